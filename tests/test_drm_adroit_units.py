"""Unit tests of what drm_adroit.py changes from drm.py: the Adroit env (reward, success, cameras,
proprioception, episode ends), the state path of the networks and the replay's states. The pieces the
scripts share are checked in test_drm_units.py."""

import mujoco  # noqa: E402  (after drm_adroit, which picks the rendering backend)
import numpy as np
import pytest
import torch
import torch.nn as nn

import drm_adroit  # sets MUJOCO_GL before mujoco is imported below


@pytest.fixture
def make_env():
    envs = []

    def make(env_id, seed=0, **kwargs):
        envs.append(drm_adroit.make_env(env_id, seed, **kwargs))
        return envs[-1]

    yield make
    for env in envs:  # free the GL contexts while the library is still loaded
        env.close()


def name_id(model, kind, name):
    return mujoco.mj_name2id(model, kind, name)


# The dense rewards of the original mj_envs tasks (DAPG; the reward DrM trained on), written from their
# source: note the MINUS on the hand-to-object distance, which gymnasium-robotics -v1 turned into a plus.
def original_door_reward(model, data):
    palm = data.site_xpos[name_id(model, mujoco.mjtObj.mjOBJ_SITE, "S_grasp")]
    handle = data.site_xpos[name_id(model, mujoco.mjtObj.mjOBJ_SITE, "S_handle")]
    door = data.qpos[model.jnt_qposadr[name_id(model, mujoco.mjtObj.mjOBJ_JOINT, "door_hinge")]]
    reward = -0.1 * np.linalg.norm(palm - handle) - 0.1 * (door - 1.57) ** 2 - 1e-5 * np.sum(data.qvel**2)
    return reward + 2 * (door > 0.2) + 8 * (door > 1.0) + 10 * (door > 1.35)


def original_hammer_reward(model, data):
    site = lambda name: data.site_xpos[name_id(model, mujoco.mjtObj.mjOBJ_SITE, name)]  # noqa: E731
    hammer = data.xpos[name_id(model, mujoco.mjtObj.mjOBJ_BODY, "Object")]
    palm, tool, nail, goal = site("S_grasp"), site("tool"), site("S_target"), site("nail_goal")
    reward = -0.1 * np.linalg.norm(palm - hammer) - np.linalg.norm(tool - nail) - 10 * np.linalg.norm(nail - goal)
    reward -= 1e-2 * np.linalg.norm(data.qvel)
    reward += 2 * (hammer[2] > 0.04 and tool[2] > 0.04)
    return reward + 25 * (np.linalg.norm(nail - goal) < 0.02) + 75 * (np.linalg.norm(nail - goal) < 0.01)


def original_relocate_reward(model, data):
    ball = data.xpos[name_id(model, mujoco.mjtObj.mjOBJ_BODY, "Object")]
    palm = data.site_xpos[name_id(model, mujoco.mjtObj.mjOBJ_SITE, "S_grasp")]
    target = data.site_xpos[name_id(model, mujoco.mjtObj.mjOBJ_SITE, "target")]
    reward = -0.1 * np.linalg.norm(palm - ball)
    if ball[2] > 0.04:
        reward += 1.0 - 0.5 * np.linalg.norm(palm - target) - 0.5 * np.linalg.norm(ball - target)
    distance = np.linalg.norm(ball - target)
    return reward + 10 * (distance < 0.1) + 20 * (distance < 0.05)


@pytest.mark.parametrize(
    "env_id, original, scale",
    [("door", original_door_reward, 1 / 20), ("hammer", original_hammer_reward, 1 / 100), ("relocate", original_relocate_reward, 1 / 30)],
)
def test_reward_is_the_original_formula_scaled(make_env, env_id, original, scale):
    env = make_env(env_id, action_repeat=1)
    env.reset()
    rng = np.random.default_rng(0)
    for _ in range(40):
        _, _, reward, _, _ = env.step(rng.uniform(-1, 1, env.action_dim))
        expected = original(env.env.model, env.env.data)
        assert reward == pytest.approx(scale * expected, rel=1e-9, abs=1e-12)
    # the -v1 env itself pays the opposite sign: the correction is not a no-op
    _, v1_reward, *_ = env.env.step(np.zeros(env.action_dim))
    assert v1_reward > original(env.env.model, env.env.data) + 0.01


