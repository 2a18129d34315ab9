"""Unit tests of drm.py's pure pieces against hand-computed values. The pieces every script inlines
identically are checked in each script through the `script` fixture."""
import importlib
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import drm


@pytest.fixture(params=["drm", "drm_adroit", "drm_metaworld"])
def script(request):
    return importlib.import_module(request.param)


def set_linear(linear, weight, bias):
    with torch.no_grad():
        linear.weight.copy_(torch.as_tensor(weight, dtype=torch.float32))
        linear.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))


# ----------------------------------------------------------------------------------- dormant ratio
def test_dormant_ratio_counts_known_dormant_neurons(script):
    # per-neuron mean |output| over the batch: 1, 1, 0.01, 0 -> layer mean 0.5025, cut 0.01256
    # -> neurons 3 and 4 are dormant; the second layer's single neuron is never below its own mean
    layer1, layer2 = nn.Linear(2, 4), nn.Linear(4, 1)
    set_linear(layer1, [[1, 0], [0, 1], [0.01, 0], [0, 0]], [0, 0, 0, 0])
    set_linear(layer2, [[1, 1, 1, 1]], [0])
    model = script.record_linear_outputs(nn.Sequential(layer1, layer2))
    x = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    ratio = script.dormant_ratio(model, x)
    assert torch.is_tensor(ratio) and ratio.dim() == 0
    assert ratio.item() == pytest.approx(2 / 5)
    # a threshold under 0.01 / 0.5025 = 0.0199 spares neuron 3
    assert script.dormant_ratio(model, x, threshold=0.019).item() == pytest.approx(1 / 5)


@pytest.mark.parametrize("inplace, expected", [(True, 1 / 3), (False, 0.0)])
def test_dormant_ratio_sees_through_in_place_relu(script, inplace, expected):
    # unit 2 has pre-activations -9 and -8: active by |pre-activation|, dead after the ReLU.
    # The official actor's in-place ReLUs make the hook see the post-ReLU value.
    layer1, layer2 = nn.Linear(1, 2), nn.Linear(2, 1)
    set_linear(layer1, [[1], [1]], [0, -10])
    set_linear(layer2, [[1, 1]], [0])
    model = script.record_linear_outputs(nn.Sequential(layer1, nn.ReLU(inplace=inplace), layer2))
    assert script.dormant_ratio(model, torch.tensor([[1.0], [2.0]])).item() == pytest.approx(expected)


