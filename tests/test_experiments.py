"""benchmark/run.py (the grid runner) and benchmark/report.py (figures and tables)."""

import os
import signal
import subprocess
import sys
from collections import defaultdict

import numpy as np
import pytest
from torch.utils.tensorboard import SummaryWriter

from helpers import run_script, scalars, without_module

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
    # locally the runs checkpoint only when stopped by a signal, with their replay; --extra-flags come last
    assert drqv2.endswith("--no-perturb --exploration linear --no-exploit --checkpoint-replay --total-frames 1000")
    assert any(c.endswith("--exp-name threshold-0.1 --dormant-threshold 0.1 --checkpoint-replay --total-frames 1000") for c in commands)
    on_slurm = run_script("benchmark/run.py", "--env-ids", "walker-walk", "dog-run", "--seeds", "1", "--variants", "drm", "--launcher",
                          "slurm", "--dry-run", "--no-checkpoint-replay")  # fmt: skip
    walker, dog = on_slurm.stdout.splitlines()
    assert walker.endswith("--checkpoint-every-frames 500000") and dog.endswith("--checkpoint-every-frames 1000000")
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
    # stand-ins for Slurm's commands: submitit checks for srun and submits with sbatch; squeue shows nothing pending
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text("#!/bin/sh\necho Submitted batch job 4242\n")
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "squeue").write_text("#!/bin/sh\nexit 0\n")
    for tool in ("sbatch", "srun", "squeue"):
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
    status = run_script("benchmark/run.py", "--status", "--output-dir", str(tmp_path / "out"))
    assert "| walker-walk__drm__1 | pending |  | 0 | 4242 |" in status.stdout and "2 pending" in status.stdout


# A stand-in for a training script: a new run makes its run directory, writes a checkpoint and stops as
# SIGTERM makes a script stop; a resumed one finishes
STAND_IN = """
import os, signal, sys, time
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
print(f"checkpoint: {run_dir}/checkpoint.pt at global_step=500"); sys.exit(143)
"""


def test_a_run_is_continued_from_its_checkpoint_in_its_run_directory_and_never_run_twice(tmp_path):
    from run import GridTask, grid_status, lock_run

    task, output_dir, env = GridTask(), str(tmp_path), dict(os.environ)
    task.output_dir = output_dir

    stand_in = tmp_path / "stand_in.py"  # by path: its source in the logged command would read as its output
    stand_in.write_text(STAND_IN)

    def command(name, *flags):
        return [sys.executable, str(stand_in), name, *flags]

    assert task.run("toy__drm__1", command("toy__drm__1"), env) == 143  # stopped with a checkpoint
    assert grid_status(output_dir) == [("toy__drm__1", "stopped", 500, 1, "local", "checkpoint at frame 500")]
    (run_dir,) = os.listdir(tmp_path / "runs")
    assert task.run("toy__drm__1", command("toy__drm__1"), env) == 0  # continued, in the same run directory
    log = (tmp_path / "logs" / "toy__drm__1.log").read_text()
    assert log.count("=== toy__drm__1: attempt") == 2 and f"=== continuing from {tmp_path}/runs/{run_dir}" in log
    assert log.splitlines()[-1] == "global_step=1000, episode=2, episodic_return=1.0"  # appended, not overwritten
    assert log.count("the run holds its lock") == 2  # it stays held if this task dies before the run
    assert grid_status(output_dir) == [("toy__drm__1", "finished", 1000, 2, "local", "")]
    assert task.run("toy__drm__1", command("toy__drm__1"), env) == 0 and log == (tmp_path / "logs" / "toy__drm__1.log").read_text()

    # a run that failed before its first checkpoint starts over: its run directory goes
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
    assert f"=== removing {tmp_path}/runs/{failed_dir}: it has no checkpoint to continue from" in log
    assert len([name for name in os.listdir(tmp_path / "runs") if name.startswith("toy__drm__2__")]) == 1
    # a run that another task is running is left alone, and shows as running
    held = lock_run(output_dir, "toy__drm__3")
    assert task.run("toy__drm__3", command("toy__drm__3"), env) is None
    assert grid_status(output_dir, ["toy__drm__3"])[0][1] == "running"
    held.close()
    # a stop signal that kills the run before it could checkpoint stops it all the same: it continues
    assert task.run("toy__drm__5", command("toy__drm__5", "--killed"), env) == -signal.SIGTERM
    assert grid_status(output_dir, ["toy__drm__5"]) == [("toy__drm__5", "stopped", None, 1, "local", "no checkpoint")]
    # the local task fails when a run did not finish, naming it
    with pytest.raises(RuntimeError, match=r"runs that did not finish: toy__drm__4 \(exit 143\)"):
        task([("toy__drm__4", command("toy__drm__4"))], output_dir, {})


def test_local_workers_each_get_a_gpu_of_their_own():
    from run import gpu_assignment

    assert gpu_assignment(3, ["0", "1", "2", "3"]) == ["0", "1", "2"]
    assert gpu_assignment(4, ["3", "5"]) == ["3", "5", "3", "5"]  # more workers than GPUs: they share, in turn
    assert gpu_assignment(2, [], None) == [None, None]  # no GPU: the shell's setting stays, unset
    assert gpu_assignment(2, [], "") == ["", ""]  # or hiding every GPU


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
        (tmp_path / "logs" / name).read_text().split("CUDA_VISIBLE_DEVICES=")[1].split()[0] for name in os.listdir(tmp_path / "logs")
    }
    assert devices == {"3", "5"}  # one each
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
    assert dog_run[-7:] == ["--no-perturb", "--exploration", "linear", "--no-exploit", "--checkpoint-every-frames", "1000000",
                            "--checkpoint-replay"]  # fmt: skip
    walker_run = next(c for c in commands if "walker-run" in c)
    assert walker_run[-3:] == ["--checkpoint-every-frames", "500000", "--checkpoint-replay"]
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
