"""Fidelity check against the official DrM code (XuGW-Kevin/DrM at commit 317116a), read from the user's
own checkout. Per benchmark family (dmc: agents/drm.py vs drm.py; adroit: agents/drm_adroit.py vs
drm_adroit.py; metaworld: agents/drm_mw.py vs drm_metaworld.py) the official agent is built, its
initial weights are copied into this repository's networks, and both codes run on the same replay
batches and the same random streams:
- shift: the random-shift augmentation of one batch;
- forward: the encoder, the actor's mean, Q1, Q2 and V on that batch;
- update: one update; the parameters of all five networks and the logged metrics after it;
- perturb+update: the perturbation (the official one inside `DrMAgent.update`, ours `perturb_agent`
  before `update`, as the training loop calls it), then an update on a second batch.
It prints the largest absolute difference of each and exits non-zero if one exceeds --tolerance.
docs/parity.md explains the alignments and shows the output.

    git clone https://github.com/XuGW-Kevin/DrM && git -C DrM checkout 317116a
    python benchmark/official_parity.py --official DrM
    python benchmark/official_parity.py --official DrM --families adroit --adam-eps 1e-8  # the training eps
"""

import contextlib
import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass, replace
from typing import Literal, NamedTuple

import torch
import torch.nn as nn
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import drm  # noqa: E402
import drm_adroit  # noqa: E402
import drm_metaworld  # noqa: E402
from speed import cpu_name  # noqa: E402  (benchmark/speed.py, beside this script)

OFFICIAL_COMMIT = "317116a"
Family = Literal["dmc", "adroit", "metaworld"]


@dataclass
class Args:
    official: str
    """a checkout of XuGW-Kevin/DrM at commit 317116a (the folder holding agents/ and utils.py)"""
    families: tuple[Family, ...] = ("dmc", "adroit", "metaworld")
    """which scripts to compare with their official agents"""
    device: str = "cpu"
    """where both codes run"""
    hidden_dim: int = 64
    """width of the hidden layers (the scripts' default is 1024)"""
    batch_size: int = 8
    """samples in each replay batch"""
    # Adam's first step after a (re)start moves a weight by about lr * g / (|g| + eps): with eps 1e-8, a
    # gradient entry that float rounding makes 1e-8 in one code and 1.5e-8 in the other moves by visibly
    # different amounts, up to about lr. A larger eps in both codes keeps that noise out of the check.
    adam_eps: float = 1e-4
    """Adam's eps in both codes (training uses 1e-8: `--adam-eps 1e-8` shows the rounding noise it amplifies)"""
    shared_shift: bool = True
    """both codes' updates shift with the official `RandomShiftsAug` (`--no-shared-shift`: each its own)"""
    seed: int = 1
    """seed of the initial weights, the replay batches and every random draw of the updates"""
    tolerance: float = 1e-5
    """largest absolute difference accepted"""


class FamilySpec(NamedTuple):
    script: object  # our module
    official_file: str  # the official agent, relative to the checkout
    action_dim: int


FAMILIES = {
    "dmc": FamilySpec(drm, "agents/drm.py", 6),  # walker's action size
    "adroit": FamilySpec(drm_adroit, "agents/drm_adroit.py", 28),  # door's
    "metaworld": FamilySpec(drm_metaworld, "agents/drm_mw.py", 4),
}
# official module names -> ours; a parameter's name maps part by part
OUR_NAMES = {
    "value_predictor": "value", "Q1": "q1", "Q2": "q2", "V": "v", "state_enc": "state_fusion", "state_encoder": "state_mlp",
}  # fmt: skip
OFFICIAL_NETWORKS = ("encoder", "actor", "critic", "critic_target", "value_predictor")
# our logged metric -> the official `update`'s metric of the same quantity
METRICS = {
    "losses/value_loss": "predictor_loss",
    "losses/qf1_values": "critic_q1",
    "losses/qf2_values": "critic_q2",
    "losses/qf_loss": "critic_loss",
    "losses/actor_loss": "actor_loss",
    "charts/dormant_ratio": "actor_dormant_ratio",
}
# the order of a batch from the official replay loader; the Adroit one ends with the hand states
OFFICIAL_BATCH_ORDER = ("obs", "action", "reward", "discount", "next_obs", "state", "next_state")


