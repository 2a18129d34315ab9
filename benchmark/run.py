"""Run an experiment grid of one script (env ids x seeds x variants) as a submitit job array, on this
machine (`--launcher local`, submitit's local executor) or on a Slurm cluster (`--launcher slurm`)
with the same code, and report its state.

A run is (env id, variant, seed) in an output directory. Each run writes
`{output_dir}/runs/{env_id}__{variant}__{seed}__{time}` (read by `benchmark/report.py`), appends its
output to `{output_dir}/logs/{env_id}__{variant}__{seed}.log` and its state to
`{output_dir}/status/`; submitit's own files go to `{output_dir}/submitit`. The same grid submitted
again, or a task requeued by Slurm or submitit, continues every run from its checkpoint in its run
directory, skips the finished ones and waits for one that another process holds.

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
# Runs checkpoint every this many env frames by default: about 30 (60 for drm.py's 30.1M-frame tasks) minutes
# of a GPU run, against 16 s to write a checkpoint holding a full 1M-transition replay
CHECKPOINT_EVERY_FRAMES, LONG_RUN_CHECKPOINT_EVERY_FRAMES = 500_000, 1_000_000
# exit statuses of a run that a stop signal ended: 128 + SIGINT, SIGTERM, SIGUSR1, SIGUSR2 after its
# checkpoint at the episode end, or minus the signal when it came before the run's handlers were in place
# (while it loaded a checkpoint): either way the run continues from its last checkpoint
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
STOPPED = {128 + signum for signum in STOP_SIGNALS} | {-signum for signum in STOP_SIGNALS}
# locally, a task is signalled this long before its time limit (at most half of it), and waits for its run's
# checkpoint until 15 s before the limit: an episode, an evaluation and a write of a 21 GB replay on a slow disk
LOCAL_SIGNAL_DELAY_S = 900
# a run directory's own lock (the scripts' run.lock) from another host, refreshed this recently, is held by a
# live process (the scripts' STALE_LOCK_S)
RUN_LOCK_FRESH_S = 120
LOCK_POLL_S = 5  # a task waiting for a run that another process holds looks again this often
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
    """the runs' --checkpoint-every-frames (None: 500,000, or 1,000,000 for drm.py's 30.1M-frame tasks; 0: none,
    a run then checkpoints only when a signal stops it)"""
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
    """time limits a run may reach and be requeued (pre-emptions do not count); on this machine submitit starts a
    task at most 6 times"""
    slurm_options: list[str] = field(default_factory=list)
    """more sbatch options as `key=value`, e.g. `account=my-lab qos=high constraint=a100`"""


def checkpoint_flags(args, env_id):
    """The checkpoint flags every run gets before --extra-flags (which win)."""
    every = args.checkpoint_every_frames
    if every is None:
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


def threads_per_run(args, runs):
    """The CPU threads of each run: on Slurm its task's cores; on this machine its share of the cores, with
    `runs` in the grid (at most --workers at a time)."""
    if args.launcher == "slurm":
        return args.slurm_cpus_per_task
    return max(1, len(os.sched_getaffinity(0)) // max(1, min(args.workers, runs)))


def expand(args):
    """(name, command) of every run of the grid. Each run's evaluation workers fit its threads, before
    --extra-flags (which win): by default a run starts one per episode up to the machine's cores."""
    variants = {name: VARIANTS[name] for name in args.variants}
    for entry in args.sweep:
        name, _, flags = entry.partition("=")
        variants[name] = shlex.split(flags)
    grid = list(itertools.product(args.env_ids, variants, args.seeds))
    threads = str(threads_per_run(args, len(grid)))
    jobs = []
    for env_id, variant, seed in grid:
        command = [sys.executable, os.path.join(ROOT, args.script), "--env-id", env_id, "--seed", str(seed), "--exp-name",
                   variant, *variants[variant], *checkpoint_flags(args, env_id), "--eval-workers", threads,
                   *shlex.split(args.extra_flags)]  # fmt: skip
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