def test_dormant_ratio_of_actor_hooks_every_linear_once_and_records_only_while_measuring():
    actor = drm.Actor(repr_dim=16, action_dim=3, feature_dim=5, hidden_dim=8)
    with pytest.raises(ValueError, match="record_linear_outputs"):
        drm.dormant_ratio(actor, torch.randn(4, 16))
    drm.record_linear_outputs(drm.record_linear_outputs(actor))  # a second call adds nothing
    with torch.no_grad():  # make one hidden unit of the first policy layer dead after its ReLU
        actor.policy[0].weight[0].zero_()
        actor.policy[0].bias[0] = -1.0
    ratio = drm.dormant_ratio(actor, torch.randn(64, 16))
    total = 5 + 8 + 8 + 3
    assert round(ratio.item() * total) >= 1
    linears = [m for m in actor.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 4 and all(len(m._forward_hooks) == 1 and m.recorded is None for m in linears)


def test_dormant_ratio_compiles_as_one_graph(script):
    model = script.record_linear_outputs(nn.Sequential(nn.Linear(6, 8), nn.ReLU(inplace=True), nn.Linear(8, 2)))
    x = torch.randn(16, 6)
    compiled = torch.compile(lambda inputs: script.dormant_ratio(model, inputs), fullgraph=True, backend="eager")
    assert compiled(x).item() == pytest.approx(script.dormant_ratio(model, x).item())


# ------------------------------------------------------------------------------------- perturbation
def test_perturb_blends_linear_layers_with_a_fresh_orthogonal_draw(script):
    model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
    old_weight, old_bias = torch.randn(3, 3), torch.randn(3)
    set_linear(model[0], old_weight, old_bias)
    with torch.no_grad():
        model[1].weight.fill_(2.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    assert optimizer.state
    stepped_weight, stepped_bias = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    layer_norm = {k: v.clone() for k, v in model[1].state_dict().items()}

    torch.manual_seed(7)
    script.perturb(model, optimizer, 0.25)
    torch.manual_seed(7)
    fresh = nn.init.orthogonal_(torch.empty(3, 3))
    torch.testing.assert_close(model[0].weight.detach(), 0.25 * stepped_weight + 0.75 * fresh)
    torch.testing.assert_close(model[0].bias.detach(), 0.25 * stepped_bias)
    for key, tensor in model[1].state_dict().items():
        torch.testing.assert_close(tensor, layer_norm[key])
    # Adam moments and step counts reset in place: the next step is a fresh optimizer's first step
    assert all(torch.count_nonzero(t) == 0 for state in optimizer.state.values() for t in state.values())
    fresh_model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
    fresh_model.load_state_dict(model.state_dict())
    fresh_optimizer = torch.optim.Adam(fresh_model.parameters(), lr=1e-3)
    x = torch.randn(4, 3)
    for net, opt in [(model, optimizer), (fresh_model, fresh_optimizer)]:
        opt.zero_grad()
        net(x).sum().backward()
        opt.step()
    for ours, fresh in zip(model.parameters(), fresh_model.parameters()):
        torch.testing.assert_close(ours, fresh)


@pytest.mark.parametrize("nonfinite", [False, True])
def test_step_unless_drops_the_whole_adam_step_on_the_device(script, nonfinite):
    layer = nn.Linear(2, 1)
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.1, fused=True)
    before = [p.detach().clone() for p in layer.parameters()]
    layer(torch.ones(1, 2)).sum().backward()
    script.step_unless(optimizer, torch.tensor(nonfinite))
    moved = [not torch.equal(p, b) for p, b in zip(layer.parameters(), before)]
    steps = [state["step"].item() for state in optimizer.state.values()]
    assert moved == [not nonfinite] * 2 and steps == [0.0 if nonfinite else 1.0] * 2


def test_perturb_leaves_the_conv_encoder_and_factor_one_untouched():
    encoder = drm.Encoder((9, 84, 84))
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    optimizer = torch.optim.Adam(encoder.parameters())
    drm.perturb(encoder, optimizer, torch.tensor(0.2))
    for key, tensor in encoder.state_dict().items():
        assert torch.equal(tensor, before[key])
    actor = drm.Actor(16, 2, 4, 8)
    before = {k: v.clone() for k, v in actor.state_dict().items()}
    drm.perturb(actor, torch.optim.Adam(actor.parameters()), 1.0)
    for key, tensor in actor.state_dict().items():
        assert torch.equal(tensor, before[key])


# --------------------------------------------------------------------------------------- schedules
@pytest.mark.parametrize(
    "ratio, expected",
    [(0.0, 1 / (1 + math.exp(2))), (0.2, 0.5), (0.4, 1 / (1 + math.exp(-2))), (1.0, 1 / (1 + math.exp(-8)))],
)
def test_dormant_std(script, ratio, expected):
    assert script.dormant_std(ratio) == pytest.approx(expected)
    assert script.dormant_std(torch.tensor(ratio)).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(
    "ratio, expected", [(0.0, 0.6 / (1 + math.exp(-10))), (0.2, 0.3), (0.3, 0.6 / (1 + math.exp(5)))]
)
def test_exploitation_lambda(script, ratio, expected):
    assert script.exploitation_lambda(ratio) == pytest.approx(expected)
    assert script.exploitation_lambda(torch.tensor(ratio)).item() == pytest.approx(expected, rel=1e-5)
    assert script.exploitation_lambda(0.2, target_lambda=0.5) == pytest.approx(0.25)


@pytest.mark.parametrize(
    "ratio, max_factor, expected", [(0.0, 1.0, 1.0), (0.1, 1.0, 0.8), (0.5, 1.0, 0.2), (0.0, 0.6, 0.6), (0.15, 0.6, 0.6)]
)
def test_perturb_factor(script, ratio, max_factor, expected):
    assert script.perturb_factor(ratio, max_factor=max_factor) == pytest.approx(expected)
    assert script.perturb_factor(torch.tensor(ratio), max_factor=max_factor).item() == pytest.approx(expected)


def test_linear_schedule(script):
    assert script.linear_schedule(1.0, 0.1, 100, 50) == pytest.approx(0.55)
    assert script.linear_schedule(1.0, 0.1, 100, 500) == pytest.approx(0.1)
    assert script.linear_schedule(1.0, 0.1, 100, -5) == pytest.approx(1.0)
    assert script.linear_schedule(1.0, 0.1, 100, torch.tensor(25)).item() == pytest.approx(0.775)


def test_expectile_loss_weights(script):
    # V - Q = +1 (over-estimate) weighs 1 - 0.9, V - Q = -2 weighs 0.9: (0.1 * 1 + 0.9 * 4) / 2
    diff = torch.tensor([[1.0], [-2.0]])
    assert script.expectile_loss(diff, 0.9).item() == pytest.approx(1.85)
    assert script.expectile_loss(diff, 0.5).item() == pytest.approx(0.5 * 5 / 2)


# ------------------------------------------------------------------------------ augmentation, policy
def drqv2_shift(images, shifts, pad=4):
    """DrQ-v2's bilinear grid-sample formulation, re-derived here to check the crop against it."""
    n, _, h, _ = images.shape
    padded = F.pad(images, (pad,) * 4, mode="replicate")
    eps = 1.0 / (h + 2 * pad)
    arange = torch.linspace(-1.0 + eps, 1.0 - eps, h + 2 * pad)[:h]
    arange = arange.unsqueeze(0).repeat(h, 1).unsqueeze(2)
    base = torch.cat([arange, arange.transpose(1, 0)], dim=2).unsqueeze(0).repeat(n, 1, 1, 1)
    grid = base + shifts.view(n, 1, 1, 2).float() * 2.0 / (h + 2 * pad)
    return F.grid_sample(padded, grid, padding_mode="zeros", align_corners=False)


def test_random_shift_moves_a_known_pixel(script):
    image = torch.zeros(3, 2, 84, 84)
    image[:, :, 10, 20] = 255.0
    shifts = torch.tensor([[4, 4], [0, 0], [8, 0]])  # (x, y); 4 is the identity
    out = script.random_shift(image, shifts=shifts)
    assert torch.equal(out[0], image[0])
    assert out[1, :, 14, 24].eq(255).all() and out[1].sum() == 2 * 255  # moved down-right by 4
    assert out[2, :, 14, 16].eq(255).all() and out[2].sum() == 2 * 255  # down 4, left 4


def test_random_shift_equals_drqv2_grid_sample(script):
    images = torch.randint(0, 256, (6, 9, 84, 84)).float()
    shifts = torch.randint(0, 9, (6, 2))
    torch.testing.assert_close(script.random_shift(images, shifts=shifts), drqv2_shift(images, shifts), atol=1e-2, rtol=0)
    assert script.random_shift(images).shape == images.shape


def test_sample_action_noise_clip_bounds_and_straight_through_gradient(script):
    mean = torch.tensor([[0.0, 0.9999999, -0.5]], requires_grad=True)
    assert torch.equal(script.sample_action(mean, 0.0), mean.detach().clamp(-1 + 1e-6, 1 - 1e-6))
    torch.manual_seed(0)
    samples = script.sample_action(mean.detach().expand(10000, 3), 5.0, clip=0.3)
    assert ((samples - mean.detach()).abs() <= 0.3 + 1e-6).all() and samples.abs().max() < 1
    script.sample_action(mean, 1.0).sum().backward()
    assert torch.equal(mean.grad, torch.ones_like(mean))


# ---------------------------------------------------------------------------------------- replay
def fill(buffer, episodes, terminal=False):
    """Each episode is a list of frame ids; the reset shows the first, step t brings reward = frame id."""
    for frames in episodes:
        buffer.add(np.full((1, 1, 1), frames[0], np.uint8), np.zeros(1), 0.0, 1.0, first=True)
        for i, frame in enumerate(frames[1:], start=1):
            end = terminal and i == len(frames) - 1
            buffer.add(np.full((1, 1, 1), frame, np.uint8), np.array([frame]), float(frame), 0.0 if end else 1.0, first=False)


def make_buffer(capacity, nstep=2, gamma=0.5):
    return drm.ReplayBuffer(capacity, (1, 1, 1), 1, frame_stack=3, nstep=nstep, gamma=gamma, device="cpu")


def stack_ids(obs):
    return obs.flatten(1).tolist()


def test_replay_nstep_and_frame_stack_at_episode_start():
    buffer = make_buffer(32)
    fill(buffer, [[0, 1, 2, 3, 4], [10, 11, 12, 13, 14, 15]])
    # episode 1 is slots 0..4: starts 0..2 have a full 2-step window; 3 and 4 would cross its end
    assert buffer.valid.nonzero().flatten().tolist() == [0, 1, 2, 5, 6, 7, 8]
    batch = buffer.gather(torch.tensor([0, 1, 5]))
    assert stack_ids(batch.obs) == [[0, 0, 0], [0, 0, 1], [10, 10, 10]]  # first frame repeated
    assert stack_ids(batch.next_obs) == [[0, 1, 2], [1, 2, 3], [10, 11, 12]]
    assert batch.action.flatten().tolist() == [1, 2, 11]
    assert batch.reward.flatten().tolist() == [1 + 0.5 * 2, 2 + 0.5 * 3, 11 + 0.5 * 12]
    assert batch.discount.flatten().tolist() == [0.25, 0.25, 0.25]


def test_replay_terminal_discount_zero_and_time_limit_bootstrap():
    buffer = make_buffer(32)
    fill(buffer, [[0, 1, 2, 3, 4]], terminal=True)
    batch = buffer.gather(torch.tensor([2]))  # window ends on the terminal step 4
    assert batch.reward.item() == 3 + 0.5 * 4 and batch.discount.item() == 0.0
    buffer = make_buffer(32)
    fill(buffer, [[0, 1, 2, 3, 4]], terminal=False)  # a time-limit end keeps discount 1
    assert buffer.gather(torch.tensor([2])).discount.item() == 0.25


def test_replay_wraps_around_the_ring():
    buffer = make_buffer(7)
    fill(buffer, [list(range(11))])  # frames 0..10 in slots t % 7: frames 4..10 survive
    # start t needs frames t-2..t+2: only t = 6, 7, 8 (slots 6, 0, 1) are intact
    assert sorted(buffer.valid.nonzero().flatten().tolist()) == [0, 1, 6]
    batch = buffer.gather(torch.tensor([0]))  # t = 7, its window t = 8, 9 sits in slots 1, 2
    assert stack_ids(batch.obs) == [[5, 6, 7]] and stack_ids(batch.next_obs) == [[7, 8, 9]]
    assert batch.reward.item() == 8 + 0.5 * 9
    torch.manual_seed(0)
    newest = buffer.sample(500, "cpu").obs[:, -1].flatten()
    assert set(newest.tolist()) == {6, 7, 8}


def test_replay_footprint():
    nbytes = drm.ReplayBuffer.nbytes(1_000_000, (3, 84, 84), 6)
    assert 21.1e9 < nbytes < 21.3e9


# --------------------------------------------------------------------------------- arguments, presets
VALID = ["walker-walk", "walker-run", "dog-run", "quadruped-walk", "cartpole-balance", "manipulator-bring_ball"]


def test_presets_fill_only_what_the_command_line_left_unset():
    dog = drm.resolve_args(drm.Args(env_id="dog-run"), VALID)
    assert (dog.total_frames, dog.std_schedule_steps, dog.learning_rate) == (30_100_000, 2_000_000, 8e-5)
    assert (dog.feature_dim, dog.max_perturb_factor, dog.batch_size, dog.buffer_size) == (100, 0.6, 256, 1_000_000)
    assert drm.resolve_args(drm.Args(env_id="walker-run"), VALID).batch_size == 512
    assert drm.resolve_args(drm.Args(env_id="quadruped-walk"), VALID).buffer_size == 100_000
    manipulator = drm.resolve_args(drm.Args(), VALID)
    assert (manipulator.learning_rate, manipulator.feature_dim, manipulator.max_perturb_factor) == (8e-5, 50, 0.9)
    walker = drm.resolve_args(drm.Args(env_id="walker-walk"), VALID)  # no row: medium
    assert (walker.total_frames, walker.std_schedule_steps, walker.max_perturb_factor) == (3_100_000, 500_000, 1.0)
    assert drm.resolve_args(drm.Args(env_id="dog-run", learning_rate=3e-4), VALID).learning_rate == 3e-4


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(env_id="walker-wlak"), "did you mean walker-walk"),
        (dict(env_id="nonsense"), "valid ids: cartpole-balance, dog-run"),
        (dict(total_frames=0), "--total-frames must be positive"),
        (dict(total_frames=-10), "--total-frames must be positive"),
        (dict(batch_size=512, buffer_size=100), "--batch-size 512 is larger than --buffer-size 100"),
        (dict(nstep=500), "is not shorter than an episode (500 agent steps)"),
        (dict(num_seed_frames=4), "leaves no complete n-step window"),
        (dict(expectile=1.0), "--expectile must be in (0, 1)"),
        (dict(min_perturb_factor=0.7, max_perturb_factor=0.6), "perturb factors need"),
    ],
)
def test_bad_arguments_stop_with_a_reason(overrides, message):
    with pytest.raises(SystemExit) as stop:
        drm.resolve_args(drm.Args(**{"env_id": "walker-walk", **overrides}), VALID)
    assert message in str(stop.value)


