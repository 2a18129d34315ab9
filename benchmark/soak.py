"""A soak run: drm.py with tiny settings for long enough that its replay wraps many times, evaluating with
worker processes, perturbing, and checkpointing with its replay, while the resident memory, open files and
processes of its process tree are sampled; then what it left behind once it ended. A long run's leaks show
here as a slope after the buffer is full; its leftovers as processes or files after the end.

    python benchmark/soak.py --episodes 40
"""

import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Args:
    episodes: int = 40
    """training episodes of 1,000 frames (cartpole-balance at action repeat 8: 126 replay slots each)"""
    buffer_size: int = 300
    """replay slots: full after 3 episodes, then written over every 2.4 episodes"""
    checkpoint_every_frames: int = 2000
    eval_every_frames: int = 4000
    eval_workers: int = 2
    perturb_interval_steps: int = 100
    sample_seconds: float = 1.0
    """how often the process tree is read"""
    steady_malloc: bool = True
    """one malloc arena that returns freed memory (MALLOC_ARENA_MAX=1, MALLOC_TRIM_THRESHOLD_=65536): without it glibc's
    per-thread arenas make the resident size wander by tens of MB without a trend"""
    output: str = "soak/soak.json"
    """the samples and the summary, as JSON"""


def processes_with(marker):
    """{pid: its name} of the live processes whose environment holds `marker`."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as environ:
                if marker.encode() not in environ.read():
                    continue
            with open(f"/proc/{pid}/stat") as stat:
                name, state = stat.read().split(" (", 1)[1].rsplit(") ", 1)
            if state[0] != "Z":
                found[int(pid)] = name
        except OSError:
            continue
    return found


def sample(marker, main_pid):
    """Resident MB of the main process and of the others, open files and threads of all, and their number."""
    resident = {"main": 0.0, "workers": 0.0}
    files = threads = 0
    pids = processes_with(marker)
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as status:
                fields = dict(line.split(":", 1) for line in status)
            files += len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            continue
        resident["main" if pid == main_pid else "workers"] += int(fields["VmRSS"].split()[0]) / 1024
        threads += int(fields["Threads"])
    return {"time": time.time(), **resident, "files": files, "threads": threads, "processes": len(pids)}


def floors(samples, key, first_episode, last_episode):
    """{episode: the lowest value of `key` sampled while it ran}: what the run holds between its checkpoint
    writes and evaluations, which lift the resident size for a moment."""
    lowest = {}
    for point in samples:
        if first_episode <= point["episode"] <= last_episode:
            lowest[point["episode"]] = min(lowest.get(point["episode"], point[key]), point[key])
    return lowest


if __name__ == "__main__":
    args = tyro.cli(Args)
    work = tempfile.mkdtemp(prefix="drm-soak-")
    marker = str(uuid.uuid4())
    env = {**os.environ, "DRM_SOAK_RUN": marker}
    if args.steady_malloc:
        env.update(MALLOC_ARENA_MAX="1", MALLOC_TRIM_THRESHOLD_="65536")
    command = [sys.executable, "-u", os.path.join(ROOT, "drm.py"), "--env-id", "cartpole-balance", "--action-repeat", "8",
               "--num-seed-frames", "400", "--total-frames", str(1000 * args.episodes), "--batch-size", "8", "--hidden-dim", "64",
               "--buffer-size", str(args.buffer_size), "--log-every-updates", "5", "--no-cuda", "--num-eval-episodes", "2",
               "--eval-workers", str(args.eval_workers), "--eval-every-frames", str(args.eval_every_frames),
               "--perturb-interval-steps", str(args.perturb_interval_steps), "--checkpoint-every-frames",
               str(args.checkpoint_every_frames), "--checkpoint-replay"]  # fmt: skip
    print(f"soak: {args.episodes} episodes in {work}:\n  {' '.join(command)}", flush=True)
    started = time.time()
    process = subprocess.Popen(command, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    episodes, lines, samples = {}, [], []  # episodes: number -> when it ended

    def read_output():
        for line in process.stdout:
            lines.append(line)
            found = re.match(r"global_step=\d+, episode=(\d+),", line)
            if found:
                episodes[int(found.group(1))] = time.time()

    reader = threading.Thread(target=read_output)
    reader.start()
    while process.poll() is None:
        samples.append({**sample(marker, process.pid), "episode": max(episodes, default=0)})
        time.sleep(args.sample_seconds)
    reader.join()
    ended = time.time()
    time.sleep(2)  # what outlives the run by more than a moment
    left = processes_with(marker)
    (run_dir,) = [os.path.join(work, "runs", name) for name in os.listdir(os.path.join(work, "runs"))]
    files_left = sorted(os.listdir(run_dir))

    full_after = -(-args.buffer_size // (1000 // 8 + 1))  # the episode at whose end the buffer is full
    summary = {
        "exit": process.returncode,
        "seconds": round(ended - started, 1),
        "checkpoints": sum(line.startswith("checkpoint: ") for line in lines),
        "failed checkpoint writes": sum(" not written " in line for line in lines),
        "evaluations": sum("eval/episodic_return=" in line for line in lines),
        "replay full after episode": full_after,
        "replay slots written": args.episodes * (1000 // 8 + 1),
    }
    # from the first episode after the buffer is full to the last one that ran whole (the run closes in the last)
    for key in ("main", "workers", "files", "threads", "processes"):
        lowest = floors(samples, key, full_after, args.episodes - 2)
        episodes_seen = sorted(lowest)
        summary[key] = {
            f"floor in episode {episodes_seen[0]}": lowest[episodes_seen[0]],
            f"floor in episode {episodes_seen[-1]}": lowest[episodes_seen[-1]],
            "floors, lowest and highest": [min(lowest.values()), max(lowest.values())],
            "highest sample": max(point[key] for point in samples if point["episode"] >= full_after),
        }
    summary["processes left after the end"] = left
    summary["files left in the run directory"] = files_left
    print("\n".join(line.rstrip() for line in lines[-4:]))
    print(json.dumps(summary, indent=1))
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as output:
        json.dump({"args": vars(args), "summary": summary, "samples": samples}, output, indent=1)
    print(f"samples and summary in {args.output}; the run's directory stays in {work}")
    sys.exit(process.returncode)
