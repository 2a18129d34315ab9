"""Run drm_adroit.py as a user would (a subprocess with tiny settings on the CPU) and check what it wrote."""

import ctypes.util
import glob
import os
import re

import imageio.v3 as iio
import pytest
import torch

from conftest import reference_group
from helpers import run_script, scalars, without_module

SCRIPT = "drm_adroit.py"
TINY = ["--num-seed-frames", "400", "--batch-size", "8", "--buffer-size", "2000", "--log-every-updates", "10"]


@reference_group(SCRIPT)
def test_adroit_run_writes_events_videos_and_a_model_that_evaluates(reference_runs, tmp_path):
    # the reference run (tests/conftest.py): hammer at action repeat 10, three 20-step episodes, updates
    # every 2 agent steps from step 10, perturbations every 20 agent steps, evaluations at frames 0 and 400
    runs = reference_runs(SCRIPT)
    result, run_dir = runs.full, runs.full_dir
    assert "  expectile: 0.7" in result.stdout and "  max_perturb_factor: 0.9" in result.stdout
    # the episode line, in CleanRL's key=value style, with the share of --total-frames done and the time left
    assert re.search(r"^global_step=200, episode=1, episodic_return=.*, SPS=\d+, done=33.3%, time_left=\d+:\d\d:\d\d$", result.stdout, re.M)
    assert "Traceback" not in result.stderr

    assert os.path.basename(run_dir).startswith("hammer__drm__1__")
    logged = scalars(run_dir)
    expected = {
        "charts/episodic_return", "charts/episodic_length", "charts/success_rate", "charts/SPS",
        "losses/qf1_values", "losses/qf2_values", "losses/qf_loss", "losses/actor_loss", "losses/value_loss",
        "charts/dormant_ratio", "charts/exploration_std", "charts/lambda", "charts/perturb_factor",
        "charts/awaken_step", "eval/episodic_return", "eval/success_rate", "perf/eval_seconds", "perf/wall_seconds",
    }  # fmt: skip
    assert expected <= set(logged), expected - set(logged)
    assert logged["charts/episodic_length"] == [(200, 200.0), (400, 200.0), (600, 200.0)]  # env frames
    assert [value for _, value in logged["charts/success_rate"]] == [0.0, 0.0, 0.0]  # random hammering
    assert [step for step, _ in logged["eval/success_rate"]] == [0, 400]
    assert [step for step, _ in logged["charts/perturb_factor"]] == [200, 400]  # agent steps 20 and 40
    assert len(logged["losses/qf_loss"]) == 5  # 25 updates, written at agent steps 10, 20, ..., 50

    # the videos of evaluations 0 and 1: by an evaluation worker of the killed run, and by the resumed run
    videos = sorted(glob.glob(os.path.join(os.path.dirname(os.path.dirname(runs.cut_dir)), "videos", "*", "*.mp4")))
    assert [os.path.basename(video) for video in videos] == ["0.mp4", "400.mp4"]
    for video in videos:
        frames = iio.imread(video)
        assert frames.shape[0] == 20 and frames.shape[1:3] == (256, 256) and frames.mean() > 20

    model = torch.load(os.path.join(run_dir, "drm.cleanrl_model"), weights_only=False)
    assert {"encoder", "actor", "critic", "critic_target", "value", "args"} <= set(model)
    assert model["actor"]["state_fusion.state_mlp.0.weight"].shape == (64, 24)
    assert model["critic"]["state_fusion.fusion.2.weight"].shape == (50, 64)
    assert model["encoder"]["convnet.0.weight"].shape == (32, 3, 3, 3)  # one frame
    assert model["args"]["env_id"] == "hammer"
    evaluated = run_script(SCRIPT, "--eval-model", os.path.join(run_dir, "drm.cleanrl_model"), "--num-eval-episodes", "1",
                           "--no-cuda", cwd=tmp_path)  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "eval/episodic_return=" in evaluated.stdout and "eval/success_rate=0.00 over 1 episodes" in evaluated.stdout


def test_adroit_pen_drqv2_mode(tmp_path):
    result = run_script(
        SCRIPT, "--env-id", "pen", *TINY, "--action-repeat", "4", "--total-frames", "500", "--num-eval-episodes", "1",
        "--no-perturb", "--exploration", "linear", "--no-exploit", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    logged = scalars(run_dir)
    assert "losses/value_loss" not in logged and "charts/perturb_factor" not in logged
    assert {value for _, value in logged["charts/lambda"]} == {0.0}
    assert all(length <= 100 for _, length in logged["charts/episodic_length"])  # pen: 100 env steps at most


def test_adroit_bad_input_stops_before_any_work(tmp_path):
    result = run_script(SCRIPT, "--env-id", "kettle", cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "unknown env id 'kettle'; valid ids: door, hammer, pen, relocate" in result.stderr
    # gymnasium-robotics made unimportable: the install line, no traceback
    result = run_script(SCRIPT, "--env-id", "door", prefix=without_module("gymnasium_robotics"), cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "pip install gymnasium-robotics==1.4.2" in result.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.skipif(ctypes.util.find_library("OSMesa") is not None, reason="OSMesa is installed here")
def test_adroit_missing_rendering_backend_prints_the_apt_line(tmp_path):
    result = run_script(SCRIPT, "--env-id", "door", env={**os.environ, "MUJOCO_GL": "osmesa"}, cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "apt-get install -y --no-install-recommends libegl1 libopengl0 libgl1-mesa-dri" in result.stderr
