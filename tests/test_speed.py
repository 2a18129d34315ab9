"""The fast paths: benchmark/speed.py run as a user would, and what it measured. On the CPU it runs
env-only, eager and --compile with tiny settings; on a GPU (skipped here) the CUDA graph modes too.
Every mode trains from the same seed, so the fast paths must log eager's losses; every training mode
evaluates, so its full-loop rate and its evaluation share are measured beside its training-only rate."""

import json

import pytest
import torch

from helpers import run_script

# one 1000-frame episode of seeding, one measured (from its start to its end, with the evaluation at frame
# 1000), no warm-up
TINY = ["--seed-frames", "1000", "--warmup-frames", "0", "--measure-frames", "1000"]
TINY_SCRIPT = ["--", "--action-repeat", "8", "--batch-size", "8", "--hidden-dim", "32", "--feature-dim", "16", "--buffer-size", "4000",
               "--eval-every-frames", "1000", "--num-eval-episodes", "2"]  # fmt: skip


def run_speed(tmp_path, *flags):
    result = run_script("benchmark/speed.py", "--env-id", "cartpole-balance", *TINY, "--output", str(tmp_path), *flags, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "speed.json") as file:
        return result.stdout, json.load(file)["results"]


def test_speed_on_the_cpu_measures_every_mode_and_compile_learns_like_eager(tmp_path):
    table, results = run_speed(tmp_path, "--no-cuda", "--eval-workers", "1", *TINY_SCRIPT)
    eager, compiled = "eager, 1 eval worker", "compile, 1 eval worker"
    assert list(results) == ["env-only", eager, compiled]
    for mode, result in results.items():
        assert result["frames_per_second"] > 0, mode
    for mode in (eager, compiled):  # the evaluation at frame 1000 took its share of the measured wall time
        assert 0 < results[mode]["eval_share"] < 1 and results[mode]["training_frames_per_second"] > results[mode]["frames_per_second"]
        assert results[mode]["update_ms"] > 0
    assert results[compiled]["qf_loss_difference"] < 1e-3  # the 6 logged losses of 62 updates
    assert "| env-only |" in table and f"| {compiled} |" in table and "no GPU" in table
    assert f"\n{eager}: " in table and " ms per update\n" in table  # each mode is reported when its run ends


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_speed_on_the_gpu_and_every_fast_path_learns_like_eager(tmp_path):
    _, results = run_speed(tmp_path, *TINY_SCRIPT)
    assert list(results) == ["env-only", "eager", "compile", "cudagraphs", "compile+cudagraphs"]
    for mode in ["compile", "cudagraphs", "compile+cudagraphs"]:
        assert results[mode]["qf_loss_difference"] < 1e-3, mode


def test_cudagraphs_without_a_gpu_stops_with_a_reason(tmp_path):
    result = run_script("drm.py", "--env-id", "cartpole-balance", "--cudagraphs", "--no-cuda", cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "drm.py: --cudagraphs needs a CUDA GPU and --cuda" in result.stderr
    assert not (tmp_path / "runs").exists()
    result = run_script("benchmark/speed.py", "--no-cuda", "--modes", "eager", "cudagraphs", cwd=tmp_path)
    assert result.returncode != 0 and "speed.py: cudagraphs needs a CUDA GPU" in result.stderr
