# DrM on DeepMind Control from pixels. Docs: docs/drm.md
import atexit
import contextlib
import dataclasses
import difflib
import functools
import importlib.util
import json
import math
import multiprocessing
import multiprocessing.connection
import multiprocessing.resource_tracker
import os
import random
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Literal, NamedTuple

os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering; must be set before dm_control is imported

import imageio
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter


@dataclass
class Args:
    """DrM (Xu et al., ICLR 2024) on a DeepMind Control task from pixels. Flags marked "preset per task"
    take the task's value unless given; `--print-config` shows what a task resolves to."""

    exp_name: str = os.path.splitext(os.path.basename(__file__))[0]
    """name of the experiment, part of the run name"""
    seed: int = 121
    """random seed of torch, numpy, python and the envs (121 is the official DrM default)"""
    torch_deterministic: bool = True
    """deterministic cuDNN kernels (turns cuDNN autotuning off)"""
    cuda: bool = True
    """train on the GPU when one is available"""
    track: bool = False
    """mirror the TensorBoard logs to Weights & Biases"""
    wandb_project_name: str = "DrM"
    """Weights & Biases project"""
    wandb_entity: str | None = None
    """Weights & Biases team or user (None: your default)"""
    capture_video: bool = False
    """save an mp4 of the first episode of evaluations 0, 1, 8, 27, ... (cubes, then every 1000th) under `videos/{run_name}`"""
    save_model: bool = False
    """save the networks and arguments to `runs/{run_name}/{exp_name}.cleanrl_model` at the end (see `--eval-model`)"""

    # Algorithm specific arguments
    env_id: str = "manipulator-bring_ball"
    """the dm_control suite task, `domain-task` (the official default task)"""
    total_frames: int | None = None
    """total env frames of the run (preset per task)"""
    num_seed_frames: int = 4000
    """env frames of uniform random actions before learning starts"""
    eval_every_frames: int = 10000
    """evaluate every this many env frames (starting at frame 0)"""
    num_eval_episodes: int = 10
    """episodes per evaluation (mean action, no noise)"""
    action_repeat: int = 2
    """env frames per agent step (each action is repeated this many times)"""
    frame_stack: int = 3
    """frames stacked into one observation"""
    buffer_size: int | None = None
    """replay capacity in transitions (preset per task)"""
    batch_size: int | None = None
    """the batch size of samples from the replay memory (preset per task)"""
    learning_rate: float | None = None
    """the learning rate of all four Adam optimizers (preset per task)"""
    feature_dim: int | None = None
    """width of the trunk after the encoder (preset per task)"""
    hidden_dim: int = 1024
    """width of the hidden layers of actor, critic and value network"""
    nstep: int = 3
    """n of the n-step return, in agent steps"""
    gamma: float = 0.99
    """the discount factor gamma (per agent step)"""
    tau: float = 0.01
    """target critic smoothing coefficient"""
    update_every_steps: int = 2
    """one update every this many agent steps"""
    std_init: float = 1.0
    """start of the linear exploration-std schedule"""
    std_final: float = 0.1
    """end of the linear exploration-std schedule"""
    std_schedule_steps: int | None = None
    """length of the linear exploration-std schedule in agent steps (preset per task)"""
    std_clip: float = 0.3
    """clip of the policy noise in the actor and critic updates"""
    exploration: Literal["awake", "dormant", "linear"] = "awake"
    """exploration std: `awake` (DrM), `dormant` (sigmoid of the dormant ratio only), `linear` (DrQ-v2)"""
    perturb: bool = True
    """shrink-and-perturb the weights every `perturb-interval-steps` agent steps (DrM; `--no-perturb`: never)"""
    exploit: bool = True
    """train the expectile value network and blend it into the TD target (DrM; `--no-exploit`: lambda 0, no V)"""
    dormant_threshold: float = 0.025
    """a neuron is dormant if its mean |activation| is below this fraction of its layer's mean"""
    target_dormant_ratio: float = 0.2
    """dormant ratio at which the awake/exploitation sigmoids cross their midpoint"""
    dormant_temp: float = 10.0
    """inverse temperature of the dormant-ratio exploration sigmoid"""
    target_lambda: float = 0.6
    """maximum weight of the value network in the TD target"""
    lambda_temp: float = 50.0
    """inverse temperature of the exploitation lambda sigmoid"""
    expectile: float = 0.9
    """expectile of the value network's regression on min(Q1, Q2)"""
    perturb_interval_steps: int = 100000
    """perturb every this many agent steps"""
    min_perturb_factor: float = 0.2
    """smallest share of the old weights kept by a perturbation"""
    max_perturb_factor: float | None = None
    """largest share of the old weights kept by a perturbation (preset per task)"""
    perturb_rate: float = 2.0
    """perturb factor = clip(1 - perturb_rate * dormant_ratio, min, max)"""
    log_every_updates: int = 100
    """write the scalars that need a device-to-host copy every this many updates"""

    # Run operations (the marked sections at the end of this file)
    print_config: bool = False
    """print the arguments the given task resolves to, and exit without building anything"""
    eval_model: str | None = None
    """evaluate a model saved by `--save-model` over `--num-eval-episodes` episodes, print its mean return and exit"""
    checkpoint_every_frames: int | None = None
    """write `checkpoint.pt` into the run directory at the first episode end after every this many env frames"""
    checkpoint_replay: bool = False
    """checkpoints include the replay buffer, so that a resumed run is exactly the uninterrupted one"""
    keep_replay_at_end: bool = False
    """a finished run keeps its last checkpoint's replay (up to 21.2 GB), so that `--resume` with more `--total-frames` goes on
    exactly; by default the replay is deleted at the end and `checkpoint.pt` stays without it"""
    resume: str | None = None
    """continue the run whose run directory (or checkpoint file) this is, in that directory"""
    compile: bool = False
    """torch.compile acting and the phases of the update"""
    cudagraphs: bool = False
    """capture acting and the update as CUDA graphs (needs a GPU and the replay in GPU memory)"""
    tf32: bool = True
    """TF32 tensor cores for float32 matmuls and convolutions on Ampere and newer GPUs (`--no-tf32`: IEEE float32)"""
    eval_workers: int | None = None
    """processes that run evaluation episodes side by side (None: one per episode, up to the cores this process can use; 1: here)"""


# Per-task presets: the effective values of the official configs (XuGW-Kevin/DrM at 317116a,
# cfgs/task/*.yaml over cfgs/task/medium.yaml and hard.yaml). A field left None on the command line
# takes its task's value; tasks without a row get MEDIUM.
MEDIUM = dict(
    total_frames=3_100_000,
    std_schedule_steps=500_000,
    learning_rate=1e-4,
    feature_dim=50,
    max_perturb_factor=1.0,
    batch_size=256,
    buffer_size=1_000_000,
)
HARD = dict(MEDIUM, total_frames=30_100_000, std_schedule_steps=2_000_000)
HARD_LARGE = dict(HARD, learning_rate=8e-5, feature_dim=100)  # dog and humanoid
TASK_PRESETS = {
    "acrobot-swingup": MEDIUM,
    "cartpole-swingup_sparse": MEDIUM,
    "cheetah-run": MEDIUM,
    "hopper-hop": MEDIUM,
    "quadruped-run": dict(MEDIUM, buffer_size=100_000),
    "quadruped-walk": dict(MEDIUM, buffer_size=100_000),
    "reacher-easy": MEDIUM,
    "reacher-hard": MEDIUM,
    "walker-run": dict(MEDIUM, batch_size=512),
    "acrobot-swingup_sparse": dict(HARD, max_perturb_factor=0.9),
    "dog-run": dict(HARD_LARGE, max_perturb_factor=0.6),
    "dog-stand": dict(HARD_LARGE, max_perturb_factor=0.6),
    "dog-trot": dict(HARD_LARGE, max_perturb_factor=0.9),
    "dog-walk": dict(HARD_LARGE, max_perturb_factor=0.6),
    "humanoid-run": dict(HARD_LARGE, max_perturb_factor=0.6),
    "humanoid-stand": dict(HARD_LARGE, max_perturb_factor=0.9),
    "humanoid-walk": dict(HARD_LARGE, max_perturb_factor=0.9),
    "manipulator-bring_ball": dict(HARD, learning_rate=8e-5, max_perturb_factor=0.9),
}
EPISODE_FRAMES = 1000  # every suite task but the two LQR ones is 1000 env steps with no early termination
# dm_control's LQR tasks have no time limit: an episode ends only when the state converges, which a
# random policy may never reach, so they are not run
UNBOUNDED_TASKS = ("lqr-lqr_2_1", "lqr-lqr_6_2")
VIDEO_SIZE = 256  # evaluation videos are rendered larger than what the agent sees
RENDER_HELP = "On Debian/Ubuntu install the EGL libraries: apt-get install -y --no-install-recommends libegl1 libopengl0 libgl1-mesa-dri"


def fail(message):
    """Stop with a one-line reason that names this script, and no traceback."""
    sys.exit(f"{os.path.basename(__file__)}: {message}")


def import_suite():
    """dm_control picks its rendering backend when imported, so it is imported here, where a missing
    backend can be explained instead of ending in a traceback."""
    try:
        from dm_control import suite
    except Exception as error:
        fail(f"dm_control cannot render with MUJOCO_GL={os.environ['MUJOCO_GL']} ({error!r}). {RENDER_HELP}")
    return suite


class DMCEnv:
    """A dm_control suite task from pixels: 84x84 uint8 frames, channels first, the last
    `frame_stack` frames stacked (the first frame repeated at reset), each float32 action in
    [-1, 1] repeated `action_repeat` times with the rewards summed."""

    def __init__(self, env_id, seed, action_repeat=2, frame_stack=3, size=84):
        domain, task = env_id.split("-", 1)
        self.env = import_suite().load(domain, task, task_kwargs={"random": seed}, visualize_reward=False)
        self.camera_id = 2 if domain == "quadruped" else 0
        self.action_repeat, self.size = action_repeat, size
        spec = self.env.action_spec()
        self.action_low, self.action_high = spec.minimum.astype(np.float32), spec.maximum.astype(np.float32)
        self.action_dim = spec.shape[0]
        self.frames = deque(maxlen=frame_stack)
        self.observation_shape = (3 * frame_stack, size, size)
        self.episode_frames = 0

    def render(self, size=None):
        size = size or self.size
        return self.env.physics.render(height=size, width=size, camera_id=self.camera_id)

    def rng_state(self):
        return self.env.task.random.get_state()  # all the randomness of the suite's resets

    def set_rng_state(self, state):
        self.env.task.random.set_state(state)

    def _observation(self):
        return np.concatenate(self.frames, axis=0)

    def close(self):
        self.env.close()

    def reset(self, seed=None):
        """Starts an episode; `seed` first re-seeds the generator its start is drawn from."""
        if seed is not None:
            self.env.task.random.seed(seed)
        self.env.reset()
        self.episode_frames = 0
        frame = self.render().transpose(2, 0, 1).copy()
        for _ in range(self.frames.maxlen):
            self.frames.append(frame)
        return self._observation()

    def step(self, action):
        """Returns (observation, reward, discount, last); discount is 0 only at a true termination,
        so a time-limit end bootstraps."""
        action = np.clip(np.asarray(action, dtype=np.float32), -1.0, 1.0)
        action = self.action_low + (action + 1.0) * 0.5 * (self.action_high - self.action_low)
        reward = 0.0
        for _ in range(self.action_repeat):
            time_step = self.env.step(action)
            reward += time_step.reward or 0.0
            self.episode_frames += 1
            if time_step.last():
                break
        self.frames.append(self.render().transpose(2, 0, 1).copy())
        return self._observation(), reward, float(time_step.discount), time_step.last()


