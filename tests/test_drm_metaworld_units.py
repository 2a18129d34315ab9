"""Unit tests of what drm_metaworld.py changes from drm.py: the Meta-World env (goals and their seeding,
camera, success, episode length, the zero-filled first stack), the dropout critic and the replay's
stacks. The pieces the scripts share are checked in test_drm_units.py."""

import mujoco  # noqa: E402  (after drm_metaworld, which picks the rendering backend)
import numpy as np
import pytest
import torch
import torch.nn as nn

import drm_metaworld  # sets MUJOCO_GL before mujoco is imported below


@pytest.fixture
def make_env():
    envs = []

    def make(env_id, seed=0, **kwargs):
        envs.append(drm_metaworld.make_env(env_id, seed, **kwargs))
        return envs[-1]

    yield make
    for env in envs:  # free the GL contexts while the library is still loaded
        env.close()


def goal_and_object(env):
    return np.concatenate([env.env._target_pos, env.env._get_pos_objects()])


def test_every_reset_draws_a_new_goal_from_the_seeded_generator(make_env):
    first, twin, other = make_env("coffee-push", seed=3), make_env("coffee-push", seed=3), make_env("coffee-push", seed=4)
    draws = []
    for _ in range(3):
        first.reset(), twin.reset(), other.reset()
        draws.append(goal_and_object(first))
        np.testing.assert_array_equal(goal_and_object(twin), draws[-1])  # one seed, one goal sequence
        assert not np.allclose(goal_and_object(other), draws[-1])
    assert not np.allclose(draws[0], draws[1]) and not np.allclose(draws[1], draws[2])
    late = make_env("coffee-push", seed=3)
    np.random.seed(0)  # the global generator plays no part
    np.random.uniform(size=5)
    late.reset()
    np.testing.assert_array_equal(goal_and_object(late), draws[0])


def test_camera_is_drms_moved_corner2(make_env):
    env = make_env("coffee-push")
    obs = env.reset()
    assert obs.shape == (9, 84, 84) and obs.dtype == np.uint8
    assert not obs[:6].any()  # the first stack: zeros, then the reset frame
    assert obs[6:].mean() > 20  # not the black frames of gymnasium's render() with two GL contexts
    model = env.env.model
    np.testing.assert_allclose(model.cam_pos[mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, "corner4")], [0.75, 0.075, 0.7])
    renderer = env.renderers[84]
    renderer.update_scene(env.env.data, camera="corner2")  # the stock corner2 sees another picture
    assert np.abs(renderer.render().astype(int) - obs[6:].transpose(1, 2, 0)).mean() > 10


def test_episode_success_length_and_frame_stack(make_env):
    env = make_env("reach", seed=1, action_repeat=10)  # 50 agent steps per episode
    obs, last, step = env.reset(), False, 0
    successes = []
    while not last:
        # Meta-World's scripted reach policy: move the hand toward the goal
        action = np.append(np.clip(5.0 * (env.env._target_pos - env.env.tcp_center), -1, 1), 0.0)
        previous = obs
        obs, reward, discount, last = env.step(action)
        step += 1
        successes.append(env.success)
        assert discount == 1.0 and 0.0 <= reward <= 100.0  # ten env steps of 0..10
        assert np.array_equal(obs[:6], previous[3:])  # the stack shifts by one frame
    assert step == 50 and env.episode_frames == 500  # 500 env steps, the benchmark's limit
    first = successes.index(True)  # the hand reached the goal ...
    assert 0 < first < 20 and all(successes[first:])  # ... and the episode stays a success
    env.reset()
    assert not env.success


def test_success_is_any_env_step_including_repeated_ones(make_env, monkeypatch):
    env = make_env("coffee-push")
    env.reset()
    real_step, calls = env.env.step, []

    def step_succeeding_once(action):  # only the 3rd env step (the 2nd agent step's 1st) succeeds
        observation, reward, terminated, truncated, info = real_step(action)
        calls.append(1)
        # some Meta-World rewards come as numpy float32, which a torch tensor refuses to store
        return observation, np.float32(reward), terminated, truncated, dict(info, success=float(len(calls) == 3))

    monkeypatch.setattr(env.env, "step", step_succeeding_once)
    _, reward, _, _ = env.step(np.zeros(4))
    assert type(reward) is float
    assert not env.success
    env.step(np.zeros(4))
    assert env.success
    env.step(np.zeros(4))
    assert env.success


