"""benchmark/run.py (the grid runner) and benchmark/report.py (figures and tables)."""

import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict

import numpy as np
import pytest
from torch.utils.tensorboard import SummaryWriter

from conftest import REFERENCE_RUNS, SMALL, STAND_INS
from helpers import only_run_dir, run_script, scalars, start, without_module, without_repeats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmark"))
import report  # noqa: E402


def write_run(runs_dir, name, series):
    writer = SummaryWriter(os.path.join(runs_dir, name))
    for tag, points in series.items():
        for step, value in points:
            writer.add_scalar(tag, value, step)
    writer.close()


def test_report_on_synthetic_runs_gives_the_known_table_correlation_and_baseline(tmp_path):
    runs = tmp_path / "runs"
    for seed in (1, 2, 3):
        returns = {"eval/episodic_return": [(0, 0.0), (1000, 10.0 * seed), (2000, 20.0 * seed)]}
        if seed == 1:  # the episodes' motor activity against the dormant ratio logged before them
            returns["charts/dormant_ratio"] = [(100, 0.1), (200, 0.2), (300, 0.3)]
            returns["charts/action_change"] = [(150, 1.0), (250, 3.0), (350, 2.0)]
        write_run(runs, f"toy-task__alpha__{seed}__100", returns)
        write_run(runs, f"toy-task__beta__{seed}__100", {"eval/episodic_return": [(0, 0.0), (1000, 5.0), (2000, 5.0 + seed)]})
    # an older run directory of one run, as a run started again by hand leaves: said, and not read
    write_run(runs, "toy-task__alpha__1__99", {"eval/episodic_return": [(0, 0.0), (1000, 999.0), (2000, 999.0)]})
    # DrQ-v2's published curves have this layout (facebookresearch/drqv2, curves/dmc_walker_run.csv)
    curves = tmp_path / "curves"
    curves.mkdir()
    rows = [(1, 0, 0.0), (1, 1000, 100.0), (1, 2000, 300.0), (2, 0, 0.0), (2, 1000, 200.0), (2, 2000, 500.0)]
    (curves / "dmc_toy_task.csv").write_text(",agent,task,seed,frame,episode_reward,hour\n" + "".join(
        f"{i},DrQ-v2,toy_task,{seed},{frame},{reward},0.1\n" for i, (seed, frame, reward) in enumerate(rows)))  # fmt: skip
    result = run_script("benchmark/report.py", str(runs), "--output", str(tmp_path / "out"), "--budgets", "1000", "1500", "2000",
                        "--reference", "beta", "--baseline-curves", str(curves))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "report.py: 2 run directories for toy-task__alpha__1; reading the newest, toy-task__alpha__1__100" in result.stderr
    table = (tmp_path / "out" / "report.md").read_text()
    # alpha at 1000 and 1500 frames: mean of 10, 20, 30; at 2000: of 20, 40, 60; beta at 2000: of 6, 7, 8
    assert "| alpha | 3 | 20 (10–30) | 20 (10–30) | 40 (20–60) |" in table
    assert "| beta | 3 | 5 (5–5) | 5 (5–5) | 7 (6–8) |" in table
    assert "| DrQ-v2 (published) | 2 | 150 (100–200) | 150 (100–200) | 400 (300–500) |" in table
    # one task x 3 seeds: point estimates only (normalized: return / 1000); with 3 scores the IQM is the mean
    assert "| alpha | 3 x 1 | 0.040 | 0.040 | 0.960 |" in table and "| alpha | 1.000 |" in table
    assert "alpha, beta: too few scores for an interval (fewer than 10 runs x tasks, or one run per task): " in table
    # pairs (0.1, 1), (0.2, 3), (0.3, 2): r = 0.1 / sqrt(0.02 * 2) = 0.5
    assert "| alpha | 3 | 0.500 |" in table and "| beta | 0 | nan |" in table
    figures = ["toy-task_eval_episodic_return.png", "toy-task_drm_signals.png", "toy-task_dormant_vs_activity.png",
               "performance_profile_at_2000.png"]  # fmt: skip
    for figure in figures:
        assert (tmp_path / "out" / figure).stat().st_size > 1000
    assert not (tmp_path / "out" / "aggregates_at_2000.png").exists()  # no intervals, no interval figure

    (curves / "dmc_toy_task.csv").write_text("seed,frame,return\n1,0,0.0\n")
    bad = run_script("benchmark/report.py", str(runs), "--baseline-curves", str(curves))
    assert bad.returncode != 0
    assert bad.stderr.strip() == "report.py: --baseline-curves: dmc_toy_task.csv has no column(s) episode_reward"


