# docs and implementation details: README.md, section "drm_adroit.py (Adroit hands)"
import difflib
import math
import os
import random
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import Literal, NamedTuple

os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering; must be set before mujoco is imported

import imageio
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter


@dataclass
class Args:
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
    """save an mp4 of the first episode of every evaluation under `videos/{run_name}`"""
    save_model: bool = False
    """save the networks' state dicts under `runs/{run_name}` at the end"""

    # Algorithm specific arguments
    env_id: str = "door"
    """the Adroit task: door, hammer, pen or relocate"""
    total_frames: int = 6_100_000
    """total env frames of the run"""
    num_seed_frames: int = 4000
    """env frames of uniform random actions before learning starts"""
    eval_every_frames: int = 10000
    """evaluate every this many env frames (starting at frame 0)"""
    num_eval_episodes: int = 10
    """episodes per evaluation (mean action, no noise)"""
    action_repeat: int = 2
    """env frames per agent step (each action is repeated this many times)"""
    frame_stack: int = 1
    """frames stacked into one observation (DrM uses a single frame plus the hand's joint positions)"""
    buffer_size: int = 1_000_000
    """replay capacity in transitions"""
    batch_size: int = 256
    """the batch size of samples from the replay memory"""
    learning_rate: float = 1e-4
    """the learning rate of all four Adam optimizers"""
    feature_dim: int = 50
    """width of the trunk after the encoder, and of the state and fusion MLPs' outputs"""
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
    std_schedule_steps: int = 500_000
    """length of the linear exploration-std schedule in agent steps"""
    std_clip: float = 0.3
    """clip of the policy noise in the actor and critic updates"""
    exploration: Literal["awake", "dormant", "linear"] = "awake"
    """exploration std: `awake` (DrM), `dormant` (sigmoid of the dormant ratio only), `linear` (DrQ-v2)"""
    perturb: bool = True
    """if toggled, shrink-and-perturb the weights every `perturb-interval-steps` (DrM)"""
    exploit: bool = True
    """if toggled, train the expectile value network and blend it into the TD target (DrM)"""
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
    expectile: float = 0.7
    """expectile of the value network's regression on min(Q1, Q2)"""
    perturb_interval_steps: int = 100000
    """perturb every this many agent steps"""
    min_perturb_factor: float = 0.2
    """smallest share of the old weights kept by a perturbation"""
    max_perturb_factor: float = 0.9
    """largest share of the old weights kept by a perturbation"""
    perturb_rate: float = 2.0
    """perturb factor = clip(1 - perturb_rate * dormant_ratio, min, max)"""
    log_every_updates: int = 100
    """write the scalars that need a device-to-host copy every this many updates"""

    # Checkpoints
    checkpoint_every_frames: int | None = None
    """write `checkpoint.pt` into the run directory at the first episode end after every this many env frames"""
    checkpoint_replay: bool = False
    """if toggled, checkpoints include the replay buffer, so that a resumed run is exactly the uninterrupted one"""
    resume: str | None = None
    """continue the run whose run directory (or checkpoint file) this is, in that directory"""
    skip_nonfinite_updates: bool = False
    """if toggled, skip an update whose loss or Q value is NaN or infinite instead of stopping the run"""

    # Speed (README, "Speed")
    compile: bool = False
    """if toggled, torch.compile the update and acting"""
    cudagraphs: bool = False
    """if toggled, capture the update and acting as CUDA graphs (needs a GPU and the replay in GPU memory)"""
    tf32: bool = True
    """allow TF32 tensor cores in float32 matmuls and convolutions (Ampere and newer GPUs)"""


# The four tasks as DrM ran them (REFERENCE.md sections 8 and 10.2). They share one config, whose values
# are the Args defaults above; relocate had no official config and uses the same.
class AdroitTask(NamedTuple):
    gym_id: str
    episode_frames: int  # env steps per episode (DrM's time limits)
    reward_scale: float  # DrM's reward rescaling
    success_frames: int  # an episode succeeds when MORE env steps than this reported success
    camera: str  # the model camera the agent sees through
    camera_pose: tuple | None  # DrM's pose for that camera as (position, quaternion w x y z); None: stock
    hand_qpos: slice  # the 24 hand joint positions inside qpos (DrM's slices)


TOP_DOWN = (0.0008, 0.0, 0.0, 1.0)  # DrM's "top" camera orientation, looking straight down
TILTED_45 = (0.92388, 0.38268, 0.0, 0.0)  # DrM's pen camera orientation, looking down at 45 degrees
ADROIT_TASKS = {
    # DrM's "top" and closer "vil_camera" do not exist in these models: their poses overwrite the
    # stock vil_camera, which nothing else uses
    "door": AdroitTask("AdroitHandDoor-v1", 200, 1 / 20, 25, "vil_camera", ((0.0, 0.0, 1.5), TOP_DOWN), slice(4, -2)),
    "hammer": AdroitTask("AdroitHandHammer-v1", 200, 1 / 100, 25, "vil_camera", ((0.0, 0.0, 1.1), TOP_DOWN), slice(2, -7)),
    "pen": AdroitTask("AdroitHandPen-v1", 100, 1 / 50, 20, "vil_camera", ((0.0, -0.8, 0.8), TILTED_45), slice(None, -6)),
    # DrM stacked three cameras of its own model that do not fit this one: the stock "fixed" camera instead
    "relocate": AdroitTask("AdroitHandRelocate-v1", 200, 1 / 30, 25, "fixed", None, slice(6, -6)),
}  # fmt: skip
STATE_DIM = 24
PEN_DROP_HEIGHT = 0.075  # the original pen episode terminates when the pen falls below this height
VIDEO_SIZE = 256  # evaluation videos are rendered larger than what the agent sees
RENDER_HELP = (
    "On Debian/Ubuntu install the EGL libraries: "
    "apt-get install -y --no-install-recommends libegl1 libopengl0 libgl1-mesa-dri"
)


def import_mujoco():
    """mujoco picks its rendering backend when imported, so it is imported here, where a missing
    backend can be explained instead of ending in a traceback."""
    try:
        import mujoco
    except Exception as error:
        sys.exit(f"drm_adroit.py: mujoco cannot render with MUJOCO_GL={os.environ['MUJOCO_GL']} ({error!r}). {RENDER_HELP}")
    return mujoco


