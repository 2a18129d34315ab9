"""Checkpoints and resumption of all three scripts, run as subprocesses with tiny settings on the CPU."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import types
import uuid

import pytest
import torch

import drm
import drm_adroit
import drm_metaworld
from conftest import REFERENCE_RUNS, make_reference_runs, reference_group
from helpers import ROOT, memory_cgroup, only_run_dir, processes_with, run_script, scalars, small_filesystem, start, without_repeats

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
REFERENCE_RUNS_ACTION_REPEAT = {script: int(flags[flags.index("--action-repeat") + 1]) for script, (_, flags, _) in REFERENCE_RUNS.items()}
DRM_TASK = ["--env-id", "cartpole-balance", "--action-repeat", "8", "--num-seed-frames", "400"]  # 1000-frame episodes


def assert_resumed_bit_identical(runs, script):
    """The interrupted run died while writing its second checkpoint, at the end of its second episode: the
    first checkpoint stays complete, and the resumed run does the second episode again, as the
    uninterrupted run did. It evaluated with 2 worker processes, the other runs in their own process."""
    episode = runs.episode_frames
    assert runs.killed.returncode == -signal.SIGKILL
    assert runs.leftover_workers == [], "the killed run's evaluation workers outlived it"
    # the write that was cut short: the new replay file is complete, checkpoint.pt's temporary file is not; the
    # resumed run removes both, and keeps the replay file that its checkpoint names
    steps = episode // REFERENCE_RUNS_ACTION_REPEAT[script]
    (cut_short,) = [name for name in runs.cut_write_left if name.endswith(".tmp")]
    replay_files = {int(name.split("-")[1]): name for name in runs.cut_write_left if name.endswith(".bin")}  # by agent step
    assert cut_short.startswith("checkpoint.pt.") and sorted(replay_files) == [steps, 2 * steps]
    orphan = replay_files[2 * steps]
    assert f"removed what an interrupted checkpoint write left: {cut_short}, {orphan}\n" in runs.resumed.stdout
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
    # both attempts of the interrupted run went to one W&B run, whose id its run directory keeps; the other run has its own
    cut_calls = [json.loads(line) for line in open(os.path.join(runs.cut_dir, "..", "..", "wandb-calls.jsonl"))]
    (full_call,) = [json.loads(line) for line in open(os.path.join(runs.full_dir, "..", "..", "wandb-calls.jsonl"))]
    wandb_id = json.loads(open(os.path.join(runs.cut_dir, "run.json")).read())["wandb_id"]
    assert [(call["id"], call["resume"]) for call in cut_calls] == [(wandb_id, "allow")] * 2 and full_call["id"] != wandb_id
    assert json.loads(open(os.path.join(runs.cut_dir, "run.json")).read())["attempts"] == 2


# each script's reference runs are made once per test process: the tests that read them share one
@pytest.mark.parametrize("script", [pytest.param(script, marks=reference_group(script)) for script in REFERENCE_RUNS])
def test_a_run_killed_mid_checkpoint_resumes_bit_identical_to_the_uninterrupted_one(reference_runs, script):
    assert_resumed_bit_identical(reference_runs(script), script)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_run_killed_mid_checkpoint_resumes_bit_identical_with_its_cuda_rng_and_gpu_replay(tmp_path):
    (tmp_path / "full").mkdir(), (tmp_path / "cut").mkdir()
    runs = make_reference_runs("drm.py", tmp_path / "full", tmp_path / "cut", "--cuda")
    assert "replay: 2,000 transitions, 0.0 GB on cuda" in runs.full.stdout  # the replay in GPU memory
    checkpoint = torch.load(os.path.join(runs.cut_dir, "checkpoint.pt"), weights_only=False)
    assert "cuda" in checkpoint["rng"] and checkpoint["args"]["cuda"]
    assert_resumed_bit_identical(runs, "drm.py")


def test_sigterm_checkpoints_at_the_episode_end_ends_the_workers_and_a_second_process_and_resume_without_replay_seeds_again(tmp_path):
    episode = 1000
    marker = str(uuid.uuid4())
    process = start("drm.py", *DRM_TASK, *COMMON, "--num-eval-episodes", "2", "--eval-workers", "2", "--total-frames", "100000",
                    "--checkpoint-every-frames", "1000", "--perturb-interval-steps", "35", cwd=tmp_path,
                    env={**os.environ, "DRM_TEST_RUN": marker})  # fmt: skip
    for line in process.stdout:  # after the first checkpoint, a second process on the run; then ask the run to stop, twice
        if line.startswith("checkpoint: "):
            run_dir = only_run_dir(tmp_path)
            second = run_script("drm.py", "--resume", run_dir, cwd=tmp_path)
            process.send_signal(signal.SIGTERM)
        if line.startswith("SIGTERM: stopping"):
            process.send_signal(signal.SIGUSR2)
            break
    out, err = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "SIGTERM: stopping with a checkpoint at the end of this episode" in line
    assert "SIGUSR2: already stopping at the end of this episode" in out  # a repeat changes nothing
    assert f"stopped; continue with: {sys.executable} {ROOT}/drm.py --resume {os.path.abspath(run_dir)}" in out
    assert processes_with(marker) == []  # the evaluation workers ended with the run
    # the second process stopped at once, in one line naming the one that holds the run
    assert second.returncode == 1 and len(second.stderr.strip().splitlines()) == 1
    assert second.stderr.startswith(f"drm.py: {os.path.abspath(run_dir)} is in use by pid {process.pid} on {socket.gethostname()}")
    assert "resolved arguments" not in second.stdout  # it read nothing of the run
    stopped_at = int(out.split("checkpoint: ")[-1].split("global_step=")[1].split()[0])
    assert stopped_at in (2 * episode, 3 * episode)  # the episode under way, or the one after

    resumed = run_script("drm.py", "--resume", run_dir, "--total-frames", str(stopped_at + episode), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed at global_step={stopped_at} (WITHOUT the replay buffer)" in resumed.stdout
    logged = scalars(run_dir)
    assert [step for step, _ in logged["charts/episodic_return"]] == list(range(episode, stopped_at + episode + 1, episode))
    # without its replay the run seeds again (400 frames, 50 agent steps) before its first update, which makes the
    # perturbation due meanwhile (every 35 agent steps: at agent step 280 if it stopped at frame 2,000, 420 at 3,000)
    assert "seeding the empty replay again: 400 frames of random actions before the first update" in resumed.stdout
    first_update = (stopped_at // 8 + 50 + 1) // 2 * 2 * 8  # the first even agent step from there on, in frames
    assert min(step for step, _ in logged["losses/qf_loss"] if step > stopped_at) >= first_update
    assert min(step for step, _ in logged["charts/perturb_factor"] if step > stopped_at) == first_update


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


# ---------------------------------------------------------------------------------------------------
# A long run on shared machines: memory, disks, locks and trackers
# ---------------------------------------------------------------------------------------------------
STAND_IN_ENV = types.SimpleNamespace(rng_state=lambda: None, set_rng_state=lambda state: None)


def filled_replay(script, capacity, rows, device="cpu"):
    """A replay buffer of `script` with its first `rows` slots written (frame k shows the value k % 251)."""
    extra = (script.STATE_DIM,) if script is drm_adroit else ()
    rb = script.ReplayBuffer(capacity, (3, 84, 84), *extra, 6, 3, 3, 0.99, device)
    generator = torch.Generator().manual_seed(0)
    for field in script.REPLAY_FIELDS:
        tensor = getattr(rb, field)
        if field == "frames":
            tensor[:rows] = (torch.arange(rows) % 251).to(torch.uint8).view(-1, 1, 1, 1).to(device)
        else:
            tensor[:rows] = torch.randint(0, 100, tensor[:rows].shape, generator=generator).to(tensor.dtype).to(device)
    rb.pos, rb.size, rb.episode_step, rb.ready = rows % capacity, rows, 7, True
    return rb


def checkpoint_of(script, rb, device="cpu"):
    """(the state `run_state` checkpoints at agent step 3 with `rb`, its networks, its optimizers): tiny networks"""
    args = script.Args(checkpoint_replay=True, feature_dim=4, hidden_dim=8)
    networks = script.make_networks((9, 84, 84), 6, args, device)
    optimizers = script.make_optimizers(networks, 1e-4)
    successes = [] if script is drm else [[True, False]]
    state = script.run_state(args, 3, 1, networks, optimizers, torch.tensor(0.5), torch.tensor(-1), *successes, STAND_IN_ENV, rb,
                             torch.device(device))  # fmt: skip
    return state, networks, optimizers


def restore(script, path, networks, optimizers, rb):
    checkpoint = script.load_checkpoint(path)
    successes = [] if script is drm else [[]]
    script.restore_run_state(checkpoint, networks, optimizers, torch.tensor(0.0), torch.tensor(0), *successes, STAND_IN_ENV, rb,
                             rb.device)  # fmt: skip


def resident_peak_growth_mb(action):
    """Run `action`; how far this process's resident memory peaked above where it was, in MB."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # the peak (VmHWM) starts again from the resident size now

    def status(field):
        with open("/proc/self/status") as lines:
            return next(int(line.split()[1]) for line in lines if line.startswith(field))

    before = status("VmRSS:")
    action()
    return (status("VmHWM:") - before) / 1024