# ------------------------------------------------------------------------------------------ env
def test_dmc_env_pixels_stack_actions_and_episode_length():
    env = drm.make_env("cartpole-balance", seed=1)
    obs = env.reset()
    assert obs.shape == (9, 84, 84) and obs.dtype == np.uint8 and obs.max() > 0
    assert np.array_equal(obs[:3], obs[3:6]) and np.array_equal(obs[3:6], obs[6:])  # first frame repeated
    steps, last = 0, False
    while not last:
        obs, reward, discount, last = env.step(np.ones(env.action_dim, np.float32))
        steps += 1
        if steps == 3:
            assert not np.array_equal(obs[:3], obs[6:])  # the pole has moved
    assert steps == 500 and discount == 1.0  # 1000 frames, time-limit end bootstraps
    assert env.render(256).shape == (256, 256, 3)
    twin = drm.make_env("cartpole-balance", seed=1)
    assert np.array_equal(twin.reset(), drm.make_env("cartpole-balance", seed=1).reset())
    assert drm.make_env("quadruped-walk", seed=1).camera_id == 2


def test_replay_that_fits_nowhere_stops_before_training(script, monkeypatch):
    monkeypatch.setattr(script, "available_host_memory", lambda: 8 * 1024**3)
    assert script.replay_device(2 * 1024**3, torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(SystemExit) as stop:
        script.replay_device(21_212_000_000, torch.device("cpu"))
    assert "the replay buffer needs 21.2 GB" in str(stop.value) and "lower --buffer-size" in str(stop.value)
