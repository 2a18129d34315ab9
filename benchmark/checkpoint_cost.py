"""What a drm.py checkpoint with its replay costs: the write's and the load's time and peak memory, for today's
checkpoints (format 2: the replay written straight from the buffer into a file of its own, and read back into
the buffer, piece by piece) beside the earlier format 1 (the replay inside checkpoint.pt, as torch.save writes
it: a buffer not yet full copied first; loading holds the loaded copy beside the buffer), with the same replay
and networks, in one run. Memory: the peak resident size above where each step began (VmHWM, reset through
/proc/self/clear_refs), and on a GPU the peak of torch.cuda.max_memory_allocated above what was allocated.

    python benchmark/checkpoint_cost.py --capacity 1000000 --filled 100000            # 100k transitions in the 1M replay
    python benchmark/checkpoint_cost.py --capacity 1000000 --filled 1000000 --formats 2   # the full 1M replay (21.2 GB)
"""

import contextlib
import functools
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
import types
from dataclasses import dataclass, field

import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import drm  # noqa: E402

STAND_IN_ENV = types.SimpleNamespace(rng_state=lambda: None, set_rng_state=lambda state: None)


@dataclass
class Args:
    capacity: int = 1_000_000
    """replay capacity in transitions"""
    filled: int = 100_000
    """transitions written into it before the checkpoint"""
    formats: list[int] = field(default_factory=lambda: [1, 2])
    """checkpoint formats to measure: 1 (before), 2 (today's)"""
    device: str = "cpu"
    """where the replay and the networks live: cpu, or cuda"""
    action_dim: int = 6
    """walker's"""
    directory: str | None = None
    """where to write (default: a temporary directory on the system's temp disk)"""
    drop_caches: bool = True
    """drop the page cache before each load (as root), so that a load reads the disk, as a resume on a new node does"""


def peak_growth(action, device):
    """(seconds, host peak growth in bytes, GPU peak growth in bytes) of `action()`."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # VmHWM starts again from the resident size now
    resident_before = status_kb("VmRSS:")
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        allocated_before = torch.cuda.memory_allocated()
    start = time.perf_counter()
    action()
    seconds = time.perf_counter() - start
    gpu = torch.cuda.max_memory_allocated() - allocated_before if device.type == "cuda" else 0
    return seconds, (status_kb("VmHWM:") - resident_before) * 1024, gpu


def status_kb(field_name):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field_name))


def write_format_1(state, rb, directory):
    """The earlier checkpoint: the replay's tensors inside checkpoint.pt, a buffer not yet full copied up to its fill level."""
    state = dict(state, replay={"pos": rb.pos, "size": rb.size, "episode_step": rb.episode_step, "ready": rb.ready})
    for name in drm.REPLAY_FIELDS:
        tensor = getattr(rb, name)
        state["replay"][name] = tensor if rb.size == rb.capacity else tensor[: rb.size].clone()
    path = os.path.join(directory, drm.CHECKPOINT_NAME)
    with open(path + ".tmp", "wb") as file:
        torch.save(state, file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(path + ".tmp", path)


def load_format_1(directory, rb):
    checkpoint = torch.load(os.path.join(directory, drm.CHECKPOINT_NAME), map_location="cpu", weights_only=False)
    for name in drm.REPLAY_FIELDS:
        getattr(rb, name)[: checkpoint["replay"]["size"]] = checkpoint["replay"][name]


def load_format_2(directory, rb, *, networks, optimizers):
    checkpoint = drm.load_checkpoint(os.path.join(directory, drm.CHECKPOINT_NAME))
    with contextlib.redirect_stdout(io.StringIO()):  # its "resumed at" line
        drm.restore_run_state(checkpoint, networks, optimizers, torch.tensor(0.0), torch.tensor(0), STAND_IN_ENV, rb, rb.device)


def drop_page_cache():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as drop:
        drop.write("3")


if __name__ == "__main__":
    args = tyro.cli(Args)
    device = torch.device(args.device)
    run_args = drm.Args(checkpoint_replay=True, feature_dim=50, hidden_dim=1024)
    networks = drm.make_networks((9, 84, 84), args.action_dim, run_args, device)
    optimizers = drm.make_optimizers(networks, 1e-4)
    for name, optimizer in optimizers.items():  # one step, so that Adam's moments exist
        for parameter in getattr(networks, name).parameters():
            parameter.grad = torch.zeros_like(parameter)
        optimizer.step()

    def new_replay():
        return drm.ReplayBuffer(args.capacity, (3, 84, 84), args.action_dim, 3, 3, 0.99, device)

    rb = new_replay()
    for name in drm.REPLAY_FIELDS:
        getattr(rb, name)[: args.filled].fill_(7)
    rb.pos, rb.size, rb.ready = args.filled % args.capacity, args.filled, True
    state = drm.run_state(run_args, 1, 1, networks, optimizers, torch.tensor(0.5), torch.tensor(-1), STAND_IN_ENV, rb, device)
    filled = state["replay"]["nbytes"]
    writers = {1: functools.partial(write_format_1, state, rb), 2: lambda directory: drm.save_checkpoint(dict(state), directory, rb)}
    loaders = {1: load_format_1, 2: functools.partial(load_format_2, networks=networks, optimizers=optimizers)}
    machine = subprocess.run(["uname", "-srm"], capture_output=True, text=True).stdout.strip()
    print(
        f"replay: {args.filled:,} transitions in a {args.capacity:,}-transition buffer on {device.type}, {filled / 1e9:.2f} GB; {machine}"
    )
    can_drop = args.drop_caches and os.access("/proc/sys/vm/drop_caches", os.W_OK)
    print(f"loads read {'the disk (page cache dropped first)' if can_drop else 'what the page cache holds'}")
    print("| format | checkpoint GB | write s | write peak, host GB | write peak, GPU GB | load s | "
          "load peak beyond the buffer, host GB | load peak, GPU GB |\n|---|---|---|---|---|---|---|---|")  # fmt: skip
    written = {}  # every format is written before any is loaded, so that the loads need not hold the first buffer too
    for checkpoint_format in args.formats:
        directory = tempfile.mkdtemp(dir=args.directory)
        write = peak_growth(functools.partial(writers[checkpoint_format], directory), device)
        written[checkpoint_format] = directory, write, sum(os.path.getsize(os.path.join(directory, name)) for name in os.listdir(directory))
    del rb, writers, state
    for checkpoint_format, (directory, write, size) in written.items():
        if can_drop:
            drop_page_cache()
        restored = new_replay()  # its pages are committed as the load fills them: that part is the buffer's own
        load = peak_growth(functools.partial(loaders[checkpoint_format], directory, restored), device)
        beyond_buffer = load[1] - (filled if device.type == "cpu" else 0)
        print(f"| {checkpoint_format} | {size / 1e9:.2f} | {write[0]:.1f} | {write[1] / 1e9:.2f} | {write[2] / 1e9:.2f} | {load[0]:.1f} | "
              f"{beyond_buffer / 1e9:.2f} | {load[2] / 1e9:.2f} |", flush=True)  # fmt: skip
        del restored
        shutil.rmtree(directory)
    weights = sum(parameter.nbytes for network in networks for parameter in network.parameters())
    print(f"(the networks: {weights / 1e9:.2f} GB, {3 * weights / 1e9:.2f} GB with Adam's moments)")