def test_critic_heads_have_dropout_and_layer_norm():
    critic = drm_metaworld.Critic(repr_dim=16, action_dim=4, feature_dim=5, hidden_dim=32, dropout=0.5)
    layers = [type(m) for m in critic.q1]
    assert layers == [nn.Linear, nn.Dropout, nn.LayerNorm, nn.ReLU, nn.Linear, nn.Dropout, nn.LayerNorm, nn.ReLU, nn.Linear]
    assert critic.q1[1].p == 0.5 and critic.q1[2].normalized_shape == (32,)
    features, action = torch.randn(8, 16), torch.randn(8, 4)
    torch.manual_seed(0)
    assert not torch.equal(critic(features, action)[0], critic(features, action)[0])  # dropout in train mode
    assert torch.equal(critic.eval()(features, action)[0], critic(features, action)[0])
    no_dropout = drm_metaworld.Critic(16, 4, 5, 32, dropout=0.0)
    assert torch.equal(no_dropout(features, action)[0], no_dropout(features, action)[0])


def test_perturb_leaves_the_critics_layer_norms_alone():
    critic = drm_metaworld.Critic(16, 4, 5, 32)
    norms = {k: v.clone() for k, v in critic.state_dict().items() if ".2." in k or ".6." in k}
    linear_before = critic.q1[0].weight.detach().clone()
    drm_metaworld.perturb(critic, torch.optim.Adam(critic.parameters()), 0.5)
    for key, tensor in norms.items():
        assert torch.equal(critic.state_dict()[key], tensor)
    assert not torch.allclose(critic.q1[0].weight, linear_before)


def test_replay_fills_the_first_stack_with_zeros():
    buffer = drm_metaworld.ReplayBuffer(32, (1, 1, 1), 1, frame_stack=3, nstep=2, gamma=0.5, device="cpu")
    for episode in ([1, 2, 3, 4, 5], [11, 12, 13, 14]):
        for i, frame in enumerate(episode):
            buffer.add(np.full((1, 1, 1), frame, np.uint8), np.array([frame]), float(frame), 1.0, first=i == 0)
    batch = buffer.gather(torch.tensor([0, 1, 2, 5]))
    assert batch.obs.flatten(1).tolist() == [[0, 0, 1], [0, 1, 2], [1, 2, 3], [0, 0, 11]]  # not frames 4, 5
    assert batch.next_obs.flatten(1).tolist() == [[1, 2, 3], [2, 3, 4], [3, 4, 5], [11, 12, 13]]


# ------------------------------------------------------------------------------------- arguments
TASKS = ["coffee-push", "assembly", "disassemble", "stick-pull", "sweep-into", "soccer", "pick-place-wall", "reach"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(env_id="coffee-pull"), "unknown env id 'coffee-pull'; did you mean coffee-push"),
        (dict(env_id="coffee-push-v3"), "did you mean coffee-push"),
        (dict(nstep=250), "is not shorter than an episode (250 agent steps)"),
        (dict(num_seed_frames=20), "leaves no complete n-step window"),
    ],
)
def test_bad_arguments_stop_with_a_reason(overrides, message):
    with pytest.raises(SystemExit) as stop:
        drm_metaworld.resolve_args(drm_metaworld.Args(**overrides), TASKS)
    assert message in str(stop.value)


def test_defaults_are_drms_metaworld_config():
    args = drm_metaworld.resolve_args(drm_metaworld.Args(), TASKS)
    assert (args.env_id, args.total_frames, args.std_schedule_steps, args.frame_stack) == ("coffee-push", 2_100_000, 500_000, 3)
    assert (args.nstep, args.gamma, args.expectile, args.max_perturb_factor) == (10, 0.97, 0.9, 0.95)
    assert (args.lambda_schedule, args.target_lambda, args.critic_dropout) == ("constant", 0.5, 0.01)
    assert (args.learning_rate, args.feature_dim, args.batch_size, args.action_repeat) == (1e-4, 50, 256, 2)
    assert len(drm_metaworld.import_metaworld()) == 50
