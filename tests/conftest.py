import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from typing import NamedTuple

import pytest

# the scripts live at the repository root and are imported as modules by the unit tests
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# one thread per process: the tests' processes share the cores, and OpenMP threads that wait for each
# other spin on a core another process needs
os.environ.setdefault("OMP_NUM_THREADS", "1")

from helpers import only_run_dir, processes_with, run_script  # noqa: E402

# ---------------------------------------------------------------------------------------------------
# The reference runs: per script, a tiny run that checkpoints (with the replay) at every episode end and
# saves its model, run three ways: uninterrupted; SIGKILLed while it writes its second checkpoint; and
# resumed from there. The smoke tests read the uninterrupted run, the resume tests compare the resumed
# one with it, and the Slurm tests compare runs pre-empted and cut by a time limit with it.
# ---------------------------------------------------------------------------------------------------
REFERENCE_RUNS = {
    # script: (the run's identity, as benchmark/run.py gives it; its other flags; frames per episode)
    "drm.py": (
        ["--env-id", "cartpole-balance", "--seed", "1", "--exp-name", "drm"],
        ["--action-repeat", "10", "--num-seed-frames", "400", "--total-frames", "3000", "--eval-every-frames", "2000",
         "--num-eval-episodes", "2", "--perturb-interval-steps", "50"],
        1000,
    ),
    "drm_adroit.py": (
        ["--env-id", "hammer", "--seed", "1", "--exp-name", "drm"],
        ["--action-repeat", "10", "--num-seed-frames", "100", "--total-frames", "600", "--eval-every-frames", "400",
         "--num-eval-episodes", "2", "--perturb-interval-steps", "20"],
        200,
    ),
    "drm_metaworld.py": (
        ["--env-id", "reach", "--seed", "1", "--exp-name", "drm"],
        ["--action-repeat", "20", "--num-seed-frames", "400", "--total-frames", "1000", "--eval-every-frames", "1000",
         "--num-eval-episodes", "2", "--perturb-interval-steps", "10"],
        500,
    ),
}  # fmt: skip
STAND_INS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "stand_ins")
SMALL = ["--batch-size", "8", "--hidden-dim", "64", "--buffer-size", "2000", "--log-every-updates", "5", "--no-cuda"]
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


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook: without it, `pytest -o addopts=""` runs in one process
def pytest_xdist_auto_num_workers(config):
    """`-n auto`: a test process per core, and one more, for the time the cluster tests spend waiting."""
    return (os.cpu_count() or 1) + 1


# the longest tests first (the cluster tests wait for Slurm, and the other tests use the cores meanwhile),
# so that no long test is left to run alone at the end
FIRST = ["tests/test_slurm.py", "tests/test_speed.py::test_speed_on_the_cpu", "tests/test_experiments.py::test_a_local_time_limit",
         "tests/test_checkpoints.py", "tests/test_experiments.py::test_two_tiny_jobs"]  # fmt: skip


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: next((rank for rank, prefix in enumerate(FIRST) if item.nodeid.startswith(prefix)), len(FIRST)))


def reference_group(script):
    """The xdist group of the tests that read a script's reference runs: one test process makes them once."""
    return pytest.mark.xdist_group(f"reference-{script}")


def reference_flags(script):
    """The reference run's flags without the checkpoint, model, worker and video flags."""
    identity, flags, _ = REFERENCE_RUNS[script]
    return [*identity, *flags, *SMALL]


class ReferenceRuns(NamedTuple):
    full: subprocess.CompletedProcess  # uninterrupted, evaluating in this process
    full_dir: str
    killed: subprocess.CompletedProcess  # evaluating with 2 worker processes, SIGKILLed in its second checkpoint
    cut_write_left: list  # the temporary and replay files the killed run left, its cut-short checkpoint write among them
    leftover_workers: list  # processes of the killed run still alive after it
    resumed: subprocess.CompletedProcess  # the killed run resumed, evaluating in its own process
    cut_dir: str
    episode_frames: int


def make_reference_runs(script, full_path, cut_path, *flags):
    """The reference runs of a script, in two empty folders; `flags` go to all three (e.g. `--cuda`). They track
    their runs with a stand-in for Weights & Biases (tests/stand_ins/wandb.py)."""
    episode = REFERENCE_RUNS[script][2]
    checkpoints = ["--checkpoint-every-frames", str(episode), "--checkpoint-replay", "--save-model", "--track", *flags]
    tracked = {**os.environ, "PYTHONPATH": os.pathsep.join([STAND_INS, *filter(None, [os.environ.get("PYTHONPATH")])])}
    full = run_script(script, *reference_flags(script), *checkpoints, "--eval-workers", "1", cwd=full_path, env=tracked)
    assert full.returncode == 0, full.stderr[-3000:]
    marker = str(uuid.uuid4())
    killed = run_script(script, *reference_flags(script), *checkpoints, "--eval-workers", "2", "--capture-video",
                        prefix=("-c", KILLED_IN_THE_SECOND_CHECKPOINT_WRITE), cwd=cut_path,
                        env={**tracked, "DRM_TEST_RUN": marker})  # fmt: skip
    leftover = processes_with(marker)
    cut_dir = only_run_dir(cut_path)
    cut_write_left = sorted(name for name in os.listdir(cut_dir) if name.endswith((".tmp", ".bin")))
    resumed = run_script(script, "--resume", cut_dir, "--eval-workers", "1", cwd=cut_path, env=tracked)
    return ReferenceRuns(full, only_run_dir(full_path), killed, cut_write_left, leftover, resumed, cut_dir, episode)


