"""What the tests share: running a script of the repository as a user would, and reading what it wrote."""

import contextlib
import glob
import os
import subprocess
import sys
import time
import uuid

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(script, *flags, cwd=None, env=None, prefix=(), timeout=600):
    """Run a script of the repository (its path from the root) in a subprocess, as a user would."""
    return subprocess.run(
        [sys.executable, *prefix, os.path.join(ROOT, script), *flags],
        cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env,
    )  # fmt: skip


def start(script, *flags, cwd=None, env=None):
    """Like run_script, but returns the running process, for tests that watch or signal it."""
    command = [sys.executable, os.path.join(ROOT, script), *flags]
    return subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def without_module(name):
    """A `python -c` prefix that runs the script with the module `name` unimportable."""
    return (
        "-c",
        f"import runpy, sys; sys.modules[{name!r}] = None; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')",
    )


def scalars(run_dir):
    """{tag: [(step, value), ...]} of a run directory's event files."""
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def only_run_dir(path, pattern="*"):
    (run_dir,) = glob.glob(os.path.join(str(path), "runs", pattern))
    return run_dir


def processes_with(marker, wait=10.0):
    """The pids of live processes whose environment holds `marker` (a run's processes inherit it), once
    none is left or `wait` seconds have passed."""
    deadline = time.monotonic() + wait
    while True:
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/environ", "rb") as environ:
                    if marker.encode() in environ.read():
                        with open(f"/proc/{pid}/stat") as stat:
                            if stat.read().split(") ")[1][0] != "Z":  # a zombie has ended
                                found.append(int(pid))
            except OSError:
                continue
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def without_repeats(points):
    """Logged points in order, each once: a run killed after its last checkpoint may have logged the
    points at the checkpoint's frame that the resumed run logs again, identical."""
    return [point for i, point in enumerate(points) if point not in points[:i]]


@contextlib.contextmanager
def small_filesystem(path, size, read_only=False):
    """A tmpfs of `size` (e.g. "64m") mounted at `path` while the block runs, read-only if asked; skips the
    test where none can be mounted (it needs root)."""
    os.makedirs(path, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a small filesystem here (it needs root): {mount.stderr.strip()}")
    try:
        yield str(path)
    finally:
        subprocess.run(["umount", "--lazy", str(path)], capture_output=True)


@contextlib.contextmanager
def memory_cgroup(limit_bytes):
    """A memory cgroup limited to `limit_bytes`, made under this process's own while the block runs (cgroup v1,
    or v2 where its memory controller may be enabled there); yields a `preexec_fn` that moves a child process
    into it. Skips the test where none can be made (it needs root and a writable cgroup filesystem)."""
    with open("/proc/self/cgroup") as own:
        memberships = [line.split(":", 2) for line in own.read().splitlines()]
    v1 = [path for _, controllers, path in memberships if "memory" in controllers.split(",")]
    v2 = [path for _, controllers, path in memberships if controllers == ""]
    if v1:
        parent, limit_file = os.path.join("/sys/fs/cgroup/memory", v1[0].lstrip("/")), "memory.limit_in_bytes"
    elif v2:
        parent, limit_file = os.path.join("/sys/fs/cgroup", v2[0].lstrip("/")), "memory.max"
    else:
        pytest.skip("no memory cgroup here")
    directory = os.path.join(parent, f"drm-test-{uuid.uuid4().hex[:8]}")
    try:
        os.mkdir(directory)
        with open(os.path.join(directory, limit_file), "w") as limit:
            limit.write(str(limit_bytes))
    except OSError as error:
        with contextlib.suppress(OSError):
            os.rmdir(directory)
        pytest.skip(f"cannot make a memory cgroup under {parent}: {error}")

    def move_into_it():
        with open(os.path.join(directory, "cgroup.procs"), "w") as procs:
            procs.write(str(os.getpid()))

    try:
        yield move_into_it
    finally:
        for _ in range(50):  # its processes have exited; the kernel lets it go once they are reaped
            with contextlib.suppress(OSError):
                os.rmdir(directory)
                break
            time.sleep(0.1)