def test_aggregates_match_rliable_called_directly(tmp_path):
    from rliable import library as rly
    from rliable import metrics

    # normalized scores (runs x tasks): toy-a and toy-b log returns (/ 1000), toy-c a success rate
    scores = {
        "drm": np.array([[0.5, 0.1, 0.0], [0.6, 0.2, 0.25], [0.7, 0.3, 0.5], [0.8, 0.9, 1.0]]),
        "drqv2": np.array([[0.4, 0.1, 0.0], [0.5, 0.1, 0.0], [0.6, 0.2, 0.25], [0.7, 0.3, 0.5]]),
    }
    runs = tmp_path / "runs"
    for variant, matrix in scores.items():
        for seed, (a, b, c) in enumerate(matrix, start=1):
            write_run(runs, f"toy-a__{variant}__{seed}__1", {"eval/episodic_return": [(0, 0.0), (1000, 0.0), (2000, 1000 * a)]})
            write_run(runs, f"toy-b__{variant}__{seed}__1", {"eval/episodic_return": [(0, 0.0), (1000, 0.0), (2000, 1000 * b)]})
            success = {"eval/episodic_return": [(0, 0.0), (2000, 77.0)], "eval/success_rate": [(0, 0.0), (1000, 0.0), (2000, c)]}
            write_run(runs, f"toy-c__{variant}__{seed}__1", success)
    # a lower seed that stopped at 1,000 frames has no score at 2,000: it must not take a seed's place
    write_run(runs, "toy-a__drm__0__1", {"eval/episodic_return": [(0, 0.0), (500, 0.0), (1000, 0.0)]})
    result = run_script("benchmark/report.py", str(runs), "--output", str(tmp_path / "out"), "--budgets", "2000",
                        "--bootstrap-samples", "300", "--seed", "7")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    table = (tmp_path / "out" / "report.md").read_text()

    def statistics(x):
        return np.array([metrics.aggregate_iqm(x), metrics.aggregate_mean(x), metrics.aggregate_optimality_gap(x)])

    for variant, matrix in scores.items():
        np.random.seed(7)  # rliable resamples with NumPy's global generator
        points, intervals = rly.get_interval_estimates({variant: matrix}, statistics, reps=300)
        cells = [f"{p:.3f} [{low:.3f}, {high:.3f}]" for p, low, high in zip(points[variant], *intervals[variant], strict=True)]
        assert f"| {variant} | 4 x 3 | " + " | ".join(cells) + " |" in table
        if variant == "drm":  # by hand: the middle six of the twelve scores, 0.25 0.3 0.5 0.5 0.6 0.7; their sum 5.85
            assert np.allclose(points[variant], [2.85 / 6, 5.85 / 12, 1 - 5.85 / 12])
    np.random.seed(7)
    points, intervals = rly.get_interval_estimates({"drm,drqv2": [scores["drm"], scores["drqv2"]]},
                                                   metrics.probability_of_improvement, reps=300)  # fmt: skip
    # by hand (Mann-Whitney, ties count half): toy-a 11.5/16, toy-b and toy-c 11/16, mean 0.698
    assert f"| drm | 0.698 [{intervals['drm,drqv2'][0, 0]:.3f}, {intervals['drm,drqv2'][1, 0]:.3f}] |" in table
    assert round(float(points["drm,drqv2"]), 3) == 0.698
    thresholds = np.linspace(0.0, 1.0, 51)  # the performance profile
    assert np.array_equal(report.score_distribution(scores["drm"], thresholds), rly.score_distributions(scores["drm"], thresholds))
    for figure in ["aggregates_at_2000.png", "performance_profile_at_2000.png", "probability_of_improvement_at_2000.png"]:
        assert (tmp_path / "out" / figure).stat().st_size > 1000


def test_a_run_scores_at_a_budget_only_once_it_got_there():
    steps, values = np.array([0, 1000, 2000]), np.array([0.0, 1.0, 2.0])
    assert report.score_at(steps, values, 1500) == 1.0 and report.score_at(steps, values, 2000) == 2.0
    assert report.score_at(steps, values, 3000) == 2.0  # a finished run's last evaluation falls short by < 1 interval
    assert report.score_at(steps, values, 3001) is None  # stopped (or still running) before the budget
    assert report.score_at(np.array([0]), np.array([5.0]), 0) == 5.0 and report.score_at(np.array([0]), np.array([5.0]), 1) is None


