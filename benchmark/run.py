"""Run an experiment grid of one script (env ids x seeds x variants) as a submitit job array, on this
machine (`--launcher local`, submitit's local executor) or on a Slurm cluster (`--launcher slurm`)
with the same code, and report its state.

A run is (env id, variant, seed) in an output directory. Each run writes
`{output_dir}/runs/{env_id}__{variant}__{seed}__{time}` (read by `benchmark/report.py`), appends its
output to `{output_dir}/logs/{env_id}__{variant}__{seed}.log` and its state to
`{output_dir}/status/`; submitit's own files go to `{output_dir}/submitit`. The same grid submitted
again, or a task requeued by Slurm or submitit, continues every run from its checkpoint in its run
directory, skips the finished ones and leaves a running one alone.

    python benchmark/run.py --env-ids walker-walk cheetah-run --seeds 1 2 3 --workers 2 --dry-run
    python benchmark/run.py --script drm_metaworld.py --env-ids coffee-push --launcher slurm \\
        --slurm-partition gpu --sweep "threshold-0.05=--dormant-threshold 0.05"
    python benchmark/run.py --status --output-dir experiments
"""

import contextlib
import fcntl
import glob
import io
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Literal

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the ablations of the three DrM mechanisms; drqv2 switches all three off
VARIANTS = {
    "drm": [],
    "no-perturb": ["--no-perturb"],
    "linear-exploration": ["--exploration", "linear"],
    "no-exploit": ["--no-exploit"],
    "drqv2": ["--no-perturb", "--exploration", "linear", "--no-exploit"],
}
# On Slurm, runs checkpoint every this many env frames by default: about 30 (60 for drm.py's 30.1M-frame
# tasks) minutes of a GPU run, against about 30 s to write a checkpoint holding a full 1M-transition replay
CHECKPOINT_EVERY_FRAMES, LONG_RUN_CHECKPOINT_EVERY_FRAMES = 500_000, 1_000_000
# exit statuses of a run that a stop signal ended: 128 + SIGINT, SIGTERM, SIGUSR1, SIGUSR2 after its
# checkpoint at the episode end, or minus the signal when it came before the run's handlers were in place
# (while it loaded a checkpoint): either way the run continues from its last checkpoint
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
STOPPED = {128 + signum for signum in STOP_SIGNALS} | {-signum for signum in STOP_SIGNALS}
LOCAL_SIGNAL_DELAY_S = 30  # submitit's local executor signals a task this long before its time limit
# why a pending Slurm job never starts, by the flag that caused it
NEVER_STARTS = {
    "PartitionConfig": "--slurm-cpus-per-task, --slurm-gpus-per-node or --slurm-mem-gb asks for more than the partition's nodes have",
    "PartitionTimeLimit": "--timeout-min is above the partition's time limit",
    "PartitionNodeLimit": "the partition has too few nodes for the job",
    "ReqNodeNotAvail": "no node of the partition can take the job now (drained, down or reserved)",
    "InvalidAccount": "the account (--slurm-options account=...) is not valid",
    "InvalidQOS": "the QOS (--slurm-options qos=...) is not valid",
}  # fmt: skip
# what sbatch rejects, by the flag to change
SBATCH_ERRORS = {
    "Invalid generic resource": "--slurm-gpus-per-node: the partition has no GPUs (0 for CPU-only nodes)",
    "Memory specification can not be satisfied": "--slurm-mem-gb: more memory than the partition's nodes have",
    "More processors requested than permitted": "--slurm-cpus-per-task: more CPUs than the partition's nodes have",
    "Requested node configuration is not available": "--slurm-cpus-per-task, --slurm-gpus-per-node or --slurm-mem-gb: no node has that",
    "invalid partition": "--slurm-partition: no such partition",
    "Invalid account": "--slurm-options account=...: not a valid account",
    "Invalid qos": "--slurm-options qos=...: not a valid QOS",
    "Requested time limit is invalid": "--timeout-min: above the partition's time limit",
}  # fmt: skip