def import_gymnasium_robotics():
    """gymnasium-robotics is imported here, where a missing install can be explained."""
    import_mujoco()  # first, so that a missing rendering backend is reported as such
    try:
        import gymnasium as gym
        import gymnasium_robotics
    except ImportError as error:
        sys.exit(f"drm_adroit.py: the Adroit tasks need gymnasium-robotics ({error}): pip install gymnasium-robotics==1.4.2")
    gym.register_envs(gymnasium_robotics)
    return gym


def make_renderer(model, size):
    try:
        return import_mujoco().Renderer(model, size, size)
    except Exception as error:
        sys.exit(f"drm_adroit.py: mujoco cannot render with MUJOCO_GL={os.environ['MUJOCO_GL']} ({error!r}). {RENDER_HELP}")


def resolve_args(args: Args, valid_env_ids) -> Args:
    """Stop with a one-line reason on an unknown task or impossible settings, before any env or network
    is built."""
    if args.env_id not in valid_env_ids:
        close = difflib.get_close_matches(args.env_id, valid_env_ids, n=5, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        sys.exit(f"drm_adroit.py: unknown env id {args.env_id!r}; {hint}valid ids: {', '.join(sorted(valid_env_ids))}")

    episode_steps = ADROIT_TASKS[args.env_id].episode_frames // max(args.action_repeat, 1)
    problems = [
        (args.total_frames <= 0, f"--total-frames must be positive (got {args.total_frames})"),
        (args.num_seed_frames < 0, f"--num-seed-frames must be >= 0 (got {args.num_seed_frames})"),
        (args.eval_every_frames <= 0, f"--eval-every-frames must be positive (got {args.eval_every_frames})"),
        (args.num_eval_episodes < 0, f"--num-eval-episodes must be >= 0 (got {args.num_eval_episodes})"),
        (args.action_repeat < 1, f"--action-repeat must be >= 1 (got {args.action_repeat})"),
        (args.frame_stack < 1, f"--frame-stack must be >= 1 (got {args.frame_stack})"),
        (args.batch_size <= 0, f"--batch-size must be positive (got {args.batch_size})"),
        (args.buffer_size <= 0, f"--buffer-size must be positive (got {args.buffer_size})"),
        (args.batch_size > args.buffer_size, f"--batch-size {args.batch_size} is larger than --buffer-size {args.buffer_size}"),
        (args.nstep < 1, f"--nstep must be >= 1 (got {args.nstep})"),
        (args.nstep >= episode_steps, f"--nstep {args.nstep} is not shorter than an episode ({episode_steps} agent steps)"),
        (args.buffer_size <= args.nstep + args.frame_stack, f"--buffer-size {args.buffer_size} cannot hold one n-step window"),
        (args.num_seed_frames // args.action_repeat <= args.nstep,
         f"--num-seed-frames {args.num_seed_frames} leaves no complete n-step window to learn from at the first update"),
        (args.update_every_steps < 1, f"--update-every-steps must be >= 1 (got {args.update_every_steps})"),
        (args.perturb_interval_steps < 1, f"--perturb-interval-steps must be >= 1 (got {args.perturb_interval_steps})"),
        (args.std_schedule_steps <= 0, f"--std-schedule-steps must be positive (got {args.std_schedule_steps})"),
        (args.log_every_updates < 1, f"--log-every-updates must be >= 1 (got {args.log_every_updates})"),
        (args.checkpoint_every_frames is not None and args.checkpoint_every_frames <= 0,
         f"--checkpoint-every-frames must be positive (got {args.checkpoint_every_frames})"),
        (args.learning_rate <= 0, f"--learning-rate must be positive (got {args.learning_rate})"),
        (not 0 < args.gamma <= 1, f"--gamma must be in (0, 1] (got {args.gamma})"),
        (not 0 < args.tau <= 1, f"--tau must be in (0, 1] (got {args.tau})"),
        (not 0 < args.expectile < 1, f"--expectile must be in (0, 1) (got {args.expectile})"),
        (not 0 <= args.min_perturb_factor <= args.max_perturb_factor <= 1,
         f"perturb factors need 0 <= --min-perturb-factor <= --max-perturb-factor <= 1 "
         f"(got {args.min_perturb_factor}, {args.max_perturb_factor})"),
    ]
    for failed, reason in problems:
        if failed:
            sys.exit(f"drm_adroit.py: {reason}")
    return args


def original_reward(env_id, env, v1_reward):
    """The dense reward DrM trained on, from gymnasium-robotics -v1's: door, hammer and relocate -v1
    add +0.1 * |hand - object| where the original subtracts it, paying the hand to move away."""
    data = env.data
    if env_id == "door":
        hand, target = data.site_xpos[env.grasp_site_id], data.site_xpos[env.handle_site_id]
    elif env_id in ("hammer", "relocate"):
        hand, target = data.site_xpos[env.S_grasp_site_id], data.xpos[env.obj_body_id]
    else:
        return v1_reward  # pen's -v1 reward is the original one
    return v1_reward - 0.2 * float(np.linalg.norm(hand - target))


class AdroitEnv:
    """An Adroit hand task from pixels and proprioception: 84x84 uint8 frames, channels first, the
    last `frame_stack` frames stacked (the first frame repeated at reset), and the 24 hand joint
    positions; each float32 action in [-1, 1] repeated `action_repeat` times with the rewards summed
    and scaled by DrM's per-task factor. `success` tells whether the current episode succeeded."""

    def __init__(self, env_id, seed, action_repeat=2, frame_stack=1, size=84):
        self.env_id, self.task = env_id, ADROIT_TASKS[env_id]
        self.env = import_gymnasium_robotics().make(self.task.gym_id).unwrapped  # time limits are counted here
        model, mujoco = self.env.model, import_mujoco()
        self.camera_id = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, self.task.camera)
        if self.task.camera_pose is not None:
            position, quaternion = self.task.camera_pose
            model.cam_pos[self.camera_id] = position
            model.cam_quat[self.camera_id] = np.asarray(quaternion) / np.linalg.norm(quaternion)
        # one persistent renderer per size: gymnasium's env.render() returns black frames once a process
        # holds a second GL context
        self.renderers = {size: make_renderer(model, size)}
        self.seed, self.action_repeat, self.size = seed, action_repeat, size
        self.action_dim = self.env.action_space.shape[0]
        self.frames = deque(maxlen=frame_stack)
        self.observation_shape = (3 * frame_stack, size, size)
        self.episode_frames, self.successful_frames = 0, 0

    def render(self, size=None):
        size = size or self.size
        if size not in self.renderers:
            self.renderers[size] = make_renderer(self.env.model, size)
        self.renderers[size].update_scene(self.env.data, camera=self.camera_id)
        return self.renderers[size].render()

    def close(self):
        for renderer in self.renderers.values():
            renderer.close()

    def state(self):
        return self.env.data.qpos[self.task.hand_qpos].astype(np.float32)

    @property
    def success(self):
        """DrM's episode success: more than 25 (pen: 20) env steps reported success."""
        return self.successful_frames > self.task.success_frames

    def rng_state(self):
        # the generator of every reset (door, hammer, ball and pen-goal positions), and whether the
        # first reset (which seeds it) is still to come
        return {"generator": self.env.np_random.bit_generator.state, "seed": self.seed}

    def set_rng_state(self, state):
        self.env.np_random.bit_generator.state = state["generator"]
        self.seed = state["seed"]

    def _observation(self):
        return np.concatenate(self.frames, axis=0)

    def reset(self):
        """Returns (observation, state). The first reset seeds the env's generator, later ones continue it."""
        self.env.reset(seed=self.seed)
        self.seed = None
        self.episode_frames, self.successful_frames = 0, 0
        frame = self.render().transpose(2, 0, 1).copy()
        for _ in range(self.frames.maxlen):
            self.frames.append(frame)
        return self._observation(), self.state()

    def step(self, action):
        """Returns (observation, state, reward, discount, last); discount is 0 only when the pen drops
        (the one true termination), so a time-limit end bootstraps."""
        action = np.clip(np.asarray(action, dtype=np.float32), -1.0, 1.0)  # the env maps [-1, 1] to the actuators
        reward, dropped, last = 0.0, False, False
        for _ in range(self.action_repeat):
            _, v1_reward, _, _, info = self.env.step(action)
            reward += original_reward(self.env_id, self.env, v1_reward)
            self.successful_frames += bool(info["success"])
            self.episode_frames += 1
            dropped = self.env_id == "pen" and self.env.data.xpos[self.env.obj_body_id][2] < PEN_DROP_HEIGHT
            last = dropped or self.episode_frames >= self.task.episode_frames
            if last:
                break
        self.frames.append(self.render().transpose(2, 0, 1).copy())
        return self._observation(), self.state(), reward * self.task.reward_scale, 0.0 if dropped else 1.0, last


