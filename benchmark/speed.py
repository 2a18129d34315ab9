"""Training speed of one script, side by side in ONE run: the script itself is run once per mode
(and per evaluation worker count) on the same task and seed, and its TensorBoard logs are read back.
- env-only: random actions, no learning and no evaluation (every frame is a seed frame), the
  simulator's ceiling;
- eager, compile (`--compile`), cudagraphs (`--cudagraphs`), compile+cudagraphs, each with the
  script's evaluation protocol (10 episodes every 10,000 frames by default): the full-loop frames/s
  (evaluation included), the training-only frames/s (the wall time less the evaluations' share, from
  the script's `perf/eval_seconds`), the evaluations' share of the wall time, and the milliseconds of
  one update (`perf/update_ms`), all after a warm-up;
- the largest relative difference of the first logged `losses/qf_loss` values from eager's: the
  runs share the seed, so the fast paths must learn the same thing.
Rates come from the wall times of the episode-end events after the warm-up; the measured frames
should hold at least one evaluation (`--measure-frames` >= the script's `--eval-every-frames`). The
CUDA graph modes run only on a GPU. Each mode's run goes to `{output}/{mode}/` (replacing an earlier
one there) and the table to `{output}/speed.json`.

    python benchmark/speed.py --script drm.py --env-id walker-walk
    python benchmark/speed.py --script drm.py --env-id dog-run --modes env-only eager --eval-workers 1 10
    # CPU, tiny (what the test runs)
    python benchmark/speed.py --env-id cartpole-balance --no-cuda --seed-frames 1000 --warmup-frames 1000 \\
        --measure-frames 2000 --eval-workers 1 2 -- --action-repeat 8 --batch-size 8 --hidden-dim 32 --feature-dim 16 \\
        --buffer-size 4000 --eval-every-frames 1000 --num-eval-episodes 4
Flags after `--` go to the script; without them it runs at its defaults (batch 256, one update per 2
agent steps, 10 evaluation episodes every 10,000 frames).
"""

import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
Mode = Literal["env-only", "eager", "compile", "cudagraphs", "compile+cudagraphs"]
MODE_FLAGS = {
    "env-only": [],
    "eager": [],
    "compile": ["--compile"],
    "cudagraphs": ["--cudagraphs"],
    "compile+cudagraphs": ["--compile", "--cudagraphs"],
}
COMPARED_LOSSES = 10  # logged qf_loss values compared with eager's


@dataclass
class Args:
    script: Literal["drm.py", "drm_adroit.py", "drm_metaworld.py"] = "drm.py"
    env_id: str = "walker-walk"
    modes: tuple[Mode, ...] | None = None
    """what to run (default: all that the device supports)"""
    cuda: bool = True
    """run the script on the GPU when there is one"""
    seed_frames: int = 4000
    """random-action frames before learning starts (the scripts' default)"""
    warmup_frames: int = 6000
    """training frames left out of the measurement (compilation, graph capture, cuDNN autotuning)"""
    measure_frames: int = 10000
    """training frames measured (at least one episode: from the end of the one before to the end of the last)"""
    log_every_updates: int = 10
    eval_workers: tuple[int, ...] | None = None
    """the script's --eval-workers, one run of each training mode per count (default: the script's own choice)"""
    output: str = "speed"
    """where the runs and speed.json go"""


def cpu_name():
    """The CPU's model name and core count."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def hardware(cuda):
    if cuda:
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    return f"{cpu_name()}, no GPU, torch {torch.__version__}"


def read_scalars(run_dir, tags):
    """{tag: [(step, wall_time, value), ...]} of one run directory."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    events.Reload()
    available = set(events.Tags()["scalars"])
    return {tag: [(e.step, e.wall_time, e.value) for e in events.Scalars(tag)] if tag in available else [] for tag in tags}


def run_label(mode, eval_workers):
    return mode if eval_workers is None else f"{mode}, {eval_workers} eval worker{'s' if eval_workers > 1 else ''}"


def run_mode(args, script_args, mode, eval_workers, total_frames):
    """Run the script in one mode; returns its logged scalars."""
    label = run_label(mode, eval_workers)
    directory = os.path.join(args.output, label.replace(", ", "-").replace(" ", "-"))
    shutil.rmtree(directory, ignore_errors=True)  # one run per mode: the last one measured
    os.makedirs(directory)
    if mode == "env-only":
        no_learning = ["--num-seed-frames", str(total_frames), "--num-eval-episodes", "0"]
    else:
        no_learning = ["--num-seed-frames", str(args.seed_frames)]
    workers = [] if eval_workers is None else ["--eval-workers", str(eval_workers)]
    command = [
        sys.executable, os.path.join(ROOT, args.script), "--env-id", args.env_id, "--exp-name", "speed",
        "--total-frames", str(total_frames), *no_learning, "--log-every-updates", str(args.log_every_updates),
        "--cuda" if args.cuda else "--no-cuda", *MODE_FLAGS[mode], *workers, *script_args,
    ]  # fmt: skip
    print(f"{label}: {shlex.join(command)}", flush=True)
    result = subprocess.run(command, cwd=directory, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"speed.py: the {label} run failed:\n{result.stderr[-3000:]}")
    (run_name,) = os.listdir(os.path.join(directory, "runs"))
    tags = ["charts/episodic_return", "perf/update_ms", "perf/eval_seconds", "losses/qf_loss"]
    return read_scalars(os.path.join(directory, "runs", run_name), tags)


