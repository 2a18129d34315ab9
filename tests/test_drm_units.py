"""Unit tests of drm.py's pure pieces and DrM decisions against hand-computed values. The pieces every
script shares are checked in each script through the `script` fixture."""

import copy
import dataclasses
import importlib
import math
import typing
from typing import NamedTuple

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

import drm


@pytest.fixture(params=["drm", "drm_adroit", "drm_metaworld"])
def script(request):
    return importlib.import_module(request.param)


def set_linear(linear, weight, bias):
    with torch.no_grad():
        linear.weight.copy_(torch.as_tensor(weight, dtype=torch.float32))
        linear.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))


# ----------------------------------------------------------------------------------- dormant ratio
def test_dormant_ratio_counts_known_dormant_neurons_of_any_module(script):
    # per-neuron mean |output| over the batch: 1, 1, 0.01, 0 -> layer mean 0.5025, cut 0.01256
    # -> neurons 3 and 4 are dormant; the second layer's single neuron is never below its own mean
    layer1, layer2 = nn.Linear(2, 4), nn.Linear(4, 1)
    set_linear(layer1, [[1, 0], [0, 1], [0.01, 0], [0, 0]], [0, 0, 0, 0])
    set_linear(layer2, [[1, 1, 1, 1]], [0])
    model = nn.Sequential(layer1, layer2)  # a plain module, no setup call
    x = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    ratio = script.dormant_ratio(model, x)
    assert torch.is_tensor(ratio) and ratio.dim() == 0
    assert ratio.item() == pytest.approx(2 / 5)
    # a threshold under 0.01 / 0.5025 = 0.0199 spares neuron 3
    assert script.dormant_ratio(model, x, threshold=0.019).item() == pytest.approx(1 / 5)
    assert all(not m._forward_hooks for m in model.modules())  # the model is left as it came


@pytest.mark.parametrize("inplace, expected", [(True, 1 / 3), (False, 0.0)])
def test_dormant_ratio_sees_through_in_place_relu(script, inplace, expected):
    # unit 2 has pre-activations -9 and -8: active by |pre-activation|, dead after the ReLU.
    # The official actor's in-place ReLUs make the hook see the post-ReLU value.
    layer1, layer2 = nn.Linear(1, 2), nn.Linear(2, 1)
    set_linear(layer1, [[1], [1]], [0, -10])
    set_linear(layer2, [[1, 1]], [0])
    model = nn.Sequential(layer1, nn.ReLU(inplace=inplace), layer2)
    assert script.dormant_ratio(model, torch.tensor([[1.0], [2.0]])).item() == pytest.approx(expected)


def test_dormant_ratio_of_the_actor_and_under_torch_compile():
    actor = drm.Actor(repr_dim=16, action_dim=3, feature_dim=5, hidden_dim=8)
    with torch.no_grad():  # make one hidden unit of the first policy layer dead after its ReLU
        actor.policy[0].weight[0].zero_()
        actor.policy[0].bias[0] = -1.0
    x = torch.randn(64, 16)
    ratio = drm.dormant_ratio(actor, x)
    assert round(ratio.item() * (5 + 8 + 8 + 3)) >= 1
    compiled = torch.compile(lambda inputs: drm.dormant_ratio(actor, inputs), backend="eager")
    assert compiled(x).item() == ratio.item() and compiled(x).item() == ratio.item()  # twice: no stale hooks