def lock_run(output_dir, name):
    """An open file holding the run's exclusive lock, or None if a live process holds it (a task running the
    run, or the run itself, which inherits it). The lock goes with the process, however it ends. A filesystem
    without flock stops run.py in one line."""
    path = os.path.join(output_dir, "status", f"{name}.lock")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    lock = open(path, "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return lock
    except BlockingIOError:
        lock.close()
        return None
    except OSError as error:  # ENOSYS, EOPNOTSUPP, ENOLCK: no flock on this filesystem
        lock.close()
        sys.exit(f"run.py: cannot lock {path}: {filesystem_of(path)} does not support flock ({error.strerror}); put --output-dir on "
                 "a filesystem that does, e.g. a local disk, or ask for it (Lustre: mount with -o flock)")  # fmt: skip


def filesystem_of(path):
    """`the {type} filesystem at {mount point}` that holds `path`, from /proc/mounts."""
    path, found = os.path.realpath(path), ("?", "/")
    with contextlib.suppress(OSError), open("/proc/mounts") as mounts:
        for line in mounts:
            _, mount_point, kind = line.split()[:3]
            if (path + "/").startswith(mount_point.rstrip("/") + "/") and len(mount_point) >= len(found[1]):
                found = kind, mount_point
    return f"the {found[0]} filesystem at {found[1]}"


def run_record(path):
    """The record a run keeps in its run directory (`run.json`, which the scripts write): its attempts, its last
    complete checkpoint ({"frame", "replay"}), its last failed checkpoint write, and the frame it finished at;
    {} where there is none."""
    try:
        with open(os.path.join(path, "run.json")) as file:
            return json.load(file)
    except (OSError, ValueError):
        return {}


def run_held_elsewhere(path):
    """Whether a live process holds the run directory `path` by its run.lock (a run started by hand, or by a
    task on another node, where flock is per node): one on this host while the process the lock names runs
    (the scripts' own rule for taking a lock over), one from another host, or a lock that cannot be read,
    while it is refreshed within RUN_LOCK_FRESH_S."""
    lock_path = os.path.join(path, "run.lock")
    try:
        age = time.time() - os.stat(lock_path).st_mtime
    except OSError:
        return False
    with contextlib.suppress(OSError, ValueError, AttributeError), open(lock_path) as file:
        holder = json.load(file)
        if holder.get("host") == socket.gethostname() and holder.get("pids") == pid_space():
            return process_start(holder.get("pid")) == holder.get("started")
    return age < RUN_LOCK_FRESH_S


def process_start(pid):
    """When process `pid` started, in clock ticks since boot (None if there is no such process), as the
    scripts record it in run.lock: with the boot, it names a process where its pid alone may have been reused."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return int(stat.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def pid_space():
    """This boot of the kernel and this pid namespace, as the scripts record them in run.lock (None where
    /proc cannot tell): where a pid in a lock means the same process as here."""
    with contextlib.suppress(OSError), open("/proc/sys/kernel/random/boot_id") as boot:
        return f"{boot.read().strip()}/{os.readlink('/proc/self/ns/pid')}"


def log_tail(output_dir, name, size=1 << 16):
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
        cut_short = {name: status for name, status in statuses.items() if status != 0}
        if any(status in STOPPED for status in cut_short.values()) and self.job_id() and requeue(self.job_id()):
            return statuses  # Slurm ends this task and starts it again, which continues the runs
        if cut_short:
            raise RuntimeError("runs that did not finish: " + ", ".join(f"{name} (exit {status})" for name, status in cut_short.items()))
        return statuses

    def run(self, name, command, env):
        """Run one run to its end, or continue it from its checkpoint; its exit status."""
        output_dir = self.output_dir
        lock = self.wait_for_run(name)
        status, existing = read_status(output_dir, name), run_dirs(output_dir, name)
        if status.get("state") == "finished" or (existing and run_record(existing[-1]).get("finished")):
            print(f"{name}: finished before; not run again", flush=True)
            write_status(output_dir, name, state="finished")  # a run that ended after its task had gone says so itself
            lock.close()
            return 0
        resumable = [path for path in existing if os.path.exists(os.path.join(path, "checkpoint.pt"))]
        os.makedirs(os.path.join(output_dir, "logs"), exist_ok=True)
        with open(os.path.join(output_dir, "logs", f"{name}.log"), "a") as log:
            attempt = status.get("attempts", 0) + 1
            started = time.strftime("%Y-%m-%d %H:%M:%S")
            devices = ", ".join(f"{key}={env.get(key, '(unset)')}" for key in ("CUDA_VISIBLE_DEVICES", "MUJOCO_EGL_DEVICE_ID"))
            print(f"=== {name}: attempt {attempt}, {started}, host {socket.gethostname()}, job {self.job_id() or 'local'}, {devices}",
                  file=log)  # fmt: skip
            if resumable:
                command = [*command, "--resume", resumable[-1]]
                print(f"=== continuing from {resumable[-1]}", file=log)
            for path in existing:
                if path not in resumable[-1:]:  # stopped before its first checkpoint: kept aside, started over
                    aside = os.path.join(output_dir, "failed_attempts", os.path.basename(path))
                    print(f"=== moving {path} to {aside}: it has no checkpoint to continue from", file=log)
                    os.makedirs(os.path.dirname(aside), exist_ok=True)
                    os.replace(path, aside)
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

    def wait_for_run(self, name):
        """The run's lock, once no live process holds the run: another task running it; the run itself, when
        the task that started it is gone (at a local time limit the task is started again while its run
        still writes its checkpoint); or a process that holds its run directory (a run started by hand, or by
        a task on another node, where flock is per node). A process that has ended holds nothing: its flock
        went with it, and its run directory's lock no longer counts (at once on this host; from another, after
        RUN_LOCK_FRESH_S unrefreshed)."""
        waiting = False
        while True:
            lock = lock_run(self.output_dir, name)
            newest = run_dirs(self.output_dir, name)[-1:]
            if lock is not None and not (newest and run_held_elsewhere(newest[0])):
                return lock
            if lock is not None:
                lock.close()
            if not waiting:
                print(f"{name}: another process holds the run; waiting for it to end", flush=True)
                waiting = True
            time.sleep(LOCK_POLL_S)

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
        """submitit calls this on SIGUSR2, before it requeues the task: let the run checkpoint and exit. A run
        that has not exited 15 s before the kill keeps its lock (and its checkpoint write): the requeued task
        waits for it, then continues it."""
        import submitit

        if self.child is not None and self.child.returncode is None:
            # os.kill, not send_signal, which may collect the run's exit where wait_for_child cannot record it
            os.kill(self.child.pid, signal.SIGUSR2)  # a no-op if the run has it already
            timeout = max(self.signal_delay_s - 15, 5)  # then the task's own kill is near
            if self.wait_for_child(timeout) is None:
                print(f"{self.child_name}: no checkpoint within {timeout} s; requeued, to continue the run once it ends", flush=True)
        return submitit.helpers.DelayedSubmission(GridTask(self.signal_delay_s, self.on_slurm), runs, output_dir, env_changes)


def record_exit(output_dir, name, exit_status):
    """The run's state from its exit status; a failed run's reason is its log's last line (each script's
    one-line error)."""
    if exit_status == 0:
        state = "finished"
    elif exit_status in STOPPED:
        state = "stopped"
    else:
        state = "failed"
    last_line = next((line for line in reversed(log_tail(output_dir, name).strip().splitlines()) if line.strip()), "")
    write_status(output_dir, name, state=state, exit=exit_status, reason=last_line if state == "failed" else None)


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


def device_assignment(workers, visible, egl_devices, shell=None):
    """The device settings of each local worker. CUDA_VISIBLE_DEVICES: the visible GPUs dealt round-robin, one
    each; MUJOCO_EGL_DEVICE_ID: the EGL device of that GPU (`egl_devices`: {GPU: EGL device}), which MuJoCo
    renders on (EGL ignores CUDA_VISIBLE_DEVICES: unset, every worker renders on the first EGL device);
    CUDA_DEVICE_ORDER: PCI bus order, nvidia-smi's, in which both are counted, unless the shell sets another.
    Where there is no GPU, or no EGL device is known for it, the shell's settings (`shell`; None unsets one,
    "" keeps every GPU hidden)."""
    shell = shell or {}
    if not visible:
        return [{"CUDA_VISIBLE_DEVICES": shell.get("CUDA_VISIBLE_DEVICES")} for _ in range(workers)]
    assignment = []
    for worker in range(workers):
        gpu = visible[worker % len(visible)]
        egl_device = egl_devices.get(gpu)
        assignment.append({
            "CUDA_VISIBLE_DEVICES": gpu,
            "CUDA_DEVICE_ORDER": shell.get("CUDA_DEVICE_ORDER") or "PCI_BUS_ID",
            "MUJOCO_EGL_DEVICE_ID": shell.get("MUJOCO_EGL_DEVICE_ID") if egl_device is None else str(egl_device),
        })  # fmt: skip
    return assignment


# Prints the CUDA device of each EGL device, in the order eglQueryDevicesEXT lists them (MUJOCO_EGL_DEVICE_ID's
# index), or null; NVIDIA's EGL tells it through the EGL_NV_device_cuda extension (EGL_CUDA_DEVICE_NV = 0x323A)
EGL_CUDA_DEVICES = """
import ctypes, json, sys
egl = ctypes.CDLL("libEGL.so.1")
egl.eglGetProcAddress.restype, egl.eglGetProcAddress.argtypes = ctypes.c_void_p, [ctypes.c_char_p]
def function(name, *argtypes):
    address = egl.eglGetProcAddress(name) or sys.exit(f"no {name.decode()}")
    return ctypes.CFUNCTYPE(ctypes.c_uint, *argtypes)(address)
