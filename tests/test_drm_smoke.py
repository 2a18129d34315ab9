"""Run drm.py as a user would (a subprocess with tiny settings on the CPU) and check what it wrote."""

import ctypes.util
import glob
import os
import re

import imageio.v3 as iio
import pytest
import torch

import drm
from conftest import reference_group
from helpers import run_script, scalars

TINY = [
    "--env-id", "cartpole-balance", "--num-seed-frames", "400", "--batch-size", "8",
    "--buffer-size", "2000", "--log-every-updates", "10",
]  # fmt: skip


def run_drm(tmp_path, *flags, env=None):
    return run_script("drm.py", *flags, cwd=tmp_path, env=env)


@reference_group("drm.py")
def test_drm_run_writes_events_checkpoint_and_model_and_perturbs_in_the_loop(reference_runs):
    # the reference run (tests/conftest.py): cartpole-balance at action repeat 10, three 100-step episodes,
    # updates every 2 agent steps from step 40, perturbations every 50 agent steps, a checkpoint per episode
    runs = reference_runs("drm.py")
    result, run_dir = runs.full, runs.full_dir
    assert "  max_perturb_factor: 1.0" in result.stdout and "  learning_rate: 0.0001" in result.stdout  # presets
    assert "replay: 2,000 transitions" in result.stdout and "evaluation: in this process" in result.stdout
    # the episode line, in CleanRL's key=value style, with the share of --total-frames done and the time left
    assert re.search(
        r"^global_step=1000, episode=1, episodic_return=.*, SPS=\d+, done=33.3%, time_left=\d+:\d\d:\d\d$", result.stdout, re.M
    )
    assert "Traceback" not in result.stderr

    assert os.path.basename(run_dir).startswith("cartpole-balance__drm__1__")
    logged = scalars(run_dir)
    expected = {
        "charts/episodic_return", "charts/episodic_length", "charts/SPS", "losses/qf1_values",
        "losses/qf2_values", "losses/qf_loss", "losses/actor_loss", "losses/value_loss",
        "charts/dormant_ratio", "charts/exploration_std", "charts/lambda", "charts/perturb_factor",
        "charts/awaken_step", "eval/episodic_return", "perf/update_ms", "perf/eval_seconds", "perf/env_seconds",
        "perf/update_seconds", "perf/wall_seconds",
    }  # fmt: skip
    assert expected <= set(logged), expected - set(logged)
    assert logged["charts/episodic_length"] == [(1000, 1000.0), (2000, 1000.0), (3000, 1000.0)]
    assert [step for step, _ in logged["charts/perturb_factor"]] == [500, 1000, 1500, 2000, 2500]  # env frames
    assert all(0.2 <= factor < 1.0 for _, factor in logged["charts/perturb_factor"])
    assert [step for step, _ in logged["eval/episodic_return"]] == [0, 2000]
    assert len(logged["losses/qf_loss"]) == 26  # 130 updates (agent steps 40 to 298), one write per 5
    assert all(0.0 <= value <= 1.0 for _, value in logged["charts/dormant_ratio"])
    # where the wall time went: each episode's phases add up to less than its wall time; the first and the
    # third episode each hold an evaluation
    perf = {phase: dict(logged[f"perf/{phase}_seconds"]) for phase in ("eval", "env", "update", "wall")}
    for frame in (1000, 2000, 3000):
        assert perf["env"][frame] > 0 and perf["update"][frame] > 0 and (perf["eval"][frame] > 0) == (frame != 2000)
        assert perf["eval"][frame] + perf["env"][frame] + perf["update"][frame] < perf["wall"][frame]

    # the perturbation in the loop: the last one, at agent step 250, restarted every Adam state, so the
    # checkpoint at frame 3000 (after agent step 299) holds Adam states 25 updates old while 130 have run
    checkpoint = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=False)
    assert checkpoint["next_step"] == 300
    for name, optimizer in checkpoint["optimizers"].items():
        assert {state["step"].item() for state in optimizer["state"].values()} == {25.0}, name
    model = torch.load(os.path.join(run_dir, "drm.cleanrl_model"), weights_only=False)
    for network in ["encoder", "actor", "critic", "critic_target", "value"]:
        assert all(torch.equal(tensor, checkpoint["networks"][network][name]) for name, tensor in model[network].items())
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
    # the same weights evaluated here, on the first episode of the run's first evaluation (seed 121)
    model = torch.load(model_path, weights_only=False)
    args = drm.Args(**model["args"])
    networks = drm.make_networks((9, 84, 84), 1, args, "cpu")
    for name, network in networks._asdict().items():
        network.load_state_dict(model[name])
    env = drm.make_env("cartpole-balance", 121, action_repeat=8)
    assert printed == pytest.approx(drm.evaluate(env, networks, drm.eval_episode_seeds(121, 0, 1), "cpu"), abs=0.05)
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