# ------------------------------------------------------------------------------------- perturbation
def test_perturb_blends_linear_layers_with_a_fresh_orthogonal_draw(script):
    model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
    old_weight, old_bias = torch.randn(3, 3), torch.randn(3)
    set_linear(model[0], old_weight, old_bias)
    with torch.no_grad():
        model[1].weight.fill_(2.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
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
    fresh_optimizer = torch.optim.Adam(fresh_model.parameters(), lr=1e-3, fused=True)
    x = torch.randn(4, 3)
    for net, opt in [(model, optimizer), (fresh_model, fresh_optimizer)]:
        opt.zero_grad()
        net(x).sum().backward()
        opt.step()
    for ours, fresh in zip(model.parameters(), fresh_model.parameters(), strict=True):
        torch.testing.assert_close(ours, fresh)


def tiny_agent(script, **overrides):
    """Small networks and their optimizers, each optimizer stepped once so that Adam has state."""
    args = script.Args(feature_dim=4, hidden_dim=8, std_schedule_steps=500_000, **overrides)
    networks = script.make_networks((3 * args.frame_stack, 84, 84), 2, args, "cpu")
    optimizers = script.make_optimizers(networks, 1e-3)
    for name, optimizer in optimizers.items():
        for parameter in getattr(networks, name).parameters():
            parameter.grad = torch.ones_like(parameter)
        optimizer.step()
    return args, networks, optimizers


def test_perturb_agent_blends_every_network_in_the_official_order(script):
    args, networks, optimizers = tiny_agent(script)
    before = copy.deepcopy(networks)
    torch.manual_seed(3)
    script.perturb_agent(networks, optimizers, torch.tensor(0.4))
    torch.manual_seed(3)  # the fresh draws, in the order actor, critic, target critic, (encoder: none), value
    for name in ["actor", "critic", "critic_target", "value"]:
        for old, new in zip(getattr(before, name).modules(), getattr(networks, name).modules(), strict=True):
            if isinstance(old, nn.Linear):
                fresh = nn.init.orthogonal_(torch.empty_like(old.weight))
                torch.testing.assert_close(new.weight, 0.4 * old.weight + 0.6 * fresh)
                torch.testing.assert_close(new.bias, 0.4 * old.bias)
    for old, new in zip(before.encoder.parameters(), networks.encoder.parameters(), strict=True):
        assert torch.equal(old, new)  # convolutions only: untouched
    assert not torch.equal(networks.critic.q1[0].weight, networks.critic_target.q1[0].weight)  # own draws
    for optimizer in optimizers.values():
        assert all(torch.count_nonzero(t) == 0 for state in optimizer.state.values() for t in state.values())


@pytest.mark.parametrize(
    "ratio, max_factor, expected", [(0.0, 1.0, 1.0), (0.1, 1.0, 0.8), (0.5, 1.0, 0.2), (0.0, 0.6, 0.6), (0.15, 0.6, 0.6)]
)
def test_perturb_factor(script, ratio, max_factor, expected):
    args = script.Args(max_perturb_factor=max_factor)
    assert script.perturb_factor(args, torch.tensor(ratio)).item() == pytest.approx(expected)


# ---------------------------------------------------------------- the DrM decisions: awaken, std, λ
def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_no_awakening_during_seeding_even_with_a_low_dormant_ratio():
    args = drm.Args(num_seed_frames=4000, action_repeat=2)  # 2000 seed steps: the first update is at step 2000
    low = torch.tensor(0.1)
    assert drm.awaken_step_after(args, torch.tensor(2000), low, torch.tensor(-1)).item() == -1
    assert drm.awaken_step_after(args, torch.tensor(2002), torch.tensor(0.25), torch.tensor(-1)).item() == -1
    assert drm.awaken_step_after(args, torch.tensor(2002), low, torch.tensor(-1)).item() == 2002
    assert drm.awaken_step_after(args, torch.tensor(9000), low, torch.tensor(2002)).item() == 2002  # once only


def test_metaworld_may_awaken_at_the_first_update():
    import drm_metaworld

    args = drm_metaworld.Args(num_seed_frames=4000, action_repeat=2)
    assert drm_metaworld.awaken_step_after(args, torch.tensor(2000), torch.tensor(0.1), torch.tensor(-1)).item() == 2000


def test_a_resume_without_its_replay_seeds_again_and_owes_a_perturbation_due_meanwhile(script, capsys):
    args = script.Args(num_seed_frames=4000, action_repeat=2, perturb_interval_steps=100_000, update_every_steps=2)
    # a checkpoint at 1M frames is agent step 500,000: a perturbation step, which comes at the first update
    assert script.seeding_after_resume(args, 500_000) == (502_000, True)
    assert "seeding the empty replay again: 4,000 frames of random actions before the first update" in capsys.readouterr().out
    assert script.seeding_after_resume(args, 500_250) == (502_250, False)
    assert script.seeding_after_resume(args, 499_000) == (501_000, True)
    assert script.seeding_after_resume(dataclasses.replace(args, perturb=False), 500_000) == (502_000, False)
    # an update step is needed: with updates every 3 steps, step 600,000 is one, 500,000 is not
    odd = dataclasses.replace(args, update_every_steps=3)
    assert script.seeding_after_resume(odd, 500_000) == (502_000, False)
    assert script.seeding_after_resume(odd, 599_000)[1]


def test_awake_std_is_the_sigmoid_until_awakening_then_at_least_the_restarted_linear_schedule(script):
    args = script.Args(std_schedule_steps=500_000)  # linear(1.0, 0.1, 500000), dormant temperature 10
    step = torch.tensor(251_000)
    # not awake: sigmoid(10 * (0.1 - 0.2)) = sigmoid(-1), whatever the linear schedule says
    std = script.exploration_std(args, step, torch.tensor(0.1), torch.tensor(-1))
    assert std.item() == pytest.approx(sigmoid(-1))
    # awake since step 1000: linear at 250000 steps since then = 1 - 0.9 * 0.5 = 0.55 > sigmoid(-1)
    std = script.exploration_std(args, step, torch.tensor(0.1), torch.tensor(1000))
    assert std.item() == pytest.approx(0.55)
    # a dormant actor again: sigmoid(10 * (0.5 - 0.2)) = sigmoid(3) = 0.953 > 0.55
    std = script.exploration_std(args, step, torch.tensor(0.5), torch.tensor(1000))
    assert std.item() == pytest.approx(sigmoid(3))


def test_dormant_exploration_never_awakens_and_linear_is_drqv2s(script):
    dormant = script.Args(exploration="dormant", std_schedule_steps=500_000)
    assert script.awaken_step_after(dormant, torch.tensor(10**6), torch.tensor(0.0), torch.tensor(-1)).item() == -1
    std = script.exploration_std(dormant, torch.tensor(251_000), torch.tensor(0.1), torch.tensor(1000))
    assert std.item() == pytest.approx(sigmoid(-1))  # the sigmoid alone, even given an awaken step
    linear = script.Args(exploration="linear", std_schedule_steps=500_000)
    assert script.awaken_step_after(linear, torch.tensor(10**6), torch.tensor(0.0), torch.tensor(-1)).item() == -1
    std = script.exploration_std(linear, torch.tensor(125_000), torch.tensor(0.9), torch.tensor(-1))
    assert std.item() == pytest.approx(1.0 - 0.9 * 0.25)


@pytest.mark.parametrize("ratio, expected", [(0.0, 0.6 / (1 + math.exp(-10))), (0.2, 0.3), (0.3, 0.6 / (1 + math.exp(5)))])
def test_exploitation_lambda(ratio, expected):
    for script in (drm, importlib.import_module("drm_adroit")):
        assert script.exploitation_lambda(script.Args(), torch.tensor(ratio)).item() == pytest.approx(expected, rel=1e-5)
        assert script.exploitation_lambda(script.Args(exploit=False), torch.tensor(ratio)).item() == 0.0


def test_metaworld_lambda_is_constant_unless_asked_for_the_dormant_schedule():
    import drm_metaworld

    assert drm_metaworld.exploitation_lambda(drm_metaworld.Args(), torch.tensor(0.9)).item() == 0.5
    dormant = drm_metaworld.Args(lambda_schedule="dormant")
    assert drm_metaworld.exploitation_lambda(dormant, torch.tensor(0.2)).item() == pytest.approx(0.25)


def test_td_target_blends_v_and_q_and_is_drqv2s_at_lambda_zero(script):
    reward, discount = torch.tensor([[1.0], [2.0]]), torch.tensor([[0.9], [0.0]])
    next_q, next_value = torch.tensor([[10.0], [10.0]]), torch.tensor([[20.0], [20.0]])
    assert torch.equal(script.td_target(reward, discount, next_q, next_value, torch.tensor(0.0)), reward + discount * next_q)
    blended = script.td_target(reward, discount, next_q, next_value, torch.tensor(0.25))
    assert blended.flatten().tolist() == pytest.approx([1 + 0.9 * (0.25 * 20 + 0.75 * 10), 2.0])


# ------------------------------------------------------------------------------------ one update
def toy_batch(script, batch_size=4, frame_stack=3):
    generator = torch.Generator().manual_seed(0)
    fields = {
        "obs": torch.randint(0, 256, (batch_size, 3 * frame_stack, 84, 84), dtype=torch.uint8, generator=generator),
        "action": torch.rand(batch_size, 2, generator=generator) * 2 - 1,
        "reward": torch.rand(batch_size, 1, generator=generator),
        "discount": torch.full((batch_size, 1), 0.99**3),
        "next_obs": torch.randint(0, 256, (batch_size, 3 * frame_stack, 84, 84), dtype=torch.uint8, generator=generator),
        "state": torch.rand(batch_size, 24, generator=generator),
        "next_state": torch.rand(batch_size, 24, generator=generator),
    }
    return script.Batch(**{name: fields[name] for name in script.Batch._fields})


@pytest.mark.parametrize("exploit", [True, False])
def test_one_update_on_given_networks_and_batch(script, exploit):
    # target_dormant_ratio 1: any batch's ratio is below it, so the update at step 300 (past the 200 seed steps) awakens
    args, networks, optimizers = tiny_agent(script, exploit=exploit, target_dormant_ratio=1.0, num_seed_frames=400)
    batch = toy_batch(script, frame_stack=args.frame_stack)
    before = copy.deepcopy(networks)
    beta, awaken_step, step = torch.tensor(1.0), torch.tensor(-1), torch.tensor(300)
    torch.manual_seed(0)
    metrics, features = script.update(networks, optimizers, batch, step, beta, awaken_step, args)

    # β is the actor's dormant ratio (before its own step) on the batch's encoded observations
    state = (batch.state,) if "state" in script.Batch._fields else ()
    assert beta.item() == pytest.approx(script.dormant_ratio(before.actor, features, *state).item())
    assert awaken_step.item() == 300 and metrics["charts/awaken_step"].item() == 300
    assert metrics["charts/exploration_std"].item() == pytest.approx(script.exploration_std(args, step, beta, awaken_step).item())
    assert metrics["charts/lambda"].item() == pytest.approx(script.exploitation_lambda(args, beta).item())
    # the encoder learns through the critic loss; V only with exploitation
    changed = {}
    for name in ["encoder", "actor", "critic", "value"]:
        pairs = zip(getattr(before, name).parameters(), getattr(networks, name).parameters(), strict=True)
        changed[name] = any(not torch.equal(old, new) for old, new in pairs)
    assert changed == {"encoder": True, "actor": True, "critic": True, "value": exploit}
    assert ("losses/value_loss" in metrics) == exploit
    # the target critic moved 1% of the way to the updated critic
    for old_target, critic, target in zip(
        before.critic_target.parameters(), networks.critic.parameters(), networks.critic_target.parameters(), strict=True
    ):
        assert torch.equal(target, torch.lerp(old_target, critic, args.tau))
    assert all(math.isfinite(float(value)) for value in metrics.values())


# --------------------------------------------------------------------------------------- schedules
def test_linear_schedule(script):
    assert script.linear_schedule(1.0, 0.1, 100, torch.tensor(50)).item() == pytest.approx(0.55)
    assert script.linear_schedule(1.0, 0.1, 100, torch.tensor(500)).item() == pytest.approx(0.1)
    assert script.linear_schedule(1.0, 0.1, 100, torch.tensor(-5)).item() == pytest.approx(1.0)


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


# ------------------------------------------------------------------------------ evaluation videos
def test_video_schedule_is_capped_cubic(script):
    assert [e for e in range(3011) if script.video_due(e)] == [0, 1, 8, 27, 64, 125, 216, 343, 512, 729, 1000, 2000, 3000]


class FiveStepEnv:
    """A stand-in env whose episodes last 5 steps; its frames show the step they were rendered at."""

    action_dim = 2

    def reset(self, seed=None):
        self.t = 0
        return np.zeros((9, 84, 84), np.uint8)

    def step(self, action):
        self.t += 1
        return np.zeros((9, 84, 84), np.uint8), 1.0, 1.0, self.t == 5

    def render(self, size):
        return np.full((size, size, 3), self.t, np.uint8)


def test_evaluation_streams_the_video_frame_by_frame(monkeypatch, tmp_path):
    env, appended = FiveStepEnv(), []

    class Writer:  # records at which env step each frame reaches the writer
        def append_data(self, frame):
            appended.append((env.t, int(frame[0, 0, 0])))

        def close(self):
            appended.append("closed")

    monkeypatch.setattr(drm.imageio.v2, "get_writer", lambda path, fps: Writer())
    networks = drm.make_networks((9, 84, 84), 2, drm.Args(feature_dim=4, hidden_dim=8), "cpu")
    mean_return = drm.evaluate(env, networks, [7, 8], "cpu", str(tmp_path / "eval.mp4"))
    assert mean_return == 5.0
    # each frame is written while its episode runs (not buffered until the end), first episode only
    assert appended == [(0, 0), (1, 1), (2, 2), (3, 3), (4, 4), "closed"]


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
    fill(buffer, [[0, 1]])
    assert not buffer.ready  # a 1-step episode holds no 2-step window yet
    fill(buffer, [[0, 1, 2, 3, 4], [10, 11, 12, 13, 14, 15]])
    assert buffer.ready
    # episode 1 is slots 2..6: starts 2..4 have a full 2-step window; 5 and 6 would cross its end
    assert buffer.valid.nonzero().flatten().tolist() == [2, 3, 4, 7, 8, 9, 10]
    batch = buffer.gather(torch.tensor([2, 3, 7]))
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


class Placed(NamedTuple):
    device: torch.device


def place(script, monkeypatch, gpu_free_gb, host_room_gb, saved_on=None, out_of_memory=False, **args):
    """Where `place_replay` puts a 10 GB replay, with `gpu_free_gb` free on a stand-in GPU (None: no GPU) and
    `host_room_gb` of host memory this job may still use; a run with 2 evaluation workers."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (gpu_free_gb * 1e9, 80e9))
    monkeypatch.setattr(script, "host_memory_room", lambda: (host_room_gb * 1e9, "the memory limit of cgroup /job: 32.0 GB"))

    def new_replay(storage):
        if out_of_memory and storage.type == "cuda":
            raise torch.OutOfMemoryError("another run took it")
        return Placed(storage)

    run_args = script.Args(buffer_size=470_000, num_eval_episodes=2, eval_workers=2, **args)
    checkpoint = None if saved_on is None else {"replay": {"device": saved_on}}
    device = torch.device("cpu" if gpu_free_gb is None else "cuda")
    return script.place_replay(new_replay, 10e9, device, run_args, checkpoint).device.type


def test_the_replay_goes_to_the_gpu_where_it_fits_and_a_resumed_one_stays_where_it_was(script, monkeypatch, capsys):
    assert place(script, monkeypatch, gpu_free_gb=20, host_room_gb=40) == "cuda"
    assert place(script, monkeypatch, gpu_free_gb=11, host_room_gb=40) == "cpu"  # 10 GB and 2 GiB headroom
    assert place(script, monkeypatch, gpu_free_gb=20, host_room_gb=40, out_of_memory=True) == "cpu"  # taken meanwhile
    assert place(script, monkeypatch, gpu_free_gb=None, host_room_gb=40) == "cpu"
    capsys.readouterr()
    # a resumed run keeps its replay where it was, which draws the same batches; elsewhere it says so
    assert place(script, monkeypatch, gpu_free_gb=20, host_room_gb=40, saved_on="cpu") == "cpu"
    assert place(script, monkeypatch, gpu_free_gb=20, host_room_gb=40, saved_on="cuda") == "cuda"
    assert "no longer bit-identical" not in capsys.readouterr().out
    assert place(script, monkeypatch, gpu_free_gb=5, host_room_gb=40, saved_on="cuda") == "cpu"
    assert (
        "--resume: the replay is on cpu, the checkpoint's was on cuda: the run goes on, but no longer bit-identical"
        in capsys.readouterr().out
    )
    with pytest.raises(SystemExit) as stop:
        place(script, monkeypatch, gpu_free_gb=5, host_room_gb=40, saved_on="cuda", cudagraphs=True)
    assert "--cudagraphs samples the replay inside the graph, so it must fit in GPU memory" in str(stop.value)


def test_a_replay_the_host_cannot_hold_stops_before_training_naming_the_flag_and_both_numbers(script, monkeypatch):
    # beside the 10 GB replay: 2 workers of 0.42 GB, a checkpoint write's 0.07 GB and 2.15 GB headroom
    with pytest.raises(SystemExit) as stop:
        place(script, monkeypatch, gpu_free_gb=None, host_room_gb=12.5)
    message = str(stop.value)
    assert message.startswith(
        f"{script.__name__}.py: --buffer-size 470,000: the run needs 13.1 GB of host memory (the replay when full 10.0 GB"
    )
    assert "2 evaluation workers 0.8 GB" in message and "but may use 12.5 GB (the memory limit of cgroup /job: 32.0 GB)" in message
    assert message.endswith("lower --buffer-size or --eval-workers") and "\n" not in message
    assert place(script, monkeypatch, gpu_free_gb=None, host_room_gb=13.2) == "cpu"
    # with the replay in GPU memory the host holds the rest: the workers, the write's piece, the headroom
    assert place(script, monkeypatch, gpu_free_gb=20, host_room_gb=3.5) == "cuda"
    with pytest.raises(SystemExit) as stop:
        place(script, monkeypatch, gpu_free_gb=20, host_room_gb=2.5)
    assert str(stop.value) == (
        f"{script.__name__}.py: --eval-workers 2: beside its replay in GPU memory the run needs 3.1 GB of host memory (2 evaluation "
        "workers 0.8 GB; a checkpoint write and headroom 2.2 GB), but may use 2.5 GB (the memory limit of cgroup /job: 32.0 GB); "
        "lower --eval-workers"
    )


def test_the_memory_limits_of_the_cgroup_v1_or_v2_and_its_ancestors(script, tmp_path):
    def write(path, text):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    # cgroup v2: the job's limit of 8 GB (2 GB in use, of which 0.5 GB is reclaimable file cache), its step without one
    v2 = tmp_path / "v2"
    write(v2 / "cgroup.controllers", "cpu memory\n")
    write(v2 / "job" / "memory.max", "8000000000\n")
    write(v2 / "job" / "memory.current", "2000000000\n")
    write(v2 / "job" / "memory.stat", "anon 1500000000\nfile 500000000\ninactive_file 500000000\n")
    write(v2 / "job" / "step" / "memory.max", "max\n")
    write(v2 / "job" / "step" / "memory.current", "1000000000\n")
    write(v2 / "job" / "step" / "memory.stat", "inactive_file 0\n")
    write(tmp_path / "cgroup-v2", "0::/job/step\n")
    assert script.cgroup_memory_limits(str(v2), str(tmp_path / "cgroup-v2")) == [(str(v2 / "job"), 8_000_000_000, 1_500_000_000)]
    # cgroup v1 (Slurm's task/cgroup): the limit in memory.limit_in_bytes, none written as a huge number
    v1 = tmp_path / "v1"
    write(v1 / "memory" / "slurm" / "job_7" / "memory.limit_in_bytes", "34359738368\n")
    write(v1 / "memory" / "slurm" / "job_7" / "memory.usage_in_bytes", "4000000000\n")
    write(v1 / "memory" / "slurm" / "job_7" / "memory.stat", "cache 10\ntotal_inactive_file 1000000000\n")
    write(v1 / "memory" / "slurm" / "memory.limit_in_bytes", "9223372036854771712\n")
    write(v1 / "memory" / "slurm" / "memory.usage_in_bytes", "4000000000\n")
    write(v1 / "memory" / "slurm" / "memory.stat", "total_inactive_file 0\n")
    write(tmp_path / "cgroup-v1", "12:pids:/slurm/job_7\n4:memory:/slurm/job_7\n0::/slurm/job_7\n")
    limits = script.cgroup_memory_limits(str(v1), str(tmp_path / "cgroup-v1"))
    assert limits == [(str(v1 / "memory" / "slurm" / "job_7"), 34_359_738_368, 3_000_000_000)]
    assert script.cgroup_memory_limits(str(v1), str(tmp_path / "nowhere")) == []


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
        (dict(batch_size=512, buffer_size=100), "--batch-size 512 is larger than --buffer-size 100"),
        (dict(nstep=500), "is not shorter than an episode (500 agent steps)"),
        (dict(num_seed_frames=4), "leaves no complete n-step window"),
        (dict(min_perturb_factor=0.7, max_perturb_factor=0.6), "--min-perturb-factor 0.7 is above --max-perturb-factor 0.6"),
        (
            dict(buffer_size=2**24 + 1),
            "--buffer-size 16,777,217 is above 16,777,216 (2**24), the most slots torch.multinomial samples from",
        ),
    ],
)
def test_impossible_combinations_stop_with_a_reason(overrides, message):
    with pytest.raises(SystemExit) as stop:
        drm.resolve_args(drm.Args(**{"env_id": "walker-walk", **overrides}), VALID)
    assert message in str(stop.value)


# Every numeric flag of every script, with the values among 0, -1, nan and inf that it accepts; all
# others must stop the run with a one-line message that names the flag. A new numeric flag fails this
# test until it is listed here.
ACCEPTS = {
    "seed": {0}, "num_seed_frames": set(), "num_eval_episodes": {0}, "std_init": {0}, "std_final": {0},
    "std_clip": {0}, "dormant_threshold": {0}, "target_dormant_ratio": {0}, "target_lambda": {0},
    "min_perturb_factor": {0}, "perturb_rate": {0}, "critic_dropout": {0},
    **dict.fromkeys([
        "total_frames", "eval_every_frames", "action_repeat", "frame_stack", "buffer_size", "batch_size",
        "learning_rate", "feature_dim", "hidden_dim", "nstep", "gamma", "tau", "update_every_steps",
        "std_schedule_steps", "dormant_temp", "lambda_temp", "expectile", "perturb_interval_steps",
        "max_perturb_factor", "log_every_updates", "checkpoint_every_frames", "shadow_size", "eval_workers",
    ], set()),
}  # fmt: skip


def numeric_fields(args_class):
    for field in dataclasses.fields(args_class):
        kinds = set(typing.get_args(field.type)) or {field.type}
        if kinds & {int, float}:
            yield field.name, float in kinds


def test_every_numeric_flag_rejects_bad_values_in_one_line(script):
    valid_ids = {"drm": VALID, "drm_adroit": ["door", "hammer", "pen", "relocate"], "drm_metaworld": ["coffee-push"]}
    env_id = {"drm": "walker-walk", "drm_adroit": "door", "drm_metaworld": "coffee-push"}[script.__name__]
    fields = dict(numeric_fields(script.Args))
    assert set(fields) <= set(ACCEPTS), set(fields) - set(ACCEPTS)
    for name, is_float in fields.items():
        flag = "--" + name.replace("_", "-")
        for bad in ["0", "-1", "nan", "inf"] if is_float else ["0", "-1"]:
            if float(bad) in ACCEPTS[name]:
                continue
            args = tyro.cli(script.Args, args=["--env-id", env_id, flag, bad])
            with pytest.raises(SystemExit) as stop:
                script.resolve_args(args, valid_ids[script.__name__])
            message = str(stop.value)
            assert message.startswith(f"{script.__name__}.py: ") and flag in message and "\n" not in message, (name, bad, message)


def test_the_lqr_tasks_without_a_time_limit_stop_with_one_line():
    for env_id in drm.UNBOUNDED_TASKS:
        with pytest.raises(SystemExit) as stop:
            drm.resolve_args(tyro.cli(drm.Args, args=["--env-id", env_id]), VALID)
        assert str(stop.value).startswith(f"drm.py: {env_id} has no time limit (its episodes end only when the state converges)")


# ------------------------------------------------------------------------------------------ env
def test_dmc_env_pixels_stack_actions_and_episode_length():
    env = drm.make_env("cartpole-balance", seed=1, action_repeat=8)
    obs = env.reset()
    assert obs.shape == (9, 84, 84) and obs.dtype == np.uint8 and obs.max() > 0
    assert np.array_equal(obs[:3], obs[3:6]) and np.array_equal(obs[3:6], obs[6:])  # first frame repeated
    steps, last = 0, False
    while not last:
        obs, reward, discount, last = env.step(np.ones(env.action_dim, np.float32))
        steps += 1
        if steps == 3:
            assert not np.array_equal(obs[:3], obs[6:])  # the pole has moved
    assert steps == 125 and env.episode_frames == 1000 and discount == 1.0  # the time-limit end bootstraps
    assert env.render(256).shape == (256, 256, 3)
    twin = drm.make_env("cartpole-balance", seed=1)
    assert np.array_equal(twin.reset(), drm.make_env("cartpole-balance", seed=1).reset())
    assert drm.make_env("quadruped-walk", seed=1).camera_id == 2
