"""benchmark/run.py on a real single-node Slurm (started by tests/conftest.py; skipped where it cannot
be, except in CI): a grid end to end with its report, a pre-emption and a time limit. The pre-empted
and the time-limited run each end resumed, and log what the uninterrupted reference run logged."""

import concurrent.futures
import os
import re
import subprocess
import time

import pytest

from conftest import REFERENCE_RUNS, SMALL, reference_group
from helpers import only_run_dir, run_script, scalars, without_repeats

pytestmark = reference_group("drm.py")
ON_THE_TEST_NODE = ["--launcher", "slurm", "--slurm-gpus-per-node", "0", "--slurm-cpus-per-task", "1", "--slurm-mem-gb", "1",
                    "--timeout-min", "20"]  # fmt: skip
COMPARED = ["charts/episodic_return", "eval/episodic_return", "losses/qf_loss", "losses/actor_loss", "charts/dormant_ratio"]


def submit(slurm, output_dir, extra_flags, *flags, variants=("drm",)):
    result = run_script("benchmark/run.py", "--env-ids", "cartpole-balance", "--seeds", "1", "--variants", *variants,
                        *ON_THE_TEST_NODE, *flags, f"--extra-flags={' '.join(extra_flags)}", "--output-dir", str(output_dir),
                        env=slurm)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.split("Slurm array ")[1].split(";")[0]


def log_of(output_dir, name="cartpole-balance__drm__1"):
    path = os.path.join(output_dir, "logs", f"{name}.log")
    return open(path).read() if os.path.exists(path) else ""


