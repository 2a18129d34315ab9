"""Training speed of one script, side by side in ONE run: the script itself is run once per mode
on the same task and seed, and its TensorBoard logs are read back.
- env-only: random actions and no learning (every frame is a seed frame), the simulator's ceiling;
- eager, compile (`--compile`), cudagraphs (`--cudagraphs`), compile+cudagraphs: training frames/s
  and the milliseconds of one update (the script's `perf/update_ms`), both after a warm-up;
- the largest relative difference of the first logged `losses/qf_loss` values from eager's: the
  runs share the seed, so the fast paths must learn the same thing.
Rates come from the wall times of the episode-end events after the warm-up. The CUDA graph modes
run only on a GPU.

    python benchmark/speed.py --script drm.py --env-id walker-walk
    python benchmark/speed.py --script drm.py --env-id dog-run
    # CPU, tiny (what the test runs)
    python benchmark/speed.py --env-id cartpole-balance --no-cuda --seed-frames 1000 --warmup-frames 1000 \\
        --measure-frames 2000 -- --action-repeat 8 --batch-size 8 --hidden-dim 32 --feature-dim 16 --buffer-size 4000
Flags after `--` go to the script; without them it runs at its defaults (batch 256, one update per 2
agent steps).
"""
import json
import os
import platform
import shlex
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
    output: str = "speed"
    """where the runs and speed.json go"""


def hardware(cuda):
    if cuda:
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, no GPU, torch {torch.__version__}"


def read_scalars(run_dir, tags):
    """{tag: [(step, wall_time, value), ...]} of one run directory."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    events.Reload()
    available = set(events.Tags()["scalars"])
    return {tag: [(e.step, e.wall_time, e.value) for e in events.Scalars(tag)] if tag in available else [] for tag in tags}


def run_mode(args, script_args, mode, total_frames):
    directory = os.path.join(args.output, mode)
    os.makedirs(directory, exist_ok=True)
    seed_frames = total_frames if mode == "env-only" else args.seed_frames
    command = [
        sys.executable, os.path.join(ROOT, args.script), "--env-id", args.env_id, "--exp-name", "speed",
        "--total-frames", str(total_frames), "--num-seed-frames", str(seed_frames), "--num-eval-episodes", "0",
        "--log-every-updates", str(args.log_every_updates), "--cuda" if args.cuda else "--no-cuda",
        *MODE_FLAGS[mode], *script_args,
    ]  # fmt: skip
    print(f"{mode}: {shlex.join(command)}", flush=True)
    result = subprocess.run(command, cwd=directory, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"speed.py: the {mode} run failed:\n{result.stderr[-3000:]}")
    (run_name,) = os.listdir(os.path.join(directory, "runs"))
    return read_scalars(os.path.join(directory, "runs", run_name), ["charts/episodic_return", "perf/update_ms", "losses/qf_loss"])


def measure(logged, start_frame):
    """(frames/s between the first episode end at or after `start_frame` and the last one, mean
    milliseconds per update logged from `start_frame` on)."""
    ends = [(step, wall) for step, wall, _ in logged["charts/episodic_return"] if step >= start_frame]
    if len(ends) < 2:
        sys.exit("speed.py: no whole episode was measured after the warm-up; raise --measure-frames")
    (first_step, first_wall), (last_step, last_wall) = ends[0], ends[-1]
    update_ms = [value for step, _, value in logged["perf/update_ms"] if step >= start_frame]
    return (last_step - first_step) / (last_wall - first_wall), float(np.mean(update_ms)) if update_ms else float("nan")


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
    if "eager" not in modes and len(modes) > 1:
        modes.insert(1 if "env-only" in modes else 0, "eager")  # the reference of the ratios
    total_frames = args.seed_frames + args.warmup_frames + args.measure_frames
    start_frame = args.seed_frames + args.warmup_frames

    # Each mode's result is printed and written as soon as its run ends, so a time-boxed benchmark
    # (a GPU lease, a `timeout`) keeps every mode it finished.
    machine = hardware(cuda)
    logged, results = {}, {}
    for mode in modes:
        logged[mode] = run_mode(args, script_args, mode, total_frames)
        frames_per_second, update_ms = measure(logged[mode], start_frame)
        results[mode] = {"frames_per_second": frames_per_second, "update_ms": update_ms}
        if mode not in ("env-only", "eager") and "eager" in logged:
            results[mode]["qf_loss_difference"] = loss_difference(logged[mode], logged["eager"])
        timing = "" if mode == "env-only" else f", {update_ms:.1f} ms per update"
        print(f"{mode}: {frames_per_second:.1f} frames/s{timing}", flush=True)
        with open(os.path.join(args.output, "speed.json"), "w") as file:
            json.dump({"hardware": machine, "args": vars(args), "script_args": list(script_args), "results": results}, file, indent=2)
    print(speed_table(args, script_args, machine, results))
    return results


def speed_table(args, script_args, machine, results):
    env_only = results.get("env-only", {}).get("frames_per_second")
    eager = results.get("eager", {}).get("frames_per_second")
    lines = [
        f"{args.script} {args.env_id}, {shlex.join(script_args) or 'default settings'}; frames {args.seed_frames} seed + "
        f"{args.warmup_frames} warm-up + {args.measure_frames} measured",
        f"hardware: {machine}",
        "",
        "| mode | frames/s | / env-only | / eager | ms per update | qf_loss vs eager (max rel. diff) |",
        "|---|---|---|---|---|---|",
    ]
    for mode, result in results.items():
        fps = result["frames_per_second"]
        cells = [
            mode,
            f"{fps:.1f}",
            f"{fps / env_only:.2f}" if env_only else "",
            f"{fps / eager:.2f}" if eager and mode != "env-only" else "",
            f"{result['update_ms']:.1f}" if mode != "env-only" else "",
            f"{result['qf_loss_difference']:.1e}" if "qf_loss_difference" in result else "",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    main(tyro.cli(Args, args=argv[:cut]), argv[cut + 1 :])