def make_env(env_id, seed, action_repeat=2, frame_stack=1):
    return AdroitEnv(env_id, seed, action_repeat, frame_stack)


# ALGO LOGIC: replay buffer
class Batch(NamedTuple):
    obs: torch.Tensor  # uint8, (B, 3 * frame_stack, 84, 84)
    state: torch.Tensor  # float32 hand joint positions, (B, 24)
    action: torch.Tensor
    reward: torch.Tensor  # n-step discounted reward sum, (B, 1)
    discount: torch.Tensor  # gamma^n times the env discounts of the window, (B, 1)
    next_obs: torch.Tensor
    next_state: torch.Tensor


class ReplayBuffer:
    """A ring of SINGLE frames and their hand states, one slot per env time step (the reset step
    included, with a zero action). Frame stacks and n-step returns are rebuilt at sample time. A slot
    k is a valid sample start when slots k..k+n hold one episode, so windows never cross an episode
    end; `valid` tracks that as the ring is written, and sampling is uniform over valid starts."""

    STORED = ("frames", "states", "actions", "rewards", "discounts", "episode_steps", "valid")

    def __init__(self, capacity, frame_shape, state_dim, action_dim, frame_stack, nstep, gamma, device):
        self.capacity, self.frame_stack, self.nstep, self.gamma = capacity, frame_stack, nstep, gamma
        self.device = torch.device(device)
        # never zero-filled: only written slots are ever read, and host pages are committed as they fill
        self.frames = torch.empty((capacity, *frame_shape), dtype=torch.uint8, device=device)
        self.states = torch.empty((capacity, state_dim), dtype=torch.float32, device=device)
        self.actions = torch.empty((capacity, action_dim), dtype=torch.float32, device=device)
        self.rewards = torch.zeros(capacity, dtype=torch.float32, device=device)
        self.discounts = torch.ones(capacity, dtype=torch.float32, device=device)
        self.episode_steps = torch.zeros(capacity, dtype=torch.int64, device=device)
        self.valid = torch.zeros(capacity, dtype=torch.float32, device=device)  # sampling weights, 0 or 1
        self.stack_offsets = torch.arange(frame_stack - 1, -1, -1, device=device)  # oldest frame first
        self.retire_offsets = torch.arange(frame_stack, device=device)
        self.window_offsets = torch.arange(1, nstep + 1, device=device)
        self.pos, self.size, self.episode_step = 0, 0, 0

    @staticmethod
    def nbytes(capacity, frame_shape, state_dim, action_dim):
        per_slot = math.prod(frame_shape) + 4 * state_dim + 4 * action_dim + 4 + 4 + 8 + 4
        return capacity * per_slot

    def add(self, frame, state, action, reward, discount, first):
        """Store one time step: the frame and hand state it shows and the action, reward and env
        discount that led to it (first=True at a reset)."""
        pos = self.pos
        self.episode_step = 0 if first else self.episode_step + 1
        self.frames[pos] = torch.as_tensor(frame, device=self.device)
        self.states[pos] = torch.as_tensor(state, device=self.device)
        self.actions[pos] = torch.as_tensor(action, device=self.device)
        self.rewards[pos] = reward
        self.discounts[pos] = discount
        self.episode_steps[pos] = self.episode_step
        # starts whose n-step window or frame stack would read the overwritten slot are retired
        self.valid[(pos + self.retire_offsets) % self.capacity] = 0.0
        if self.episode_step >= self.nstep:
            self.valid[(pos - self.nstep) % self.capacity] = 1.0
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
            state=self.states[starts],
            action=self.actions[window[:, 0]],
            reward=(reward_weights * self.rewards[window]).sum(1, keepdim=True),
            discount=step_discounts[:, -1:],
            next_obs=self._stacked_frames(window[:, -1]),
            next_state=self.states[window[:, -1]],
        )

    def state_dict(self):
        """The written slots and the write position. Before the ring is full only its filled front is
        kept, which copies it once."""
        state = {"pos": self.pos, "size": self.size, "episode_step": self.episode_step}
        for name in self.STORED:
            tensor = getattr(self, name)
            state[name] = tensor if self.size == self.capacity else tensor[: self.size].clone()
        return state

    def load_state_dict(self, state):
        for name in self.STORED:
            getattr(self, name)[: state["size"]] = state[name]
        self.pos, self.size, self.episode_step = state["pos"], state["size"], state["episode_step"]

    def sample(self, batch_size, device):
        starts = torch.multinomial(self.valid, batch_size, replacement=True)
        return Batch(*(x.to(device, non_blocking=True) for x in self.gather(starts)))