def make_env(env_id, seed, action_repeat=2, frame_stack=3):
    return DMCEnv(env_id, seed, action_repeat, frame_stack)


# ALGO LOGIC: replay buffer
class Batch(NamedTuple):
    obs: torch.Tensor  # uint8, (B, 3 * frame_stack, 84, 84)
    action: torch.Tensor
    reward: torch.Tensor  # n-step discounted reward sum, (B, 1)
    discount: torch.Tensor  # gamma^n times the env discounts of the window, (B, 1)
    next_obs: torch.Tensor


class ReplayBuffer:
    """A ring of SINGLE frames, one slot per env time step (the reset step included, with a zero
    action). Frame stacks and n-step returns are rebuilt at sample time. A slot k is a valid sample
    start when slots k..k+n hold one episode, so windows never cross an episode end; `valid` tracks
    that as the ring is written, and sampling is uniform over valid starts."""

    def __init__(self, capacity, frame_shape, action_dim, frame_stack, nstep, gamma, device):
        self.capacity, self.frame_stack, self.nstep, self.gamma = capacity, frame_stack, nstep, gamma
        self.device = torch.device(device)
        # never zero-filled: only written slots are ever read, and host pages are committed as they fill
        self.frames = torch.empty((capacity, *frame_shape), dtype=torch.uint8, device=device)
        self.actions = torch.empty((capacity, action_dim), dtype=torch.float32, device=device)
        self.rewards = torch.zeros(capacity, dtype=torch.float32, device=device)
        self.discounts = torch.ones(capacity, dtype=torch.float32, device=device)
        self.episode_steps = torch.zeros(capacity, dtype=torch.int64, device=device)
        self.valid = torch.zeros(capacity, dtype=torch.float32, device=device)  # sampling weights, 0 or 1
        self.stack_offsets = torch.arange(frame_stack - 1, -1, -1, device=device)  # oldest frame first
        self.retire_offsets = torch.arange(frame_stack, device=device)
        self.window_offsets = torch.arange(1, nstep + 1, device=device)
        self.pos, self.size, self.episode_step = 0, 0, 0
        self.ready = False  # whether a complete n-step window can be sampled

    @staticmethod
    def nbytes(capacity, frame_shape, action_dim):
        per_slot = math.prod(frame_shape) + 4 * action_dim + 4 + 4 + 8 + 4
        return capacity * per_slot

    def add(self, frame, action, reward, discount, first):
        """Store one time step: the frame it shows and the action, reward and env discount that led
        to it (first=True at a reset)."""
        pos = self.pos
        self.episode_step = 0 if first else self.episode_step + 1
        self.frames[pos] = torch.as_tensor(frame, device=self.device)
        self.actions[pos] = torch.as_tensor(action, device=self.device)
        self.rewards[pos] = reward
        self.discounts[pos] = discount
        self.episode_steps[pos] = self.episode_step
        # starts whose n-step window or frame stack would read the overwritten slot are retired
        self.valid[(pos + self.retire_offsets) % self.capacity] = 0.0
        if self.episode_step >= self.nstep:
            self.valid[(pos - self.nstep) % self.capacity] = 1.0
            self.ready = True
        self.pos = (pos + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def _stacked_frames(self, slots):
        # at an episode start the first frame is repeated instead of reaching into the previous episode
        back = torch.minimum(self.stack_offsets[None, :], self.episode_steps[slots][:, None])
        frames = self.frames[(slots[:, None] - back) % self.capacity]
        return frames.flatten(1, 2)

    def gather(self, starts):
        """The batch for the given start slots (obs slot k, n-step window k+1..k+n)."""
        window = (starts[:, None] + self.window_offsets[None, :]) % self.capacity
        step_discounts = torch.cumprod(self.gamma * self.discounts[window], dim=1)
        reward_weights = torch.cat([torch.ones_like(step_discounts[:, :1]), step_discounts[:, :-1]], dim=1)
        return Batch(
            obs=self._stacked_frames(starts),
            action=self.actions[window[:, 0]],
            reward=(reward_weights * self.rewards[window]).sum(1, keepdim=True),
            discount=step_discounts[:, -1:],
            next_obs=self._stacked_frames(window[:, -1]),
        )

    def sample(self, batch_size, device):
        starts = torch.multinomial(self.valid, batch_size, replacement=True)
        return Batch(*(x.to(device, non_blocking=True) for x in self.gather(starts)))


# ALGO LOGIC: networks
def weight_init(module):
    if isinstance(module, nn.Linear):
        nn.init.orthogonal_(module.weight.data)
        module.bias.data.fill_(0.0)
    elif isinstance(module, nn.Conv2d):
        nn.init.orthogonal_(module.weight.data, nn.init.calculate_gain("relu"))
        module.bias.data.fill_(0.0)


class Encoder(nn.Module):
    def __init__(self, obs_shape):
        super().__init__()
        self.convnet = nn.Sequential(
            nn.Conv2d(obs_shape[0], 32, 3, stride=2), nn.ReLU(),
            nn.Conv2d(32, 32, 3, stride=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, stride=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, stride=1), nn.ReLU(),
        )  # fmt: skip
        self.repr_dim = 32 * 35 * 35  # 84 -> 41 -> 39 -> 37 -> 35
        self.apply(weight_init)

    def forward(self, obs):
        return self.convnet(obs / 255.0 - 0.5).flatten(1)


def trunk(repr_dim, feature_dim):
    return nn.Sequential(nn.Linear(repr_dim, feature_dim), nn.LayerNorm(feature_dim), nn.Tanh())


def mlp(in_dim, hidden_dim, out_dim):
    # In-place ReLUs as in the official code: they overwrite the hooked Linear outputs, which makes
    # `dormant_ratio` score hidden units after the ReLU.
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, hidden_dim), nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim),
    )  # fmt: skip


class Actor(nn.Module):
    """Deterministic policy mean; exploration noise comes from outside (the std schedule)."""

    def __init__(self, repr_dim, action_dim, feature_dim, hidden_dim):
        super().__init__()
        self.trunk = trunk(repr_dim, feature_dim)
        self.policy = mlp(feature_dim, hidden_dim, action_dim)
        self.apply(weight_init)

    def forward(self, features):
        return torch.tanh(self.policy(self.trunk(features)))


class Critic(nn.Module):
    """Twin Q heads on one shared trunk."""

    def __init__(self, repr_dim, action_dim, feature_dim, hidden_dim):
        super().__init__()
        self.trunk = trunk(repr_dim, feature_dim)
        self.q1 = mlp(feature_dim + action_dim, hidden_dim, 1)
        self.q2 = mlp(feature_dim + action_dim, hidden_dim, 1)
        self.apply(weight_init)

    def forward(self, features, action):
        h = torch.cat([self.trunk(features), action], dim=-1)
        return self.q1(h), self.q2(h)


class ValueNetwork(nn.Module):
    """State value V(s), regressed to an upper expectile of min(Q1, Q2) over replay actions."""

    def __init__(self, repr_dim, feature_dim, hidden_dim):
        super().__init__()
        self.trunk = trunk(repr_dim, feature_dim)
        self.v = mlp(feature_dim, hidden_dim, 1)
        self.apply(weight_init)

    def forward(self, features):
        return self.v(self.trunk(features))


class Networks(NamedTuple):
    encoder: Encoder  # shared by all, trained through the critic loss only
    actor: Actor
    critic: Critic
    critic_target: Critic  # a Polyak average of the critic; it has no optimizer
    value: ValueNetwork


def make_networks(obs_shape, action_dim, args, device):
    encoder = Encoder(obs_shape).to(device)
    actor = Actor(encoder.repr_dim, action_dim, args.feature_dim, args.hidden_dim).to(device)
    critic = Critic(encoder.repr_dim, action_dim, args.feature_dim, args.hidden_dim).to(device)
    critic_target = Critic(encoder.repr_dim, action_dim, args.feature_dim, args.hidden_dim).to(device)
    critic_target.load_state_dict(critic.state_dict())
    value = ValueNetwork(encoder.repr_dim, args.feature_dim, args.hidden_dim).to(device)
    return Networks(encoder, actor, critic, critic_target, value)


def make_optimizers(networks, learning_rate, capturable=False):
    """One Adam per trained network (the target critic has none). Fused: one kernel per step;
    capturable: its step counts stay on the device, as CUDA graphs need."""
    adam = dict(lr=learning_rate, fused=True, capturable=capturable)
    return {name: torch.optim.Adam(getattr(networks, name).parameters(), **adam) for name in ("encoder", "actor", "critic", "value")}


# ALGO LOGIC: DrQ-v2 pieces
def random_shift(images, pad=4, shifts=None):
    """Replicate-pad by `pad` and crop back at a random integer offset in [0, 2 * pad] per sample and
    axis: DrQ-v2's grid-sample shift, written as the exact crop it amounts to. `shifts` (B, 2) as
    (x, y) fixes the offsets."""
    n, _, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad), mode="replicate")
    if shifts is None:
        shifts = torch.randint(0, 2 * pad + 1, (n, 2), device=images.device)
    rows = (shifts[:, 1:] + torch.arange(h, device=images.device))[:, :, None]  # (B, h, 1)
    cols = (shifts[:, :1] + torch.arange(w, device=images.device))[:, None, :]  # (B, 1, w)
    batch = torch.arange(n, device=images.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)


def sample_action(mean, std, clip=None):
    """Truncated normal: mean + clipped Gaussian noise, clamped into (-1, 1) with a straight-through
    gradient."""
    noise = torch.randn_like(mean) * std
    if clip is not None:
        noise = noise.clamp(-clip, clip)
    action = mean + noise
    return action - action.detach() + action.detach().clamp(-1.0 + 1e-6, 1.0 - 1e-6)


def linear_schedule(start, end, duration, step):
    """DrQ-v2's linear(start, end, duration) at the agent step `step` (a tensor)."""
    return start + (end - start) * (step / duration).clamp(0.0, 1.0)


def expectile_loss(diff, expectile):
    """Asymmetric squared error of diff = V - Q: weight 1 - expectile above Q, expectile below."""
    weight = torch.where(diff > 0, 1.0 - expectile, expectile)
    return (weight * diff.pow(2)).mean()


# ALGO LOGIC: DrM pieces. β is the actor's dormant ratio; like the awaken step (-1 until the agent
# awakens) and the agent step, it is a device tensor, so these decisions never wait for the host.
def dormant_ratio(model, *inputs, threshold=0.025):
    """Share of dormant neurons over every nn.Linear of `model` run on `inputs`: a neuron is dormant
    when its mean |output| over the batch is below `threshold` times its layer's mean. Returns a 0-d
    tensor. As in the official code, each Linear's output is read after the whole forward pass, so a
    Linear followed by an in-place ReLU is scored after that ReLU."""
    outputs = []
    hooks = [
        module.register_forward_hook(lambda _module, _inputs, output: outputs.append(output))
        for module in model.modules()
        if isinstance(module, nn.Linear)
    ]
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for hook in hooks:
            hook.remove()
    dormant, total = 0, 0
    for output in outputs:
        score = output.abs().flatten(0, -2).mean(0)
        dormant = dormant + (score < threshold * score.mean()).sum()
        total += score.numel()
    return dormant / total