query_devices = function(b"eglQueryDevicesEXT", ctypes.c_int, ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_int))
query_attribute = function(b"eglQueryDeviceAttribEXT", ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_ssize_t))
devices, count = (ctypes.c_void_p * 64)(), ctypes.c_int()
query_devices(64, devices, ctypes.byref(count))
cuda = []
for device in devices[: count.value]:
    value = ctypes.c_ssize_t(-1)
    cuda.append(value.value if query_attribute(device, 0x323A, ctypes.byref(value)) else None)
print(json.dumps(cuda))
"""


def egl_devices_of_gpus():
    """{GPU, as CUDA_VISIBLE_DEVICES counts it: the index of its EGL device, as MUJOCO_EGL_DEVICE_ID counts it},
    asked of NVIDIA's EGL in a process that sees every GPU, counted in the order the workers count them; {}
    where no EGL device names its CUDA device (no NVIDIA driver, or no EGL)."""
    environment = {key: value for key, value in os.environ.items() if key != "CUDA_VISIBLE_DEVICES"}
    environment["CUDA_DEVICE_ORDER"] = os.environ.get("CUDA_DEVICE_ORDER") or "PCI_BUS_ID"
    try:
        query = subprocess.run([sys.executable, "-c", EGL_CUDA_DEVICES], env=environment, capture_output=True, text=True, timeout=60)
        cuda_devices = json.loads(query.stdout) if query.returncode == 0 else []
    except (OSError, ValueError, subprocess.TimeoutExpired):
        cuda_devices = []
    return {str(cuda): egl for egl, cuda in enumerate(cuda_devices) if cuda is not None}


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
    `names`, if given, those without one as not started). A run's checkpoint comes from its own record
    (`run.json` in its run directory); the frames it reached, from its log's last progress line. A run still
    pending is looked up with the scheduler: pending and why, or vanished from the queue before its run
    started (and how, where Slurm keeps accounting)."""
    status_dir = os.path.join(output_dir, "status")
    known = sorted(path[:-5] for path in os.listdir(status_dir) if path.endswith(".json")) if os.path.isdir(status_dir) else []
    names = names or known
    statuses = {name: read_status(output_dir, name) for name in names}
    pending_jobs = {name: status["job"] for name, status in statuses.items() if status.get("state") == "pending" and status.get("job")}
    queued = scheduler_states(pending_jobs.values())
    rows = []
    for name in names:
        status = statuses[name]
        state, notes = status.get("state", "not started"), []
        directories = run_dirs(output_dir, name)
        record = run_record(directories[-1]) if directories else {}
        checkpoint_frame = (record.get("checkpoint") or {}).get("frame")
        progress = last_match(r"global_step=(\d+)", log_tail(output_dir, name))
        lock = lock_run(output_dir, name)
        if lock is None or (directories and run_held_elsewhere(directories[-1])):  # a live process holds it, whatever the file says
            state = "running"
        elif record.get("finished"):  # it ended after its task had gone
            state = "finished"
        elif state == "running":  # no exit was recorded: the task was killed outright
            state = "stopped" if checkpoint_frame else "failed"
            notes.append("killed (no exit recorded)")
        if lock is not None:
            lock.close()
        if state == "stopped":
            notes.append(f"checkpoint at frame {checkpoint_frame:,}" if checkpoint_frame else "no checkpoint")
        elif state == "failed" and status.get("reason") and not notes:
            notes.append(f"exit {status.get('exit')}: {status['reason']}")
        elif state == "pending" and name in pending_jobs:
            state, note = queued.get(pending_jobs[name], ("pending", ""))
            notes.append(note)
        if record.get("checkpoint_error") and state in ("running", "stopped"):
            notes.append(f"a checkpoint write failed at {record['checkpoint_error']}")
        if len(directories) > 1:
            notes.append(f"{len(directories)} run directories")
        frame = progress if state in ("running", "finished", "failed") else checkpoint_frame
        rows.append((name, state, frame, status.get("attempts", 0), status.get("job", ""), "; ".join(filter(None, notes))))
    return rows