@pytest.mark.parametrize(
    "device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))]
)
def test_a_checkpoint_write_and_load_never_copy_the_replay(tmp_path, device):
    # 20,000 of 40,000 slots filled: 0.42 GB; a copy of it, in host or GPU memory, would show
    rb = filled_replay(drm, 40_000, 20_000, device)
    state, networks, optimizers = checkpoint_of(drm, rb, device)
    filled = state["replay"]["nbytes"] / 1024**2
    assert filled > 400
    on_gpu = device == "cuda"
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
        allocated = torch.cuda.memory_allocated()
    # one 64 MB piece at a time, from the buffer itself or through one host piece
    assert resident_peak_growth_mb(lambda: drm.save_checkpoint(state, str(tmp_path), rb)) < 100
    assert not on_gpu or torch.cuda.max_memory_allocated() == allocated
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt", f"replay-3-{socket.gethostname()}-{os.getpid()}.bin"]

    restored = drm.ReplayBuffer(40_000, (3, 84, 84), 6, 3, 3, 0.99, device)  # not yet committed: torch.empty
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
        allocated = torch.cuda.memory_allocated()
    # in host memory the buffer's own pages, as the load fills them, and no more
    growth = resident_peak_growth_mb(lambda: restore(drm, str(tmp_path / "checkpoint.pt"), networks, optimizers, restored))
    assert growth < (0 if on_gpu else filled) + 100
    assert not on_gpu or torch.cuda.max_memory_allocated() == allocated
    for field in drm.REPLAY_FIELDS:
        assert torch.equal(getattr(restored, field)[:20_000], getattr(rb, field)[:20_000]), field
    assert (restored.pos, restored.size, restored.episode_step, restored.ready) == (20_000, 20_000, 7, True)