def wait_until(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def squeue(slurm, job):
    return subprocess.run(["squeue", "-h", "-r", "-j", job, "-o", "%T"], env=slurm, capture_output=True, text=True).stdout.split()


@pytest.fixture(scope="module")
def scenarios(slurm, reference_runs, tmp_path_factory):
    """The scenarios on the test node: (a, b) a two-run grid, the reference run and its DrQ-v2 twin, in
    the partition whose jobs `high` pre-empts, pre-empted by a job that needs the whole node once the
    reference run has trained an episode; (c) the reference run, longer, with a 2-minute time limit,
    stopped once it has resumed and trained an episode more. The reference runs are made meanwhile."""
    grid, limited = tmp_path_factory.mktemp("grid"), tmp_path_factory.mktemp("limited")  # before the thread: it makes some too
    reference = concurrent.futures.ThreadPoolExecutor(1).submit(reference_runs, "drm.py")
    _, run_flags, _ = REFERENCE_RUNS["drm.py"]
    same_run = [*run_flags, *SMALL, "--eval-workers", "1"]

    grid_array = submit(slurm, grid, same_run, "--slurm-partition", "preemptible", variants=("drm", "drqv2"))
    wait_until(lambda: "episode=1," in log_of(grid), 240, "the first episode of the run to pre-empt")
    whole_node = ["sbatch", "--parsable", "-p", "high", "-c", "4", "--mem=100M", "-o", "/dev/null", "--wrap", "sleep 3"]
    preemptor = subprocess.run(whole_node, env=slurm, capture_output=True, text=True, check=True).stdout.strip()
    wait_until(lambda: squeue(slurm, preemptor) in (["RUNNING"], []), 240, "the pre-empting job to start")
    # SIGUSR2 comes 75 s before the time limit: 15 to 45 s after the start (Slurm checks every 30 s)
    limited_array = submit(slurm, limited, [*same_run, "--total-frames", "6000"], "--timeout-min", "2", "--slurm-signal-delay-s", "75")
    # once the time-limited run has its SIGUSR2, its next attempt gets 10 minutes
    wait_until(lambda: "SIGUSR2: stopping" in log_of(limited), 300, "the time limit's SIGUSR2")
    subprocess.run(["scontrol", "update", f"JobId={limited_array}", "TimeLimit=10"], env=slurm, check=True)
    resumed = re.compile(r"resumed at global_step=(\d+) .*global_step=(\d+), episode=", re.DOTALL)
    wait_until(lambda: resumed.search(log_of(limited)), 300, "the time-limited run to resume and train an episode")
    subprocess.run(["scancel", limited_array], env=slurm, check=True)
    for job in (preemptor, grid_array, limited_array):
        wait_until(lambda job=job: not squeue(slurm, job), 600, f"Slurm job {job} to end")
    return {"reference": reference.result(), "grid": grid, "limited": limited}


def status_of(slurm, output_dir):
    result = run_script("benchmark/run.py", "--status", "--output-dir", str(output_dir), env=slurm)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def assert_resumed_from_its_checkpoint(log):
    """Check that the run resumed, with its replay, from the checkpoint it stopped with; that checkpoint's frame."""
    stopped_at = int(log.split("checkpoint: ")[1].split("global_step=")[1].split()[0])
    assert f"resumed at global_step={stopped_at} (with the replay buffer)" in log
    return stopped_at


def assert_logs_what_the_reference_logged(run_dir, reference_dir, up_to_frame):
    ours, reference = scalars(run_dir), scalars(reference_dir)
    for tag in COMPARED:
        expected = [point for point in reference[tag] if point[0] <= up_to_frame]
        assert [point for point in without_repeats(ours[tag]) if point[0] <= up_to_frame] == expected, tag


def test_a_grid_runs_end_to_end_and_its_report_reads_it(slurm, scenarios):
    grid = scenarios["grid"]
    status = status_of(slurm, grid)
    assert "| cartpole-balance__drm__1 | finished | 3,000 | 2 |" in status and "2 finished" in status
    result = run_script("benchmark/report.py", str(grid / "runs"), "--output", str(grid / "report"), "--budgets", "1000", "3000")
    assert result.returncode == 0, result.stderr[-3000:]
    table = (grid / "report" / "report.md").read_text()
    assert "| drm | 1 |" in table and "| drqv2 | 1 |" in table


def test_a_preempted_run_checkpoints_is_requeued_and_resumes_to_the_reference_result(slurm, scenarios):
    grid = scenarios["grid"]
    log = log_of(grid)
    # Slurm's SIGTERM (the grace time is 90 s), a checkpoint at the episode end, the runner's own requeue
    # (a job that ends within its grace time is not requeued by Slurm), and the same run directory again
    assert "SIGTERM: stopping with a checkpoint at the end of this episode" in log
    assert_resumed_from_its_checkpoint(log)
    assert log.count("=== cartpole-balance__drm__1: attempt") == 2 and "=== continuing from" in log
    submitit_log = open(next((grid / "submitit").glob("*_0_log.out"))).read()
    assert "requeued" in submitit_log
    assert_logs_what_the_reference_logged(only_run_dir(grid, "*__drm__*"), scenarios["reference"].full_dir, 3000)


def test_a_time_limit_checkpoints_is_requeued_by_submitit_and_resumes(slurm, scenarios):
    limited = scenarios["limited"]
    log = log_of(limited)
    assert "SIGUSR2: stopping with a checkpoint at the end of this episode" in log
    stopped_at = assert_resumed_from_its_checkpoint(log)
    submitit_log = open(next((limited / "submitit").glob("*_0_log.err"))).read()
    assert "this job is timed-out" in submitit_log
    # up to the episode it trained after resuming, the run is the reference run (it is that run, longer),
    # but for an evaluation at frame 3,000, which the reference, ending there, does not make
    trained_to = min(stopped_at + 1000, 2999)
    assert_logs_what_the_reference_logged(only_run_dir(limited), scenarios["reference"].full_dir, trained_to)
    # scancel's SIGTERM stopped it with a checkpoint again (or, on a loaded machine, KillWait's SIGKILL came
    # first: from its last checkpoint), and a cancelled job is not requeued; a killed run is not running
    assert re.search(r"\| cartpole-balance__drm__1 \| stopped \| [\d,]+ \| 2 \|", status_of(slurm, limited))


def test_requests_the_cluster_cannot_meet_stop_with_one_line_naming_the_flag(slurm, tmp_path):
    def runner(*flags):  # a request that fits the test node, but for `flags`
        base = ["--env-ids", "cartpole-balance", "--seeds", "1", "--variants", "drm", *ON_THE_TEST_NODE, "--output-dir", str(tmp_path)]
        result = run_script("benchmark/run.py", *base, *flags, env=slurm)
        assert result.returncode != 0 and "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
        return result.stderr

    # what sbatch rejects
    assert "(--slurm-gpus-per-node: the partition has no GPUs (0 for CPU-only nodes))" in runner("--slurm-gpus-per-node", "1")
    assert "--slurm-mem-gb" in runner("--slurm-mem-gb", "100000")
    # what Slurm accepts and leaves pending for ever
    too_many_cpus = runner("--slurm-cpus-per-task", "64")
    assert "(PartitionConfig) and will not start: --slurm-cpus-per-task 64 is more than the partition's nodes have" in too_many_cpus
    # --status asks Slurm about a run whose task has not started: pending, and why
    pending = status_of(slurm, tmp_path)
    assert (
        "| cartpole-balance__drm__1 | pending |  | 0 | " in pending and "Slurm: pending (PartitionConfig): --slurm-cpus-per-task" in pending
    )
    assert "(PartitionTimeLimit) and will not start: --timeout-min is above the partition's time limit" in runner("--timeout-min", "120")
    subprocess.run(["scancel", "--user", "root", "--state", "PENDING"], env=slurm)