@dataclass
class Args:
    env_ids: list[str] = field(default_factory=list)
    """tasks of the script, e.g. walker-walk cheetah-run"""
    script: Literal["drm.py", "drm_adroit.py", "drm_metaworld.py"] = "drm.py"
    """the training script"""
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    """variants to run, from: drm, no-perturb, linear-exploration, no-exploit, drqv2"""
    sweep: list[str] = field(default_factory=list)
    """extra variants as `name=flags`, e.g. `threshold-0.05=--dormant-threshold 0.05`"""
    extra_flags: str = ""
    """flags appended to every command, e.g. `--total-frames 500000 --no-cuda`; they win over the runner's"""
    output_dir: str = "experiments"
    """working directory of the runs: runs/, videos/, logs/, status/ and submitit/ go there"""
    launcher: Literal["local", "slurm"] = "local"
    """`local`: the job array runs on this machine (submitit's local executor); `slurm`: it is submitted to Slurm"""
    workers: int = 1
    """local only: runs at a time, spread over the GPUs this shell sees and sharing the CPU threads;
    on Slurm every run is its own array task"""
    timeout_min: int = 4320
    """time limit of one run in minutes (Slurm's --time; locally, a worker's limit is this times its number of runs)"""
    checkpoint_every_frames: int | None = None
    """the runs' --checkpoint-every-frames (None: on Slurm 500,000, or 1,000,000 for drm.py's 30.1M-frame tasks;
    locally none, a run then checkpoints only when stopped by a signal; 0: none)"""
    checkpoint_replay: bool = True
    """checkpoints hold the replay (up to 21.2 GB a run with a 1M-transition buffer), so that a resumed run is
    exactly the uninterrupted one; `--no-checkpoint-replay`: it resumes with an empty buffer"""
    dry_run: bool = False
    """print the commands and exit"""
    status: bool = False
    """print the state of every run in --output-dir (finished, running, stopped with a checkpoint, failed,
    pending) and exit"""
    slurm_partition: str | None = None
    """Slurm partition (None: the cluster's default)"""
    slurm_gpus_per_node: int = 1
    """GPUs of each run (0 for CPU-only nodes: the runs train on the CPU)"""
    slurm_cpus_per_task: int = 8
    """CPU cores of each run: its OMP_NUM_THREADS, and its evaluation workers (one per episode, up to these)"""
    slurm_mem_gb: int = 64
    """host memory of each run (a replay that does not fit in GPU memory lives here: 21.2 GB for 1M transitions)"""
    slurm_signal_delay_s: int = 300
    """seconds before the time limit at which a run gets SIGUSR2, checkpoints at its episode end and is
    requeued: enough for an evaluation, an episode and a checkpoint write"""
    slurm_max_timeouts: int = 30
    """time limits a run may reach and be requeued (pre-emptions do not count)"""
    slurm_options: list[str] = field(default_factory=list)
    """more sbatch options as `key=value`, e.g. `account=my-lab qos=high constraint=a100`"""


def checkpoint_flags(args, env_id):
    """The checkpoint flags every run gets before --extra-flags (which win)."""
    every = args.checkpoint_every_frames
    if every is None and args.launcher == "slurm":
        every = CHECKPOINT_EVERY_FRAMES
        if args.script == "drm.py" and env_id in long_dmc_tasks():
            every = LONG_RUN_CHECKPOINT_EVERY_FRAMES
    flags = ["--checkpoint-every-frames", str(every)] if every else []
    return flags + (["--checkpoint-replay"] if args.checkpoint_replay else [])


def long_dmc_tasks():
    """drm.py's tasks whose preset is 30.1M frames."""
    sys.path.insert(0, ROOT)
    import drm

    return {env_id for env_id, preset in drm.TASK_PRESETS.items() if preset["total_frames"] > 10_000_000}


def expand(args):
    """(name, command) of every run of the grid."""
    variants = {name: VARIANTS[name] for name in args.variants}
    for entry in args.sweep:
        name, _, flags = entry.partition("=")
        variants[name] = shlex.split(flags)
    jobs = []
    for env_id, variant, seed in itertools.product(args.env_ids, variants, args.seeds):
        command = [sys.executable, os.path.join(ROOT, args.script), "--env-id", env_id, "--seed", str(seed), "--exp-name",
                   variant, *variants[variant], *checkpoint_flags(args, env_id), *shlex.split(args.extra_flags)]  # fmt: skip
        jobs.append((f"{env_id}__{variant}__{seed}", command))
    return jobs