@pytest.mark.parametrize("script", [drm, drm_adroit, drm_metaworld], ids=lambda script: script.__name__)
def test_every_replay_field_comes_back_from_a_checkpoint_and_a_cut_replay_file_stops_the_resume(script, tmp_path):
    rb = filled_replay(script, 50, 50)  # full
    state, networks, optimizers = checkpoint_of(script, rb)
    script.save_checkpoint(state, str(tmp_path), rb)
    restored = filled_replay(script, 50, 1)
    restore(script, str(tmp_path / "checkpoint.pt"), networks, optimizers, restored)
    for field in script.REPLAY_FIELDS:
        assert torch.equal(getattr(restored, field), getattr(rb, field)), field
    # a checkpoint as the scripts wrote them before the replay had a file of its own, the replay inside it, resumes too
    earlier = {"pos": rb.pos, "size": rb.size, "episode_step": rb.episode_step, "ready": rb.ready}
    earlier |= {field: getattr(rb, field).clone() for field in script.REPLAY_FIELDS}
    torch.save(state | {"replay": earlier}, tmp_path / "earlier.pt")
    restored = filled_replay(script, 50, 1)
    restore(script, str(tmp_path / "earlier.pt"), networks, optimizers, restored)
    assert all(torch.equal(getattr(restored, field), getattr(rb, field)) for field in script.REPLAY_FIELDS)

    (replay_file,) = tmp_path.glob("replay-*.bin")
    with open(replay_file, "r+b") as file:
        file.truncate(1000)
    with pytest.raises(SystemExit) as stop:
        script.load_checkpoint(str(tmp_path / "checkpoint.pt"))
    assert str(stop.value) == (
        f"{script.__name__}.py: --resume: the checkpoint's replay file {replay_file} is 1,000 of its {state['replay']['nbytes']:,} "
        "bytes; resume from another copy or start a new run"
    )


