"""Checkpoints and resumption of all three scripts, run as subprocesses with tiny settings on the CPU."""

import os
import signal
import sys
import uuid

import pytest
import torch

from conftest import REFERENCE_RUNS, make_reference_runs, reference_group
from helpers import ROOT, only_run_dir, processes_with, run_script, scalars, start, without_repeats

COMMON = [
    "--batch-size",
    "8",
    "--hidden-dim",
    "64",
    "--buffer-size",
    "2000",
    "--log-every-updates",
    "5",
    "--num-eval-episodes",
    "1",
    "--no-cuda",
]
DRM_TASK = ["--env-id", "cartpole-balance", "--action-repeat", "8", "--num-seed-frames", "400"]  # 1000-frame episodes


def assert_resumed_bit_identical(runs):
    """The interrupted run died while writing its second checkpoint, at the end of its second episode: the
    first checkpoint stays complete, and the resumed run does the second episode again, as the
    uninterrupted run did. It evaluated with 2 worker processes, the other runs in their own process."""
    episode = runs.episode_frames
    assert runs.killed.returncode == -signal.SIGKILL
    assert runs.leftover_workers == [], "the killed run's evaluation workers outlived it"
    assert runs.cut_write_left  # the write that was cut short
    assert runs.resumed.returncode == 0, runs.resumed.stderr[-3000:]
    assert f"resumed at global_step={episode} (with the replay buffer)" in runs.resumed.stdout
    assert "global_step=0," not in runs.resumed.stdout  # no evaluation or seeding repeated
    assert "evaluation: 2 worker processes" in runs.killed.stdout

    full_model = torch.load(os.path.join(runs.full_dir, "drm.cleanrl_model"), weights_only=False)
    resumed_model = torch.load(os.path.join(runs.cut_dir, "drm.cleanrl_model"), weights_only=False)
    for network in ["encoder", "actor", "critic", "critic_target", "value"]:
        for name, tensor in full_model[network].items():
            assert torch.equal(tensor, resumed_model[network][name]), f"{network}.{name}"
    # TensorBoard goes on at the same steps, with the same values: what the killed run logged after the
    # checkpoint's frame is hidden; what it logged at that very frame (the evaluation there, an update's
    # losses) stays, and the resumed run logs it again, identical. The evaluations in worker processes
    # return what the in-process evaluations return.
    full_logged, resumed_logged = scalars(runs.full_dir), scalars(runs.cut_dir)
    for tag in ["charts/episodic_return", "eval/episodic_return", "losses/qf_loss"]:
        assert without_repeats(resumed_logged[tag]) == full_logged[tag], tag


# each script's reference runs are made once per test process: the tests that read them share one
@pytest.mark.parametrize("script", [pytest.param(script, marks=reference_group(script)) for script in REFERENCE_RUNS])
def test_a_run_killed_mid_checkpoint_resumes_bit_identical_to_the_uninterrupted_one(reference_runs, script):
    assert_resumed_bit_identical(reference_runs(script))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_run_killed_mid_checkpoint_resumes_bit_identical_with_its_cuda_rng_and_gpu_replay(tmp_path):
    (tmp_path / "full").mkdir(), (tmp_path / "cut").mkdir()
    runs = make_reference_runs("drm.py", tmp_path / "full", tmp_path / "cut", "--cuda")
    assert "replay: 2,000 transitions, 0.0 GB on cuda" in runs.full.stdout  # the replay in GPU memory
    checkpoint = torch.load(os.path.join(runs.cut_dir, "checkpoint.pt"), weights_only=False)
    assert "cuda" in checkpoint["rng"] and checkpoint["args"]["cuda"]
    assert_resumed_bit_identical(runs)


