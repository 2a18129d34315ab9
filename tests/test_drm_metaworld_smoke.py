"""Run drm_metaworld.py as a user would (a subprocess with tiny settings on the CPU) and check what it wrote."""

import ctypes.util
import glob
import math
import os
import re

import imageio.v3 as iio
import pytest
import torch

from conftest import reference_group
from helpers import run_script, scalars, without_module

SCRIPT = "drm_metaworld.py"


@reference_group(SCRIPT)
def test_metaworld_run_writes_events_videos_and_model(reference_runs):
    # the reference run (tests/conftest.py): reach at action repeat 20, two 25-step episodes, updates
    # every 2 agent steps from step 20, perturbations every 10 agent steps, an evaluation at frame 0
    runs = reference_runs(SCRIPT)
    result, run_dir = runs.full, runs.full_dir
    assert "  nstep: 10" in result.stdout and "  gamma: 0.97" in result.stdout and "  shadow_size: 1024" in result.stdout
    # the episode line, in CleanRL's key=value style, with the share of --total-frames done and the time left
    assert re.search(r"^global_step=500, episode=1, episodic_return=.*, SPS=\d+, done=50.0%, time_left=\d+:\d\d:\d\d$", result.stdout, re.M)
    assert "Traceback" not in result.stderr

    assert os.path.basename(run_dir).startswith("reach__drm__1__")
    logged = scalars(run_dir)
    expected = {
        "charts/episodic_return", "charts/episodic_length", "charts/success_rate", "charts/SPS",
        "losses/qf1_values", "losses/qf2_values", "losses/qf_loss", "losses/actor_loss", "losses/value_loss",
        "charts/dormant_ratio", "charts/exploration_std", "charts/lambda", "charts/perturb_factor",
        "charts/awaken_step", "eval/episodic_return", "eval/success_rate", "perf/eval_seconds", "perf/wall_seconds",
    }  # fmt: skip
    assert expected <= set(logged), expected - set(logged)
    assert logged["charts/episodic_length"] == [(500, 500.0), (1000, 500.0)]
    assert [step for step, _ in logged["eval/success_rate"]] == [0]
    assert [step for step, _ in logged["charts/perturb_factor"]] == [400, 600, 800]  # agent steps 20, 30 and 40
    assert {value for _, value in logged["charts/lambda"]} == {0.5}  # constant lambda

    # the video of evaluation 0, written by an evaluation worker of the killed run
    videos = sorted(glob.glob(os.path.join(os.path.dirname(os.path.dirname(runs.cut_dir)), "videos", "*", "*.mp4")))
    assert [os.path.basename(video) for video in videos] == ["0.mp4"]
    for video in videos:
        frames = iio.imread(video)
        assert frames.shape[0] == 25 and frames.shape[1:3] == (256, 256) and frames.mean() > 20

    model = torch.load(os.path.join(run_dir, "drm.cleanrl_model"), weights_only=False)
    assert {"encoder", "actor", "critic", "critic_target", "value", "args"} <= set(model)
    assert model["critic"]["q1.2.weight"].shape == (64,)  # the LayerNorm after the first Linear
    assert model["encoder"]["convnet.0.weight"].shape == (32, 9, 3, 3)
    assert model["args"]["env_id"] == "reach"


def test_metaworld_dormant_lambda_and_logging_that_does_not_change_the_run(tmp_path):
    # action repeat 10: 40 agent steps, 20 of seeding, 10 updates; the two runs differ only in how often
    # they log: at updates 12 and 16 (agent steps / 2), or at 10, 12, 14, 16 and 18
    logged = {}
    for every in (4, 2):
        result = run_script(
            SCRIPT, "--env-id", "reach", "--batch-size", "8", "--buffer-size", "2000", "--action-repeat", "10",
            "--num-seed-frames", "200", "--total-frames", "400", "--num-eval-episodes", "0",
            "--lambda-schedule", "dormant", "--exploration", "linear", "--no-perturb", "--log-every-updates", str(every),
            "--exp-name", f"every{every}", cwd=tmp_path,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        (run_dir,) = (tmp_path / "runs").glob(f"*every{every}*")
        logged[every] = scalars(run_dir)
    ratios = dict(logged[2]["charts/dormant_ratio"])
    for frame, lam in logged[2]["charts/lambda"]:  # drm.py's lambda, from the ratio of the same update
        assert lam == pytest.approx(0.5 / (1 + math.exp(50 * (ratios[frame] - 0.2))), rel=1e-4, abs=1e-6)
    # the critic's dormant ratio is measured without dropout, so logging more often draws no extra
    # random numbers: the losses at the frames both runs logged are the same
    often = dict(logged[2]["losses/qf_loss"])
    shared = [(frame, loss) for frame, loss in logged[4]["losses/qf_loss"] if frame in often]
    assert [frame for frame, _ in shared] == [240, 320] and all(often[frame] == loss for frame, loss in shared)
    assert "charts/perturb_factor" not in logged[2] and "losses/value_loss" in logged[2]


def test_metaworld_bad_input_stops_before_any_work(tmp_path):
    result = run_script(SCRIPT, "--env-id", "coffee-pushh", cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "unknown env id 'coffee-pushh'; did you mean coffee-push" in result.stderr
    # metaworld made unimportable: the install line, no traceback
    result = run_script(SCRIPT, "--env-id", "coffee-push", prefix=without_module("metaworld"), cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "pip install metaworld==3.1.1" in result.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.skipif(ctypes.util.find_library("OSMesa") is not None, reason="OSMesa is installed here")
def test_metaworld_missing_rendering_backend_prints_the_apt_line(tmp_path):
    result = run_script(SCRIPT, "--env-id", "coffee-push", env={**os.environ, "MUJOCO_GL": "osmesa"}, cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "apt-get install -y --no-install-recommends libegl1 libopengl0 libgl1-mesa-dri" in result.stderr