def test_runner_dry_run_expands_the_grid():
    result = run_script("benchmark/run.py", "--env-ids", "walker-walk", "cartpole-balance", "--seeds", "1", "2", "--dry-run",
                      "--sweep", "threshold-0.1=--dormant-threshold 0.1", "--extra-flags=--total-frames 1000")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    commands = result.stdout.splitlines()
    assert len(commands) == 2 * 2 * 6  # env ids x seeds x (5 variants + 1 sweep point)
    drqv2 = next(c for c in commands if "--exp-name drqv2" in c and "walker-walk" in c and "--seed 2" in c)
    # locally as on Slurm the runs checkpoint every 500,000 frames, with their replay; each run's evaluation
    # workers fit the cores of this machine (one worker: all of them); --extra-flags come last
    cores = len(os.sched_getaffinity(0))
    ours = f"--checkpoint-every-frames 500000 --checkpoint-replay --eval-workers {cores} --total-frames 1000"
    assert drqv2.endswith(f"--no-perturb --exploration linear --no-exploit {ours}")
    assert any(c.endswith(f"--exp-name threshold-0.1 --dormant-threshold 0.1 {ours}") for c in commands)
    four = run_script("benchmark/run.py", "--env-ids", "walker-walk", "--seeds", "1", "2", "3", "4", "5", "--variants", "drm",
                      "--workers", "4", "--dry-run")  # fmt: skip
    assert all(c.split("--eval-workers ")[1].split()[0] == str(max(1, cores // 4)) for c in four.stdout.splitlines())
    on_slurm = run_script("benchmark/run.py", "--env-ids", "walker-walk", "dog-run", "--seeds", "1", "--variants", "drm", "--launcher",
                          "slurm", "--dry-run", "--no-checkpoint-replay")  # fmt: skip
    walker, dog = on_slurm.stdout.splitlines()
    assert walker.endswith("--checkpoint-every-frames 500000 --eval-workers 8")  # --slurm-cpus-per-task
    assert dog.endswith("--checkpoint-every-frames 1000000 --eval-workers 8")
    bad = run_script("benchmark/run.py", "--env-ids", "walker-walk", "--variants", "drm", "no-purturb", "--dry-run")
    assert bad.returncode != 0 and "unknown variant(s) no-purturb" in bad.stderr


def test_missing_optional_dependencies_and_slurm_name_what_is_missing(tmp_path):
    runner = run_script("benchmark/run.py", "--env-ids", "walker-walk", "--output-dir", str(tmp_path), prefix=without_module("submitit"))
    assert runner.returncode != 0 and "the launcher needs submitit: pip install -r requirements-experiments.txt" in runner.stderr
    no_slurm = run_script("benchmark/run.py", "--env-ids", "walker-walk", "--launcher", "slurm", "--output-dir", str(tmp_path),
                          env={**os.environ, "PATH": os.path.dirname(sys.executable)})  # fmt: skip
    assert no_slurm.returncode != 0 and no_slurm.stderr.strip() == (
        "run.py: --launcher slurm needs Slurm's sbatch and srun on the PATH (run it where you submit Slurm jobs)"
    )
    for module, needed in [("matplotlib", "the figures need matplotlib"), ("rliable", "the statistics need rliable")]:
        report = run_script("benchmark/report.py", str(tmp_path), prefix=without_module(module))
        assert report.returncode != 0 and f"{needed}: pip install -r requirements-experiments.txt" in report.stderr


def test_slurm_array_carries_the_cluster_flags(tmp_path):
    # stand-ins for Slurm's commands: submitit checks for srun and submits with sbatch; squeue shows nothing
    # pending when run.py watches the new array, and then, asked for the state of each task, the first pending
    # for its priority; the second is gone from the queue, and sacct says it was cancelled
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text("#!/bin/sh\necho Submitted batch job 4242\n")
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "squeue").write_text('#!/bin/sh\ncase "$*" in *%i*) echo "4242_0|PENDING|Priority";; esac\n')
    (bin_dir / "sacct").write_text("#!/bin/sh\necho '4242_1|CANCELLED by 1000|0:0'\n")
    for tool in ("sbatch", "srun", "squeue", "sacct"):
        (bin_dir / tool).chmod(0o755)
    result = run_script("benchmark/run.py", "--env-ids", "walker-walk", "cheetah-run", "--seeds", "1", "--variants", "drm",
                        "--launcher", "slurm", "--slurm-partition", "gpu", "--slurm-gpus-per-node", "2", "--timeout-min", "600",
                        "--slurm-options", "account=my-lab", "--output-dir", str(tmp_path / "out"),
                        env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"})  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("submitted 2 runs as Slurm array 4242; logs in ")
    script = (tmp_path / "out" / "submitit" / "4242_submission.sh").read_text()
    for line in ["--array=0-1%2", "--partition=gpu", "--gpus-per-node=2", "--time=600", "--account=my-lab", "--cpus-per-task=8",
                 "--signal=USR2@300"]:  # fmt: skip
        assert f"#SBATCH {line}\n" in script
    assert sorted(os.listdir(tmp_path / "out" / "submitit")).count("4242_1_submitted.pkl") == 1  # one pickled job per run
    status = run_script("benchmark/run.py", "--status", "--output-dir", str(tmp_path / "out"),
                        env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"})  # fmt: skip
    assert "| walker-walk__drm__1 | pending |  | 0 | 4242_0 | Slurm: pending (Priority) |" in status.stdout
    assert (
        "| cheetah-run__drm__1 | vanished |  | 0 | 4242_1 | gone from Slurm's queue before its run started: CANCELLED by 1000 "
        "(exit 0:0, sacct) |"
    ) in status.stdout
    assert status.stdout.strip().endswith("1 pending, 1 vanished")


# A stand-in for a training script: a new run makes its run directory, writes a checkpoint and its record
# (as a script's run.json names its last checkpoint), then much output (Adroit's pen writes 300 KB between
# checkpoints), and stops as SIGTERM makes a script stop; a resumed one finishes
STAND_IN = """
import json, os, signal, sys, time
held = any(os.readlink(f"/proc/self/fd/{fd}").endswith(".lock") for fd in os.listdir("/proc/self/fd") if fd.isdigit() and
           os.path.exists(f"/proc/self/fd/{fd}"))
print("the run holds its lock" if held else "the run does not hold its lock")
if "--resume" in sys.argv:
    print("resumed at global_step=500 (with the replay buffer)"); print("global_step=1000, episode=2, episodic_return=1.0")
    sys.exit(0)
run_dir = f"runs/{sys.argv[1]}__{time.time_ns()}"
os.makedirs(run_dir)
if "--killed" in sys.argv:  # a stop signal before the run's handlers are in place
    os.kill(os.getpid(), signal.SIGTERM)
if "--crash" in sys.argv:
    print("global_step=20, episode=1, episodic_return=0.0")
    sys.exit("toy.py: losses/qf_loss is nan at global_step=20")
open(os.path.join(run_dir, "checkpoint.pt"), "w").close()
with open(os.path.join(run_dir, "run.json"), "w") as record:
    json.dump({"attempts": 1, "checkpoint": {"frame": 500, "replay": True}}, record)
print(f"checkpoint: {run_dir}/checkpoint.pt at global_step=500")
for episode in range(3000):
    print(f"global_step={600 + episode}, episode={episode}, episodic_return=1.0, success=False, SPS=700, done=1.0%, time_left=1:00:00")
print("SIGTERM: stopping with a checkpoint at the end of this episode"); sys.exit(143)
"""


def test_a_run_is_continued_from_its_checkpoint_in_its_run_directory_and_never_run_twice(tmp_path):
    from run import GridTask, grid_status, lock_run, pid_space, process_start, write_status

    task, output_dir, env = GridTask(), str(tmp_path), dict(os.environ)
    task.output_dir = output_dir

    stand_in = tmp_path / "stand_in.py"  # by path: its source in the logged command would read as its output
    stand_in.write_text(STAND_IN)

    def command(name, *flags):
        return [sys.executable, str(stand_in), name, *flags]

    assert task.run("toy__drm__1", command("toy__drm__1"), env) == 143  # stopped with a checkpoint
    # its checkpoint comes from its own record, although its log printed more than 256 KB since
    assert os.path.getsize(tmp_path / "logs" / "toy__drm__1.log") > 256 * 1024
    assert grid_status(output_dir) == [("toy__drm__1", "stopped", 500, 1, "local", "checkpoint at frame 500")]
    (run_dir,) = os.listdir(tmp_path / "runs")
    assert task.run("toy__drm__1", command("toy__drm__1"), env) == 0  # continued, in the same run directory
    log = (tmp_path / "logs" / "toy__drm__1.log").read_text()
    assert log.count("=== toy__drm__1: attempt") == 2 and f"=== continuing from {tmp_path}/runs/{run_dir}" in log
    assert log.splitlines()[-1] == "global_step=1000, episode=2, episodic_return=1.0"  # appended, not overwritten
    assert log.count("the run holds its lock") == 2  # it stays held if this task dies before the run
    assert grid_status(output_dir) == [("toy__drm__1", "finished", 1000, 2, "local", "")]
    assert task.run("toy__drm__1", command("toy__drm__1"), env) == 0 and log == (tmp_path / "logs" / "toy__drm__1.log").read_text()

    # a run that failed before its first checkpoint starts over: its run directory is kept aside
    assert task.run("toy__drm__2", command("toy__drm__2", "--crash"), env) == 1
    assert grid_status(output_dir)[1] == (
        "toy__drm__2",
        "failed",
        20,
        1,
        "local",
        "exit 1: toy.py: losses/qf_loss is nan at global_step=20",
    )
    (failed_dir,) = [name for name in os.listdir(tmp_path / "runs") if name.startswith("toy__drm__2__")]
    assert task.run("toy__drm__2", command("toy__drm__2"), env) == 143
    log = (tmp_path / "logs" / "toy__drm__2.log").read_text()
    aside = f"{tmp_path}/failed_attempts/{failed_dir}"
    assert f"=== moving {tmp_path}/runs/{failed_dir} to {aside}: it has no checkpoint to continue from" in log
    assert len([name for name in os.listdir(tmp_path / "runs") if name.startswith("toy__drm__2__")]) == 1 and os.path.isdir(aside)

    # a run that another process holds shows as running, and a task waits for it to end, then goes on with it:
    # a task's lock (here held for 3 s), or the run directory's own lock refreshed by a live run (here 2 s)
    held = lock_run(output_dir, "toy__drm__3")
    assert grid_status(output_dir, ["toy__drm__3"])[0][1] == "running"
    threading.Timer(3, held.close).start()
    started = time.monotonic()
    assert task.run("toy__drm__3", command("toy__drm__3"), env) == 143 and time.monotonic() - started > 3
    (run_dir,) = [path for path in (tmp_path / "runs").iterdir() if path.name.startswith("toy__drm__3__")]
    (run_dir / "run.lock").touch()
    assert grid_status(output_dir, ["toy__drm__3"])[0][1] == "running"
    stale = time.time() - 118
    os.utime(run_dir / "run.lock", (stale, stale))  # fresh for 2 s more
    started = time.monotonic()
    assert task.run("toy__drm__3", command("toy__drm__3"), env) == 0 and time.monotonic() - started > 2
    # a run.lock naming a process on this host is held while that process runs, however fresh the lock: a run
    # killed outright (as Slurm does KillWait after scancel's SIGTERM) is not shown running for 120 s more
    holder = subprocess.Popen(["sleep", "60"])
    lock = {"host": socket.gethostname(), "pid": holder.pid, "started": process_start(holder.pid), "pids": pid_space()}
    (run_dir / "run.lock").write_text(json.dumps(lock))
    assert grid_status(output_dir, ["toy__drm__3"])[0][1] == "running"
    holder.kill()
    holder.wait()
    assert grid_status(output_dir, ["toy__drm__3"])[0][1] == "finished"
    (run_dir / "run.lock").write_text(json.dumps({**lock, "host": "another-node"}))  # there, only its age tells
    assert grid_status(output_dir, ["toy__drm__3"])[0][1] == "running"
    os.remove(run_dir / "run.lock")

    # a run that finished after its task had gone (its exit recorded by nobody) says so in its own record
    (tmp_path / "runs" / "toy__drm__6__1").mkdir()
    (tmp_path / "runs" / "toy__drm__6__1" / "run.json").write_text(json.dumps({"attempts": 1, "finished": 1000}))
    write_status(output_dir, "toy__drm__6", state="running", attempts=1, job="local")
    assert grid_status(output_dir, ["toy__drm__6"])[0][1] == "finished"
    assert task.run("toy__drm__6", command("toy__drm__6"), env) == 0 and not (tmp_path / "logs" / "toy__drm__6.log").exists()

    # a stop signal that kills the run before it could checkpoint stops it all the same: it continues
    assert task.run("toy__drm__5", command("toy__drm__5", "--killed"), env) == -signal.SIGTERM
    assert grid_status(output_dir, ["toy__drm__5"]) == [("toy__drm__5", "stopped", None, 1, "local", "no checkpoint")]
    # the local task fails when a run did not finish, naming it
    with pytest.raises(RuntimeError, match=r"runs that did not finish: toy__drm__4 \(exit 143\)"):
        task([("toy__drm__4", command("toy__drm__4"))], output_dir, {})


def test_a_filesystem_without_flock_stops_the_runner_in_one_line_naming_it(tmp_path, monkeypatch):
    import fcntl

    from run import lock_run

    def no_flock(file, operation):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    with pytest.raises(SystemExit) as stop:
        lock_run(str(tmp_path), "toy__drm__1")
    message = str(stop.value)
    assert message.startswith(f"run.py: cannot lock {tmp_path}/status/toy__drm__1.lock: the ") and "\n" not in message
    assert "filesystem at /" in message and "does not support flock (Function not implemented); put --output-dir on" in message


def test_local_workers_each_get_a_gpu_of_their_own_and_render_on_it():
    from run import device_assignment, egl_devices_of_gpus

    def gpus_of(assignment):
        return [(worker["CUDA_VISIBLE_DEVICES"], worker["MUJOCO_EGL_DEVICE_ID"]) for worker in assignment]

    # EGL lists the GPUs in another order than CUDA (and a software device after them)
    egl = {"0": 1, "1": 0, "2": 3, "3": 2}
    assert gpus_of(device_assignment(3, ["0", "1", "2", "3"], egl)) == [("0", "1"), ("1", "0"), ("2", "3")]
    # more workers than GPUs: they share, in turn, each rendering where it trains
    assert gpus_of(device_assignment(4, ["3", "1"], egl)) == [("3", "2"), ("1", "0"), ("3", "2"), ("1", "0")]
    assert {worker["CUDA_DEVICE_ORDER"] for worker in device_assignment(2, ["0", "1"], egl)} == {"PCI_BUS_ID"}  # nvidia-smi's
    # a GPU without a known EGL device keeps the shell's choice (unset: MuJoCo takes the first EGL device)
    assert gpus_of(device_assignment(2, ["0", "7"], egl, {"MUJOCO_EGL_DEVICE_ID": "5"})) == [("0", "1"), ("7", "5")]
    assert gpus_of(device_assignment(1, ["7"], egl)) == [("7", None)]
    # no GPU: the shell's setting stays, unset or hiding every GPU
    assert device_assignment(2, [], egl) == [{"CUDA_VISIBLE_DEVICES": None}] * 2
    assert device_assignment(2, [], egl, {"CUDA_VISIBLE_DEVICES": ""}) == [{"CUDA_VISIBLE_DEVICES": ""}] * 2
    # every GPU nvidia-smi lists has its EGL device (none where there is no NVIDIA driver, as on a CPU machine)
    listed = subprocess.run("nvidia-smi --query-gpu=index --format=csv,noheader", shell=True, capture_output=True, text=True)
    assert set(egl_devices_of_gpus()) == set(listed.stdout.split() if listed.returncode == 0 else [])


def test_two_tiny_jobs_run_through_submitit_locally_end_to_end_each_on_its_own_gpu(tmp_path):
    tiny = ("--action-repeat 8 --num-seed-frames 400 --batch-size 8 --buffer-size 2000 --total-frames 2000 "
            "--num-eval-episodes 1 --eval-every-frames 1000 --log-every-updates 5 --no-cuda")  # fmt: skip
    grid = ["benchmark/run.py", "--env-ids", "cartpole-balance", "--seeds", "1", "--variants", "drm", "drqv2", "--workers", "2",
            f"--extra-flags={tiny}", "--output-dir", str(tmp_path)]  # fmt: skip
    # the shell sees GPUs 3 and 5 (on this CPU-only machine the runs train on the CPU all the same)
    result = run_script(*grid, env={**os.environ, "CUDA_VISIBLE_DEVICES": "3,5"})
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout
    assert "2 of 2 runs finished" in result.stdout
    devices = {
        (tmp_path / "logs" / name).read_text().split("CUDA_VISIBLE_DEVICES=")[1].split(",")[0] for name in os.listdir(tmp_path / "logs")
    }
    assert devices == {"3", "5"}  # one each
    assert "MUJOCO_EGL_DEVICE_ID=(unset)" in (tmp_path / "logs" / "cartpole-balance__drm__1.log").read_text()  # no NVIDIA EGL here
    # the job array went through submitit: one array task per worker, each with its pickled result
    assert len([name for name in os.listdir(tmp_path / "submitit") if name.endswith("_result.pkl")]) == 2
    assert sorted(os.listdir(tmp_path / "logs")) == ["cartpole-balance__drm__1.log", "cartpole-balance__drqv2__1.log"]
    run_dirs = sorted(os.listdir(tmp_path / "runs"))
    assert [name.rsplit("__", 1)[0] for name in run_dirs] == ["cartpole-balance__drm__1", "cartpole-balance__drqv2__1"]
    logged = scalars(tmp_path / "runs" / run_dirs[0])
    diagnostics = {"charts/dormant_ratio_critic", "charts/dormant_ratio_value", "charts/action_magnitude", "charts/action_change"}
    assert diagnostics <= set(logged)
    assert [step for step, _ in logged["charts/action_change"]] == [1000, 2000]
    assert all(0 <= value <= 1 for _, value in logged["charts/dormant_ratio_critic"])
    assert "charts/dormant_ratio_value" not in scalars(tmp_path / "runs" / run_dirs[1])  # no V without exploitation

    result = run_script("benchmark/report.py", str(tmp_path / "runs"), "--output", str(tmp_path / "report"), "--budgets", "1000", "2000")
    assert result.returncode == 0, result.stderr[-3000:]
    table = (tmp_path / "report" / "report.md").read_text()
    assert "## cartpole-balance: eval/episodic_return at frame budgets" in table
    assert "| drm | 1 |" in table and "| drqv2 | 1 |" in table
    # the last evaluation is at frame 1,000 (the next would be at 2,000): it is also the score at 2,000
    score = scalars(tmp_path / "runs" / run_dirs[0])["eval/episodic_return"][-1][1] / 1000
    assert f"| drm | 1 x 1 | {score:.3f} | {score:.3f} | {1 - score:.3f} |" in table
    assert "## Aggregates at 2,000 frames" in table and "| X | P(X > drqv2) |" in table
    assert "drm, drqv2: too few scores for an interval" in table

    again = run_script(*grid)  # the same grid again: both runs finished, neither runs again
    assert again.returncode == 0 and "2 of 2 runs finished" in again.stdout
    assert len(os.listdir(tmp_path / "runs")) == 2


def test_reproduction_script_dry_run_lists_the_published_grid():
    script = os.path.join(ROOT, "benchmark", "drm.sh")
    result = subprocess.run(["bash", script, "--dry-run"], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHON": sys.executable})  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    commands = [line.split() for line in result.stdout.splitlines() if not line.startswith(("#", "python benchmark/report.py"))]
    grid = {(os.path.basename(c[1]), c[c.index("--env-id") + 1], c[c.index("--exp-name") + 1], c[c.index("--seed") + 1])
            for c in commands}  # fmt: skip
    assert len(commands) == len(grid) == 9 * 2 * 4 + 9 * 2 * 4 + 3 * 5 * 4 + 5 * 2 * 4  # DMC hard, DMC medium, Adroit, Meta-World
    tasks, variants = defaultdict(set), defaultdict(set)
    for script, env_id, variant, _ in grid:
        tasks[script].add(env_id)
        variants[script].add(variant)
    sys.path.insert(0, ROOT)
    import drm
    import drm_metaworld

    assert tasks["drm.py"] == set(drm.TASK_PRESETS)  # every DMC task with a DrM config: 9 hard, 9 medium
    assert tasks["drm_adroit.py"] == {"door", "hammer", "pen"}
    assert tasks["drm_metaworld.py"] == {"assembly", "coffee-push", "disassemble", "stick-pull", "sweep-into"}
    assert tasks["drm_metaworld.py"] <= set(drm_metaworld.import_metaworld())
    assert variants["drm.py"] == variants["drm_metaworld.py"] == {"drm", "drqv2"}
    assert variants["drm_adroit.py"] == set(__import__("run").VARIANTS)  # and the paper's ablations
    assert {seed for *_, seed in grid} == {"1", "2", "3", "4"}
    dog_run = next(c for c in commands if "dog-run" in c and "drqv2" in c)
    assert dog_run[-9:] == ["--no-perturb", "--exploration", "linear", "--no-exploit", "--checkpoint-every-frames", "1000000",
                            "--checkpoint-replay", "--eval-workers", "8"]  # fmt: skip
    walker_run = next(c for c in commands if "walker-run" in c)
    assert walker_run[-5:] == ["--checkpoint-every-frames", "500000", "--checkpoint-replay", "--eval-workers", "8"]
    report_lines = [line for line in result.stdout.splitlines() if line.startswith("python benchmark/report.py")]
    assert len(report_lines) == 4 and all("--baseline-curves" in line for line in report_lines if "dmc-" in line)


@pytest.mark.parametrize("variant", ["drm", "no-perturb", "linear-exploration", "no-exploit", "drqv2"])
def test_every_variant_is_a_valid_command_line(variant):
    sys.path.insert(0, ROOT)
    import tyro

    import drm

    flags = __import__("run").VARIANTS[variant]
    args = tyro.cli(drm.Args, args=flags)
    assert args.perturb == ("--no-perturb" not in flags) and args.exploit == ("--no-exploit" not in flags)
    assert args.exploration == ("linear" if "linear" in flags else "awake")


def test_a_local_time_limit_while_the_run_still_writes_its_checkpoint_is_waited_for_and_the_run_finished(tmp_path):
    # The reference run of tests/conftest.py, two episodes long, through run.py on this machine with a 2-minute
    # limit: the task gets SIGUSR2 60 s before it, and the run, signalled in turn, takes 48 s to write its
    # checkpoint (a stand-in slows its fsyncs, as a 21 GB replay's write is slow), longer than the 45 s its task
    # waits. The task is started again while the run still holds the run, waits for it to end, and continues it.
    _, run_flags, _ = REFERENCE_RUNS["drm.py"]
    same_run = [*run_flags, *SMALL, "--eval-workers", "1", "--checkpoint-every-frames", "1000", "--total-frames", "2000"]
    threads = str(len(os.sched_getaffinity(0)))  # run.py's one worker has all the cores: the float rounding depends on it
    uninterrupted = start("drm.py", "--env-id", "cartpole-balance", "--seed", "1", "--exp-name", "drm", *same_run, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads})  # fmt: skip
    slow_stop = {"PYTHONPATH": os.path.join(STAND_INS, "slow_stop"), "DRM_TEST_SLOW_STOP": str(tmp_path / "slow-stop-claimed")}
    grid = tmp_path / "grid"
    result = run_script("benchmark/run.py", "--env-ids", "cartpole-balance", "--seeds", "1", "--variants", "drm", "--timeout-min", "2",
                        f"--extra-flags={' '.join(same_run)}", "--output-dir", str(grid), env={**os.environ, **slow_stop})  # fmt: skip
    assert result.returncode == 0 and "1 of 1 runs finished" in result.stdout, result.stderr[-3000:] + result.stdout
    assert uninterrupted.wait(timeout=300) == 0, uninterrupted.stderr.read()[-3000:]

    log = (grid / "logs" / "cartpole-balance__drm__1.log").read_text()
    assert "SIGUSR2: stopping with a checkpoint at the end of this episode" in log
    stopped_at = int(log.split("checkpoint: ")[1].split("global_step=")[1].split()[0])
    assert f"resumed at global_step={stopped_at} (with the replay buffer)" in log
    tasks = "".join(path.read_text() for path in (grid / "submitit").glob("*_0_log.out"))
    assert "cartpole-balance__drm__1: no checkpoint within 45 s; requeued, to continue the run once it ends" in tasks
    assert "cartpole-balance__drm__1: another process holds the run; waiting for it to end" in tasks
    status = run_script("benchmark/run.py", "--status", "--output-dir", str(grid)).stdout
    assert re.search(r"\| cartpole-balance__drm__1 \| finished \| 2,000 \| [2-6] \|", status), status
    # the run that went through the time limit logged what the uninterrupted one logged
    ours, theirs = scalars(only_run_dir(grid)), scalars(only_run_dir(tmp_path))
    for tag in ["charts/episodic_return", "eval/episodic_return", "losses/qf_loss", "losses/actor_loss", "charts/dormant_ratio"]:
        assert without_repeats(ours[tag]) == theirs[tag], tag