@pytest.fixture(scope="session")
def reference_runs(tmp_path_factory):
    """reference_runs(script) -> ReferenceRuns on the CPU, made once per session and script."""
    made = {}

    def get(script):
        if script not in made:
            made[script] = make_reference_runs(script, tmp_path_factory.mktemp("full"), tmp_path_factory.mktemp("cut"))
        return made[script]

    return get


# ---------------------------------------------------------------------------------------------------
# A real single-node Slurm (slurmctld, slurmd and munge on this machine), for the cluster tests
# ---------------------------------------------------------------------------------------------------
SLURM_PACKAGES = ["slurm-wlm", "munge"]
SLURM_CONF = """\
ClusterName=drmtest
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=5
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobRequeue=1
KillWait=30
SlurmdParameters=config_overrides
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
SlurmctldPort=16817
SlurmdPort=16818
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
NodeName=localhost NodeAddr=127.0.0.1 CPUs=4 RealMemory={memory_mb} State=UNKNOWN
PartitionName=main Nodes=ALL Default=YES MaxTime=60 State=UP PriorityTier=1 PreemptMode=OFF
PartitionName=preemptible Nodes=ALL MaxTime=60 State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=90
PartitionName=high Nodes=ALL MaxTime=60 State=UP PriorityTier=10 PreemptMode=OFF
"""


def slurm_unavailable_reason():
    """Why a single-node Slurm cannot be started here (None: it can, after installing what is missing)."""
    if shutil.which("slurmctld") and shutil.which("munged"):
        return None if os.geteuid() == 0 else "the Slurm tests start slurmctld and slurmd, which needs root"
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "Slurm is not installed, and installing it needs root and apt-get (Debian/Ubuntu)"
    environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=environment)
    install = subprocess.run(["apt-get", "install", "-y", "-q", *SLURM_PACKAGES], capture_output=True, text=True, env=environment)
    return None if install.returncode == 0 else f"apt-get install {' '.join(SLURM_PACKAGES)} failed: {install.stderr.strip()[-300:]}"


@pytest.fixture(scope="session")
def slurm():
    """The environment of a running single-node Slurm: a node of 4 CPUs (more than this machine has, so
    that the tests' tiny runs share it) and three partitions, `main`, `preemptible` (its jobs are
    requeued by jobs of `high`, after a 90 s grace time: an episode of the tests' runs takes up to
    about 70 s on a loaded 2-core machine) and `high`. Where one cannot be started, the
    tests skip with the reason, except where DRM_REQUIRE_SLURM is set (CI), where they fail."""
    reason = slurm_unavailable_reason()
    if reason:
        if os.environ.get("DRM_REQUIRE_SLURM"):
            pytest.fail(f"DRM_REQUIRE_SLURM is set, but {reason}")
        pytest.skip(reason)
    directory = tempfile.mkdtemp(prefix="drm-slurm-")
    os.makedirs(os.path.join(directory, "state")), os.makedirs(os.path.join(directory, "spool"))
    with open("/proc/meminfo") as meminfo:
        memory_mb = int(next(line for line in meminfo if line.startswith("MemTotal")).split()[1]) // 1024 * 8 // 10
    with open(os.path.join(directory, "slurm.conf"), "w") as conf:
        conf.write(SLURM_CONF.format(dir=directory, memory_mb=memory_mb))
    env = {**os.environ, "SLURM_CONF": os.path.join(directory, "slurm.conf")}
    started_munged = subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode != 0
    if started_munged:
        for path in ["/run/munge", "/var/lib/munge", "/var/log/munge"]:
            os.makedirs(path, exist_ok=True)
            shutil.chown(path, "munge", "munge")
        os.chmod("/run/munge", 0o755)
        shutil.chown("/etc/munge/munge.key", "munge", "munge")
        os.chmod("/etc/munge/munge.key", 0o600)
        subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)
    subprocess.run(["slurmctld", "-c"], env=env, check=True)
    subprocess.run(["slurmd", "-N", "localhost"], env=env, check=True)
    for _ in range(30):
        if subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True).stdout.strip() == "idle":
            break
        time.sleep(1)
    else:
        pytest.fail(f"the test Slurm did not come up: {open(os.path.join(directory, 'slurmctld.log')).read()[-2000:]}")
    yield env
    subprocess.run(["scancel", "--full", "--user", "root"], env=env, capture_output=True)
    pid_files = [os.path.join(directory, f"{daemon}.pid") for daemon in ["slurmd", "slurmctld"]]
    for pid_file in pid_files + (["/run/munge/munged.pid"] if started_munged else []):  # a munged found running stays
        with open(pid_file) as pids:
            os.kill(int(pids.read()), signal.SIGTERM)
    shutil.rmtree(directory, ignore_errors=True)