@torch.no_grad()
def perturb(model, optimizer, factor):
    """Shrink-and-perturb in place: every nn.Linear's weight and bias become factor * old +
    (1 - factor) * fresh, fresh drawn from the init (orthogonal weights, zero biases); other
    parameters (conv, LayerNorm) are untouched. The optimizer's state (Adam moments and step
    counts) is reset for all its parameters: zeroed in place, which Adam treats exactly like the
    official code's emptied state, while compiled code and CUDA graphs keep valid pointers."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            fresh = nn.init.orthogonal_(torch.empty_like(module.weight))
            module.weight.mul_(factor).add_((1.0 - factor) * fresh)
            module.bias.mul_(factor)
    for state in optimizer.state.values():
        for tensor in state.values():
            tensor.zero_()


def perturb_factor(args, beta):
    """Share of the old weights a perturbation keeps: clip(1 - perturb_rate * β, min, max)."""
    return (1.0 - args.perturb_rate * beta).clamp(min=args.min_perturb_factor).clamp(max=args.max_perturb_factor)


def perturb_agent(networks, optimizers, factor):
    """DrM's periodic perturbation, in the official order. The target critic gets its own fresh draw
    (it is not re-synchronised with the critic); it has no optimizer, so the critic's Adam state is
    wiped a second time, as in the official code. The encoder has no Linear layer: only its Adam
    state is wiped."""
    perturb(networks.actor, optimizers["actor"], factor)
    perturb(networks.critic, optimizers["critic"], factor)
    perturb(networks.critic_target, optimizers["critic"], factor)
    perturb(networks.encoder, optimizers["encoder"], factor)
    perturb(networks.value, optimizers["value"], factor)


def awaken_step_after(args, step, beta, awaken_step):
    """The awaken step after an update at agent step `step` whose batch had dormant ratio β. With
    awake exploration the agent awakens once, at the first update after the seed steps whose β is
    below target_dormant_ratio; -1 until then, and always with the other explorations."""
    if args.exploration != "awake":
        return awaken_step
    num_seed_steps = args.num_seed_frames // args.action_repeat
    awakens = (awaken_step < 0) & (beta < args.target_dormant_ratio) & (step > num_seed_steps)
    return torch.where(awakens, step, awaken_step)


def exploration_std(args, step, beta, awaken_step):
    """The exploration std at agent step `step`. `linear`: DrQ-v2's schedule. `dormant`: the more
    dormant the actor, the more noise, sigmoid(dormant_temp * (β - target_dormant_ratio)). `awake`
    (DrM): that sigmoid until the agent awakens, then the larger of it and the linear schedule
    restarted at the awaken step."""
    linear = linear_schedule(args.std_init, args.std_final, args.std_schedule_steps, step)
    if args.exploration == "linear":
        return linear
    std = torch.sigmoid(args.dormant_temp * (beta - args.target_dormant_ratio))
    if args.exploration == "awake":
        since_awake = linear_schedule(args.std_init, args.std_final, args.std_schedule_steps, step - awaken_step)
        std = torch.where(awaken_step >= 0, torch.maximum(std, since_awake), std)
    return std


def exploitation_lambda(args, beta):
    """λ, the weight of V(s') in the TD target: target_lambda / (1 + exp(lambda_temp * (β -
    target_dormant_ratio))), high once the actor is active; 0 without exploitation."""
    if not args.exploit:
        return torch.zeros_like(beta)
    return args.target_lambda * torch.sigmoid(-args.lambda_temp * (beta - args.target_dormant_ratio))


def td_target(reward, discount, next_q, next_value, lam):
    """DrM's n-step target R + γⁿ (λ V(s') + (1 - λ) min Q_target(s', a')); with λ = 0 it is DrQ-v2's."""
    return reward + discount * (lam * next_value + (1.0 - lam) * next_q)


@torch.no_grad()
def act(networks, obs, std):
    """An exploration action for one observation: the policy mean plus Gaussian noise (no clip)."""
    return sample_action(networks.actor(networks.encoder(obs.unsqueeze(0))), std)[0]


# ALGO LOGIC: one update, in phases of one backward pass each (--compile compiles each phase whole)
def encode(networks, batch):
    """The batch's observations augmented and encoded (with gradient), and its next observations
    (without): each gets its own random shift."""
    features = networks.encoder(random_shift(batch.obs.float()))
    with torch.no_grad():
        next_features = networks.encoder(random_shift(batch.next_obs.float()))
    return features, next_features


def update_value(networks, optimizers, features, batch, args):
    # expectile regression on the online critic's min(Q1, Q2) of the replay actions
    with torch.no_grad():
        q_replay = torch.min(*networks.critic(features, batch.action))
    value_loss = expectile_loss(networks.value(features) - q_replay, args.expectile)
    optimizers["value"].zero_grad(set_to_none=True)
    value_loss.backward()
    optimizers["value"].step()
    return value_loss.detach()


def update_critic(networks, optimizers, features, next_features, batch, std, lam, args):
    # critic and encoder: the n-step TD target blends the target critic and V(s') by λ
    with torch.no_grad():
        next_action = sample_action(networks.actor(next_features), std, args.std_clip)
        next_q = torch.min(*networks.critic_target(next_features, next_action))
        next_value = networks.value(next_features) if args.exploit else torch.zeros_like(next_q)
        target = td_target(batch.reward, batch.discount, next_q, next_value, lam)
    qf1_values, qf2_values = networks.critic(features, batch.action)
    qf_loss = F.mse_loss(qf1_values, target) + F.mse_loss(qf2_values, target)
    optimizers["encoder"].zero_grad(set_to_none=True)
    optimizers["critic"].zero_grad(set_to_none=True)
    qf_loss.backward()
    optimizers["critic"].step()
    optimizers["encoder"].step()
    return qf1_values.detach().mean(), qf2_values.detach().mean(), qf_loss.detach()


def update_actor(networks, optimizers, features, std, args):
    # actor: maximise min(Q1, Q2) of the just-updated critic; then the target critic follows the critic
    policy_action = sample_action(networks.actor(features), std, args.std_clip)
    actor_loss = -torch.min(*networks.critic(features, policy_action)).mean()
    optimizers["actor"].zero_grad(set_to_none=True)
    actor_loss.backward()
    optimizers["actor"].step()
    with torch.no_grad():
        for param, target_param in zip(networks.critic.parameters(), networks.critic_target.parameters(), strict=True):
            target_param.lerp_(param, args.tau)
    return actor_loss.detach()


def update(networks, optimizers, batch, step, beta, awaken_step, args):
    """One DrM update at agent step `step` on a replay batch; β and the awaken step are updated in
    place. Returns the metrics (device tensors: nothing here waits for the host) and the batch's
    encoded observations."""
    features, next_features = encode(networks, batch)
    features_only = features.detach()  # V and the actor train on the features, not the encoder
    # the actor's dormant ratio on this batch may awaken the agent, and sets the noise and λ
    beta.copy_(dormant_ratio(networks.actor, features_only, threshold=args.dormant_threshold))
    awaken_step.copy_(awaken_step_after(args, step, beta, awaken_step))
    std = exploration_std(args, step, beta, awaken_step)
    lam = exploitation_lambda(args, beta)
    metrics = {}
    if args.exploit:
        metrics["losses/value_loss"] = update_value(networks, optimizers, features_only, batch, args)
    qf1_mean, qf2_mean, qf_loss = update_critic(networks, optimizers, features, next_features, batch, std, lam, args)
    actor_loss = update_actor(networks, optimizers, features_only, std, args)
    metrics.update({
        "losses/qf1_values": qf1_mean,
        "losses/qf2_values": qf2_mean,
        "losses/qf_loss": qf_loss,
        "losses/actor_loss": actor_loss,
        "charts/dormant_ratio": beta,
        "charts/exploration_std": std,
        "charts/lambda": lam,
        "charts/awaken_step": awaken_step,
    })  # fmt: skip
    return metrics, features_only


def video_due(evaluation):
    """Whether the evaluation numbered `evaluation` (0, 1, 2, ...) records a video: the perfect cubes
    below 1000, then every 1000th (CleanRL's capped cubic schedule), so a 30M-frame run with 3,010
    evaluations keeps 13 videos."""
    if evaluation < 1000:
        return round(evaluation ** (1 / 3)) ** 3 == evaluation
    return evaluation % 1000 == 0


def eval_episode_seeds(seed, evaluation, num_episodes):
    """The seed of each episode of the evaluation numbered `evaluation` (0, 1, 2, ...): drawn from (seed,
    evaluation, episode), so that every episode starts where it would in any order and in any process."""
    return [int(np.random.SeedSequence([seed, evaluation, episode]).generate_state(1)[0]) for episode in range(num_episodes)]


@torch.no_grad()
def mean_action(networks, obs, device):
    """The action evaluation takes: the policy's mean for one observation, without noise."""
    return networks.actor(networks.encoder(torch.as_tensor(obs, device=device).unsqueeze(0)))[0].cpu().numpy()