def fail(message):
    """Stop with a one-line reason that names this script, and no traceback."""
    sys.exit(f"{os.path.basename(__file__)}: {message}")


def import_official(checkout, families):
    """(the official utils module, {family: official agent module}) from the checkout. The repository
    does not install as a whole (its conda environment pins torch 1.12 and mujoco-py), but these files
    need only torch and numpy and run unchanged on today's torch. The agents do
    `sys.path.append('..')` and then `import utils`: the checkout goes first on sys.path so that this
    finds the checkout's utils.py. The agents are loaded by file path, as `agents/` has no __init__.py."""
    if not os.path.isdir(checkout):
        fail(f"--official {checkout}: no such directory")
    if not os.path.isfile(os.path.join(checkout, "agents", "drm.py")):
        fail(f"--official {checkout} is not a checkout of XuGW-Kevin/DrM (no agents/drm.py)")
    checkout = os.path.abspath(checkout)
    sys.path.insert(0, checkout)  # only while importing: the checkout's other modules could shadow packages
    agents = {}
    try:
        import utils

        for family in families:
            path = os.path.join(checkout, FAMILIES[family].official_file)
            spec = importlib.util.spec_from_file_location(f"official_{family}", path)
            agents[family] = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(agents[family])
    except Exception as error:
        fail(f"--official {checkout}: importing the official agents failed ({type(error).__name__}: {error})")
    finally:
        sys.path.remove(checkout)
    if os.path.dirname(os.path.abspath(utils.__file__)) != checkout:
        fail(f"--official {checkout}: `import utils` found {utils.__file__}, not the checkout's utils.py")
    return utils, agents