# ---------------------------------------------------------------------------------------------------
# What a run has left in the output directory: its run directory, log and status
# ---------------------------------------------------------------------------------------------------
def run_dirs(output_dir, name):
    """The run directories of a run, oldest first (one, unless something made more)."""
    return sorted(glob.glob(os.path.join(output_dir, "runs", f"{glob.escape(name)}__*")), key=lambda path: path.rsplit("__", 1)[1])


def read_status(output_dir, name):
    try:
        with open(os.path.join(output_dir, "status", f"{name}.json")) as file:
            return json.load(file)
    except (OSError, ValueError):
        return {}


def write_status(output_dir, name, **fields):
    """Update a run's status file (written whole and renamed over the old one)."""
    status = {**read_status(output_dir, name), **fields, "updated": time.strftime("%Y-%m-%d %H:%M:%S")}
    path = os.path.join(output_dir, "status", f"{name}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as file:
        json.dump(status, file, indent=1)
    os.replace(path + ".tmp", path)


def lock_run(output_dir, name, tries=1):
    """An open file holding the run's exclusive lock, or None if a live process holds it (the run is
    running). The lock goes with the process, however it ends."""
    os.makedirs(os.path.join(output_dir, "status"), exist_ok=True)
    lock = open(os.path.join(output_dir, "status", f"{name}.lock"), "w")
    for attempt in range(tries):
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return lock
        except BlockingIOError:
            time.sleep(0.5 if attempt + 1 < tries else 0)
    lock.close()
    return None


def log_tail(output_dir, name, size=1 << 18):
    try:
        with open(os.path.join(output_dir, "logs", f"{name}.log"), "rb") as log:
            log.seek(max(0, os.fstat(log.fileno()).st_size - size))
            return log.read().decode(errors="replace")
    except OSError:
        return ""


def last_match(pattern, text):
    found = re.findall(pattern, text)
    return int(found[-1]) if found else None


# ---------------------------------------------------------------------------------------------------
# One task of the job array, on this machine or a Slurm node
# ---------------------------------------------------------------------------------------------------
class GridTask:
    """One task of the job array: runs (or continues) its runs one after another in `output_dir`. It is
    checkpointable in submitit's sense: when submitit relays SIGUSR2 (a time limit or a pre-emption is
    near) it calls `checkpoint`, which waits for the run, signalled too, to write its checkpoint and exit,
    and then lets submitit requeue this same task, which resumes the run."""

    def __init__(self, signal_delay_s=90, on_slurm=True):
        self.signal_delay_s = signal_delay_s  # how long before the time limit submitit relays SIGUSR2
        self.on_slurm = on_slurm  # a local grid started inside a Slurm allocation must not requeue it
        self.child, self.child_name, self.output_dir = None, None, None

    def job_id(self):
        return slurm_job_id() if self.on_slurm else None

    def __call__(self, runs, output_dir, env_changes):
        """Returns {name: exit status} of the runs it ran; raises if a run failed or stopped and is not
        requeued, so that the array task fails."""
        self.output_dir = output_dir
        env = {key: value for key, value in {**os.environ, **env_changes}.items() if value is not None}
        statuses = {}
        for name, command in runs:
            statuses[name] = self.run(name, command, env)
        cut_short = {name: status for name, status in statuses.items() if status not in (0, None)}
        if any(status in STOPPED for status in cut_short.values()) and self.job_id() and requeue(self.job_id()):
            return statuses  # Slurm ends this task and starts it again, which continues the runs
        if cut_short:
            raise RuntimeError("runs that did not finish: " + ", ".join(f"{name} (exit {status})" for name, status in cut_short.items()))
        return statuses

    def run(self, name, command, env):
        """Run one run, or continue it from its checkpoint; its exit status (None: left alone)."""
        output_dir = self.output_dir
        lock = lock_run(output_dir, name, tries=6)  # --status holds it for a moment
        if lock is None:
            print(f"{name}: running in another task; left alone", flush=True)
            return None
        status = read_status(output_dir, name)
        if status.get("state") == "finished":
            print(f"{name}: finished before; not run again", flush=True)
            return 0
        existing = run_dirs(output_dir, name)
        resumable = [path for path in existing if os.path.exists(os.path.join(path, "checkpoint.pt"))]
        os.makedirs(os.path.join(output_dir, "logs"), exist_ok=True)
        with open(os.path.join(output_dir, "logs", f"{name}.log"), "a") as log:
            attempt = status.get("attempts", 0) + 1
            started = time.strftime("%Y-%m-%d %H:%M:%S")
            gpus = env.get("CUDA_VISIBLE_DEVICES", "(all)")
            print(f"=== {name}: attempt {attempt}, {started}, host {socket.gethostname()}, job {self.job_id() or 'local'}, "
                  f"CUDA_VISIBLE_DEVICES={gpus}", file=log)  # fmt: skip
            if resumable:
                command = [*command, "--resume", resumable[-1]]
                print(f"=== continuing from {resumable[-1]}", file=log)
            for path in existing:
                if path not in resumable[-1:]:  # stopped before its first checkpoint: started over
                    print(f"=== removing {path}: it has no checkpoint to continue from", file=log)
                    shutil.rmtree(path)
            print(f"=== {shlex.join(command)}", file=log, flush=True)
            write_status(output_dir, name, state="running", attempts=attempt, job=self.job_id() or "local",
                         host=socket.gethostname(), exit=None)  # fmt: skip
            # the run holds the lock too, so that it stays held if this task dies first (a run ends its
            # episode and checkpoints after a signal that ends this task at once)
            self.child = subprocess.Popen(command, cwd=output_dir, stdout=log, stderr=subprocess.STDOUT, env=env, pass_fds=[lock.fileno()])
            self.child_name = name
            exit_status = self.wait_for_child()
        self.child = None
        lock.close()
        return exit_status

    def wait_for_child(self, timeout=None):
        """The run's exit status, once it has ended (None if it is still running after `timeout` seconds).
        The wait is os.waitpid's, which `checkpoint` may also call from a signal handler."""
        child, deadline = self.child, None if timeout is None else time.monotonic() + timeout
        while child.returncode is None:
            try:
                pid, wait_status = os.waitpid(child.pid, 0 if deadline is None else os.WNOHANG)
            except ChildProcessError:  # collected by the other waiter
                break
            if pid:
                child.returncode = os.waitstatus_to_exitcode(wait_status)
                record_exit(self.output_dir, self.child_name, child.returncode)
            elif time.monotonic() > deadline:
                return None
            else:
                time.sleep(1)
        return child.returncode

    def checkpoint(self, runs, output_dir, env_changes):
        """submitit calls this on SIGUSR2, before it requeues the task: let the run checkpoint and exit."""
        import submitit

        if self.child is not None and self.child.returncode is None:
            # os.kill, not send_signal, which may collect the run's exit where wait_for_child cannot record it
            os.kill(self.child.pid, signal.SIGUSR2)  # a no-op if the run has it already
            timeout = max(self.signal_delay_s - 15, 5)  # then Slurm's own kill is near
            if self.wait_for_child(timeout) is None:
                print(f"{self.child_name}: no checkpoint within {timeout} s; requeued anyway", flush=True)
        return submitit.helpers.DelayedSubmission(GridTask(self.signal_delay_s, self.on_slurm), runs, output_dir, env_changes)


def record_exit(output_dir, name, exit_status):
    """The run's state from its exit status, with the frame of its last checkpoint."""
    tail = log_tail(output_dir, name)
    if exit_status == 0:
        state = "finished"
    elif exit_status in STOPPED:
        state = "stopped"
    else:
        state = "failed"
    last_line = next((line for line in reversed(tail.strip().splitlines()) if line.strip()), "")
    write_status(output_dir, name, state=state, exit=exit_status, checkpoint_frame=last_match(r"checkpoint: .* at global_step=(\d+)", tail),
                 reason=last_line if state == "failed" else None)  # fmt: skip


def slurm_job_id():
    """The Slurm job id of this array task (`{array}_{task}`), or None outside Slurm."""
    if "SLURM_ARRAY_JOB_ID" in os.environ:
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def requeue(job_id):
    """Put this Slurm job back in the queue (as submitit does after a checkpoint), unless it is no longer
    running: scancel sends the same SIGTERM as a pre-emption, and a cancelled job stays cancelled.
    Whether it was requeued."""
    for _ in range(3):  # squeue may time out while slurmctld is busy
        listing = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True)
        if listing.returncode == 0:
            break
        time.sleep(5)
    state = listing.stdout.strip()
    if listing.returncode == 0 and state != "RUNNING":
        print(f"job {job_id} is {state or 'gone'}: not requeued", flush=True)
        return False
    result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
    print(f"scontrol requeue {job_id}: {'requeued' if result.returncode == 0 else result.stderr.strip()}", flush=True)
    return result.returncode == 0


