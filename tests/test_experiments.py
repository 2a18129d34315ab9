"""benchmark/run.py (the grid runner) and benchmark/report.py (figures and tables)."""
import os
import sys

import numpy as np
import pytest
from torch.utils.tensorboard import SummaryWriter

from test_drm_smoke import run_script, scalars, without_module

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmark"))
import report  # noqa: E402


def write_run(runs_dir, name, series):
    writer = SummaryWriter(os.path.join(runs_dir, name))
    for tag, points in series.items():
        for step, value in points:
            writer.add_scalar(tag, value, step)
    writer.close()


def test_report_on_synthetic_runs_gives_the_known_table_and_correlation(tmp_path):
    runs = tmp_path / "runs"
    for seed in (1, 2, 3):
        returns = {"eval/episodic_return": [(0, 0.0), (1000, 10.0 * seed), (2000, 20.0 * seed)]}
        if seed == 1:  # the episodes' motor activity against the dormant ratio logged before them
            returns["charts/dormant_ratio"] = [(100, 0.1), (200, 0.2), (300, 0.3)]
            returns["charts/action_change"] = [(150, 1.0), (250, 3.0), (350, 2.0)]
        write_run(runs, f"toy-task__alpha__{seed}__100", returns)
        write_run(runs, f"toy-task__beta__{seed}__100", {"eval/episodic_return": [(0, 0.0), (1000, 5.0), (2000, 5.0 + seed)]})
    result = run_script("benchmark/report.py", str(runs), "--output", str(tmp_path / "out"), "--budgets", "1000", "1500", "2000")
    assert result.returncode == 0, result.stderr[-3000:]
    table = (tmp_path / "out" / "report.md").read_text()
    # alpha at 1000 and 1500 frames: mean(10, 20, 30) = 20; at 2000: mean(20, 40, 60) = 40; beta at 2000: 7
    alpha = next(line for line in table.splitlines() if line.startswith("| alpha | 3 | 20 ["))
    assert alpha.split(" | ")[3].startswith("20 [") and alpha.split(" | ")[4].startswith("40 [")
    assert "| beta | 3 | 5 [5, 5] | 5 [5, 5] | 7 [" in table
    # pairs (0.1, 1), (0.2, 3), (0.3, 2): r = 0.1 / sqrt(0.02 * 2) = 0.5
    assert "| alpha | 3 | 0.500 |" in table and "| beta | 0 | nan |" in table
    for figure in ["toy-task_eval_episodic_return.png", "toy-task_drm_signals.png", "toy-task_dormant_vs_activity.png"]:
        assert (tmp_path / "out" / figure).stat().st_size > 1000


def test_interquartile_mean_and_bootstrap_interval():
    assert report.interquartile_mean(np.array([1.0, 2.0, 3.0, 100.0])) == 2.5  # the middle two
    assert report.interquartile_mean(np.array([5.0, 1.0, 9.0, 3.0, 7.0])) == 5.0  # 3, 5, 7
    point, low, high = report.aggregate_with_ci([1.0, 2.0, 3.0, 4.0], np.mean, 1000, np.random.default_rng(0))
    assert point == 2.5 and 1.0 <= low < point < high <= 4.0
    assert report.aggregate_with_ci([3.0], np.mean, 1000, np.random.default_rng(0)) == (3.0, 3.0, 3.0)


def test_runner_dry_run_expands_the_grid():
    result = run_script("benchmark/run.py", "--env-ids", "walker-walk", "cartpole-balance", "--seeds", "1", "2", "--dry-run",
                      "--sweep", "threshold-0.1=--dormant-threshold 0.1", "--extra-flags=--total-frames 1000")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    commands = result.stdout.splitlines()
    assert len(commands) == 2 * 2 * 6  # env ids x seeds x (5 variants + 1 sweep point)
    drqv2 = next(c for c in commands if "--exp-name drqv2" in c and "walker-walk" in c and "--seed 2" in c)
    assert drqv2.endswith("--no-perturb --exploration linear --no-exploit --total-frames 1000")
    assert any(c.endswith("--exp-name threshold-0.1 --dormant-threshold 0.1 --total-frames 1000") for c in commands)
    bad = run_script("benchmark/run.py", "--env-ids", "walker-walk", "--variants", "drm", "no-purturb", "--dry-run")
    assert bad.returncode != 0 and "unknown variant(s) no-purturb" in bad.stderr


def test_missing_optional_dependencies_name_their_install_line(tmp_path):
    slurm = run_script("benchmark/run.py", "--env-ids", "walker-walk", "--launcher", "slurm", "--output-dir", str(tmp_path),
                     prefix=without_module("submitit"))  # fmt: skip
    assert slurm.returncode != 0 and "needs submitit: pip install -r requirements-experiments.txt" in slurm.stderr
    figures = run_script("benchmark/report.py", str(tmp_path), prefix=without_module("matplotlib"))
    assert figures.returncode != 0 and "the figures need matplotlib: pip install -r requirements-experiments.txt" in figures.stderr


def test_two_tiny_jobs_run_locally_end_to_end(tmp_path):
    tiny = ("--action-repeat 8 --num-seed-frames 400 --batch-size 8 --buffer-size 2000 --total-frames 2000 "
            "--num-eval-episodes 1 --eval-every-frames 1000 --log-every-updates 5 --no-cuda")  # fmt: skip
    result = run_script("benchmark/run.py", "--env-ids", "cartpole-balance", "--seeds", "1", "--variants", "drm", "drqv2",
                      "--workers", "2", f"--extra-flags={tiny}", "--output-dir", str(tmp_path))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout
    assert "2 of 2 runs finished" in result.stdout
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


@pytest.mark.parametrize("variant", ["drm", "no-perturb", "linear-exploration", "no-exploit", "drqv2"])
def test_every_variant_is_a_valid_command_line(variant):
    sys.path.insert(0, ROOT)
    import drm
    import tyro

    flags = __import__("run").VARIANTS[variant]
    args = tyro.cli(drm.Args, args=flags)
    assert args.perturb == ("--no-perturb" not in flags) and args.exploit == ("--no-exploit" not in flags)
    assert args.exploration == ("linear" if "linear" in flags else "awake")