def available_host_memory():
    try:
        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def replay_device(nbytes, device, headroom=2 * 1024**3):
    """Keep the replay on the GPU when it fits in free GPU memory (sampling is then pure device
    indexing), else in host memory; stop before training if it fits in neither."""
    if device.type == "cuda" and torch.cuda.mem_get_info(device)[0] > nbytes + headroom:
        return device
    if available_host_memory() > nbytes + headroom:
        return torch.device("cpu")
    sys.exit(
        f"drm_adroit.py: the replay buffer needs {nbytes / 1e9:.1f} GB, more than the free "
        f"{'GPU or ' if device.type == 'cuda' else ''}host memory; lower --buffer-size"
    )


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
    # `dormant_ratio` score hidden units after the ReLU (README, implementation detail 2).
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, hidden_dim), nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim),
    )  # fmt: skip


class StateFusion(nn.Module):
    """DrM's proprioception path, one per network: a state MLP whose output is added to the image
    features, then a fusion MLP over the sum. Its Linears count in the dormant ratio and are perturbed."""

    def __init__(self, state_dim, hidden_dim, feature_dim):
        super().__init__()
        # in-place ReLUs, as in `mlp`: the dormant ratio scores these hidden units after their ReLU
        self.state_mlp = nn.Sequential(
            nn.Linear(state_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, feature_dim)
        )  # fmt: skip
        self.fusion = nn.Sequential(
            nn.Linear(feature_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, feature_dim)
        )  # fmt: skip

    def forward(self, image_features, state):
        return self.fusion(image_features + self.state_mlp(state))


class Actor(nn.Module):
    """Deterministic policy mean; exploration noise comes from outside (the std schedule)."""

    def __init__(self, repr_dim, state_dim, action_dim, feature_dim, hidden_dim):
        super().__init__()
        self.trunk = trunk(repr_dim, feature_dim)
        self.state_fusion = StateFusion(state_dim, hidden_dim, feature_dim)
        self.policy = mlp(feature_dim, hidden_dim, action_dim)
        self.apply(weight_init)

    def forward(self, features, state):
        return torch.tanh(self.policy(self.state_fusion(self.trunk(features), state)))


class Critic(nn.Module):
    """Twin Q heads on one shared trunk and state fusion."""

    def __init__(self, repr_dim, state_dim, action_dim, feature_dim, hidden_dim):
        super().__init__()
        self.trunk = trunk(repr_dim, feature_dim)
        self.state_fusion = StateFusion(state_dim, hidden_dim, feature_dim)
        self.q1 = mlp(feature_dim + action_dim, hidden_dim, 1)
        self.q2 = mlp(feature_dim + action_dim, hidden_dim, 1)
        self.apply(weight_init)

    def forward(self, features, state, action):
        h = torch.cat([self.state_fusion(self.trunk(features), state), action], dim=-1)
        return self.q1(h), self.q2(h)


class ValueNetwork(nn.Module):
    """State value V(s), regressed to an upper expectile of min(Q1, Q2) over replay actions."""

    def __init__(self, repr_dim, state_dim, feature_dim, hidden_dim):
        super().__init__()
        self.trunk = trunk(repr_dim, feature_dim)
        self.state_fusion = StateFusion(state_dim, hidden_dim, feature_dim)
        self.v = mlp(feature_dim, hidden_dim, 1)
        self.apply(weight_init)

    def forward(self, features, state):
        return self.v(self.state_fusion(self.trunk(features), state))


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
    mix = min(max(step / duration, 0.0), 1.0) if not torch.is_tensor(step) else (step / duration).clamp(0.0, 1.0)
    return start + (end - start) * mix


def expectile_loss(diff, expectile):
    """Asymmetric squared error of diff = V - Q: weight 1 - expectile above Q, expectile below."""
    weight = torch.where(diff > 0, 1.0 - expectile, expectile)
    return (weight * diff.pow(2)).mean()


# ALGO LOGIC: DrM pieces
def _sigmoid(x):
    return torch.sigmoid(x) if torch.is_tensor(x) else 1.0 / (1.0 + math.exp(-x))


def _keep_output(linear, _inputs, output):
    if linear.recorded is not None:
        linear.recorded.append(output)


def record_linear_outputs(model):
    """Give every nn.Linear of `model` a forward hook that keeps its output while `dormant_ratio`
    asks for it. Installed once, when the networks are built: a hook added inside a compiled
    function would split the compiled graph."""
    for module in model.modules():
        if isinstance(module, nn.Linear) and not hasattr(module, "recorded"):
            module.recorded = None
            module.register_forward_hook(_keep_output)
    return model


