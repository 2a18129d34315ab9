"""What a drm.py checkpoint weighs and how long `save_checkpoint` takes to write it (temporary file,
fsync, rename), without and with a FULL replay buffer of the given capacity. The networks and Adam
states are drm.py's at the given sizes; the replay is filled with random frames.

    python benchmark/checkpoint_cost.py --capacities 100000 200000
"""

import dataclasses
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import drm  # noqa: E402


@dataclass
class Args:
    capacities: list[int] = field(default_factory=lambda: [100_000])
    """replay capacities to measure (each filled completely)"""
    action_dim: int = 6
    """walker's"""
    feature_dim: int = 50
    hidden_dim: int = 1024
    directory: str | None = None
    """where to write (default: a temporary directory on the system's temp disk)"""


def timed_save(state, directory):
    path = os.path.join(directory, drm.CHECKPOINT_NAME)
    start = time.perf_counter()
    drm.save_checkpoint(state, path)
    seconds = time.perf_counter() - start
    size = os.path.getsize(path)
    os.remove(path)
    return size, seconds


if __name__ == "__main__":
    args = tyro.cli(Args)
    run_args = drm.Args(feature_dim=args.feature_dim, hidden_dim=args.hidden_dim)
    networks = drm.make_networks((9, 84, 84), args.action_dim, run_args, torch.device("cpu"))
    optimizers = drm.make_optimizers(networks, 1e-4)
    for name, optimizer in optimizers.items():  # one step, so that Adam's moment buffers exist
        for parameter in getattr(networks, name).parameters():
            parameter.grad = torch.zeros_like(parameter)
        optimizer.step()
    beta, awaken_step = torch.tensor(1.0), torch.tensor(-1)

    def checkpoint_of(replay):
        state_args = dataclasses.replace(run_args, checkpoint_replay=replay is not None)
        return drm.run_state(state_args, 0, 0, networks, optimizers, beta, awaken_step, (), replay, torch.device("cpu"))

    directory = args.directory or tempfile.mkdtemp()
    size, seconds = timed_save(checkpoint_of(None), directory)
    print(f"{'replay capacity':>16}{'checkpoint GB':>15}{'write s':>9}{'GB/s':>7}")
    print(f"{'none':>16}{size / 1e9:>15.3f}{seconds:>9.2f}{size / 1e9 / seconds:>7.2f}")
    for capacity in args.capacities:
        replay = drm.ReplayBuffer(capacity, (3, 84, 84), args.action_dim, 3, 3, 0.99, "cpu")
        replay.frames.copy_(torch.from_numpy(np.random.default_rng(0).integers(0, 256, replay.frames.shape, dtype=np.uint8)))
        replay.actions.zero_(), replay.valid.fill_(1.0), replay.episode_steps.zero_()
        replay.size = capacity
        size, seconds = timed_save(checkpoint_of(replay), directory)
        print(f"{capacity:>16,}{size / 1e9:>15.3f}{seconds:>9.2f}{size / 1e9 / seconds:>7.2f}")
        del replay