def test_sigterm_checkpoints_at_the_episode_end_and_ends_the_workers_and_the_resume_continues(tmp_path):
    episode = 1000
    marker = str(uuid.uuid4())
    process = start("drm.py", *DRM_TASK, *COMMON, "--num-eval-episodes", "2", "--eval-workers", "2", "--total-frames", "100000",
                    cwd=tmp_path, env={**os.environ, "DRM_TEST_RUN": marker})  # fmt: skip
    for line in process.stdout:  # wait for the first episode, then ask the run to stop, twice
        if line.startswith("global_step=1000, episode=1"):
            process.send_signal(signal.SIGTERM)
        if line.startswith("SIGTERM: stopping"):
            process.send_signal(signal.SIGUSR2)
            break
    out, err = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "SIGTERM: stopping with a checkpoint at the end of this episode" in line
    assert "SIGUSR2: already stopping at the end of this episode" in out  # a repeat changes nothing
    run_dir = only_run_dir(tmp_path)
    assert "checkpoint: " in out and f"stopped; continue with: {sys.executable} {ROOT}/drm.py --resume {run_dir}" in out
    assert processes_with(marker) == []  # the evaluation workers ended with the run
    stopped_at = int(out.split("checkpoint: ")[1].split("global_step=")[1].split()[0])
    assert stopped_at in (episode, 2 * episode)  # the episode that just ended, or the one under way

    resumed = run_script("drm.py", "--resume", run_dir, "--total-frames", str(stopped_at + episode), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed at global_step={stopped_at} (WITHOUT the replay buffer)" in resumed.stdout
    episodes = [step for step, _ in scalars(run_dir)["charts/episodic_return"]]
    assert episodes == list(range(episode, stopped_at + episode + 1, episode))  # one per episode, none repeated


# mse_loss turns NaN from its 81st call on (the 41st update: two calls per critic loss)
NAN_AFTER_FORTY_UPDATES = (
    "import runpy, sys, torch, torch.nn.functional as F; mse, calls = F.mse_loss, []\n"
    "def failing_mse(*args, **kwargs):\n"
    "    calls.append(1)\n"
    "    return mse(*args, **kwargs) * (float('nan') if len(calls) > 80 else 1.0)\n"
    "F.mse_loss = failing_mse; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
)


def test_a_nonfinite_loss_stops_naming_the_checkpoint_and_unusable_resumes_stop_too(tmp_path):
    result = run_script("drm.py", *DRM_TASK, *COMMON, "--total-frames", "2000", "--checkpoint-every-frames", "1000",
                        prefix=("-c", NAN_AFTER_FORTY_UPDATES), cwd=tmp_path)  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr
    # updates run every 2 agent steps from step 50 (400 seed frames / 8): the 41st is at step 130 (frame
    # 1040), whose losses are logged (130 / 2 is a multiple of 5); the checkpoint came at the episode end
    run_dir = only_run_dir(tmp_path)
    assert result.stderr.strip().splitlines()[-1] == (
        f"drm.py: losses/qf_loss is nan at global_step=1040; "
        f"resume from the checkpoint at global_step=1000: {sys.executable} {ROOT}/drm.py --resume {run_dir}"
    )
    checkpoint_path = os.path.join(run_dir, "checkpoint.pt")
    checkpoint = torch.load(checkpoint_path, weights_only=False)
    assert checkpoint["next_step"] == 125
    assert all(torch.isfinite(t).all() for net in checkpoint["networks"].values() for t in net.values())

    # resuming with an argument that would change the run, from a truncated file or from nowhere stops too
    result = run_script("drm.py", "--resume", run_dir, "--batch-size", "16", cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "--resume continues the same run, but these arguments differ: --batch-size 16 (checkpoint: 8)" in result.stderr
    # a change of device or float precision is allowed, and said to end bit-identity
    result = run_script("drm.py", "--resume", run_dir, "--no-tf32", "--no-torch-deterministic", "--print-config", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--resume with another --tf32, --torch-deterministic: the run goes on, but no longer bit-identical" in result.stdout
    with open(checkpoint_path, "rb") as file:
        head = file.read(2000)
    with open(checkpoint_path, "wb") as file:  # truncated, as by a full disk
        file.write(head)
    result = run_script("drm.py", "--resume", run_dir, cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"drm.py: --resume: {checkpoint_path} is truncated or corrupt" in result.stderr
    result = run_script("drm.py", "--resume", str(tmp_path / "nowhere"), cwd=tmp_path)
    assert result.returncode != 0 and "no checkpoint at" in result.stderr


def test_resident_memory_stays_flat_once_the_buffer_is_full(tmp_path):
    episode = 1000
    # a 250-slot buffer is full after 2 episodes of 126 slots; then 4 more episodes and 2 evaluations
    # one malloc arena that returns freed memory: RSS then tracks what the run holds instead of
    # wandering by +-15 MB with the allocator's per-thread arenas (render and torch threads)
    steady_malloc = {**os.environ, "MALLOC_ARENA_MAX": "1", "MALLOC_TRIM_THRESHOLD_": "65536"}
    process = start("drm.py", *DRM_TASK, *COMMON, "--buffer-size", "250", "--update-every-steps", "16", "--total-frames",
                    str(6 * episode), "--eval-every-frames", str(3 * episode), cwd=tmp_path, env=steady_malloc)  # fmt: skip
    resident = {}
    for line in process.stdout:
        if ", episode=" in line:
            with open(f"/proc/{process.pid}/status") as status:
                rss_kb = next(int(field.split()[1]) for field in status if field.startswith("VmRSS:"))
            resident[int(line.split(", episode=")[1].split(",")[0])] = rss_kb
    assert process.wait(timeout=60) == 0, process.stderr.read()[-3000:]
    growth_mb = (resident[6] - resident[3]) / 1024
    assert growth_mb < 4, f"resident memory grew by {growth_mb:.1f} MB from episode 3 to 6: {resident}"


@pytest.mark.skipif(__import__("importlib").util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_track_without_wandb_prints_the_install_line(tmp_path):
    result = run_script("drm.py", "--env-id", "cartpole-balance", "--track", cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "drm.py: --track needs Weights & Biases: pip install wandb" in result.stderr
    assert not (tmp_path / "runs").exists()