SMALL_RUN = ["--env-id", "cartpole-balance", "--action-repeat", "10", "--num-seed-frames", "400", "--eval-every-frames", "100000",
             "--num-eval-episodes", "1", "--batch-size", "8", "--hidden-dim", "32", "--feature-dim", "4", "--buffer-size", "2000",
             "--log-every-updates", "5", "--no-cuda", "--eval-workers", "1"]  # fmt: skip


def fill_up(directory, leave=500_000):
    """Take all the free space of `directory`'s filesystem but `leave` bytes, as a full quota or disk does."""
    free = os.statvfs(directory).f_bavail * os.statvfs(directory).f_frsize
    with open(os.path.join(directory, "filler"), "wb") as filler:
        os.posix_fallocate(filler.fileno(), 0, free - leave)


def test_a_checkpoint_that_cannot_be_written_keeps_the_last_one_and_the_run_goes_on_or_stops_as_stopped(tmp_path):
    # checkpoints of 7 MB on a 64 MB filesystem, which fills up after the first, is freed, and fills up again
    disk = tmp_path / "disk"
    with small_filesystem(disk, "64m"):
        process = start("drm.py", *SMALL_RUN, "--total-frames", "8000", "--checkpoint-every-frames", "1000", "--checkpoint-replay",
                        cwd=disk)  # fmt: skip
        lines = []
        for line in process.stdout:
            lines.append(line.rstrip("\n"))
            if line.startswith("checkpoint: ") and line.endswith("at global_step=1000\n"):
                fill_up(disk)
            elif line.startswith("checkpoint at global_step=2000 not written"):
                os.remove(disk / "filler")  # someone frees space
            elif line.startswith("checkpoint: ") and line.endswith("at global_step=3000\n"):
                fill_up(disk)
            elif line.startswith("global_step=4000, episode=4"):
                process.send_signal(signal.SIGTERM)  # a pre-emption while the disk is full
        assert process.wait(timeout=60) == 128 + signal.SIGTERM, process.stderr.read()[-3000:]
        assert "Traceback" not in process.stderr.read()
        assert "checkpoints: up to 0.02 GB each (the replay included); 0.07 GB free in the run directory: room for them" in lines
        assert (
            "checkpoint at global_step=2000 not written ([Errno 28] No space left on device): the one at global_step=1000 stays; "
            "trying again at the next interval"
        ) in lines
        assert any(line.startswith("checkpoint: ") and line.endswith("at global_step=3000") for line in lines)
        assert (
            "checkpoint at global_step=5000 not written ([Errno 28] No space left on device): the one at global_step=3000 stays; "
            "stopping all the same"
        ) in lines or (
            "checkpoint at global_step=4000 not written ([Errno 28] No space left on device): the one at global_step=3000 stays; "
            "stopping all the same"
        ) in lines
        run_dir = only_run_dir(disk)
        assert lines[-1] == f"stopped; continue with: {sys.executable} {ROOT}/drm.py --resume {os.path.abspath(run_dir)}"
        # nothing of the failed writes is left, and the run's record says what it has
        files = sorted(name for name in os.listdir(run_dir) if not name.startswith("events."))
        assert files == ["checkpoint.pt", f"replay-300-{socket.gethostname()}-{process.pid}.bin", "run.json"]
        record = json.loads(open(os.path.join(run_dir, "run.json")).read())
        assert record["checkpoint"] == {"frame": 3000, "replay": True} and "No space left on device" in record["checkpoint_error"]

        os.remove(disk / "filler")
        resumed = run_script("drm.py", "--resume", run_dir, "--total-frames", "5000", cwd=disk)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert "resumed at global_step=3000 (with the replay buffer)" in resumed.stdout
        # a finished run keeps its last checkpoint without the replay
        assert "the last checkpoint, of frame 5,000, stays without its replay: --keep-replay-at-end keeps it" in resumed.stdout
        assert sorted(name for name in os.listdir(run_dir) if not name.startswith("events.")) == ["checkpoint.pt", "run.json"]
        assert torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=False)["replay"] is None