def gpu_assignment(workers, visible, shell_setting=None):
    """The CUDA_VISIBLE_DEVICES of each local worker: the visible GPUs dealt round-robin, one each; where
    there is no GPU, the shell's setting (None unsets it; "" keeps every GPU hidden)."""
    return [visible[worker % len(visible)] if visible else shell_setting for worker in range(workers)]


def visible_gpus():
    """The GPUs this shell sees: CUDA_VISIBLE_DEVICES if set, else every GPU nvidia-smi lists."""
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        return [device for device in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if device.strip()]
    try:
        listing = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True, text=True)
    except OSError:
        return []
    return listing.stdout.split() if listing.returncode == 0 else []


# ---------------------------------------------------------------------------------------------------
# The grid's state, from the output directory alone
# ---------------------------------------------------------------------------------------------------
def grid_status(output_dir, names=None):
    """[(name, state, frame, attempts, job, note)] of every run with a status in `output_dir` (and of
    `names`, if given, those without one as not started)."""
    status_dir = os.path.join(output_dir, "status")
    known = sorted(path[:-5] for path in os.listdir(status_dir) if path.endswith(".json")) if os.path.isdir(status_dir) else []
    rows = []
    for name in names or known:
        status = read_status(output_dir, name)
        state, note = status.get("state", "not started"), ""
        checkpoint_frame = status.get("checkpoint_frame")
        progress = last_match(r"global_step=(\d+)", log_tail(output_dir, name, size=1 << 16))
        lock = lock_run(output_dir, name)
        if lock is None:  # a live process holds it, whatever the file says
            state = "running"
        else:
            lock.close()
            if state == "running":  # no exit was recorded: the task was killed outright
                checkpoint_frame = last_match(r"checkpoint: .* at global_step=(\d+)", log_tail(output_dir, name))
                state, note = "stopped" if checkpoint_frame else "failed", "killed (no exit recorded)"
        if state == "stopped":
            note = f"{note}; " if note else ""
            note += f"checkpoint at frame {checkpoint_frame:,}" if checkpoint_frame else "no checkpoint"
        elif state == "failed" and status.get("reason"):
            note = note or f"exit {status.get('exit')}: {status['reason']}"
        directories = len(run_dirs(output_dir, name))
        if directories > 1:
            note += f" ({directories} run directories)"
        frame = progress if state in ("running", "finished", "failed") else checkpoint_frame
        rows.append((name, state, frame, status.get("attempts", 0), status.get("job", ""), note.strip()))
    return rows