def test_pen_reward_is_unchanged_and_scaled(make_env):
    env = make_env("pen", action_repeat=1)
    env.reset()
    saved = (env.env.data.qpos.copy(), env.env.data.qvel.copy())
    _, _, reward, _, _ = env.step(np.zeros(env.action_dim))
    env.env.set_state(*saved)
    _, v1_reward, *_ = env.env.step(np.zeros(env.action_dim))
    assert reward == pytest.approx(v1_reward / 50)


def test_success_counts_env_steps_over_the_episode(make_env):
    env = make_env("door")  # action repeat 2: every agent step adds two env steps
    env.reset()
    model, data = env.env.model, env.env.data
    data.qpos[model.jnt_qposadr[name_id(model, mujoco.mjtObj.mjOBJ_JOINT, "door_hinge")]] = 1.5  # door open
    mujoco.mj_forward(model, data)
    for agent_step in range(1, 14):
        env.step(np.zeros(env.action_dim))
        assert env.successful_frames == 2 * agent_step
        assert env.success == (2 * agent_step > 25)  # 26 successful env steps are needed
    env.reset()
    assert env.successful_frames == 0 and not env.success
    pen = make_env("pen")
    pen.reset()
    pen.successful_frames = 20
    assert not pen.success
    pen.successful_frames = 21
    assert pen.success


@pytest.mark.parametrize(
    "env_id, position",
    [("door", (0, 0, 1.5)), ("hammer", (0, 0, 1.1)), ("pen", (0, -0.8, 0.8)), ("relocate", (0, -0.7, 0.7))],
)
def test_camera_poses_are_drms(make_env, env_id, position):
    env = make_env(env_id)
    obs, _ = env.reset()
    assert obs.shape == (3, 84, 84) and obs.dtype == np.uint8
    assert obs.mean() > 20  # not the black frames of gymnasium's render() with two GL contexts
    np.testing.assert_allclose(env.env.model.cam_pos[env.camera_id], position)
    fixed = name_id(env.env.model, mujoco.mjtObj.mjOBJ_CAMERA, "fixed")
    if env_id == "relocate":
        assert env.camera_id == fixed
        return
    quaternion = env.env.model.cam_quat[env.camera_id]
    assert np.linalg.norm(quaternion) == pytest.approx(1.0)
    if env_id in ("door", "hammer"):  # looking straight down
        np.testing.assert_allclose(env.env.data.cam_xmat[env.camera_id].reshape(3, 3)[:, 2], [0, 0, 1], atol=1e-5)
    camera_id, env.camera_id = env.camera_id, fixed
    stock = env.render()
    env.camera_id = camera_id
    assert np.abs(stock.astype(int) - env.render().astype(int)).mean() > 5


def test_pen_and_goal_pen_are_opaque_as_in_drms_model(make_env):
    env = make_env("pen")
    model = env.env.model
    pen, goal = (name_id(model, mujoco.mjtObj.mjOBJ_GEOM, name) for name in ("pen", "target"))
    assert model.geom_rgba[pen].tolist() == pytest.approx([0.6, 0.6, 0.6, 1.0])
    assert model.geom_rgba[goal].tolist() == pytest.approx([0.6, 0.6, 0.6, 1.0])
    opaque, _ = env.reset()
    model.geom_rgba[[pen, goal], 3] = [0.6, 0.3]  # gymnasium-robotics' stock alphas
    see_through = env.render().transpose(2, 0, 1)
    changed = np.abs(opaque.astype(int) - see_through.astype(int)).max(axis=0) > 10
    assert 20 < changed.sum() < 0.3 * changed.size  # the pens' pixels, not the whole picture
    model.geom_rgba[[pen, goal], 3] = 1.0
    assert np.array_equal(env.render().transpose(2, 0, 1), opaque)  # the alpha alone made the difference