def scheduler_states(jobs):
    """{job: (state, note)} of array tasks whose run has not started: a local task whose run.py is gone
    (`local:{pid}`), and Slurm array tasks (`{array}_{task}`), from squeue (pending, and its reason), else from
    sacct where Slurm keeps accounting (how it ended)."""
    states = {}
    for job in jobs:
        if job.startswith("local:") and not os.path.exists(f"/proc/{job.split(':')[1]}"):
            states[job] = "vanished", "its local job ended before the run started (run.py was stopped)"
    arrays = sorted({job.split("_")[0] for job in jobs if not job.startswith("local:")})
    if not arrays or not shutil.which("squeue"):
        return states
    listing = subprocess.run(["squeue", "-h", "-r", "-j", ",".join(arrays), "-o", "%i|%T|%r"], capture_output=True, text=True)
    if listing.returncode != 0 and "Invalid job id" not in listing.stderr:  # slurmctld busy or down: nothing is known
        return states | {job: ("pending", f"squeue failed: {listing.stderr.strip()[:100]}") for job in jobs if job not in states}
    in_queue = {line.split("|")[0]: line.split("|")[1:] for line in listing.stdout.splitlines() if line.count("|") == 2}
    accounting = subprocess.run(["sacct", "-n", "-X", "-P", "-j", ",".join(arrays), "-o", "JobID,State,ExitCode"], capture_output=True,
                                text=True) if shutil.which("sacct") else None  # fmt: skip
    ended = {}
    if accounting is not None and accounting.returncode == 0:
        ended = {line.split("|")[0]: line.split("|")[1:] for line in accounting.stdout.splitlines() if line.count("|") == 2}
    for job in jobs:
        if job in states or job.startswith("local:"):
            continue
        if job in in_queue:
            slurm_state, reason = in_queue[job]
            cause = f": {NEVER_STARTS[reason]}" if reason in NEVER_STARTS else ""
            states[job] = "pending", f"Slurm: {slurm_state.lower()} ({reason}){cause}"
        elif job in ended and ended[job][0].split()[0] in ("PENDING", "RUNNING", "REQUEUED", "SUSPENDED", "RESIZING"):
            states[job] = "pending", f"Slurm: {ended[job][0].lower()} (sacct)"
        elif job in ended:
            slurm_state, exit_code = ended[job]
            states[job] = "vanished", f"gone from Slurm's queue before its run started: {slurm_state} (exit {exit_code}, sacct)"
        else:
            log = f"submitit/{job}_0_log.err"
            states[job] = "vanished", f"gone from Slurm's queue before its run started (no accounting says why; see {log})"
    return states