def measure(logged, start_frame):
    """Between the first episode end at or after `start_frame` and the last one: the full-loop and the
    training-only frames/s, the evaluations' share of the wall time, and the mean milliseconds per
    update logged from `start_frame` on."""
    ends = [(step, wall) for step, wall, _ in logged["charts/episodic_return"] if step >= start_frame]
    if len(ends) < 2:
        sys.exit("speed.py: no whole episode was measured after the warm-up; raise --measure-frames")
    (first_step, first_wall), (last_step, last_wall) = ends[0], ends[-1]
    wall = last_wall - first_wall
    eval_seconds = sum(value for step, _, value in logged["perf/eval_seconds"] if first_step < step <= last_step)
    if eval_seconds == 0 and logged["perf/update_ms"]:
        print("speed.py: no evaluation fell in the measured frames (raise --measure-frames to the script's --eval-every-frames)")
    update_ms = [value for step, _, value in logged["perf/update_ms"] if step >= start_frame]
    return {
        "frames_per_second": (last_step - first_step) / wall,
        "training_frames_per_second": (last_step - first_step) / (wall - eval_seconds),
        "eval_share": eval_seconds / wall,
        "update_ms": float(np.mean(update_ms)) if update_ms else float("nan"),
    }


def loss_difference(logged, eager):
    """Largest relative difference of the first logged qf_loss values from eager's, at the same frames."""
    ours = {step: value for step, _, value in logged["losses/qf_loss"][:COMPARED_LOSSES]}
    reference = {step: value for step, _, value in eager["losses/qf_loss"][:COMPARED_LOSSES]}
    shared = sorted(ours.keys() & reference.keys())
    if not shared:
        return float("nan")
    return max(abs(ours[step] - reference[step]) / max(abs(reference[step]), 1e-8) for step in shared)


def main(args, script_args=()):
    cuda = args.cuda and torch.cuda.is_available()
    supported = list(MODE_FLAGS) if cuda else ["env-only", "eager", "compile"]
    modes = list(args.modes or supported)
    if unsupported := [mode for mode in modes if mode not in supported]:
        sys.exit(f"speed.py: {', '.join(unsupported)} needs a CUDA GPU")
    if args.measure_frames <= 0 or args.warmup_frames < 0 or args.seed_frames <= 0:
        sys.exit("speed.py: --seed-frames and --measure-frames must be positive, --warmup-frames non-negative")
    if any(workers < 1 for workers in args.eval_workers or ()):
        sys.exit(f"speed.py: --eval-workers must be positive (got {' '.join(map(str, args.eval_workers))})")
    if "eager" not in modes and len(modes) > 1:
        modes.insert(1 if "env-only" in modes else 0, "eager")  # the reference of the ratios
    total_frames = args.seed_frames + args.warmup_frames + args.measure_frames
    start_frame = args.seed_frames + args.warmup_frames

    # Each mode's result is printed and written as soon as its run ends, so a time-boxed benchmark
    # (a GPU lease, a `timeout`) keeps every mode it finished.
    machine = hardware(cuda)
    runs = [(mode, None) if mode == "env-only" else (mode, workers) for mode in modes for workers in args.eval_workers or [None]]
    logged, results = {}, {}
    for mode, workers in dict.fromkeys(runs):  # env-only once
        label, eager = run_label(mode, workers), run_label("eager", workers)
        logged[label] = run_mode(args, script_args, mode, workers, total_frames)
        results[label] = {"mode": mode, "eval_workers": workers, **measure(logged[label], start_frame)}
        if mode not in ("env-only", "eager") and eager in logged:
            results[label]["qf_loss_difference"] = loss_difference(logged[label], logged[eager])
        result = results[label]
        if mode == "env-only":
            print(f"{label}: {result['frames_per_second']:.1f} frames/s", flush=True)
        else:
            print(f"{label}: {result['frames_per_second']:.1f} frames/s with evaluation, "
                  f"{result['training_frames_per_second']:.1f} without ({result['eval_share']:.0%} in evaluation), "
                  f"{result['update_ms']:.1f} ms per update", flush=True)  # fmt: skip
        with open(os.path.join(args.output, "speed.json"), "w") as file:
            json.dump({"hardware": machine, "args": vars(args), "script_args": list(script_args), "results": results}, file, indent=2)
    print(speed_table(args, script_args, machine, results))
    return results


def speed_table(args, script_args, machine, results):
    """The markdown table: full-loop frames/s (evaluation included) and its ratio to eager's with the same
    evaluation workers; training-only frames/s and its ratio to env-only's."""
    env_only = results.get("env-only", {}).get("frames_per_second")
    lines = [
        f"{args.script} {args.env_id}, {shlex.join(script_args) or 'default settings'}; frames {args.seed_frames} seed + "
        f"{args.warmup_frames} warm-up + {args.measure_frames} measured",
        f"hardware: {machine}",
        "",
        "| mode | frames/s, full loop | / eager | frames/s, training only | / env-only | evaluation share | ms per update "
        "| qf_loss vs eager (max rel. diff) |",
        "|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for label, result in results.items():
        if label == "env-only":
            lines.append(f"| env-only | | | {result['frames_per_second']:.1f} | 1.00 | | | |")
            continue
        eager = results.get(run_label("eager", result["eval_workers"]), {}).get("frames_per_second")
        training = result["training_frames_per_second"]
        cells = [
            label,
            f"{result['frames_per_second']:.1f}",
            f"{result['frames_per_second'] / eager:.2f}" if eager else "",
            f"{training:.1f}",
            f"{training / env_only:.2f}" if env_only else "",
            f"{result['eval_share']:.0%}",
            f"{result['update_ms']:.1f}",
            f"{result['qf_loss_difference']:.1e}" if "qf_loss_difference" in result else "",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    main(tyro.cli(Args, args=argv[:cut]), argv[cut + 1 :])