def print_status(output_dir, names=None):
    rows = grid_status(output_dir, names)
    if not rows:
        sys.exit(f"run.py: no runs in {output_dir} (its status/ folder is empty)")
    print("| run | state | frames | attempts | job | note |\n|---|---|---|---|---|---|")
    for name, state, frame, attempts, job, note in rows:
        print(f"| {name} | {state} | {'' if frame is None else f'{frame:,}'} | {attempts} | {job} | {note} |")
    counts = {
        state: sum(row[1] == state for row in rows) for state in ("finished", "running", "stopped", "failed", "pending", "not started")
    }
    print(", ".join(f"{count} {state}" for state, count in counts.items() if count))


# ---------------------------------------------------------------------------------------------------
# Submission
# ---------------------------------------------------------------------------------------------------
def check_args(args):
    unknown = [name for name in args.variants if name not in VARIANTS]
    if unknown:
        sys.exit(f"run.py: unknown variant(s) {', '.join(unknown)}; valid: {', '.join(VARIANTS)} (or --sweep name=flags)")
    malformed = [entry for entry in args.sweep if "=" not in entry]
    if malformed:
        sys.exit(f"run.py: --sweep entries are `name=flags`, got {', '.join(malformed)}")
    malformed = [entry for entry in args.slurm_options if "=" not in entry]
    if malformed:
        sys.exit(f"run.py: --slurm-options entries are `key=value`, got {', '.join(malformed)}")
    for flag in ["workers", "timeout_min", "slurm_cpus_per_task", "slurm_mem_gb", "slurm_max_timeouts"]:
        if getattr(args, flag) < 1:
            sys.exit(f"run.py: --{flag.replace('_', '-')} must be >= 1 (got {getattr(args, flag)})")
    for flag in ["slurm_gpus_per_node", "slurm_signal_delay_s", "checkpoint_every_frames"]:
        if (getattr(args, flag) or 0) < 0:
            sys.exit(f"run.py: --{flag.replace('_', '-')} must be >= 0 (got {getattr(args, flag)})")
    if not args.env_ids and not args.status:
        sys.exit("run.py: --env-ids is required (or --status)")