def video_writer(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return imageio.v2.get_writer(path, fps=30)


def evaluate(env, networks, episode_seeds, device, video_path=None):
    """Mean return of the mean action over one episode per seed in `episode_seeds`. With `video_path`, the
    first episode is streamed into that mp4 frame by frame."""
    returns, video = [], None
    if video_path:
        video = video_writer(video_path)
    for episode, seed in enumerate(episode_seeds):
        obs, last, episode_return = env.reset(seed), False, 0.0
        while not last:
            if video is not None and episode == 0:
                video.append_data(env.render(VIDEO_SIZE))
            obs, reward, _, last = env.step(mean_action(networks, obs, device))
            episode_return += reward
        returns.append(episode_return)
    if video is not None:
        video.close()
    return float(np.mean(returns)) if returns else float("nan")


def clock(seconds):
    """`seconds` as hours:minutes:seconds, e.g. 123:04:05."""
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def main():
    # arguments with their presets, checked; --eval-model, --print-config and --resume; the run directory,
    # which this process holds a lock on until it ends (RUN OPERATIONS)
    args, checkpoint, run_dir, lock = parse_args()
    run_name = os.path.basename(run_dir)

    # TRY NOT TO MODIFY: seeding and device
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    torch.backends.cudnn.benchmark = not args.torch_deterministic
    torch.backends.cuda.matmul.fp32_precision = torch.backends.cudnn.conv.fp32_precision = "tf32" if args.tf32 else "ieee"
    if args.cuda and not torch.cuda.is_available():
        print("--cuda: no CUDA device is available, running on the CPU")
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    # from here on a stop signal ends the run with a checkpoint at an episode end (RUN OPERATIONS)
    checkpoints = Checkpoints(run_dir, lock, args, checkpoint)

    # env setup: the training env, seeded with the run's seed, and evaluation: `evaluate` on an eval env of
    # its own, or its episodes spread over worker processes (RUN OPERATIONS: speed); each evaluation
    # episode starts from a seed of its own (eval_episode_seeds)
    env = make_env(args.env_id, args.seed, args.action_repeat, args.frame_stack)
    evaluate_policy, close_evaluation = make_evaluation(args)
    obs_shape, action_dim = env.observation_shape, env.action_dim
    frame_shape = (3, *obs_shape[1:])

    nbytes = ReplayBuffer.nbytes(args.buffer_size, frame_shape, action_dim)
    # in GPU memory where it fits, else in host memory (RUN OPERATIONS: speed)
    new_replay = functools.partial(ReplayBuffer, args.buffer_size, frame_shape, action_dim, args.frame_stack, args.nstep, args.gamma)
    rb = place_replay(new_replay, nbytes, device, args, checkpoint)

    if args.track:
        import wandb

        # every attempt of a resumed run goes on in the same W&B run, whose id the run directory keeps
        wandb.init(
            project=args.wandb_project_name,
            entity=args.wandb_entity,
            sync_tensorboard=True,
            config=vars(args),
            name=run_name,
            save_code=True,
            id=wandb_run_id(run_dir),
            resume="allow",
        )
    # a resumed run appends to its event files; purge_step hides what a killed run logged after the
    # checkpoint's frame (what it logged at that very frame stays: its last episode's scalars)
    writer = SummaryWriter(run_dir, purge_step=checkpoint["next_step"] * args.action_repeat + 1 if checkpoint else None)
    if checkpoint is None:
        table_rows = "\n".join(f"|{key}|{value}|" for key, value in vars(args).items())
        writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{table_rows}")

    # ALGO LOGIC: initialize agent here
    networks = make_networks(obs_shape, action_dim, args, device)
    optimizers = make_optimizers(networks, args.learning_rate, capturable=args.cudagraphs)
    # DrM's state, changed in place only, so that compiled code and CUDA graphs read the current values
    beta = torch.tensor(1.0, device=device)  # the actor's dormant ratio at the last update (1.0 before any)
    awaken_step = torch.tensor(-1, device=device)  # the agent step of awakening, -1 until then
    step_tensor = torch.tensor(0, device=device)  # the agent step, as the schedules read it

    def policy(obs, step):
        return act(networks, obs, exploration_std(args, step, beta, awaken_step))

    def learn(step):
        batch = rb.sample(args.batch_size, device)
        metrics, features = update(networks, optimizers, batch, step, beta, awaken_step, args)
        return metrics, features, batch

    if args.compile:
        compile_acting_and_update()
    if args.cudagraphs:
        policy, learn = CudaGraphed(policy), CudaGraphed(learn)
    update_timer = UpdateTimer(device)

    total_steps = args.total_frames // args.action_repeat
    seed_until_step = args.num_seed_frames // args.action_repeat  # uniform random actions before this agent step
    eval_every_steps = max(args.eval_every_frames // args.action_repeat, 1)
    start_step, episode_count, perturbation_owed = 0, 0, False
    checkpoints.check_room(networks, rb)  # whether the run directory's filesystem can hold the checkpoints
    if checkpoint is not None:
        start_step, episode_count = restore_run_state(checkpoint, networks, optimizers, beta, awaken_step, env, rb, device)
        if checkpoint["replay"] is None:  # an empty buffer, seeded again before updating (RUN OPERATIONS)
            seed_until_step, perturbation_owed = seeding_after_resume(args, start_step)
        del checkpoint  # the loaded copies of the weights
    metrics, episode_return, episode_actions = {}, 0.0, []  # episode_actions: behind charts/action_*
    start_time, stopwatch = time.time(), Stopwatch()

    # TRY NOT TO MODIFY: start the game
    obs = env.reset()
    obs_device = torch.as_tensor(obs, device=device)  # the step's one host-to-device copy of its frames
    rb.add(obs_device[-3:], np.zeros(action_dim, np.float32), 0.0, 1.0, first=True)
    for step in range(start_step, total_steps):
        global_step = step * args.action_repeat

        if step % eval_every_steps == 0 and args.num_eval_episodes > 0:
            evaluation = step // eval_every_steps
            video_path = f"videos/{run_name}/{global_step}.mp4" if args.capture_video and video_due(evaluation) else None
            with stopwatch("eval"):
                episode_seeds = eval_episode_seeds(args.seed, evaluation, args.num_eval_episodes)
                eval_return = evaluate_policy(networks, episode_seeds, device, video_path)
            print(f"global_step={global_step}, eval/episodic_return={eval_return:.1f}", flush=True)
            writer.add_scalar("eval/episodic_return", eval_return, global_step)

        # ALGO LOGIC: put action logic here
        step_tensor.fill_(step)
        with stopwatch("update"):  # on a GPU, acting waits here for the last update to finish
            if step < seed_until_step:
                action = np.random.uniform(-1.0, 1.0, action_dim).astype(np.float32)
            else:
                action = policy(obs_device, step_tensor).cpu().numpy()

        # ALGO LOGIC: training, queued on the device before the env step so that the two run side by side
        updating = step >= seed_until_step and step % args.update_every_steps == 0 and rb.ready
        if updating:
            with stopwatch("update"):
                if args.perturb and (step % args.perturb_interval_steps == 0 or perturbation_owed):
                    perturbation_owed = False
                    factor = perturb_factor(args, beta)
                    perturb_agent(networks, optimizers, factor)
                    writer.add_scalar("charts/perturb_factor", factor.item(), global_step)
                update_timer.start()
                metrics, features, batch = learn(step_tensor)
                update_timer.stop()

        # TRY NOT TO MODIFY: execute the game and log data
        with stopwatch("env"):
            obs, reward, discount, last = env.step(action)
        obs_device = torch.as_tensor(obs, device=device)
        rb.add(obs_device[-3:], action, reward, discount, first=False)

        # the update has had the env step's time to finish: reading its results now costs no wait
        if updating and (step // args.update_every_steps) % args.log_every_updates == 0:
            logged = {tag: float(value) for tag, value in metrics.items()}
            # diagnostics beside the actor's dormant ratio, on the update's batch: the critic's and V's
            logged["charts/dormant_ratio_critic"] = dormant_ratio(networks.critic, features, batch.action, threshold=args.dormant_threshold)
            if args.exploit:
                logged["charts/dormant_ratio_value"] = dormant_ratio(networks.value, features, threshold=args.dormant_threshold)
            logged["perf/update_ms"] = update_timer.milliseconds()
            stop_if_nonfinite(logged, global_step, checkpoints)
            for tag, value in logged.items():
                writer.add_scalar(tag, float(value), global_step)
        episode_return += reward
        episode_actions.append(action)
        if last:
            episode_count += 1
            frames_done = (step + 1) * args.action_repeat
            sps = int((step + 1 - start_step) * args.action_repeat / (time.time() - start_time))
            progress = f"done={frames_done / args.total_frames:.1%}, time_left={clock((args.total_frames - frames_done) / max(sps, 1))}"
            print(
                f"global_step={frames_done}, episode={episode_count}, episodic_return={episode_return:.1f}, SPS={sps}, {progress}",
                flush=True,
            )
            writer.add_scalar("charts/episodic_return", episode_return, frames_done)
            writer.add_scalar("charts/episodic_length", env.episode_frames, frames_done)
            writer.add_scalar("charts/SPS", sps, frames_done)
            # motor activity, to set beside the dormant ratio: mean |a| and mean |a_t - a_(t-1)|
            actions = np.stack(episode_actions)
            writer.add_scalar("charts/action_magnitude", np.abs(actions).mean(), frames_done)
            writer.add_scalar("charts/action_change", np.abs(np.diff(actions, axis=0)).mean(), frames_done)
            # where the wall time went since the last episode end (RUN OPERATIONS: speed)
            for phase, seconds in stopwatch.read().items():
                writer.add_scalar(f"perf/{phase}_seconds", seconds, frames_done)
            # checkpoints sit between episodes: a resumed run starts the next episode as this run would
            if checkpoints.due(frames_done):
                stop_if_nonfinite(metrics, global_step, checkpoints)  # never checkpoint a broken state
                checkpoints.save(
                    run_state(args, step + 1, episode_count, networks, optimizers, beta, awaken_step, env, rb, device), rb, writer
                )
            with stopwatch("env"):
                obs = env.reset()
            episode_return, episode_actions = 0.0, []
            obs_device = torch.as_tensor(obs, device=device)
            rb.add(obs_device[-3:], np.zeros(action_dim, np.float32), 0.0, 1.0, first=True)

    if args.save_model:
        model_path = f"{run_dir}/{args.exp_name}.cleanrl_model"
        torch.save({name: network.state_dict() for name, network in networks._asdict().items()} | {"args": vars(args)}, model_path)
        print(f"model saved to {model_path}")
    checkpoints.finish(total_steps * args.action_repeat)  # the run's record, and what it keeps of the last checkpoint

    close_evaluation()
    env.close()
    writer.close()


# ======================================================================================================
# RUN OPERATIONS: arguments. Their checks, --print-config, --eval-model and --resume; nothing here changes
# what the agent learns, and a reader may skip this section.
# ======================================================================================================
POSITIVE = ("must be positive", lambda value: value > 0)
NON_NEGATIVE = ("must be >= 0", lambda value: value >= 0)
FRACTION = ("must be in [0, 1]", lambda value: 0 <= value <= 1)
OPEN_FRACTION = ("must be in (0, 1)", lambda value: 0 < value < 1)
DISCOUNT = ("must be in (0, 1]", lambda value: 0 < value <= 1)
SEED = ("must be in [0, 2**32)", lambda value: 0 <= value < 2**32)  # numpy's seed range
# every numeric flag and what it must be (a flag left None, with no preset, is not checked)
FLAG_RULES = {
    **dict.fromkeys(["total_frames", "eval_every_frames", "action_repeat", "frame_stack", "buffer_size", "batch_size",
                     "learning_rate", "feature_dim", "hidden_dim", "nstep", "update_every_steps", "std_schedule_steps",
                     "dormant_temp", "lambda_temp", "perturb_interval_steps", "log_every_updates",
                     "checkpoint_every_frames", "eval_workers"], POSITIVE),
    **dict.fromkeys(["num_seed_frames", "num_eval_episodes", "std_init", "std_final", "std_clip", "perturb_rate"], NON_NEGATIVE),
    **dict.fromkeys(["dormant_threshold", "target_dormant_ratio", "target_lambda", "min_perturb_factor",
                     "max_perturb_factor"], FRACTION),
    **dict.fromkeys(["gamma", "tau"], DISCOUNT),
    "expectile": OPEN_FRACTION,
    "seed": SEED,
}  # fmt: skip


def resolve_args(args: Args, valid_env_ids) -> Args:
    """Fill the per-task presets and stop with a one-line reason on an impossible setting, before any
    env or network is built."""
    if args.env_id in UNBOUNDED_TASKS:
        fail(f"{args.env_id} has no time limit (its episodes end only when the state converges); drm.py runs the suite's 1000-step tasks")
    if args.env_id not in valid_env_ids:
        close = difflib.get_close_matches(args.env_id, valid_env_ids, n=5, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        fail(f"unknown env id {args.env_id!r}; {hint}valid ids: {', '.join(sorted(valid_env_ids))}")
    preset = TASK_PRESETS.get(args.env_id, MEDIUM)
    args = dataclasses.replace(args, **{key: value for key, value in preset.items() if getattr(args, key) is None})
    for name, (requirement, holds) in FLAG_RULES.items():
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and holds(value)):
            fail(f"--{name.replace('_', '-')} {requirement} (got {value})")
    episode_steps = EPISODE_FRAMES // args.action_repeat
    relations = [
        (args.batch_size > args.buffer_size, f"--batch-size {args.batch_size} is larger than --buffer-size {args.buffer_size}"),
        (args.nstep >= episode_steps, f"--nstep {args.nstep} is not shorter than an episode ({episode_steps} agent steps)"),
        (args.buffer_size <= args.nstep + args.frame_stack, f"--buffer-size {args.buffer_size} cannot hold one n-step window"),
        (args.cudagraphs and not (args.cuda and torch.cuda.is_available()), "--cudagraphs needs a CUDA GPU and --cuda"),
        (args.buffer_size > 2**24,
         f"--buffer-size {args.buffer_size:,} is above 16,777,216 (2**24), the most slots torch.multinomial samples from"),
        (args.num_seed_frames // args.action_repeat <= args.nstep,
         f"--num-seed-frames {args.num_seed_frames} leaves no complete n-step window to learn from at the first update"),
        (args.min_perturb_factor > args.max_perturb_factor,
         f"--min-perturb-factor {args.min_perturb_factor} is above --max-perturb-factor {args.max_perturb_factor}"),
    ]  # fmt: skip
    for failed, reason in relations:
        if failed:
            fail(reason)
    return args


def parse_args():
    """(arguments, checkpoint or None, run directory, its lock) of the run to start or resume. With --resume
    the checkpoint's arguments are the defaults and the flags given now may change only what does not
    change the run. --eval-model and --print-config do their work here and exit. The run directory is
    locked before its checkpoint is read, and what the run writes is checked writable before any heavy work."""
    args = tyro.cli(Args)
    if args.eval_model:
        evaluate_saved_model(args)
        sys.exit(0)
    checkpoint, lock = None, None
    if args.resume:
        checkpoint_path = find_checkpoint(args.resume)
        lock = RunLock(os.path.dirname(checkpoint_path) or ".")  # no other process writes the checkpoint while it is read
        checkpoint = load_checkpoint(checkpoint_path)
        args = tyro.cli(Args, default=Args(**{**checkpoint["args"], "resume": args.resume}))
    args = resolve_args(args, [f"{domain}-{task}" for domain, task in import_suite().ALL_TASKS])
    if checkpoint is not None:
        changed = [
            f"--{key.replace('_', '-')} {value} (checkpoint: {checkpoint['args'].get(key)})"
            for key, value in vars(args).items()
            if key not in RESUMABLE_CHANGES | ROUNDING_CHANGES and checkpoint["args"].get(key) != value
        ]
        if changed:
            fail(f"--resume continues the same run, but these arguments differ: {'; '.join(changed)}")
        rounding = [key for key in sorted(ROUNDING_CHANGES) if checkpoint["args"].get(key) != getattr(args, key)]
        if rounding:
            flags = ", ".join(f"--{key.replace('_', '-')}" for key in rounding)
            print(f"--resume with another {flags}: the run goes on, but no longer bit-identical to an uninterrupted run")
    print("resolved arguments:\n" + "\n".join(f"  {key}: {value}" for key, value in vars(args).items()))
    if args.print_config:
        sys.exit(0)
    if args.track and importlib.util.find_spec("wandb") is None:
        fail("--track needs Weights & Biases: pip install wandb")
    if lock is None:
        lock = RunLock(f"runs/{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}")  # makes the directory
    if args.capture_video:  # the videos go under the working directory
        video_dir = f"videos/{os.path.basename(lock.run_dir)}"
        try:
            os.makedirs(video_dir, exist_ok=True)
            tempfile.TemporaryFile(dir=video_dir).close()
        except OSError as error:
            fail(f"--capture-video: cannot write {os.path.abspath(video_dir)} ({error.strerror or error})")
    return args, checkpoint, lock.run_dir, lock


def evaluate_saved_model(args):
    """--eval-model: rebuild the agent that a `--save-model` file holds and evaluate it as the run did,
    on a fresh eval env; prints the mean return."""
    if not os.path.isfile(args.eval_model):
        fail(f"--eval-model: no file at {args.eval_model}")
    if args.num_eval_episodes < 1:
        fail(f"--num-eval-episodes must be positive with --eval-model (got {args.num_eval_episodes})")
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    try:
        saved = torch.load(args.eval_model, map_location=device, weights_only=False)
        saved_args = Args(**saved["args"])
    except Exception as error:
        fail(f"--eval-model: {args.eval_model} is not a model saved by --save-model ({type(error).__name__})")
    env = make_env(saved_args.env_id, saved_args.seed, saved_args.action_repeat, saved_args.frame_stack)
    networks = make_networks(env.observation_shape, env.action_dim, saved_args, device)
    env.close()
    for name, network in networks._asdict().items():
        network.load_state_dict(saved[name])
    run_name = os.path.basename(os.path.dirname(os.path.abspath(args.eval_model)))
    video_path = f"videos/{run_name}-eval/{saved_args.exp_name}.mp4" if args.capture_video else None
    # the episodes of the run's first evaluation, as many as asked for now
    evaluate_policy, close_evaluation = make_evaluation(
        dataclasses.replace(saved_args, num_eval_episodes=args.num_eval_episodes, eval_workers=args.eval_workers)
    )
    eval_return = evaluate_policy(networks, eval_episode_seeds(saved_args.seed, 0, args.num_eval_episodes), device, video_path)
    close_evaluation()
    print(f"{args.eval_model}: eval/episodic_return={eval_return:.1f} over {args.num_eval_episodes} episodes")


# ======================================================================================================
# RUN OPERATIONS: the run directory (its lock and record), checkpoints, resumption, signals and the
# non-finite-loss stop. Nothing here changes what the agent learns; a reader may skip this section.
# ======================================================================================================
CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_KEYS = {"args", "next_step", "episode_count", "drm_state", "networks", "optimizers", "rng", "env", "replay"}
REPLAY_FIELDS = ("frames", "actions", "rewards", "discounts", "episode_steps", "valid")
CHUNK_BYTES = 64 * 1024**2  # the replay is written and read in pieces of this size: no copy of it is ever made
LOCK_NAME, RECORD_NAME = "run.lock", "run.json"
# the lock's holder refreshes it every HEARTBEAT_S; a lock from another host left unrefreshed for STALE_LOCK_S is taken over
HEARTBEAT_S, STALE_LOCK_S = 15, 120
# arguments that change nothing the agent does, and so may differ from the checkpoint's on --resume
RESUMABLE_CHANGES = {
    "resume", "total_frames", "track", "wandb_project_name", "wandb_entity", "capture_video", "save_model",
    "print_config", "checkpoint_every_frames", "checkpoint_replay", "keep_replay_at_end", "compile", "cudagraphs",
    "eval_workers",
}  # fmt: skip
# arguments that change only the float rounding: a resumed run may change them (to move to another device,
# say), and then goes on as the same run up to rounding, no longer bit-identical to the uninterrupted one
ROUNDING_CHANGES = {"cuda", "tf32", "torch_deterministic"}


def writer_name():
    """This process as `{host}-{pid}`: the files it writes under temporary names carry it, so that two
    writers never share one."""
    return f"{socket.gethostname()}-{os.getpid()}"


def process_start(pid):
    """When process `pid` started, in clock ticks since boot (None if there is no such process): with the
    boot, it names a process where its pid alone may have been reused."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return int(stat.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def pid_space():
    """Where this process's pids mean the same as another's: this boot of the kernel, and this pid namespace
    (containers on one host share its name but not their pids). None where /proc cannot tell."""
    with contextlib.suppress(OSError), open("/proc/sys/kernel/random/boot_id") as boot:
        return f"{boot.read().strip()}/{os.readlink('/proc/self/ns/pid')}"


class RunLock:
    """One process per run directory. `run.lock` names its holder (host, pid, when that process started)
    and is created exclusively, which works where flock does not (flock is per node on Lustre and BeeGFS,
    and missing on some filesystems); a thread refreshes its time every HEARTBEAT_S. A lock whose holder
    is gone is taken over: on this host when that process has ended, from another host when the lock has
    not been refreshed for STALE_LOCK_S. The lock goes when this process exits (a killed process leaves it
    to be taken over). Making the lock is also the check that the run directory can be written."""

    def __init__(self, run_dir):
        self.run_dir, self.path = run_dir, os.path.join(run_dir, LOCK_NAME)
        self.holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": process_start(os.getpid()), "pids": pid_space()}
        try:
            os.makedirs(run_dir, exist_ok=True)
            self._take()
        except OSError as error:
            fail(f"cannot write the run directory {os.path.abspath(run_dir)} ({error.strerror or error}); run where you can write")
        self.released = threading.Event()
        atexit.register(self.release)
        threading.Thread(target=self._refresh, name="run lock", daemon=True).start()

    def _take(self):
        for _ in range(3):
            try:
                return self._create()
            except FileExistsError:
                holder, age = self.read()
                who = f"pid {holder.get('pid')} on {holder.get('host')}" if holder else "a process whose lock cannot be read"
                if not self._gone(holder, age):
                    fail(
                        f"{os.path.abspath(self.run_dir)} is in use by {who} (its lock refreshed {age:.0f} s ago): one process per "
                        f"run directory; its lock is taken over once that process has ended, or, from another host, after "
                        f"{STALE_LOCK_S} s unrefreshed"
                    )
                why = "that process has ended" if holder.get("host") == self.holder["host"] else f"it was not refreshed for {age:.0f} s"
                print(f"taking over the lock of {who}: {why}", flush=True)
                with contextlib.suppress(FileNotFoundError):
                    os.remove(self.path)
        fail(f"cannot take the lock of {os.path.abspath(self.run_dir)}: other processes keep taking it")

    def _create(self):
        """Make the lock, naming this process; FileExistsError if there is one."""
        descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        try:
            with os.fdopen(descriptor, "w") as file:
                json.dump(self.holder, file)
        except OSError:  # a full disk: no empty lock is left behind to be taken for another's
            os.remove(self.path)
            raise

    def read(self):
        """(the holder the lock names, {} if it cannot be read (being written, or left empty by a crash);
        seconds since it was refreshed, 0 if it is gone)"""
        try:
            age = time.time() - os.stat(self.path).st_mtime
        except OSError:
            return {}, 0.0
        try:
            with open(self.path) as file:
                return json.load(file), age
        except (OSError, ValueError):
            return {}, age

    def _gone(self, holder, age):
        if holder.get("host") == self.holder["host"] and holder.get("pids") == self.holder["pids"]:
            return process_start(holder.get("pid")) != holder.get("started")
        return age > STALE_LOCK_S  # another host's, or one that cannot be read

    def held(self):
        """Whether this process still holds the lock: False once the lock names another holder (one that took
        over a lock it took for stale). A lock that cannot be read is asked again; one deleted meanwhile is
        made again."""
        for _ in range(3):
            holder = self.read()[0]
            if holder:
                return holder == self.holder
            if not os.path.exists(self.path):
                with contextlib.suppress(OSError):
                    self._create()
                continue
            time.sleep(1)
        return True

    def _refresh(self):
        while not self.released.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self):
        self.released.set()
        if self.held():
            with contextlib.suppress(OSError):
                os.remove(self.path)


def read_run_record(run_dir):
    """The run's own record, `run.json` in its run directory: attempts, W&B id and last checkpoint."""
    try:
        with open(os.path.join(run_dir, RECORD_NAME)) as file:
            return json.load(file)
    except (OSError, ValueError):
        return {}


def update_run_record(run_dir, **fields):
    """Merge `fields` into the run's record, written whole and renamed over the old one; returns the record.
    A record that cannot be written (a full disk) stays as it was: it must not stop the run."""
    record = read_run_record(run_dir) | fields
    path = os.path.join(run_dir, RECORD_NAME)
    temporary = f"{path}.{writer_name()}.tmp"
    try:
        with open(temporary, "w") as file:
            json.dump(record, file, indent=1)
        os.replace(temporary, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.remove(temporary)
    return record


def wandb_run_id(run_dir):
    """The id of this run's W&B run: made at its first attempt and kept in its record, so that every attempt
    of a resumed run goes on in the same W&B run."""
    return read_run_record(run_dir).get("wandb_id") or update_run_record(run_dir, wandb_id=uuid.uuid4().hex[:12])["wandb_id"]


def find_checkpoint(path):
    """The checkpoint file of `--resume PATH`, a run directory or its checkpoint file; stops if there is none."""
    if os.path.isdir(path):
        path = os.path.join(path, CHECKPOINT_NAME)
    if not os.path.isfile(path):
        fail(f"--resume: no checkpoint at {path}")
    return path


def load_checkpoint(path):
    """The checkpoint at `path`, with the path of its replay file, which must be complete; stops with the
    reason if either cannot be read. Checkpoints hold pickled RNG states: load only checkpoints you wrote."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        reason = f"{type(error).__name__}: {str(error).split('. ')[0]}"
        fail(f"--resume: {path} is truncated or corrupt ({reason}); resume from another copy or start a new run")
    if not isinstance(checkpoint, dict) or not CHECKPOINT_KEYS <= set(checkpoint):
        fail(f"--resume: {path} is not a {os.path.basename(__file__)} checkpoint")
    replay = checkpoint["replay"]
    if replay is not None and "file" in replay:  # checkpoints written before the replay had a file of its own hold it
        replay["path"] = os.path.join(os.path.dirname(path), replay["file"])
        size = os.path.getsize(replay["path"]) if os.path.isfile(replay["path"]) else None
        if size != replay["nbytes"]:
            found = "missing" if size is None else f"{size:,} of its {replay['nbytes']:,} bytes"
            fail(f"--resume: the checkpoint's replay file {replay['path']} is {found}; resume from another copy or start a new run")
    return checkpoint


def run_state(args, next_step, episode_count, networks, optimizers, beta, awaken_step, env, rb, device):
    """Everything the run needs to go on from agent step `next_step` at the start of a new episode, but the
    replay's contents: with --checkpoint-replay, `save_checkpoint` writes those straight from the buffer."""
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    replay = None
    if args.checkpoint_replay:
        replay = {
            "pos": rb.pos,
            "size": rb.size,
            "episode_step": rb.episode_step,
            "ready": rb.ready,
            "device": rb.device.type,
            "nbytes": replay_bytes(rb, rb.size),
        }
    return {
        "args": vars(args),
        "next_step": next_step,
        "episode_count": episode_count,
        "drm_state": {"beta": beta, "awaken_step": awaken_step},
        "networks": {name: network.state_dict() for name, network in networks._asdict().items()},
        "optimizers": {name: optimizer.state_dict() for name, optimizer in optimizers.items()},
        "rng": rng,
        "env": env.rng_state(),  # evaluation episodes draw their starts from seeds of their own
        "replay": replay,
    }


def restore_run_state(checkpoint, networks, optimizers, beta, awaken_step, env, rb, device):
    """Load a `run_state` checkpoint into the run, and its replay file into the buffer, piece by piece (a
    checkpoint of an earlier version holds the replay itself); returns (the agent step to go on from,
    episodes so far)."""
    for name, network in networks._asdict().items():
        network.load_state_dict(checkpoint["networks"][name])
    for name, optimizer in optimizers.items():
        optimizer.load_state_dict(checkpoint["optimizers"][name])
    beta.copy_(checkpoint["drm_state"]["beta"])
    awaken_step.copy_(checkpoint["drm_state"]["awaken_step"])
    rng = checkpoint["rng"]
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if device.type == "cuda" and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"], device)
    env.set_rng_state(checkpoint["env"])
    replay = checkpoint["replay"]
    if replay is not None and "file" not in replay:
        for field in REPLAY_FIELDS:
            getattr(rb, field)[: replay["size"]] = replay[field]
    elif replay is not None:
        try:
            with open(replay["path"], "rb") as file:
                for field in REPLAY_FIELDS:
                    read_rows(file, getattr(rb, field), replay["size"])
        except (OSError, EOFError) as error:
            fail(f"--resume: cannot read the replay file {replay['path']} ({error})")
        rb.pos, rb.size, rb.episode_step, rb.ready = replay["pos"], replay["size"], replay["episode_step"], replay["ready"]
    frame = checkpoint["next_step"] * checkpoint["args"]["action_repeat"]
    print(f"resumed at global_step={frame} ({'with' if replay is not None else 'WITHOUT'} the replay buffer)", flush=True)
    return checkpoint["next_step"], checkpoint["episode_count"]


def seeding_after_resume(args, start_step):
    """A run resumed without its replay has an empty buffer: it takes --num-seed-frames of uniform random
    actions again before it updates, rather than draw its batches from a few hundred transitions, and a
    perturbation due meanwhile comes at its first update. Returns (the agent step up to which it seeds,
    whether a perturbation is owed)."""
    seed_until_step = start_step + args.num_seed_frames // args.action_repeat
    steps = range(start_step, seed_until_step)
    due = any(step % args.perturb_interval_steps == 0 and step % args.update_every_steps == 0 for step in steps)
    print(f"seeding the empty replay again: {args.num_seed_frames:,} frames of random actions before the first update", flush=True)
    return seed_until_step, args.perturb and due


def replay_bytes(rb, rows):
    """The bytes of every field of the replay's first `rows` slots: what a checkpoint writes of it."""
    return sum(getattr(rb, field)[:rows].nbytes for field in REPLAY_FIELDS)


def replay_pieces(tensor, rows):
    """(piece, host piece) pairs that cover tensor[:rows] as bytes, CHUNK_BYTES at a time: in host memory the
    host piece is the piece itself, in GPU memory one host buffer that every piece passes through."""
    data = tensor[:rows].reshape(-1).view(torch.uint8)
    staging = torch.empty(min(CHUNK_BYTES, data.numel()), dtype=torch.uint8, pin_memory=True) if data.is_cuda else None
    for start in range(0, data.numel(), CHUNK_BYTES):
        piece = data[start : start + CHUNK_BYTES]
        yield piece, piece if staging is None else staging[: piece.numel()]


def write_rows(file, tensor, rows):
    """Write tensor[:rows] into `file` as raw bytes, piece by piece."""
    for piece, host_piece in replay_pieces(tensor, rows):
        if host_piece is not piece:
            host_piece.copy_(piece)
        file.write(host_piece.numpy())


def read_rows(file, tensor, rows):
    """Read tensor[:rows] in place from `file`, as `write_rows` wrote it, piece by piece."""
    for piece, host_piece in replay_pieces(tensor, rows):
        if file.readinto(host_piece.numpy()) != host_piece.numel():
            raise EOFError(f"{file.name} ends early")
        if host_piece is not piece:
            piece.copy_(host_piece)


def remove_leftovers(run_dir, keep=None):
    """Delete what checkpoint writes left in `run_dir`: temporary files (of a write cut short) and replay
    files that no checkpoint names but `keep`. Returns their names."""
    removed = []
    for name in sorted(os.listdir(run_dir)):
        if name.endswith(".tmp") or (name.startswith("replay-") and name.endswith(".bin") and name != keep):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(run_dir, name))
                removed.append(name)
    return removed


def save_checkpoint(state, run_dir, rb=None, replaced=None):
    """Write `state` as `checkpoint.pt` into `run_dir`, and with `rb` the filled part of its replay into a file
    of its own that `state` names, such that a crash at any moment leaves one complete checkpoint: the
    replay goes into a new file straight from the buffer, then the rest into a temporary file that is
    renamed over `checkpoint.pt`, each flushed to disk first; the replaced checkpoint's replay file
    (`replaced`) goes last. Every file is written exclusively under a name of this writer's. A write that
    fails removes what it wrote and raises: the previous checkpoint stays as it was."""
    written = []
    try:
        if rb is not None:
            state["replay"]["file"] = f"replay-{state['next_step']}-{writer_name()}.bin"
            written.append(os.path.join(run_dir, state["replay"]["file"]))
            with open(written[-1], "xb") as file:
                for field in REPLAY_FIELDS:
                    write_rows(file, getattr(rb, field), rb.size)
                file.flush()
                os.fsync(file.fileno())
        written.append(os.path.join(run_dir, f"{CHECKPOINT_NAME}.{writer_name()}.tmp"))
        with open(written[-1], "xb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(written[-1], os.path.join(run_dir, CHECKPOINT_NAME))
    except BaseException:
        for path in written:
            with contextlib.suppress(OSError):
                os.remove(path)
        raise
    with contextlib.suppress(OSError):  # the rename reaches the disk before the replaced replay file goes
        directory = os.open(run_dir, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    if replaced is not None and replaced != (state["replay"] or {}).get("file"):
        with contextlib.suppress(OSError):
            os.remove(os.path.join(run_dir, replaced))


def write_failure(error):
    """Why a checkpoint write failed: the OSError, which torch.save reports as a RuntimeError of its own."""
    if isinstance(error, RuntimeError) and isinstance(error.__context__, OSError):
        error = error.__context__
    return str(error).splitlines()[0]


# Ctrl-C, and what clusters send before a pre-emption or a time limit (Slurm: SIGTERM; submitit: SIGUSR2)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class Checkpoints:
    """Checkpoints into the run directory at episode ends: every --checkpoint-every-frames env frames (None:
    never), and when a stop signal asks the run to stop, after which the run exits with 128 + the signal
    number. Repeats of a signal change nothing (Slurm sends SIGTERM again when a pre-emption's grace time
    ends: the run keeps going to its checkpoint until it is killed), except a second Ctrl-C, which stops at
    once and keeps the last complete checkpoint. A write that fails (a full disk, a quota, an I/O error)
    keeps the last complete checkpoint and says why: the run goes on and tries again at the next interval,
    or, stopping for a signal, exits as stopped all the same, to go on from the last complete checkpoint."""

    def __init__(self, run_dir, lock, args, checkpoint):
        self.run_dir, self.lock, self.args = run_dir, lock, args
        self.path, self.every_frames = os.path.join(run_dir, CHECKPOINT_NAME), args.checkpoint_every_frames
        self.resume_command = f"{sys.executable} {os.path.abspath(__file__)} --resume {os.path.abspath(run_dir)}"
        resumed_frame = checkpoint["next_step"] * args.action_repeat if checkpoint else 0
        self.last_frame = resumed_frame or None  # the global step of the last complete checkpoint
        self.replay_file = ((checkpoint or {}).get("replay") or {}).get("file")  # the last complete checkpoint's
        self.next_frame = self._next_after(resumed_frame)
        self.stop_signal = None
        removed = remove_leftovers(run_dir, keep=self.replay_file)
        if removed:
            print(f"removed what an interrupted checkpoint write left: {', '.join(removed)}")
        update_run_record(run_dir, attempts=read_run_record(run_dir).get("attempts", 0) + 1, finished=None)  # a longer run goes on
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._request_stop)

    def _next_after(self, frame):
        """The frame of the next periodic checkpoint: every --checkpoint-every-frames, and the run's last."""
        if not self.every_frames:
            return None
        return min((frame // self.every_frames + 1) * self.every_frames, max(self.args.total_frames, frame + 1))

    def _request_stop(self, signum, _frame):
        name = signal.Signals(signum).name
        if self.stop_signal is None:
            self.stop_signal = signum
            self._say(f"{name}: stopping with a checkpoint at the end of this episode")
        elif signum == signal.SIGINT:
            self._say("SIGINT again: stopping now; the last complete checkpoint stays")
            sys.exit(128 + signum)
        else:
            self._say(f"{name}: already stopping at the end of this episode")

    @staticmethod
    def _say(line):
        # os.write, not print: a handler that prints while the loop prints breaks the loop's print; and a
        # closed stdout (a pipe whose reader went with the same Ctrl-C) must not stop the checkpoint
        with contextlib.suppress(OSError):
            os.write(sys.stdout.fileno(), f"{line}\n".encode())

    def check_room(self, networks, rb):
        """With periodic checkpoints: say whether the run directory's filesystem has room for them (two at
        once while one replaces the other), and stop if it cannot hold one. A checkpoint is the weights with
        Adam's two moments, and with --checkpoint-replay the replay as full as this run will fill it. Quotas
        are not seen here: a write they stop fails as any other does."""
        if not self.every_frames:
            return
        weights = sum(parameter.nbytes for network in networks for parameter in network.parameters())
        rows = min(rb.capacity, self.args.total_frames // self.args.action_repeat) if self.args.checkpoint_replay else 0
        size = 3 * weights + replay_bytes(rb, rows)
        free = shutil.disk_usage(self.run_dir).free
        each = f"up to {size / 1e9:.2f} GB each{' (the replay included)' if rows else ''}"
        if free < size:
            advice = "; or leave the replay out: --no-checkpoint-replay" if rows else ""
            free_there = f"{os.path.abspath(self.run_dir)} has {free / 1e9:.2f} GB free"
            fail(f"--checkpoint-every-frames: checkpoints take {each}, but {free_there}{advice}")
        on_disk = 1 if self.last_frame is not None else 0  # a resumed run's checkpoint is there already
        room = "room for them" if free >= (2 - on_disk) * size else "room for the first only (a later write holds two at once)"
        print(f"checkpoints: {each}; {free / 1e9:.2f} GB free in the run directory: {room}", flush=True)

    def due(self, frame):
        """Whether to checkpoint at this episode end; stops the run if another process took its directory over."""
        if not self.lock.held():
            holder = self.lock.read()[0]
            fail(f"pid {holder.get('pid')} on {holder.get('host')} took the run directory over: this process stops without writing to it")
        return self.stop_signal is not None or (self.next_frame is not None and frame >= self.next_frame)

    def save(self, state, rb, writer):
        """Write `state`, with the replay of `rb` if `state` has a place for it; then, if a signal asked the
        run to stop, close the writer and exit."""
        frame = state["next_step"] * state["args"]["action_repeat"]
        try:
            save_checkpoint(state, self.run_dir, rb if state["replay"] is not None else None, replaced=self.replay_file)
        except (OSError, RuntimeError) as error:
            kept = f"the one at global_step={self.last_frame} stays" if self.last_frame else "there is no complete one"
            then = "stopping all the same" if self.stop_signal is not None else "trying again at the next interval"
            print(f"checkpoint at global_step={frame} not written ({write_failure(error)}): {kept}; {then}", flush=True)
            update_run_record(self.run_dir, checkpoint_error=f"global_step={frame}: {write_failure(error)}")
        else:
            self.last_frame, self.replay_file = frame, (state["replay"] or {}).get("file")
            update_run_record(self.run_dir, checkpoint={"frame": frame, "replay": self.replay_file is not None}, checkpoint_error=None)
            print(f"checkpoint: {self.path} at global_step={frame}", flush=True)
        self.next_frame = self._next_after(frame)
        if self.stop_signal is not None:
            writer.close()
            print(f"stopped; continue with: {self.resume_command}" if self.last_frame else "stopped, without a checkpoint", flush=True)
            sys.exit(128 + self.stop_signal)

    def finish(self, frame):
        """At the end of the run (`frame`): its record says it finished, and unless --keep-replay-at-end the last
        checkpoint is written again without its replay, whose file goes (a suite of runs would otherwise keep
        a full replay per run)."""
        update_run_record(self.run_dir, finished=frame)
        if self.args.keep_replay_at_end or self.replay_file is None:
            return
        try:
            checkpoint = torch.load(self.path, map_location="cpu", weights_only=False)
            checkpoint["replay"] = None
            save_checkpoint(checkpoint, self.run_dir, replaced=self.replay_file)
        except (OSError, RuntimeError, EOFError) as error:
            print(f"the last checkpoint keeps its replay: it could not be written again without it ({write_failure(error)})")
            return
        update_run_record(self.run_dir, checkpoint={"frame": self.last_frame, "replay": False})
        print(f"the last checkpoint, of frame {self.last_frame:,}, stays without its replay: --keep-replay-at-end keeps it", flush=True)


def stop_if_nonfinite(metrics, global_step, checkpoints):
    """Stop the run, naming the first loss that is NaN or infinite and the checkpoint to resume from."""
    for tag, value in metrics.items():
        if tag.startswith("losses/") and not math.isfinite(float(value)):
            if checkpoints.last_frame is None:
                advice = "no checkpoint was written (--checkpoint-every-frames)"
            else:
                advice = f"resume from the checkpoint at global_step={checkpoints.last_frame}: {checkpoints.resume_command}"
            fail(f"{tag} is {float(value)} at global_step={global_step}; {advice}")


# ======================================================================================================
# RUN OPERATIONS: speed. Where the replay lives, --compile, --cudagraphs, the evaluation workers and the
# timers change how fast the run goes, not what it computes; a reader may skip this section.
# ======================================================================================================
def compile_acting_and_update():
    """--compile: torch.compile acting and each phase of the update whole (a compiled graph ends at a
    backward pass). `main` and `update` call these functions by their module-level names, so rebinding
    the names swaps in the compiled versions. Compiled code draws eager's random numbers
    (`fallback_random`): --compile changes the speed, not the run."""
    global act, encode, update_value, update_critic, update_actor
    phases = [act, encode, update_value, update_critic, update_actor]
    act, encode, update_value, update_critic, update_actor = (torch.compile(fn, options={"fallback_random": True}) for fn in phases)


REPLAY_HEADROOM = 2 * 1024**3  # memory left free beside the replay: in GPU memory for the networks, in host memory for the process
WORKER_BYTES = 400 * 1024**2  # an evaluation worker's resident memory (torch, the simulator and an env: about 360 MB measured)
# this process's cgroup files by cgroup version: memory limit, memory in use, and the reclaimable file cache in memory.stat
CGROUP_MEMORY_FILES = {
    2: ("memory.max", "memory.current", "inactive_file"),
    1: ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"),
}


def cgroup_memory_limits(cgroup_root="/sys/fs/cgroup", own_cgroups="/proc/self/cgroup"):
    """[(cgroup directory, memory limit, memory in use)] of this process's memory cgroup and of each ancestor
    with a limit, v2 or v1; in use is without the file cache the kernel reclaims before it runs out."""
    try:
        with open(own_cgroups) as file:
            memberships = [line.split(":", 2) for line in file.read().splitlines()]
    except OSError:
        return []
    limits = []
    for _, controllers, path in memberships:
        if controllers == "":
            version, mount = 2, cgroup_root if os.path.exists(os.path.join(cgroup_root, "cgroup.controllers")) else f"{cgroup_root}/unified"
        elif "memory" in controllers.split(","):
            version, mount = 1, f"{cgroup_root}/memory"
        else:
            continue
        limit_name, usage_name, cache_name = CGROUP_MEMORY_FILES[version]
        directory = os.path.normpath(os.path.join(mount, path.lstrip("/")))
        while directory.startswith(mount):
            with contextlib.suppress(OSError, ValueError):  # no such file, or "max": no limit there
                with open(os.path.join(directory, limit_name)) as limit, open(os.path.join(directory, usage_name)) as usage:
                    limit, usage = int(limit.read()), int(usage.read())
                with open(os.path.join(directory, "memory.stat")) as stat:
                    cache = next((int(line.split()[1]) for line in stat if line.split()[0] == cache_name), 0)
                if limit < 2**60:  # v1 writes a huge number where there is no limit
                    limits.append((directory, limit, usage - cache))
            directory = os.path.dirname(directory)
    return limits


def host_memory_room():
    """(bytes of host memory this process may still commit, what bounds them): the node's available memory,
    or less where a cgroup's memory limit (Slurm's --mem, a container's) leaves less."""
    with open("/proc/meminfo") as meminfo:
        fields = dict(line.split(":", 1) for line in meminfo)
    room, bound = int(fields["MemAvailable"].split()[0]) * 1024, "the node's available memory"
    for directory, limit, used in cgroup_memory_limits():
        if limit - used < room:
            room, bound = limit - used, f"the memory limit of cgroup {directory}: {limit / 1e9:.1f} GB, {used / 1e9:.1f} GB of it in use"
    return room, bound


def place_replay(new_replay, nbytes, device, args, checkpoint):
    """The replay buffer `new_replay(storage)`: in GPU memory when it fits there with REPLAY_HEADROOM to spare
    (sampling is then pure device indexing), else in host memory. A resumed run keeps it where its checkpoint
    had it when it can: elsewhere, another device's random generator draws the batches, and the run says it
    goes on no longer bit-identical. Stops before training where the host cannot hold what the run will
    commit: the replay when full (in host memory), the evaluation workers and a checkpoint write's piece,
    with REPLAY_HEADROOM, against what this job may still use (`host_memory_room`)."""
    saved_on = ((checkpoint or {}).get("replay") or {}).get("device")
    wanted = "cuda" if args.cudagraphs else saved_on
    places = sorted(["cuda", "cpu"] if device.type == "cuda" else ["cpu"], key=lambda place: place != wanted)
    workers = evaluation_worker_count(args)
    beside = workers * WORKER_BYTES + CHUNK_BYTES + REPLAY_HEADROOM  # what the host holds beside a replay
    room, bound = host_memory_room()
    gpu_room = device.type == "cuda" and torch.cuda.mem_get_info(device)[0] > nbytes + REPLAY_HEADROOM
    rb = None
    for place in places:
        if place == "cuda" and gpu_room and room > beside:
            try:
                rb = new_replay(device)
            except torch.OutOfMemoryError:  # another process took the GPU memory since it was measured
                gpu_room = False
                torch.cuda.empty_cache()  # what the failed allocation left cached goes back to the GPU
        elif place == "cpu" and room > nbytes + beside:
            rb = new_replay(torch.device("cpu"))
        if rb is not None:
            break
    else:
        workers_gb, rest_gb = workers * WORKER_BYTES / 1e9, (CHUNK_BYTES + REPLAY_HEADROOM) / 1e9
        beside_text = f"{workers} evaluation workers {workers_gb:.1f} GB; a checkpoint write and headroom {rest_gb:.1f} GB"
        may_use = f"but may use {room / 1e9:.1f} GB ({bound})"
        if gpu_room:
            fail(
                f"--eval-workers {workers}: beside its replay in GPU memory the run needs {beside / 1e9:.1f} GB of host memory "
                f"({beside_text}), {may_use}; lower --eval-workers"
            )
        fail(
            f"--buffer-size {args.buffer_size:,}: the run needs {(nbytes + beside) / 1e9:.1f} GB of host memory (the replay when full "
            f"{nbytes / 1e9:.1f} GB{', which no GPU has free' if device.type == 'cuda' else ''}; {beside_text}), {may_use}; "
            "lower --buffer-size or --eval-workers"
        )
    print(f"replay: {args.buffer_size:,} transitions, {nbytes / 1e9:.1f} GB on {rb.device.type}")
    if saved_on not in (None, rb.device.type):
        print(
            f"--resume: the replay is on {rb.device.type}, the checkpoint's was on {saved_on}: the run goes on, but no longer bit-identical"
        )
    if args.cudagraphs and rb.device != device:
        fail("--cudagraphs samples the replay inside the graph, so it must fit in GPU memory; lower --buffer-size")
    return rb


class UpdateTimer:
    """Milliseconds one update takes on the device, read at log time: CUDA events on a GPU (nothing
    waits until the reading), the wall clock on the CPU (where the update runs synchronously)."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.begin, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def start(self):
        if self.cuda:
            self.begin.record()
        else:
            self.begin = time.perf_counter()

    def stop(self):
        if self.cuda:
            self.end.record()
        else:
            self.end = time.perf_counter()

    def milliseconds(self):
        if self.cuda:
            self.end.synchronize()
            return self.begin.elapsed_time(self.end)
        return (self.end - self.begin) * 1000.0


class CudaGraphed:
    """Calls `fn` normally for its first `warmup` calls (on a side stream, as capture requires; this
    also creates Adam's state), captures the next call as a CUDA graph and replays that graph for
    every call after. Arguments must be tensors of fixed shape: they are copied into the graph's
    own inputs. The outputs are the graph's own tensors, overwritten by the next call."""

    def __init__(self, fn, warmup=3):
        self.fn, self.warmup, self.graph = fn, warmup, None

    def __call__(self, *inputs):
        if self.graph is None and self.warmup > 0:
            self.warmup -= 1
            side_stream = torch.cuda.Stream()
            side_stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side_stream):
                outputs = self.fn(*inputs)
            torch.cuda.current_stream().wait_stream(side_stream)
            return outputs
        if self.graph is None:
            self.inputs = [tensor.clone() for tensor in inputs]
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):  # records the kernels without running them
                self.outputs = self.fn(*self.inputs)
        else:
            for graph_input, tensor in zip(self.inputs, inputs, strict=True):
                graph_input.copy_(tensor)
        self.graph.replay()
        return self.outputs


class Stopwatch:
    """Wall seconds spent in each phase of the loop (`with stopwatch("env"): ...`), and in all, since the
    last `read`."""

    PHASES = ("eval", "env", "update")

    def __init__(self):
        self.seconds, self.last_read = dict.fromkeys(self.PHASES, 0.0), time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, phase):
        start = time.perf_counter()
        yield
        self.seconds[phase] += time.perf_counter() - start

    def read(self):
        now = time.perf_counter()
        seconds = dict(self.seconds, wall=now - self.last_read)
        self.seconds, self.last_read = dict.fromkeys(self.PHASES, 0.0), now
        return seconds


def evaluation_worker_count(args):
    """The evaluation worker processes of the run (0: it evaluates in this process): --eval-workers, by
    default one per episode, up to the cores this process may use."""
    workers = min(args.eval_workers or len(os.sched_getaffinity(0)), args.num_eval_episodes)
    return workers if workers > 1 else 0


def make_evaluation(args):
    """(evaluate_policy(networks, episode_seeds, device, video_path), close): `evaluate` on an eval env
    in this process, or with evaluation workers `EvaluationWorkers`, which returns the same values."""
    env_args = (args.env_id, args.seed, args.action_repeat, args.frame_stack)
    workers = evaluation_worker_count(args)
    if not workers:
        print("evaluation: in this process")
        eval_env = make_env(*env_args)
        return functools.partial(evaluate, eval_env), eval_env.close
    print(f"evaluation: {workers} worker processes")
    evaluation_workers = EvaluationWorkers(workers, env_args)
    return evaluation_workers, evaluation_workers.close


def evaluation_worker(connection, env_args):
    """An evaluation worker process: runs episodes in an env of its own as the main process asks (reset
    with a seed, step with an action), sends back every observation and reward, and streams the video of
    an episode it is given a path for, frame by frame as `evaluate` does. It ends when its pipe closes."""
    try:
        env, video = make_env(*env_args), None
        connection.send(("ready", None))
        while True:
            command, payload = connection.recv()
            if command == "reset":
                seed, video_path = payload
                obs, reward, last = env.reset(seed), 0.0, False
                video = video_writer(video_path) if video_path else None
            else:
                obs, reward, _, last = env.step(payload)
            if video is not None and last:
                video.close()
            elif video is not None:
                video.append_data(env.render(VIDEO_SIZE))
            connection.send(("step", (obs, reward, last)))
    except (EOFError, ConnectionError):  # the run has ended
        return
    except BaseException as error:  # fail() raises SystemExit with a one-line reason
        reason = error.code if isinstance(error, SystemExit) else f"{type(error).__name__}: {error}"
        with contextlib.suppress(OSError):
            connection.send(("error", reason))


class WorkerFailure(Exception):
    """An evaluation worker died, raised or fell silent."""


class EvaluationWorkers:
    """`evaluate` with its episodes spread over `num_workers` processes, each with an eval env of its own:
    the workers step, render and write the video side by side while this process computes every action
    with `mean_action`, one observation at a time as `evaluate` does, so the mean return is `evaluate`'s
    to the last bit. The workers are spawned at the first evaluation (no GL context or CUDA state is
    inherited) with the stop signals blocked, so that Ctrl-C and a cluster's signals reach only the main
    process; they end when it closes their pipes or dies. A worker that dies, raises, or falls silent (no
    answer for twice the longest episode so far, and at least `min_silence_s`) ends its evaluation: the
    workers are replaced and the evaluation is made again, which gives the same value; should that fail
    too, this evaluation and every later one run in this process. A worker's start may take `startup_s`."""

    def __init__(self, num_workers, env_args, min_silence_s=60, startup_s=300):
        self.num_workers, self.env_args, self.min_silence_s, self.startup_s = num_workers, env_args, min_silence_s, startup_s
        self.connections, self.processes, self.longest_episode_s, self.eval_env = [], [], 0.0, None
        atexit.register(self.close)

    def _start(self):
        context = multiprocessing.get_context("spawn")
        # a spawned process inherits the blocked signals; multiprocessing's resource tracker is started
        # first because starting it unblocks SIGINT and SIGTERM
        multiprocessing.resource_tracker.ensure_running()
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            for _ in range(self.num_workers):
                ours, theirs = context.Pipe()
                process = context.Process(target=evaluation_worker, args=(theirs, self.env_args), name="evaluation worker")
                process.start()
                theirs.close()  # the worker holds the only other end: its death reads as the end of the pipe
                self.connections.append(ours)
                self.processes.append(process)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        for worker in range(self.num_workers):
            self._receive(worker, self.startup_s)  # "ready", or the reason it could not start

    def _send(self, worker, command, payload):
        try:
            self.connections[worker].send((command, payload))
        except ConnectionError:
            self._died(worker)

    def _receive(self, worker, timeout):
        connection, process = self.connections[worker], self.processes[worker]
        if not connection.poll(timeout):
            raise WorkerFailure(f"evaluation worker {worker} (pid {process.pid}) did not answer within {timeout:.0f} s")
        try:
            kind, payload = connection.recv()
        except (EOFError, ConnectionError):
            self._died(worker)
        if kind == "error":
            raise WorkerFailure(f"evaluation worker {worker}: {payload}")
        return payload

    def _died(self, worker):
        process = self.processes[worker]
        process.join(5)
        raise WorkerFailure(f"evaluation worker {worker} (pid {process.pid}) died with exit code {process.exitcode}")

    def __call__(self, networks, episode_seeds, device, video_path=None):
        if self.eval_env is None:
            for attempt in range(2):
                try:
                    if not self.processes:
                        self._start()
                    return self._evaluate(networks, episode_seeds, device, video_path)
                except WorkerFailure as failure:
                    self.close(wait=False)
                    then = "replacing the workers and evaluating again" if attempt == 0 else "evaluating in this process from now on"
                    print(f"evaluation: {failure}; {then}", flush=True)
            self.eval_env = make_env(*self.env_args)
        return evaluate(self.eval_env, networks, episode_seeds, device, video_path)

    def _evaluate(self, networks, episode_seeds, device, video_path):
        returns = [0.0] * len(episode_seeds)
        waiting, running = deque(enumerate(episode_seeds)), {}  # running: worker -> its episode
        episode_start, asked = {}, {}  # worker -> when its episode began, when it was last asked to step

        def ask(worker, command, payload):
            asked[worker] = time.monotonic()
            self._send(worker, command, payload)

        def start_next_episode(worker):
            episode, seed = waiting.popleft()
            running[worker], episode_start[worker] = episode, time.monotonic()
            ask(worker, "reset", (seed, video_path if episode == 0 else None))

        for worker in range(min(len(self.connections), len(waiting))):
            start_next_episode(worker)
        while running:
            silence = max(self.min_silence_s, 2 * self.longest_episode_s)
            ready = multiprocessing.connection.wait([self.connections[worker] for worker in running], silence)
            for worker in [self.connections.index(connection) for connection in ready]:
                obs, reward, last = self._receive(worker, 0)
                returns[running[worker]] += reward
                if not last:
                    ask(worker, "step", mean_action(networks, obs, device))
                    continue
                self.longest_episode_s = max(self.longest_episode_s, time.monotonic() - episode_start[worker])
                if waiting:
                    start_next_episode(worker)
                else:
                    del running[worker]
            for worker in running:
                if time.monotonic() - asked[worker] > silence:
                    raise WorkerFailure(f"evaluation worker {worker} (pid {self.processes[worker].pid}) was silent for {silence:.0f} s")
        return float(np.mean(returns)) if returns else float("nan")

    def close(self, wait=True):
        """End the workers: at once, or (`wait`) once they have seen their pipes close."""
        for connection in self.connections:
            connection.close()
        for process in self.processes:
            process.join(10 if wait else 0)
            if process.is_alive():
                process.kill()
                process.join()
        self.connections, self.processes = [], []
        if wait and self.eval_env is not None:
            self.eval_env.close()
            self.eval_env = None


if __name__ == "__main__":
    main()
