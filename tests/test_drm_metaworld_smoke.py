"""Run drm_metaworld.py as a user would (a subprocess with tiny settings on the CPU) and check what it wrote."""
import ctypes.util
import glob
import math
import os

import imageio.v3 as iio
import pytest
import torch

from test_drm_smoke import run_script, scalars, without_module

SCRIPT = "drm_metaworld.py"
TINY = ["--num-seed-frames", "400", "--batch-size", "8", "--buffer-size", "2000", "--log-every-updates", "10"]


def test_metaworld_smoke_run_writes_events_video_and_model(tmp_path):
    # 500 agent steps = 2 episodes of 250, updates from step 200, perturbations every 100 steps
    result = run_script(
        SCRIPT, "--env-id", "coffee-push", *TINY, "--total-frames", "1000", "--eval-every-frames", "100000",
        "--num-eval-episodes", "1", "--perturb-interval-steps", "100", "--capture-video", "--save-model",
        "--exp-name", "smoke", "--no-cuda", "--hidden-dim", "64", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "  nstep: 10" in result.stdout and "  gamma: 0.97" in result.stdout and "  shadow_size: 1024" in result.stdout
    assert "global_step=500, episode=1, episodic_return=" in result.stdout
    assert "Traceback" not in result.stderr

    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name.startswith("coffee-push__smoke__121__")
    logged = scalars(run_dir)
    expected = {
        "charts/episodic_return", "charts/episodic_length", "charts/success_rate", "charts/SPS",
        "losses/qf1_values", "losses/qf2_values", "losses/qf_loss", "losses/actor_loss", "losses/value_loss",
        "charts/dormant_ratio", "charts/exploration_std", "charts/lambda", "charts/perturb_factor",
        "charts/awaken_step", "eval/episodic_return", "eval/success_rate",
    }  # fmt: skip
    assert expected <= set(logged), expected - set(logged)
    assert logged["charts/episodic_length"] == [(500, 500.0), (1000, 500.0)]
    assert [step for step, _ in logged["eval/success_rate"]] == [0]
    assert [step for step, _ in logged["charts/perturb_factor"]] == [400, 600, 800]
    assert {value for _, value in logged["charts/lambda"]} == {0.5}  # constant lambda

    (video,) = glob.glob(str(tmp_path / "videos" / run_dir.name / "*.mp4"))
    frames = iio.imread(video)
    assert frames.shape[0] == 250 and frames.shape[1:3] == (256, 256) and frames.mean() > 20

    model = torch.load(run_dir / "smoke.cleanrl_model", weights_only=False)
    assert {"encoder", "actor", "critic", "critic_target", "value", "args"} <= set(model)
    assert model["critic"]["q1.2.weight"].shape == (64,)  # the LayerNorm after the first Linear
    assert model["encoder"]["convnet.0.weight"].shape == (32, 9, 3, 3)
    assert model["args"]["env_id"] == "coffee-push"


def test_metaworld_dormant_lambda_and_linear_exploration(tmp_path):
    result = run_script(
        SCRIPT, "--env-id", "reach", *TINY, "--total-frames", "600", "--num-eval-episodes", "0",
        "--lambda-schedule", "dormant", "--exploration", "linear", "--no-perturb", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    logged = scalars(run_dir)
    assert "charts/perturb_factor" not in logged and "losses/value_loss" in logged
    ratios = dict(logged["charts/dormant_ratio"])
    for frame, lam in logged["charts/lambda"]:  # drm.py's lambda, from the ratio of the same update
        assert lam == pytest.approx(0.5 / (1 + math.exp(50 * (ratios[frame] - 0.2))), rel=1e-4, abs=1e-6)


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