def submit(executor, task, groups, output_dir, env_changes):
    """Submit the job array, one task per group of runs; what sbatch rejects stops here with one line
    naming the flag."""
    import submitit

    try:
        with contextlib.redirect_stderr(io.StringIO()):  # submitit echoes sbatch's error: it is restated below
            return executor.map_array(task, groups, [output_dir] * len(groups), env_changes)
    except submitit.core.utils.FailedJobError as error:
        message = str(error).strip().splitlines()[-1] if str(error).strip() else "sbatch failed"
        flag = next((flag for key, flag in SBATCH_ERRORS.items() if key.lower() in message.lower()), None)
        sys.exit(f"run.py: sbatch rejected the job array: {message}" + (f" ({flag})" if flag else ""))


def report_pending(args, array_id, seconds=15):
    """Watch the new array for a few seconds; stop with one line if Slurm keeps it pending for a reason
    that does not clear by waiting (the same reason twice in a row: Slurm may change its first one)."""
    last = None
    for _ in range(seconds):
        listing = subprocess.run(["squeue", "-h", "-r", "-j", array_id, "-o", "%T %r"], capture_output=True, text=True).stdout
        reasons = sorted({line.split(maxsplit=1)[1].strip() for line in listing.splitlines() if line.startswith("PENDING")})
        fatal = next((reason for reason in reasons if reason in NEVER_STARTS), None)
        if fatal and fatal == last:
            sys.exit(f"run.py: Slurm array {array_id} is pending ({fatal}) and will not start: {pending_cause(args, fatal)}; "
                     f"cancel it with `scancel {array_id}` and submit again")  # fmt: skip
        if "PENDING" not in listing:
            return
        last = fatal
        time.sleep(1)


def pending_cause(args, reason):
    """The flag behind a PartitionConfig pend, from the partition's nodes as sinfo lists them."""
    if reason != "PartitionConfig":
        return NEVER_STARTS[reason]
    partition = ["-p", args.slurm_partition] if args.slurm_partition else []
    nodes = subprocess.run(["sinfo", "-h", *partition, "-o", "%c %m %G"], capture_output=True, text=True).stdout.split("\n")
    nodes = [line.split() for line in nodes if line.strip()]
    if nodes and args.slurm_cpus_per_task > max(int(cpus.rstrip("+")) for cpus, _, _ in nodes):
        return f"--slurm-cpus-per-task {args.slurm_cpus_per_task} is more than the partition's nodes have"
    if nodes and args.slurm_mem_gb * 1024 > max(int(memory.rstrip("+")) for _, memory, _ in nodes):
        return f"--slurm-mem-gb {args.slurm_mem_gb} is more than the partition's nodes have"
    if nodes and args.slurm_gpus_per_node and not any("gpu" in gres for _, _, gres in nodes):
        return f"--slurm-gpus-per-node {args.slurm_gpus_per_node}: the partition's nodes have no GPU (0 for CPU-only nodes)"
    return NEVER_STARTS[reason]