def test_a_run_that_cannot_write_or_hold_its_checkpoints_stops_in_one_line_before_any_work(tmp_path):
    with small_filesystem(tmp_path / "read-only", "1m", read_only=True) as read_only:
        result = run_script("drm.py", "--env-id", "cartpole-balance", cwd=read_only)
        assert result.returncode == 1 and "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
        assert result.stderr.startswith(f"drm.py: cannot write the run directory {read_only}/runs/cartpole-balance__drm__121__")
        assert result.stderr.strip().endswith("(Read-only file system); run where you can write")
    with small_filesystem(tmp_path / "small", "2m") as small:
        result = run_script("drm.py", *SMALL_RUN, "--checkpoint-every-frames", "1000", "--checkpoint-replay", cwd=small)
        assert result.returncode == 1 and "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
        assert "drm.py: --checkpoint-every-frames: checkpoints take up to 0.05 GB each (the replay included), but " in result.stderr
        assert "GB free; or leave the replay out: --no-checkpoint-replay" in result.stderr


def test_a_job_whose_memory_limit_cannot_hold_the_replay_stops_in_one_line_naming_both_numbers(tmp_path):
    # a 100,000-transition replay (2.1 GB when full) in a job limited to 1.5 GB, as Slurm's --mem does
    with memory_cgroup(1_500_000_000) as into_the_cgroup:
        result = subprocess.run([sys.executable, os.path.join(ROOT, "drm.py"), *SMALL_RUN, "--buffer-size", "100000"], cwd=tmp_path,
                                capture_output=True, text=True, timeout=300, preexec_fn=into_the_cgroup)  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    message = result.stderr.strip()
    assert message.startswith("drm.py: --buffer-size 100,000: the run needs 4.3 GB of host memory (the replay when full 2.1 GB; ")
    assert "GB (the memory limit of cgroup /sys/fs/cgroup/" in message and ": 1.5 GB, " in message
    assert message.endswith("lower --buffer-size or --eval-workers")


def test_one_process_per_run_directory_and_a_lock_whose_holder_is_gone_is_taken_over(tmp_path, capsys):
    run_dir, host = tmp_path / "run", socket.gethostname()
    lock_file = run_dir / "run.lock"
    run_dir.mkdir()

    def held_by(**holder):
        lock_file.write_text(json.dumps({"host": host, "pids": drm.pid_space(), **holder}))

    def refused():
        with pytest.raises(SystemExit) as stop:
            drm.RunLock(str(run_dir))
        return str(stop.value)

    sleeper = subprocess.Popen(["sleep", "60"])
    held_by(pid=sleeper.pid, started=drm.process_start(sleeper.pid))  # a live process of this host
    assert refused().startswith(f"drm.py: {run_dir} is in use by pid {sleeper.pid} on {host} (its lock refreshed 0 s ago)")
    held_by(pid=sleeper.pid, started=drm.process_start(sleeper.pid) - 1)  # its pid, but another process: taken over
    lock = drm.RunLock(str(run_dir))
    assert capsys.readouterr().out == f"taking over the lock of pid {sleeper.pid} on {host}: that process has ended\n"
    assert lock.held() and json.loads(lock_file.read_text())["pid"] == os.getpid()
    lock.release()
    assert not lock_file.exists()
    sleeper.kill(), sleeper.wait()
    held_by(pid=sleeper.pid, started=1234)  # ended
    drm.RunLock(str(run_dir)).release()

    # another host's lock: in use while it is refreshed, taken over once left unrefreshed
    lock_file.write_text(json.dumps({"host": "node-17", "pid": 4242, "started": 1, "pids": "another"}))
    assert "is in use by pid 4242 on node-17" in refused()
    stale = time.time() - drm.STALE_LOCK_S - 5
    os.utime(lock_file, (stale, stale))
    lock = drm.RunLock(str(run_dir))
    assert lock.held() and "taking over the lock of pid 4242 on node-17: it was not refreshed for 125 s" in capsys.readouterr().out
    # a process whose lock was taken over knows it (the loop then stops before it writes again), and leaves the lock be
    lock_file.write_text(json.dumps({"host": "node-17", "pid": 4242, "started": 1, "pids": "another"}))
    assert not lock.held()
    lock.release()
    assert lock_file.exists()
    # a lock left empty (its process killed as it wrote it) is taken over once it is stale, as another host's
    lock_file.write_text("")
    assert "is in use by a process whose lock cannot be read" in refused()
    os.utime(lock_file, (stale, stale))
    lock = drm.RunLock(str(run_dir))
    assert "taking over the lock of a process whose lock cannot be read: it was not refreshed for 125 s" in capsys.readouterr().out
    # a lock deleted under a running process is made again
    lock_file.unlink()
    assert lock.held() and json.loads(lock_file.read_text())["pid"] == os.getpid()
    lock.release()
