"""What drm_metaworld.py's `--shadow-size` buys and costs: agent steps per second of the env alone
(2 physics steps, one 84x84 render, frame stack; no learning) with the model's 4096 shadow map and
with smaller ones, measured side by side in one process, and the mean absolute pixel difference of
the frames the agent sees. Envs with one seed replay identical physics under identical actions, so
the frames differ only by their shadows.

    python benchmark/metaworld_shadows.py --env-ids coffee-push assembly
"""

import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import drm_metaworld  # noqa: E402  (sets MUJOCO_GL before mujoco is imported)


@dataclass
class Args:
    env_ids: list[str] = field(default_factory=lambda: ["coffee-push", "assembly"])
    """Meta-World tasks to measure"""
    shadow_sizes: list[int] = field(default_factory=lambda: [4096, 1024])
    """shadow map sides to compare; the first is the reference for the pixel difference"""
    steps: int = 250
    """agent steps per timed round (one episode)"""
    rounds: int = 3
    """timed rounds per setting, interleaved across settings so that drift hits all alike"""
    seed: int = 0


def timed_episode(env, actions):
    start = time.perf_counter()
    frames = [env.reset()]
    for action in actions:
        frames.append(env.step(action)[0])
    return len(actions) / (time.perf_counter() - start), np.stack(frames)


if __name__ == "__main__":
    args = tyro.cli(Args)
    print(f"{'task':<16}{'shadow map':>12}{'agent steps/s':>15}{'speed-up':>10}{'mean |pixel diff|':>20}")
    for env_id in args.env_ids:
        envs = {size: drm_metaworld.make_env(env_id, args.seed, shadow_size=size) for size in args.shadow_sizes}
        actions = np.random.default_rng(args.seed).uniform(-1, 1, (args.steps, envs[args.shadow_sizes[0]].action_dim))
        rates = {size: [] for size in args.shadow_sizes}
        frames = {}
        for _ in range(args.rounds):
            for size, env in envs.items():
                rate, frames[size] = timed_episode(env, actions)
                rates[size].append(rate)
        reference = args.shadow_sizes[0]
        for size in args.shadow_sizes:
            rate = np.median(rates[size])
            diff = np.abs(frames[size].astype(np.int16) - frames[reference]).mean()
            print(f"{env_id:<16}{size:>12}{rate:>15.1f}{rate / np.median(rates[reference]):>10.2f}{diff:>20.3f}")
        for env in envs.values():
            env.close()