def main(args):
    check_args(args)
    output_dir = os.path.abspath(args.output_dir)  # the jobs may start in another directory
    if args.status:
        print_status(output_dir, [name for name, _ in expand(args)] if args.env_ids else None)
        return
    jobs = expand(args)
    if args.dry_run:
        for _, command in jobs:
            print(shlex.join(command))
        return
    try:
        import submitit
    except ImportError:
        sys.exit("run.py: the launcher needs submitit: pip install -r requirements-experiments.txt")
    if args.launcher == "slurm" and not (shutil.which("sbatch") and shutil.which("srun")):
        sys.exit("run.py: --launcher slurm needs Slurm's sbatch and srun on the PATH (run it where you submit Slurm jobs)")

    if args.launcher == "slurm":
        groups = [[job] for job in jobs]
        threads = str(args.slurm_cpus_per_task)
        env_changes = [{"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}] * len(groups)
    else:
        # one array task per worker, each running its share of the grid, so that at most `workers` runs
        # share this machine: they split its CPU threads, and each has a GPU of its own while there are
        # GPUs enough (submitit's local executor hides every GPU: each worker is given its own)
        groups = [jobs[worker :: args.workers] for worker in range(min(args.workers, len(jobs)))]
        threads = str(max(1, (os.cpu_count() or 1) // len(groups)))
        env_changes = []
        for gpu in gpu_assignment(len(groups), visible_gpus(), os.environ.get("CUDA_VISIBLE_DEVICES")):
            env_changes.append({"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "CUDA_VISIBLE_DEVICES": gpu})
    executor = submitit.AutoExecutor(
        folder=os.path.join(output_dir, "submitit"), cluster=args.launcher, slurm_max_num_timeout=args.slurm_max_timeouts
    )
    # the slurm_* parameters apply only on Slurm
    executor.update_parameters(
        name="drm", timeout_min=args.timeout_min * max(len(group) for group in groups),
        slurm_partition=args.slurm_partition, slurm_gpus_per_node=args.slurm_gpus_per_node or None,
        slurm_cpus_per_task=args.slurm_cpus_per_task, slurm_mem_gb=args.slurm_mem_gb,
        slurm_signal_delay_s=args.slurm_signal_delay_s,
        slurm_additional_parameters=dict(entry.split("=", 1) for entry in args.slurm_options),
    )  # fmt: skip
    for name, _ in jobs:
        lock = lock_run(output_dir, name)
        if lock is None:  # held by a task running it, which keeps its own status
            continue
        if read_status(output_dir, name).get("state") != "finished":
            write_status(output_dir, name, state="pending")
        lock.close()
    on_slurm = args.launcher == "slurm"
    task = GridTask(args.slurm_signal_delay_s if on_slurm else LOCAL_SIGNAL_DELAY_S, on_slurm)
    submitted = submit(executor, task, groups, output_dir, env_changes)
    if args.launcher == "slurm":
        array_id = submitted[0].job_id.split("_")[0]
        for name, _ in jobs:
            if read_status(output_dir, name).get("state") == "pending":
                write_status(output_dir, name, job=array_id)
        report_pending(args, array_id)
        print(f"submitted {len(jobs)} runs as Slurm array {array_id}; logs in {output_dir}/logs, runs in {output_dir}/runs; "
              f"state: python {os.path.abspath(__file__)} --status --output-dir {args.output_dir}")  # fmt: skip
        return

    failed = []
    for job, group in zip(submitted, groups, strict=True):
        try:
            job.result()
        except submitit.core.utils.UncompletedJobError:
            failed += [name for name, _ in group if read_status(output_dir, name).get("state") != "finished"]
    print(f"{len(jobs) - len(failed)} of {len(jobs)} runs finished; logs in {output_dir}/logs, runs in {output_dir}/runs")
    if failed:
        sys.exit(f"run.py: not finished: {', '.join(failed)} (see their logs, and --status)")


if __name__ == "__main__":
    main(tyro.cli(Args))
