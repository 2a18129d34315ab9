"""What the tests share: running a script of the repository as a user would, and reading what it wrote."""

import glob
import os
import subprocess
import sys
import time

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