def dormant_ratio(model, *inputs, threshold=0.025):
    """Share of dormant neurons over every nn.Linear of `model` run on `inputs`: a neuron is dormant
    when its mean |output| over the batch is below `threshold` times its layer's mean. Returns a 0-d
    tensor, so calling it costs no host sync. The outputs are read after the forward pass, so a
    Linear followed by an in-place ReLU is scored after that ReLU, as in the official code."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not all(hasattr(m, "recorded") for m in linears):
        raise ValueError("dormant_ratio: call record_linear_outputs(model) once before")
    outputs = []
    for linear in linears:
        linear.recorded = outputs
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for linear in linears:
            linear.recorded = None
    dormant, total = 0, 0
    for out in outputs:
        score = out.abs().flatten(0, -2).mean(0)
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


def perturb_factor(dormant_ratio, min_factor=0.2, max_factor=1.0, rate=2.0):
    """Share of the old weights kept: clip(1 - rate * dormant_ratio, min_factor, max_factor)."""
    factor = 1.0 - rate * dormant_ratio
    if torch.is_tensor(factor):
        return factor.clamp(min=min_factor).clamp(max=max_factor)
    return min(max(min_factor, factor), max_factor)


def dormant_std(dormant_ratio, target_ratio=0.2, temperature=10.0):
    """Exploration std from the dormant ratio: sigmoid(temperature * (ratio - target_ratio))."""
    return _sigmoid(temperature * (dormant_ratio - target_ratio))


def exploitation_lambda(dormant_ratio, target_lambda=0.6, target_ratio=0.2, temperature=50.0):
    """Weight of V(s') in the TD target: target_lambda / (1 + exp(temperature * (ratio - target_ratio)))."""
    return target_lambda * _sigmoid(-temperature * (dormant_ratio - target_ratio))


@torch.no_grad()
def evaluate(env, encoder, actor, num_episodes, device, video_path=None):
    """Mean return and success rate over `num_episodes` with the mean action; the first episode is
    saved to `video_path` (mp4) when given."""
    returns, successes, video = [], [], []
    for episode in range(num_episodes):
        (obs, state), last, episode_return = env.reset(), False, 0.0
        while not last:
            if video_path and episode == 0:
                video.append(env.render(VIDEO_SIZE))
            features = encoder(torch.as_tensor(obs, device=device).unsqueeze(0))
            action = actor(features, torch.as_tensor(state, device=device).unsqueeze(0))[0].cpu().numpy()
            obs, state, reward, _, last = env.step(action)
            episode_return += reward
        returns.append(episode_return)
        successes.append(env.success)
    if video:
        os.makedirs(os.path.dirname(video_path), exist_ok=True)
        imageio.mimsave(video_path, video, fps=30)
    if not returns:
        return float("nan"), float("nan")
    return float(np.mean(returns)), float(np.mean(successes))


# Checkpoints
CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_KEYS = {"args", "run_name", "next_step", "counters", "networks", "optimizers", "rng", "envs", "replay"}
# arguments that change nothing the agent does, and so may differ from the checkpoint's on --resume
RESUMABLE_CHANGES = {
    "resume", "total_frames", "track", "wandb_project_name", "wandb_entity", "capture_video", "save_model",
    "checkpoint_every_frames", "checkpoint_replay", "compile", "cudagraphs",
}  # fmt: skip


def save_checkpoint(state, path):
    """Write atomically: into a temporary file, flushed to disk, then renamed over the previous
    checkpoint, so a crash at any moment leaves a complete checkpoint behind."""
    temporary = path + ".tmp"
    with open(temporary, "wb") as file:
        torch.save(state, file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


def load_checkpoint(path):
    """(checkpoint, its path) for a run directory or a checkpoint file; stops with the reason if it
    cannot be read. Checkpoints hold pickled RNG states: load only checkpoints you wrote."""
    if os.path.isdir(path):
        path = os.path.join(path, CHECKPOINT_NAME)
    if not os.path.isfile(path):
        sys.exit(f"drm_adroit.py: --resume: no checkpoint at {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        reason = f"{type(error).__name__}: {str(error).split('. ')[0]}"
        sys.exit(f"drm_adroit.py: --resume: {path} is truncated or corrupt ({reason}); resume from another copy or start a new run")
    if not isinstance(checkpoint, dict) or not CHECKPOINT_KEYS <= set(checkpoint):
        sys.exit(f"drm_adroit.py: --resume: {path} is not a drm_adroit.py checkpoint")
    return checkpoint, path


def conflicting_args(args, saved):
    """The arguments that would make a resumed run a different run, with both values."""
    return [
        f"--{key.replace('_', '-')} {value} (checkpoint: {saved.get(key)})"
        for key, value in vars(args).items()
        if key not in RESUMABLE_CHANGES and saved.get(key) != value
    ]


def checkpoint_frame_after(frame, every):
    """The next multiple of `every` after `frame` (None without periodic checkpoints)."""
    return (frame // every + 1) * every if every else None


def rng_states(device):
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def set_rng_states(states, device):
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)


@torch.compiler.disable  # plain Python under torch.compile, which would not pass the attribute on
def step_unless(optimizer, skip):
    """optimizer.step(), dropped on the device when the 0-d bool tensor `skip` is true: no host sync,
    so a non-finite update can be discarded inside a compiled or captured update. Fused Adam reads
    the flag from `found_inf`, the attribute torch.amp.GradScaler sets for the same purpose."""
    optimizer.found_inf = skip.float()
    optimizer.step()


# Speed: timing and CUDA graphs
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


if __name__ == "__main__":
    args = tyro.cli(Args)
    checkpoint = None
    if args.resume:
        checkpoint, checkpoint_path = load_checkpoint(args.resume)
        # the checkpoint's arguments become the defaults; flags given now override them and are checked below
        args = tyro.cli(Args, default=Args(**{**checkpoint["args"], "resume": args.resume}))
    args = resolve_args(args, list(ADROIT_TASKS))
    if checkpoint is not None and (conflicts := conflicting_args(args, checkpoint["args"])):
        sys.exit(f"drm_adroit.py: --resume continues the same run, but these arguments differ: {'; '.join(conflicts)}")
    if args.track:
        try:
            import wandb
        except ImportError:
            sys.exit("drm_adroit.py: --track needs Weights & Biases: pip install wandb")
    if checkpoint is None:
        run_name = f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
        run_dir = f"runs/{run_name}"
        checkpoint_path = os.path.join(run_dir, CHECKPOINT_NAME)
    else:
        run_name, run_dir = checkpoint["run_name"], os.path.dirname(checkpoint_path)
    print("resolved arguments:\n" + "\n".join(f"  {key}: {value}" for key, value in vars(args).items()))

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
    if args.cudagraphs and device.type != "cuda":
        sys.exit("drm.py: --cudagraphs needs a CUDA GPU and --cuda")

    # env setup: train and eval envs share the seed, as in the official code
    env = make_env(args.env_id, args.seed, args.action_repeat, args.frame_stack)
    eval_env = make_env(args.env_id, args.seed, args.action_repeat, args.frame_stack)
    obs_shape, action_dim = env.observation_shape, env.action_dim
    frame_shape = (3, *obs_shape[1:])

    nbytes = ReplayBuffer.nbytes(args.buffer_size, frame_shape, STATE_DIM, action_dim)
    storage = replay_device(nbytes, device)
    print(f"replay: {args.buffer_size:,} transitions, {nbytes / 1e9:.1f} GB on {storage.type}")
    if args.cudagraphs and storage != device:
        sys.exit("drm.py: --cudagraphs samples the replay inside the graph, so it must fit in GPU memory; lower --buffer-size")
    rb = ReplayBuffer(args.buffer_size, frame_shape, STATE_DIM, action_dim, args.frame_stack, args.nstep, args.gamma, storage)

    if args.track:
        wandb.init(
            project=args.wandb_project_name,
            entity=args.wandb_entity,
            sync_tensorboard=True,
            config=vars(args),
            name=run_name,
            save_code=True,
        )
    # a resumed run appends to its event files; purge_step hides what a killed run logged after the
    # checkpoint's frame (what it logged at that very frame stays: its last episode's scalars)
    writer = SummaryWriter(run_dir, purge_step=checkpoint["next_step"] * args.action_repeat + 1 if checkpoint else None)
    if checkpoint is None:
        table_rows = "\n".join(f"|{key}|{value}|" for key, value in vars(args).items())
        writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{table_rows}")

    # ALGO LOGIC: initialize agent here
    encoder = Encoder(obs_shape).to(device)
    actor = record_linear_outputs(Actor(encoder.repr_dim, STATE_DIM, action_dim, args.feature_dim, args.hidden_dim).to(device))
    critic = record_linear_outputs(Critic(encoder.repr_dim, STATE_DIM, action_dim, args.feature_dim, args.hidden_dim).to(device))
    critic_target = Critic(encoder.repr_dim, STATE_DIM, action_dim, args.feature_dim, args.hidden_dim).to(device)
    critic_target.load_state_dict(critic.state_dict())
    value = record_linear_outputs(ValueNetwork(encoder.repr_dim, STATE_DIM, args.feature_dim, args.hidden_dim).to(device))
    # fused Adam: one kernel per step, a step that can be dropped on the device (step_unless), and
    # CUDA graph capture (capturable)
    adam = dict(lr=args.learning_rate, fused=True, capturable=args.cudagraphs)
    encoder_optimizer = torch.optim.Adam(encoder.parameters(), **adam)
    actor_optimizer = torch.optim.Adam(actor.parameters(), **adam)
    critic_optimizer = torch.optim.Adam(critic.parameters(), **adam)
    value_optimizer = torch.optim.Adam(value.parameters(), **adam)
    networks = dict(encoder=encoder, actor=actor, critic=critic, critic_target=critic_target, value=value)
    optimizers = dict(encoder=encoder_optimizer, actor=actor_optimizer, critic=critic_optimizer, value=value_optimizer)
    # the target critic has no optimizer: its perturbation wipes the critic's state once more
    perturbed = [
        (actor, actor_optimizer),
        (critic, critic_optimizer),
        (critic_target, critic_optimizer),
        (encoder, encoder_optimizer),
        (value, value_optimizer),
    ]

    # DrM state lives on the device so the update never waits for the host; it is changed in place
    # only, so compiled code and CUDA graphs always read the current values
    beta = torch.tensor(1.0, device=device)  # actor dormant ratio of the last update (1.0 before any)
    awaken_step = torch.tensor(-1, device=device)  # agent step of awakening, -1 until then
    step_tensor = torch.tensor(0, device=device)  # the agent step, as the schedules read it
    awaken_logged = False

    def exploration_std(step):
        linear = linear_schedule(args.std_init, args.std_final, args.std_schedule_steps, step)
        if args.exploration == "linear":
            return linear
        std = dormant_std(beta, args.target_dormant_ratio, args.dormant_temp)
        if args.exploration == "awake":
            since_awake = linear_schedule(args.std_init, args.std_final, args.std_schedule_steps, step - awaken_step)
            std = torch.where(awaken_step >= 0, torch.maximum(std, since_awake), std)
        return std

    def exploit_lambda():
        if not args.exploit:
            return 0.0
        return exploitation_lambda(beta, args.target_lambda, args.target_dormant_ratio, args.lambda_temp)

    total_steps = args.total_frames // args.action_repeat
    num_seed_steps = args.num_seed_frames // args.action_repeat

    @torch.no_grad()
    def act(obs, state, step):
        features = encoder(obs.unsqueeze(0))
        return sample_action(actor(features, state.unsqueeze(0)), exploration_std(step))[0]

    # ALGO LOGIC: the update, in phases of one backward pass each (a compiled function's graph ends
    # at a backward pass, so --compile compiles each phase whole). Every phase reads and writes
    # device tensors only: nothing waits for the host, so the update is queued before the env step
    # and computes while the env steps. A non-finite loss drops its own optimizer step and every
    # later one of the update, on the device (step_unless); the loop reads `nonfinite` afterwards.
    def encode(data, step):
        features = encoder(random_shift(data.obs.float()))
        with torch.no_grad():
            next_features = encoder(random_shift(data.next_obs.float()))
        # the actor's dormant ratio on this batch drives exploration std and lambda
        beta.copy_(dormant_ratio(actor, features.detach(), data.state, threshold=args.dormant_threshold))
        awakens = (awaken_step < 0) & (beta < args.target_dormant_ratio) & (step > num_seed_steps)
        awaken_step.copy_(torch.where(awakens, step, awaken_step))
        return features, next_features, exploration_std(step), exploit_lambda()

    def update_value(features, state, action):
        # value network: expectile regression on the online critic's min(Q1, Q2) of replay actions
        with torch.no_grad():
            q_replay = torch.min(*critic(features, state, action))
        value_loss = expectile_loss(value(features, state) - q_replay, args.expectile)
        value_optimizer.zero_grad(set_to_none=True)
        value_loss.backward()
        nonfinite = ~torch.isfinite(value_loss)
        step_unless(value_optimizer, nonfinite)
        return value_loss.detach(), nonfinite

    def update_critic(features, next_features, data, std, lam, skip):
        # critic and encoder: n-step TD target blending the target critic and V(s') by lambda
        with torch.no_grad():
            next_action = sample_action(actor(next_features, data.next_state), std, args.std_clip)
            next_value = torch.min(*critic_target(next_features, data.next_state, next_action))
            if args.exploit:
                next_value = lam * value(next_features, data.next_state) + (1.0 - lam) * next_value
            td_target = data.reward + data.discount * next_value
        qf1_values, qf2_values = critic(features, data.state, data.action)
        qf_loss = F.mse_loss(qf1_values, td_target) + F.mse_loss(qf2_values, td_target)
        encoder_optimizer.zero_grad(set_to_none=True)
        critic_optimizer.zero_grad(set_to_none=True)
        qf_loss.backward()
        nonfinite = ~torch.isfinite(qf_loss)  # also catches non-finite Q values
        dropped = skip | nonfinite
        step_unless(critic_optimizer, dropped)
        step_unless(encoder_optimizer, dropped)
        return qf1_values.detach().mean(), qf2_values.detach().mean(), qf_loss.detach(), nonfinite

    def update_actor(features, state, std, skip):
        # actor: maximise min(Q1, Q2) of the just-updated critic
        policy_action = sample_action(actor(features, state), std, args.std_clip)
        actor_loss = -torch.min(*critic(features, state, policy_action)).mean()
        actor_optimizer.zero_grad(set_to_none=True)
        actor_loss.backward()
        nonfinite = ~torch.isfinite(actor_loss)
        dropped = skip | nonfinite
        step_unless(actor_optimizer, dropped)
        with torch.no_grad():  # a dropped update leaves the target critic as it was, too
            tau = args.tau * (~dropped).float()
            for param, target_param in zip(critic.parameters(), critic_target.parameters(), strict=True):
                target_param.lerp_(param, tau)
        return actor_loss.detach(), nonfinite

    def update(step):
        data = rb.sample(args.batch_size, device)
        features, next_features, std, lam = encode(data, step)
        detached = features.detach()  # V and the actor train on the features, not the encoder
        metrics, value_nonfinite = {}, torch.zeros((), dtype=torch.bool, device=device)
        if args.exploit:
            metrics["losses/value_loss"], value_nonfinite = update_value(detached, data.state, data.action)
        qf1_mean, qf2_mean, qf_loss, qf_nonfinite = update_critic(features, next_features, data, std, lam, value_nonfinite)
        actor_loss, actor_nonfinite = update_actor(detached, data.state, std, value_nonfinite | qf_nonfinite)
        metrics.update({
            "losses/qf1_values": qf1_mean,
            "losses/qf2_values": qf2_mean,
            "losses/qf_loss": qf_loss,
            "losses/actor_loss": actor_loss,
            "charts/dormant_ratio": beta,
            "charts/exploration_std": std,
            "charts/lambda": lam,
        })  # fmt: skip
        nonfinite = torch.stack([value_nonfinite, qf_nonfinite, actor_nonfinite])
        return metrics, nonfinite, detached, data.state, data.action

    # the fast paths (README, "Speed") swap these functions for compiled and/or captured versions
    if args.compile:
        same_random_draws = {"fallback_random": True}  # as eager: --compile changes the speed, not the run
        act, encode, update_value, update_critic, update_actor = (
            torch.compile(fn, options=same_random_draws) for fn in (act, encode, update_value, update_critic, update_actor)
        )
    if args.cudagraphs:
        act, update = CudaGraphed(act), CudaGraphed(update)
    update_timer = UpdateTimer(device)
    eval_every_steps = max(args.eval_every_frames // args.action_repeat, 1)
    start_step, num_updates, skipped_updates = 0, 0, 0
    episode_return, episode_count = 0.0, 0
    episode_actions = []  # behind charts/action_magnitude and charts/action_change
    recent_successes = deque(maxlen=10)  # training episodes behind charts/success_rate
    start_time = time.time()

    def write_checkpoint(next_step):
        """Everything the run needs to go on from agent step `next_step` at the start of a new episode."""
        save_checkpoint({
            "args": vars(args),
            "run_name": run_name,
            "next_step": next_step,
            "counters": dict(episode_count=episode_count, num_updates=num_updates, skipped_updates=skipped_updates,
                             recent_successes=list(recent_successes),
                             awaken_logged=awaken_logged, elapsed=time.time() - start_time, beta=beta, awaken_step=awaken_step),
            "networks": {name: network.state_dict() for name, network in networks.items()},
            "optimizers": {name: optimizer.state_dict() for name, optimizer in optimizers.items()},
            "rng": rng_states(device),
            "envs": {"train": env.rng_state(), "eval": eval_env.rng_state()},
            "replay": rb.state_dict() if args.checkpoint_replay else None,
        }, checkpoint_path)  # fmt: skip
        print(f"checkpoint: {checkpoint_path} at global_step={next_step * args.action_repeat}", flush=True)

    # SIGINT and SIGTERM (pre-emption) stop the run at the end of the current episode, with a checkpoint
    stop_signal = []

    def request_stop(signum, _frame):
        if stop_signal:  # a second signal stops at once; the last complete checkpoint stays
            sys.exit(128 + signum)
        stop_signal.append(signum)
        print(f"{signal.Signals(signum).name}: stopping with a checkpoint at the end of this episode", flush=True)

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    first_update_step = num_seed_steps
    if checkpoint is not None:
        for name, network in networks.items():
            network.load_state_dict(checkpoint["networks"][name])
        for name, optimizer in optimizers.items():
            optimizer.load_state_dict(checkpoint["optimizers"][name])
        counters = checkpoint["counters"]
        episode_count, num_updates = counters["episode_count"], counters["num_updates"]
        skipped_updates, awaken_logged = counters["skipped_updates"], counters["awaken_logged"]
        start_time = time.time() - counters["elapsed"]
        recent_successes.extend(counters["recent_successes"])
        beta.copy_(counters["beta"]), awaken_step.copy_(counters["awaken_step"])
        start_step = checkpoint["next_step"]
        set_rng_states(checkpoint["rng"], device)
        env.set_rng_state(checkpoint["envs"]["train"])
        eval_env.set_rng_state(checkpoint["envs"]["eval"])
        if checkpoint["replay"] is not None:
            rb.load_state_dict(checkpoint["replay"])
        else:  # the buffer starts empty: updates wait for its first complete n-step window
            first_update_step = max(num_seed_steps, start_step + args.nstep)
        print(f"resumed {run_dir} at global_step={start_step * args.action_repeat}"
              f" ({'with' if checkpoint['replay'] is not None else 'WITHOUT'} the replay buffer)", flush=True)  # fmt: skip
        del checkpoint  # its replay copy would double the buffer's memory
    next_checkpoint_frame = checkpoint_frame_after(start_step * args.action_repeat, args.checkpoint_every_frames)

    # TRY NOT TO MODIFY: start the game
    obs, state = env.reset()
    # frames and hand state go to the device once per step
    obs_device, state_device = torch.as_tensor(obs, device=device), torch.as_tensor(state, device=device)
    rb.add(obs_device[-3:], state_device, np.zeros(action_dim, np.float32), 0.0, 1.0, first=True)
    for step in range(start_step, total_steps):
        global_step = step * args.action_repeat

        if step % eval_every_steps == 0 and args.num_eval_episodes > 0:
            video_path = f"videos/{run_name}/{global_step}.mp4" if args.capture_video else None
            eval_return, eval_success = evaluate(eval_env, encoder, actor, args.num_eval_episodes, device, video_path)
            print(
                f"global_step={global_step}, eval/episodic_return={eval_return:.2f}, eval/success_rate={eval_success:.2f}",
                flush=True,
            )  # fmt: skip
            writer.add_scalar("eval/episodic_return", eval_return, global_step)
            writer.add_scalar("eval/success_rate", eval_success, global_step)

        # ALGO LOGIC: put action logic here
        step_tensor.fill_(step)
        if step < num_seed_steps:
            action = np.random.uniform(-1.0, 1.0, action_dim).astype(np.float32)
        else:
            action = act(obs_device, state_device, step_tensor).cpu().numpy()

        # ALGO LOGIC: training, queued on the device before the env step so the two run side by side
        updating = step >= first_update_step and step % args.update_every_steps == 0
        if updating:
            if args.perturb and step % args.perturb_interval_steps == 0:
                factor = perturb_factor(beta, args.min_perturb_factor, args.max_perturb_factor, args.perturb_rate)
                for network, optimizer in perturbed:
                    perturb(network, optimizer, factor)
                writer.add_scalar("charts/perturb_factor", factor.item(), global_step)
            update_timer.start()
            metrics, nonfinite, features, replay_state, replay_action = update(step_tensor)
            update_timer.stop()

        # TRY NOT TO MODIFY: execute the game and log data
        obs, state, reward, discount, last = env.step(action)
        obs_device, state_device = torch.as_tensor(obs, device=device), torch.as_tensor(state, device=device)
        rb.add(obs_device[-3:], state_device, action, reward, discount, first=False)

        # the update has had the env step's time to finish: reading its results now costs no wait
        if updating and nonfinite.any():
            failed = ["value_loss", "qf_loss", "actor_loss"][int(nonfinite.int().argmax())]
            if not args.skip_nonfinite_updates:
                write_checkpoint(step + 1)
                sys.exit(f"drm_adroit.py: {failed} is not finite at global_step={global_step}; the update was dropped "
                         f"and {checkpoint_path} holds the last finite state")  # fmt: skip
            skipped_updates += 1
            writer.add_scalar("charts/skipped_updates", skipped_updates, global_step)
        elif updating:
            num_updates += 1
            if num_updates % args.log_every_updates == 0:
                # diagnostics beside the actor's ratio, only at log time, so they cost nothing measurable
                logged = dict(metrics)
                logged["charts/dormant_ratio_critic"] = dormant_ratio(
                    critic, features, replay_state, replay_action, threshold=args.dormant_threshold
                )
                if args.exploit:
                    logged["charts/dormant_ratio_value"] = dormant_ratio(value, features, replay_state, threshold=args.dormant_threshold)
                logged["perf/update_ms"] = update_timer.milliseconds()
                for tag, scalar in logged.items():
                    writer.add_scalar(tag, float(scalar), global_step)
                if not awaken_logged and awaken_step.item() >= 0:
                    writer.add_scalar("charts/awaken_step", awaken_step.item(), global_step)
                    awaken_logged = True
        episode_return += reward
        episode_actions.append(action)
        if last:
            episode_count += 1
            recent_successes.append(env.success)
            frames_done = (step + 1) * args.action_repeat
            sps = int(frames_done / (time.time() - start_time))
            print(
                f"global_step={frames_done}, episode={episode_count}, episodic_return={episode_return:.2f}, "
                f"success={env.success}, SPS={sps}", flush=True,
            )  # fmt: skip
            writer.add_scalar("charts/episodic_return", episode_return, frames_done)
            # motor activity, to set beside the dormant ratio: mean |a| and mean |a_t - a_(t-1)|
            actions = np.stack(episode_actions)
            writer.add_scalar("charts/action_magnitude", np.abs(actions).mean(), frames_done)
            writer.add_scalar("charts/action_change", np.abs(np.diff(actions, axis=0)).mean(), frames_done)
            episode_actions.clear()
            writer.add_scalar("charts/episodic_length", env.episode_frames, frames_done)  # fewer if the pen dropped
            writer.add_scalar("charts/success_rate", np.mean(recent_successes), frames_done)
            writer.add_scalar("charts/SPS", sps, frames_done)
            # checkpoints sit between episodes: a resumed run starts the next episode as this run would
            if stop_signal or (next_checkpoint_frame is not None and frames_done >= next_checkpoint_frame):
                write_checkpoint(step + 1)
                next_checkpoint_frame = checkpoint_frame_after(frames_done, args.checkpoint_every_frames)
                if stop_signal:
                    writer.close()
                    print(f"stopped; continue with: python drm_adroit.py --resume {run_dir}", flush=True)
                    sys.exit(128 + stop_signal[0])
            (obs, state), episode_return = env.reset(), 0.0
            obs_device, state_device = torch.as_tensor(obs, device=device), torch.as_tensor(state, device=device)
            rb.add(obs_device[-3:], state_device, np.zeros(action_dim, np.float32), 0.0, 1.0, first=True)

    if args.save_model:
        model_path = f"{run_dir}/{args.exp_name}.cleanrl_model"
        networks = dict(encoder=encoder, actor=actor, critic=critic, critic_target=critic_target, value=value)
        torch.save({name: network.state_dict() for name, network in networks.items()} | {"args": vars(args)}, model_path)
        print(f"model saved to {model_path}")

    env.close()
    eval_env.close()
    writer.close()