@pytest.mark.parametrize("env_id, hand_qpos", [("door", (4, 28)), ("hammer", (2, 26)), ("pen", (0, 24)), ("relocate", (6, 30))])
def test_state_is_the_24_hand_joint_positions(make_env, env_id, hand_qpos):
    env = make_env(env_id)
    _, state = env.reset()
    _, state, *_ = env.step(np.full(env.action_dim, 0.5))
    assert state.shape == (24,) and state.dtype == np.float32
    np.testing.assert_allclose(state, env.env.data.qpos[slice(*hand_qpos)].astype(np.float32))
    joint = lambda i: mujoco.mj_id2name(env.env.model, mujoco.mjtObj.mjOBJ_JOINT, i)  # noqa: E731
    assert joint(hand_qpos[0]).startswith(("ARTz", "WR")) and joint(hand_qpos[1] - 1) == "THJ0"  # wrist .. thumb tip


@pytest.mark.parametrize("env_id, episode_frames", [("door", 200), ("hammer", 200), ("pen", 100), ("relocate", 200)])
def test_episode_length_and_time_limit_bootstrap(make_env, env_id, episode_frames):
    env = make_env(env_id, action_repeat=10)
    env.reset()
    for step in range(1, episode_frames // 10 + 1):
        _, _, _, discount, last = env.step(np.zeros(env.action_dim))
        assert discount == 1.0 and last == (step == episode_frames // 10)
    assert env.episode_frames == episode_frames


def test_pen_drop_ends_the_episode_with_discount_zero(make_env):
    env = make_env("pen")
    env.reset()
    model, data = env.env.model, env.env.data
    pen = env.env.obj_body_id
    slides = [j for j in range(model.njnt) if model.jnt_bodyid[j] == pen and model.jnt_type[j] == mujoco.mjtJoint.mjJNT_SLIDE]
    vertical = max(slides, key=lambda j: abs(data.xaxis[j][2]))  # the pen's frame is rotated: find its world z slide
    data.qpos[model.jnt_qposadr[vertical]] -= 0.3 * np.sign(data.xaxis[vertical][2])
    mujoco.mj_forward(model, data)
    assert data.xpos[pen][2] < 0.075  # dropped (it starts at 0.25)
    _, _, reward, discount, last = env.step(np.zeros(env.action_dim))
    assert last and discount == 0.0
    assert env.episode_frames == 1  # ends at the first env step that sees the drop
    assert reward < -5 / 50 + 0.05  # the original -5 drop penalty, scaled


def test_same_seed_same_episodes(make_env):
    first, second = make_env("door", seed=3), make_env("door", seed=3)
    for _ in range(2):  # the second reset continues the seeded generator
        (obs_a, state_a), (obs_b, state_b) = first.reset(), second.reset()
        assert np.array_equal(obs_a, obs_b) and np.array_equal(state_a, state_b)
    assert not np.array_equal(make_env("door", seed=4).reset()[0], obs_a)


# ------------------------------------------------------------------------------ networks and replay
def test_state_path_is_counted_and_perturbed():
    actor = drm_adroit.Actor(repr_dim=16, state_dim=24, action_dim=3, feature_dim=5, hidden_dim=8)
    features, state = torch.randn(64, 16), torch.randn(64, 24)
    # the dormant ratio by hand: every Linear's output as the forward sees it (hidden ones after their ReLU)
    fusion = actor.state_fusion
    with torch.no_grad():
        trunk_out = actor.trunk[0](features)
        hidden_state = torch.relu(fusion.state_mlp[0](state))
        state_out = fusion.state_mlp[2](hidden_state)
        hidden_fusion = torch.relu(fusion.fusion[0](actor.trunk(features) + state_out))
        fused = fusion.fusion[2](hidden_fusion)
        hidden1 = torch.relu(actor.policy[0](fused))
        hidden2 = torch.relu(actor.policy[2](hidden1))
        outputs = [trunk_out, hidden_state, state_out, hidden_fusion, fused, hidden1, hidden2, actor.policy[4](hidden2)]
    dormant = sum(int((o.abs().mean(0) < 0.025 * o.abs().mean()).sum()) for o in outputs)
    assert sum(o.shape[1] for o in outputs) == 5 + 8 + 5 + 8 + 5 + 8 + 8 + 3
    assert drm_adroit.dormant_ratio(actor, features, state).item() == pytest.approx(dormant / 50)

    before = actor.state_fusion.state_mlp[0].weight.detach().clone()
    drm_adroit.perturb(actor, torch.optim.Adam(actor.parameters()), 0.5)
    assert not torch.allclose(actor.state_fusion.state_mlp[0].weight, before)
    linears = [m for m in actor.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 8


def test_networks_take_the_state():
    # seeded: with 8 hidden units, some random draws leave every ReLU of the state path off for the all-ones
    # state (about 1 in 256), and then V cannot see it; which draw a test gets must not depend on the tests before
    torch.manual_seed(0)
    critic = drm_adroit.Critic(repr_dim=16, state_dim=24, action_dim=3, feature_dim=5, hidden_dim=8)
    value = drm_adroit.ValueNetwork(repr_dim=16, state_dim=24, feature_dim=5, hidden_dim=8)
    features, action = torch.randn(4, 16), torch.zeros(4, 3)
    state_a, state_b = torch.zeros(4, 24), torch.ones(4, 24)
    q_a, _ = critic(features, state_a, action)
    q_b, _ = critic(features, state_b, action)
    assert q_a.shape == (4, 1) and not torch.allclose(q_a, q_b)
    assert not torch.allclose(value(features, state_a), value(features, state_b))


def test_replay_returns_the_state_of_each_frame():
    buffer = drm_adroit.ReplayBuffer(32, (1, 1, 1), 2, 1, frame_stack=1, nstep=2, gamma=0.5, device="cpu")
    for t in range(6):
        buffer.add(np.full((1, 1, 1), t, np.uint8), np.array([t, -t], np.float32), np.array([t]), float(t), 1.0, first=t == 0)
    batch = buffer.gather(torch.tensor([0, 2]))
    assert batch.state.tolist() == [[0, 0], [2, -2]]
    assert batch.next_state.tolist() == [[2, -2], [4, -4]]  # the state n = 2 steps later, with next_obs
    assert batch.obs.flatten().tolist() == [0, 2] and batch.next_obs.flatten().tolist() == [2, 4]
    assert drm_adroit.ReplayBuffer.nbytes(10, (3, 84, 84), 24, 28) == 10 * (3 * 84 * 84 + 4 * 24 + 4 * 28 + 20)


# ------------------------------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(env_id="dor"), "unknown env id 'dor'; did you mean door? valid ids: door, hammer, pen, relocate"),
        (dict(env_id="pen", nstep=50), "is not shorter than an episode (50 agent steps)"),
        (dict(env_id="door", nstep=100), "is not shorter than an episode (100 agent steps)"),
        (dict(batch_size=512, buffer_size=100), "--batch-size 512 is larger than --buffer-size 100"),
    ],
)
def test_bad_arguments_stop_with_a_reason(overrides, message):
    with pytest.raises(SystemExit) as stop:
        drm_adroit.resolve_args(drm_adroit.Args(**overrides), list(drm_adroit.ADROIT_TASKS))
    assert message in str(stop.value)


def test_defaults_are_drms_adroit_config():
    args = drm_adroit.resolve_args(drm_adroit.Args(), list(drm_adroit.ADROIT_TASKS))
    assert (args.env_id, args.total_frames, args.std_schedule_steps, args.frame_stack) == ("door", 6_100_000, 500_000, 1)
    assert (args.expectile, args.target_lambda, args.max_perturb_factor) == (0.7, 0.6, 0.9)
    assert (args.learning_rate, args.feature_dim, args.batch_size, args.action_repeat) == (1e-4, 50, 256, 2)
