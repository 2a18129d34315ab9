"""Run drm.py as a user would (a subprocess with tiny settings on the CPU) and check what it wrote."""
import ctypes.util
import glob
import math
import os
import subprocess
import sys

import imageio.v3 as iio
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import drm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "--env-id", "cartpole-balance", "--num-seed-frames", "400", "--batch-size", "8",
    "--buffer-size", "2000", "--log-every-updates", "10",
]  # fmt: skip


def run_script(script, *flags, cwd=None, env=None, prefix=()):
    """Run a script of the repository (its path from the root) in a subprocess, as a user would."""
    return subprocess.run(
        [sys.executable, *prefix, os.path.join(ROOT, script), *flags],
        cwd=cwd, capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip


def without_module(name):
    """A `python -c` prefix that runs the script with the module `name` unimportable."""
    return ("-c", f"import runpy, sys; sys.modules[{name!r}] = None; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")


def run_drm(tmp_path, *flags, env=None):
    return run_script("drm.py", *flags, cwd=tmp_path, env=env)


def scalars(run_dir):
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_drm_smoke_run_writes_events_checkpoint_and_model_and_perturbs_in_the_loop(tmp_path):
    # action repeat 4: 300 agent steps, one full 250-step episode, updates from step 100, perturbations
    # every 50 steps
    result = run_drm(
        tmp_path, *TINY, "--action-repeat", "4", "--total-frames", "1200", "--eval-every-frames", "100000",
        "--num-eval-episodes", "1", "--perturb-interval-steps", "50", "--save-model", "--exp-name", "smoke", "--no-cuda",
        "--hidden-dim", "64", "--checkpoint-every-frames", "1000",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "  max_perturb_factor: 1.0" in result.stdout and "  learning_rate: 0.0001" in result.stdout  # presets
    assert "replay: 2,000 transitions" in result.stdout
    assert "global_step=1000, episode=1, episodic_return=" in result.stdout

    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name.startswith("cartpole-balance__smoke__121__")
    logged = scalars(run_dir)
    expected = {
        "charts/episodic_return", "charts/episodic_length", "charts/SPS", "losses/qf1_values",
        "losses/qf2_values", "losses/qf_loss", "losses/actor_loss", "losses/value_loss",
        "charts/dormant_ratio", "charts/exploration_std", "charts/lambda", "charts/perturb_factor",
        "charts/awaken_step", "eval/episodic_return", "perf/update_ms",
    }  # fmt: skip
    assert expected <= set(logged), expected - set(logged)
    assert logged["charts/episodic_length"] == [(1000, 1000.0)]
    assert [step for step, _ in logged["charts/perturb_factor"]] == [400, 600, 800, 1000]  # env frames
    assert [step for step, _ in logged["eval/episodic_return"]] == [0]
    assert len(logged["losses/qf_loss"]) == 100 // 10  # 100 updates, one write per 10
    assert all(0.0 <= value <= 1.0 for _, value in logged["charts/dormant_ratio"])

    # the perturbation in the loop: the checkpoint at frame 1000 (after agent step 249) has Adam states
    # restarted at step 200, so 25 steps old while 75 updates have run; then step 250 perturbs again
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    for name, optimizer in checkpoint["optimizers"].items():
        assert {state["step"].item() for state in optimizer["state"].values()} == {25.0}, name
    model = torch.load(run_dir / "smoke.cleanrl_model", weights_only=False)
    factor = dict(logged["charts/perturb_factor"])[1000]
    moved = (model["actor"]["policy.2.weight"] - checkpoint["networks"]["actor"]["policy.2.weight"]).norm()
    # the blend with a fresh orthogonal draw moves a 64x64 weight by about (1 - factor) * |W_old - W_fresh|
    # = (1 - factor) * 8 * sqrt(2); 25 Adam steps of lr 1e-4 move it by about 25 * 3e-4 * 64 = 0.5 at most
    assert factor < 0.5 and moved > 0.75 * (1 - factor) * 8 * math.sqrt(2)

    assert model["actor"]["trunk.0.weight"].shape == (50, 32 * 35 * 35)
    assert model["critic"]["q1.4.weight"].shape == (1, 64)
    assert model["args"]["env_id"] == "cartpole-balance" and model["args"]["max_perturb_factor"] == 1.0


def test_drm_with_all_mechanisms_off_is_drqv2_with_a_video_and_a_saved_model_that_evaluates(tmp_path):
    # action repeat 8: one 125-step episode, updates from step 50
    result = run_drm(
        tmp_path, *TINY, "--action-repeat", "8", "--total-frames", "1000", "--num-eval-episodes", "1",
        "--eval-every-frames", "100000", "--capture-video", "--no-perturb", "--exploration", "linear", "--no-exploit",
        "--cuda", "--save-model", "--exp-name", "drqv2",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    if not torch.cuda.is_available():
        assert "--cuda: no CUDA device is available, running on the CPU\n" in result.stdout
    (run_dir,) = (tmp_path / "runs").iterdir()
    logged = scalars(run_dir)
    assert "losses/value_loss" not in logged and "charts/perturb_factor" not in logged
    assert {value for _, value in logged["charts/lambda"]} == {0.0}
    assert {value for _, value in logged["charts/awaken_step"]} == {-1.0}
    # DrQ-v2's schedule: linear(1.0, 0.1, 500000) of the agent step, from step 0
    assert len(logged["charts/exploration_std"]) == 4  # updates 30, 40, 50, 60 of agent steps / 2
    for frame, std in logged["charts/exploration_std"]:
        assert std == pytest.approx(1.0 - 0.9 * (frame // 8) / 500_000, abs=1e-6)

    # the evaluation at frame 0 streamed its first episode into a video
    (video,) = glob.glob(str(tmp_path / "videos" / run_dir.name / "*.mp4"))
    frames = iio.imread(video)
    assert video.endswith("/0.mp4") and frames.shape[0] == 125 and frames.shape[1:3] == (256, 256) and frames.mean() > 10

    model_path = str(run_dir / "drqv2.cleanrl_model")
    evaluated = run_drm(tmp_path, "--eval-model", model_path, "--num-eval-episodes", "1", "--capture-video", "--no-cuda")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    printed = float(evaluated.stdout.split("eval/episodic_return=")[1].split()[0])
    # the same weights evaluated here, on the run's eval env (seed 121)
    model = torch.load(model_path, weights_only=False)
    args = drm.Args(**model["args"])
    networks = drm.make_networks((9, 84, 84), 1, args, "cpu")
    for name, network in networks._asdict().items():
        network.load_state_dict(model[name])
    env = drm.make_env("cartpole-balance", 121, action_repeat=8)
    assert printed == pytest.approx(drm.evaluate(env, networks, 1, "cpu"), abs=0.05)
    (video,) = glob.glob(str(tmp_path / "videos" / f"{run_dir.name}-eval" / "*.mp4"))
    assert iio.imread(video).shape[0] == 125


def test_bad_input_stops_before_any_work_and_print_config_builds_nothing(tmp_path):
    result = run_drm(tmp_path, "--env-id", "walker-wlak")
    assert result.returncode != 0
    assert "unknown env id 'walker-wlak'; did you mean walker-walk" in result.stderr
    result = run_drm(tmp_path, "--env-id", "walker-walk", "--action-repeat", "0")
    assert result.returncode != 0 and "drm.py: --action-repeat must be positive (got 0)" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "runs").exists()
    result = run_drm(tmp_path, "--env-id", "dog-run", "--print-config")
    assert result.returncode == 0 and "  feature_dim: 100" in result.stdout and "  total_frames: 30100000" in result.stdout
    assert not (tmp_path / "runs").exists() and not any(line.startswith("replay:") for line in result.stdout.splitlines())


@pytest.mark.skipif(ctypes.util.find_library("OSMesa") is not None, reason="OSMesa is installed here")
def test_missing_rendering_backend_prints_the_apt_line(tmp_path):
    result = run_drm(tmp_path, "--env-id", "walker-walk", env={**os.environ, "MUJOCO_GL": "osmesa"})
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "apt-get install -y --no-install-recommends libegl1 libopengl0 libgl1-mesa-dri" in result.stderr
