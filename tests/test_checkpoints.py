"""Checkpoints and resumption of all three scripts, run as subprocesses with tiny settings on the CPU."""
import glob
import os
import signal
import subprocess
import sys

import pytest
import torch

from test_drm_smoke import run_script, scalars

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON = ["--batch-size", "8", "--hidden-dim", "64", "--buffer-size", "2000", "--log-every-updates", "5", "--num-eval-episodes", "1", "--no-cuda"]
# per script: its task flags, episode length in env frames (checkpoints fall on episode ends)
SETUPS = {
    "drm.py": (["--env-id", "cartpole-balance", "--action-repeat", "8", "--num-seed-frames", "400"], 1000),
    "drm_adroit.py": (["--env-id", "hammer", "--action-repeat", "4", "--num-seed-frames", "100"], 200),
    "drm_metaworld.py": (["--env-id", "reach", "--action-repeat", "10", "--num-seed-frames", "400"], 500),
}


def start(tmp_path, script, *flags, env=None):
    """Like run_script, but returns the running process, for tests that watch or signal it."""
    command = [sys.executable, os.path.join(ROOT, script), *flags]
    return subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def only_run_dir(path, pattern="*"):
    (run_dir,) = glob.glob(str(path / "runs" / pattern))
    return run_dir


# torch.save of the second checkpoint writes a few bytes, then the process is SIGKILLed
KILLED_IN_THE_SECOND_CHECKPOINT_WRITE = (
    "import os, signal, runpy, sys, torch; save, calls = torch.save, []\n"
    "def dying_save(obj, file):\n"
    "    calls.append(1)\n"
    "    if len(calls) == 2:\n"
    "        file.write(b'PK\\x03\\x04 half a checkpoint'); file.flush(); os.kill(os.getpid(), signal.SIGKILL)\n"
    "    save(obj, file)\n"
    "torch.save = dying_save; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
)


@pytest.mark.parametrize("script", list(SETUPS))
def test_a_run_killed_mid_checkpoint_resumes_bit_identical_to_the_uninterrupted_one(tmp_path, script):
    flags, episode = SETUPS[script]
    flags = [*flags, *COMMON, "--eval-every-frames", str(episode), "--checkpoint-every-frames", str(episode),
             "--checkpoint-replay", "--save-model", "--total-frames", str(2 * episode), "--exp-name", "x"]  # fmt: skip
    (tmp_path / "full").mkdir(), (tmp_path / "cut").mkdir()
    full = run_script(script, *flags, cwd=tmp_path / "full")
    assert full.returncode == 0, full.stderr[-3000:]
    # the interrupted run dies while writing its second checkpoint, at the end of its second episode:
    # the first checkpoint stays complete, and the resumed run does the second episode again
    killed = run_script(script, *flags, prefix=("-c", KILLED_IN_THE_SECOND_CHECKPOINT_WRITE), cwd=tmp_path / "cut")
    assert killed.returncode == -signal.SIGKILL
    cut_dir = only_run_dir(tmp_path / "cut")
    assert os.path.exists(os.path.join(cut_dir, "checkpoint.pt.tmp"))  # the write that was cut short
    resumed = run_script(script, "--resume", cut_dir, cwd=tmp_path / "cut")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed at global_step={episode} (with the replay buffer)" in resumed.stdout
    assert "global_step=0," not in resumed.stdout  # no evaluation or seeding repeated

    full_model = torch.load(glob.glob(str(tmp_path / "full/runs/*/x.cleanrl_model"))[0], weights_only=False)
    resumed_model = torch.load(os.path.join(cut_dir, "x.cleanrl_model"), weights_only=False)
    for network in ["encoder", "actor", "critic", "critic_target", "value"]:
        for name, tensor in full_model[network].items():
            assert torch.equal(tensor, resumed_model[network][name]), f"{network}.{name}"
    # TensorBoard goes on at the same steps, with the same values: what the killed run logged after the
    # checkpoint's frame is hidden; what it logged at that very frame (the evaluation there, an update's
    # losses) stays, and the resumed run logs it again, identical
    full_logged, resumed_logged = scalars(only_run_dir(tmp_path / "full")), scalars(cut_dir)
    for tag in ["charts/episodic_return", "eval/episodic_return", "losses/qf_loss"]:
        points = resumed_logged[tag]
        assert [point for i, point in enumerate(points) if point not in points[:i]] == full_logged[tag], tag


def test_sigterm_checkpoints_at_the_episode_end_and_resume_continues(tmp_path):
    flags, episode = SETUPS["drm.py"]
    process = start(tmp_path, "drm.py", *flags, *COMMON, "--total-frames", "100000")
    for line in process.stdout:  # wait for the first episode, then ask the run to stop
        if line.startswith("global_step=1000, episode=1"):
            process.send_signal(signal.SIGTERM)
            break
    out, err = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "SIGTERM: stopping with a checkpoint at the end of this episode" in out
    assert "checkpoint: " in out and "stopped; continue with: python drm.py --resume runs/" in out
    run_dir = only_run_dir(tmp_path)
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
    flags, episode = SETUPS["drm.py"]
    result = run_script("drm.py", *flags, *COMMON, "--total-frames", str(2 * episode), "--checkpoint-every-frames",
                        str(episode), prefix=("-c", NAN_AFTER_FORTY_UPDATES), cwd=tmp_path)  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr
    # updates run every 2 agent steps from step 50 (400 seed frames / 8): the 41st is at step 130 (frame
    # 1040), whose losses are logged (130 / 2 is a multiple of 5); the checkpoint came at the episode end
    run_dir = only_run_dir(tmp_path)
    assert result.stderr.strip().splitlines()[-1] == (
        f"drm.py: losses/qf_loss is nan at global_step=1040; "
        f"resume from the checkpoint at global_step=1000: --resume {os.path.relpath(run_dir, tmp_path)}"
    )
    checkpoint_path = os.path.join(run_dir, "checkpoint.pt")
    checkpoint = torch.load(checkpoint_path, weights_only=False)
    assert checkpoint["next_step"] == 125
    assert all(torch.isfinite(t).all() for net in checkpoint["networks"].values() for t in net.values())

    # resuming with an argument that would change the run, from a truncated file or from nowhere stops too
    result = run_script("drm.py", "--resume", run_dir, "--batch-size", "16", cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "--resume continues the same run, but these arguments differ: --batch-size 16 (checkpoint: 8)" in result.stderr
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
    flags, episode = SETUPS["drm.py"]
    # a 250-slot buffer is full after 2 episodes of 126 slots; then 4 more episodes and 2 evaluations
    # one malloc arena that returns freed memory: RSS then tracks what the run holds instead of
    # wandering by +-15 MB with the allocator's per-thread arenas (render and torch threads)
    steady_malloc = {**os.environ, "MALLOC_ARENA_MAX": "1", "MALLOC_TRIM_THRESHOLD_": "65536"}
    process = start(tmp_path, "drm.py", *flags, *COMMON, "--buffer-size", "250", "--update-every-steps", "16",
                    "--total-frames", str(6 * episode), "--eval-every-frames", str(3 * episode), env=steady_malloc)  # fmt: skip
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