def checkout_commit(checkout):
    """The checkout's git commit, or None when it is not a git checkout (or git is missing)."""
    try:
        result = subprocess.run(["git", "-C", checkout, "rev-parse", "HEAD"], capture_output=True, text=True)
    except OSError:
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def machine(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def our_name(official_name):
    return ".".join(OUR_NAMES.get(part, part) for part in official_name.split("."))


def official_agent(family, agent_module, run_args, obs_shape, device):
    """The official DrMAgent with the values of our resolved Args (each script's docs page lists how
    they follow the official configs)."""
    hyperparameters = dict(
        obs_shape=obs_shape, action_shape=(FAMILIES[family].action_dim,), device=device, lr=run_args.learning_rate,
        feature_dim=run_args.feature_dim, hidden_dim=run_args.hidden_dim, critic_target_tau=run_args.tau,
        dormant_threshold=run_args.dormant_threshold, target_dormant_ratio=run_args.target_dormant_ratio,
        dormant_temp=run_args.dormant_temp, target_lambda=run_args.target_lambda,
        dormant_perturb_interval=run_args.perturb_interval_steps, min_perturb_factor=run_args.min_perturb_factor,
        max_perturb_factor=run_args.max_perturb_factor, perturb_rate=run_args.perturb_rate,
        num_expl_steps=run_args.num_seed_frames // run_args.action_repeat, stddev_type=run_args.exploration,
        stddev_schedule=f"linear({run_args.std_init},{run_args.std_final},{run_args.std_schedule_steps})",
        stddev_clip=run_args.std_clip, expectile=run_args.expectile, use_tb=True,
    )  # fmt: skip
    if family != "metaworld":  # agents/drm_mw.py has no λ schedule: it blends with target_lambda
        hyperparameters["lambda_temp"] = run_args.lambda_temp
    if family == "adroit":
        hyperparameters["state_dim"] = drm_adroit.STATE_DIM
    return agent_module.DrMAgent(**hyperparameters)


def match_module_order(ours, official):
    """Reorder our submodules, recursively, into the official registration order; what a forward pass
    computes does not change. The perturbation draws fresh weights layer by layer in registration
    order, and the official Adroit Actor and VNetwork register `state_enc` after their heads where
    ours register `state_fusion` before them."""
    for name, official_child in official.named_children():
        child = ours._modules.pop(our_name(name))
        ours._modules[our_name(name)] = child
        match_module_order(child, official_child)


def copy_official_weights(agent, networks):
    """Our networks take the official agent's initial weights (official -> ours), and its layer order."""
    for name in OFFICIAL_NETWORKS:
        official, ours = getattr(agent, name), getattr(networks, our_name(name))
        try:
            ours.load_state_dict({our_name(key): value for key, value in official.state_dict().items()})
        except RuntimeError as error:
            fail(f"our {our_name(name)} network does not take the official weights ({str(error).splitlines()[0]})")
        match_module_order(ours, official)
        linears = [our_name(layer) for layer, module in official.named_modules() if isinstance(module, nn.Linear)]
        if [layer for layer, module in ours.named_modules() if isinstance(module, nn.Linear)] != linears:
            fail(f"our {our_name(name)} network's Linear layers are not the official ones in the official order")


def random_batch(family, run_args, obs_shape, generator, device):
    """A replay batch as both codes read it: uint8 frames, actions in [-1, 1], n-step rewards and
    discounts (and the Adroit hand states)."""
    n, action_dim = run_args.batch_size, FAMILIES[family].action_dim
    fields = {
        "obs": torch.randint(0, 256, (n, *obs_shape), generator=generator, dtype=torch.uint8),
        "action": torch.rand(n, action_dim, generator=generator) * 2 - 1,
        "reward": torch.rand(n, 1, generator=generator),
        "discount": torch.full((n, 1), run_args.gamma**run_args.nstep),
        "next_obs": torch.randint(0, 256, (n, *obs_shape), generator=generator, dtype=torch.uint8),
    }
    if family == "adroit":
        fields["state"] = torch.randn(n, drm_adroit.STATE_DIM, generator=generator)
        fields["next_state"] = torch.randn(n, drm_adroit.STATE_DIM, generator=generator)
    return {key: value.to(device) for key, value in fields.items()}


@torch.no_grad()
def official_forward(agent, fields):
    state = (fields["state"],) if "state" in fields else ()
    features = agent.encoder(fields["obs"].float())
    q1, q2 = agent.critic(features, fields["action"], *state)
    mean = agent.actor(features, 1.0, *state).mean
    return {"encoder": features, "actor mean": mean, "Q1": q1, "Q2": q2, "V": agent.value_predictor(features, *state)}


@torch.no_grad()
def our_forward(networks, fields):
    state = (fields["state"],) if "state" in fields else ()
    features = networks.encoder(fields["obs"].float())
    q1, q2 = networks.critic(features, *state, fields["action"])
    mean = networks.actor(features, *state)
    return {"encoder": features, "actor mean": mean, "Q1": q1, "Q2": q2, "V": networks.value(features, *state)}


def official_parameters(agent):
    return {
        f"{our_name(name)}.{our_name(key)}": value for name in OFFICIAL_NETWORKS for key, value in getattr(agent, name).state_dict().items()
    }


def our_parameters(networks):
    return {f"{name}.{key}": value for name, network in networks._asdict().items() for key, value in network.state_dict().items()}


def largest_difference(official, ours):
    """(largest absolute difference, where) over the entries of two dicts with the same keys."""
    if official.keys() != ours.keys():
        fail(f"compared different things: {sorted(official.keys() ^ ours.keys())}")

    def as_float64(value):
        return torch.as_tensor(value).detach().to("cpu", torch.float64)

    differences = {name: (as_float64(ours[name]) - as_float64(official[name])).abs().max().item() for name in ours}
    worst = max(differences, key=differences.get)
    return differences[worst], worst


@contextlib.contextmanager
def patched(module, name, replacement):
    """`module.name` is `replacement` inside the block: both codes call these functions through their
    module's namespace at call time."""
    original = getattr(module, name)
    setattr(module, name, replacement)
    try:
        yield
    finally:
        setattr(module, name, original)


@contextlib.contextmanager
def seeded_perturbations(module, seed):
    """Reseed torch before each call of `module.perturb` (one call per network, in the same order in
    both codes) and record the factors. This aligns the fresh draws: the official `utils.perturb`
    re-initialises a deep copy of the whole network, so for the encoder it draws four orthogonal conv
    weights that it then discards, and V's fresh weights would come from later in the stream than ours."""
    perturb, factors = module.perturb, []

    def seeded(network, optimizer, factor):
        torch.manual_seed(seed + len(factors))
        factors.append(factor)
        return perturb(network, optimizer, factor)

    with patched(module, "perturb", seeded):
        yield factors


def official_update(agent, fields, step):
    """One official update on `fields`; returns its metrics in our names. The exploration std is read
    as the std argument of the actor's last call (the actor update): agents/drm_adroit.py computes it
    inline rather than in a method."""
    used = {}
    hook = agent.actor.register_forward_pre_hook(lambda _module, inputs: used.update(std=inputs[1]))
    try:
        logged = agent.update(iter([tuple(fields[name].clone() for name in OFFICIAL_BATCH_ORDER if name in fields)]), step)
    finally:
        hook.remove()
    metrics = {ours: logged[official] for ours, official in METRICS.items()}
    metrics["charts/exploration_std"] = used["std"]
    # agents/drm_mw.py has no `lambda_`: its update_critic blends with target_lambda
    metrics["charts/lambda"] = agent.lambda_ if hasattr(type(agent), "lambda_") else agent.target_lambda
    metrics["charts/awaken_step"] = -1 if agent.awaken_step is None else agent.awaken_step
    return metrics


def our_update(script, networks, optimizers, fields, step, beta, awaken_step, run_args):
    batch = script.Batch(**{name: fields[name].clone() for name in script.Batch._fields})
    step = torch.tensor(step, device=beta.device)
    metrics, _ = script.update(networks, optimizers, batch, step, beta, awaken_step, run_args)
    return {name: metrics[name] for name in [*METRICS, "charts/exploration_std", "charts/lambda", "charts/awaken_step"]}


def check_family(family, args, utils, agent_module, device):
    """[(check, compared, largest difference, where)] of one family."""
    script = FAMILIES[family].script
    defaults = script.Args()
    run_args = replace(defaults, hidden_dim=args.hidden_dim, batch_size=args.batch_size)
    run_args = script.resolve_args(run_args, [defaults.env_id])  # the default task's presets; no env is built
    obs_shape = (3 * run_args.frame_stack, 84, 84)
    first_step = run_args.num_seed_frames // run_args.action_repeat + 1  # the first step at which the agent may awaken
    second_step = run_args.perturb_interval_steps  # the official update perturbs at this step
    generator = torch.Generator().manual_seed(args.seed)
    first_batch, second_batch = (random_batch(family, run_args, obs_shape, generator, device) for _ in range(2))

    torch.manual_seed(args.seed)
    agent = official_agent(family, agent_module, run_args, obs_shape, device)
    networks = script.make_networks(obs_shape, FAMILIES[family].action_dim, run_args, device)
    copy_official_weights(agent, networks)
    optimizers = script.make_optimizers(networks, run_args.learning_rate)
    for optimizer in [*optimizers.values(), agent.encoder_opt, agent.actor_opt, agent.critic_opt, agent.predictor_opt]:
        for group in optimizer.param_groups:
            group["eps"] = args.adam_eps
    beta, awaken_step = torch.tensor(1.0, device=device), torch.tensor(-1, device=device)
    rows = []

    # the official shift is a bilinear grid_sample at whole-pixel offsets, ours the crop it amounts to:
    # equal up to float rounding, so compared after rounding to whole pixel values, with the rounding beside
    torch.manual_seed(args.seed)
    official_frames = agent.aug(first_batch["obs"].float())
    torch.manual_seed(args.seed)
    our_frames = script.random_shift(first_batch["obs"].float())
    rounding = (official_frames - our_frames).abs().max().item()
    difference, _ = largest_difference({"obs": official_frames.round()}, {"obs": our_frames})
    rows.append(("shift", "frames", difference, f"obs rounded to whole pixel values (unrounded: {rounding:.1e} of 255)"))

    # seeded alike: Meta-World's critic draws dropout masks
    torch.manual_seed(args.seed)
    official_outputs = official_forward(agent, first_batch)
    torch.manual_seed(args.seed)
    rows.append(("forward", "outputs", *largest_difference(official_outputs, our_forward(networks, first_batch))))

    # That rounding flips the sign of a few near-zero encoder gradients, which Adam's first step turns
    # into weight differences of up to 2 * lr: the updates share the official shift unless --no-shared-shift.
    def shared_shift():
        return patched(script, "random_shift", agent.aug) if args.shared_shift else contextlib.nullcontext()

    # Both codes draw the shifts (obs, then next_obs), then the policy noise of the critic's target and
    # of the actor update, and Meta-World's dropout masks in between, in the same order.
    torch.manual_seed(args.seed)
    official_metrics = official_update(agent, first_batch, first_step)
    torch.manual_seed(args.seed)
    with shared_shift():
        our_metrics = our_update(script, networks, optimizers, first_batch, first_step, beta, awaken_step, run_args)
    rows.append(("update", "parameters", *largest_difference(official_parameters(agent), our_parameters(networks))))
    rows.append(("update", "metrics", *largest_difference(official_metrics, our_metrics)))

    with seeded_perturbations(utils, args.seed) as official_factors:
        official_metrics = official_update(agent, second_batch, second_step)
    with seeded_perturbations(script, args.seed) as our_factors, shared_shift():
        script.perturb_agent(networks, optimizers, script.perturb_factor(run_args, beta))
        our_metrics = our_update(script, networks, optimizers, second_batch, second_step, beta, awaken_step, run_args)
    official_metrics["perturb_factor"], our_metrics["perturb_factor"] = official_factors, torch.stack(our_factors)
    rows.append(("perturb+update", "parameters", *largest_difference(official_parameters(agent), our_parameters(networks))))
    rows.append(("perturb+update", "metrics", *largest_difference(official_metrics, our_metrics)))
    return rows


def main(args):
    if args.hidden_dim <= 0 or args.batch_size <= 0:
        fail("--hidden-dim and --batch-size must be positive")
    if not (args.tolerance > 0 and args.adam_eps > 0):
        fail("--tolerance and --adam-eps must be positive")
    try:
        device = torch.device(args.device)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as error:
        fail(f"--device {args.device} is not available ({str(error).splitlines()[0]})")
    utils, agents = import_official(args.official, args.families)
    commit = checkout_commit(args.official)
    print(f"official: {args.official} (commit {commit or 'unknown: not a git checkout'})")
    if commit is not None and not commit.startswith(OFFICIAL_COMMIT):
        print(f"note: the scripts follow commit {OFFICIAL_COMMIT}; this checkout is at {commit[:7]}")
    print(
        f"torch {torch.__version__} on {device.type} ({machine(device)}); hidden {args.hidden_dim}, batch {args.batch_size}, "
        f"Adam eps {args.adam_eps:g}, {'shared' if args.shared_shift else 'own'} shifts, seed {args.seed}"
    )  # fmt: skip
    print(f"{'family':<10} {'check':<15} {'compared':<11} {'largest |diff|':>14}  at")
    failures = []
    for family in args.families:
        for check, compared, difference, where in check_family(family, args, utils, agents[family], device):
            print(f"{family:<10} {check:<15} {compared:<11} {difference:>14.1e}  {where}", flush=True)
            if not difference <= args.tolerance:
                failures.append(f"{family} {check} {compared} differ by {difference:.1e} at {where}")
    if failures:
        fail(f"{'; '.join(failures)} (above --tolerance {args.tolerance:g})")


if __name__ == "__main__":
    main(tyro.cli(Args))