def print_status(output_dir, names=None):
    rows = grid_status(output_dir, names)
    if not rows:
        sys.exit(f"run.py: no runs in {output_dir} (its status/ folder is empty)")
    print("| run | state | frames | attempts | job | note |\n|---|---|---|---|---|---|")
    for name, state, frame, attempts, job, note in rows:
        print(f"| {name} | {state} | {'' if frame is None else f'{frame:,}'} | {attempts} | {job} | {note} |")
    states = ("finished", "running", "stopped", "failed", "pending", "vanished", "not started")
    counts = {state: sum(row[1] == state for row in rows) for state in states}
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

    folder, threads = os.path.join(output_dir, "submitit"), str(threads_per_run(args, len(jobs)))
    if args.launcher == "slurm":
        groups = [[job] for job in jobs]
        env_changes = [{"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}] * len(groups)
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=args.slurm_max_timeouts)
        executor.update_parameters(
            name="drm", timeout_min=args.timeout_min, slurm_partition=args.slurm_partition,
            slurm_gpus_per_node=args.slurm_gpus_per_node or None, slurm_cpus_per_task=args.slurm_cpus_per_task,
            slurm_mem_gb=args.slurm_mem_gb, slurm_signal_delay_s=args.slurm_signal_delay_s,
            slurm_additional_parameters=dict(entry.split("=", 1) for entry in args.slurm_options),
        )  # fmt: skip
        task = GridTask(args.slurm_signal_delay_s, on_slurm=True)
    else:
        # one array task per worker, each running its share of the grid, so that at most `workers` runs
        # share this machine: they split its CPU threads, and each has a GPU of its own (and renders on it)
        # while there are GPUs enough (submitit's local executor hides every GPU: each worker is given its own)
        groups = [jobs[worker :: args.workers] for worker in range(min(args.workers, len(jobs)))]
        gpus = visible_gpus()
        devices = device_assignment(len(groups), gpus, egl_devices_of_gpus() if gpus else {}, os.environ)
        env_changes = [{"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, **device} for device in devices]
        timeout_min = args.timeout_min * max(len(group) for group in groups)
        signal_delay_s = min(LOCAL_SIGNAL_DELAY_S, timeout_min * 60 // 2)
        executor = submitit.LocalExecutor(folder=folder, max_num_timeout=args.slurm_max_timeouts)
        executor.update_parameters(timeout_min=timeout_min, signal_delay_s=signal_delay_s)
        task = GridTask(signal_delay_s, on_slurm=False)
    for name, _ in jobs:
        lock = lock_run(output_dir, name)
        if lock is None:  # held by a task running it, which keeps its own status
            continue
        if read_status(output_dir, name).get("state") != "finished":
            write_status(output_dir, name, state="pending")
        lock.close()
    submitted = submit(executor, task, groups, output_dir, env_changes)
    for job, group in zip(submitted, groups, strict=True):  # what --status asks the scheduler about
        for name, _ in group:
            lock = lock_run(output_dir, name)
            if lock is None:  # its task has started it, and keeps its status
                continue
            if read_status(output_dir, name).get("state") == "pending":
                write_status(output_dir, name, job=job.job_id if args.launcher == "slurm" else f"local:{job.job_id}")
            lock.close()
    if args.launcher == "slurm":
        array_id = submitted[0].job_id.split("_")[0]
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
