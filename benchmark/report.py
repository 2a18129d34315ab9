"""Turn the TensorBoard logs of an experiment grid (run directories named
`{env_id}__{variant}__{seed}__{time}`, as `benchmark/run.py` writes them) into PNG figures and a
markdown table:
- eval return (and success rate) against frames per variant: the mean or interquartile mean over
  seeds, with a 95% bootstrap confidence interval;
- the actor's dormant ratio, exploration std and lambda over training;
- the dormant ratio against motor activity (mean |a_t - a_(t-1)| of each training episode, paired
  with the last dormant ratio logged before the episode ended), with Pearson's correlation;
- `report.md`: each variant's score at fixed frame budgets, and the correlations.

    python benchmark/report.py experiments/runs --output experiments/report --budgets 100000 500000
"""
import os
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import tyro

TAGS = [
    "eval/episodic_return", "eval/success_rate", "charts/dormant_ratio", "charts/exploration_std", "charts/lambda",
    "charts/action_change", "charts/action_magnitude", "charts/dormant_ratio_critic", "charts/dormant_ratio_value",
]  # fmt: skip


@dataclass
class Args:
    runs_dir: tyro.conf.Positional[str]
    """directory holding the run directories (e.g. experiments/runs)"""
    output: str = "report"
    """where the figures and report.md go"""
    budgets: list[int] = field(default_factory=lambda: [100_000, 500_000, 1_000_000])
    """env-frame budgets of the table's columns"""
    aggregate: Literal["mean", "iqm"] = "mean"
    """statistic over seeds: the mean, or the interquartile mean (robust to a broken seed)"""
    bootstrap_samples: int = 2000
    seed: int = 0
    """seed of the bootstrap resampling"""


def load_runs(runs_dir):
    """{(env_id, variant): {seed: {tag: (steps, values)}}} from every run directory under `runs_dir`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = defaultdict(dict)
    for name in sorted(os.listdir(runs_dir)):
        parts = name.split("__")
        if len(parts) != 4 or not os.path.isdir(os.path.join(runs_dir, name)):
            continue
        env_id, variant, seed, _ = parts
        events = EventAccumulator(os.path.join(runs_dir, name), size_guidance={"scalars": 0})
        events.Reload()
        available = set(events.Tags()["scalars"])
        runs[env_id, variant][int(seed)] = {
            tag: (np.array([e.step for e in events.Scalars(tag)]), np.array([e.value for e in events.Scalars(tag)]))
            for tag in TAGS
            if tag in available
        }
    return runs


def interquartile_mean(values, axis=-1):
    """Mean of the middle 50% of the values (the lowest and highest quarters are dropped)."""
    values = np.sort(values, axis=axis)
    n = values.shape[axis]
    low, high = int(np.floor(n * 0.25)), int(np.ceil(n * 0.75))
    return np.take(values, range(low, max(high, low + 1)), axis=axis).mean(axis=axis)


def aggregate_with_ci(values, statistic, samples, rng):
    """The statistic over seeds (last axis) and its 95% percentile-bootstrap confidence interval."""
    values = np.asarray(values, dtype=float)
    point = statistic(values, axis=-1)
    if values.shape[-1] < 2:
        return point, point, point
    picks = rng.integers(0, values.shape[-1], (samples, values.shape[-1]))
    resampled = statistic(values[..., picks], axis=-1)  # (..., samples)
    low, high = np.percentile(resampled, [2.5, 97.5], axis=-1)
    return point, low, high


def score_at(steps, values, budget):
    """The last evaluation at or before `budget` frames (None if none)."""
    before = steps <= budget
    return values[before][-1] if before.any() else None


def dormant_vs_activity(seeds):
    """Pairs (dormant ratio, motor activity): each training episode's mean |a_t - a_(t-1)| with the
    last actor dormant ratio logged at or before the episode's end."""
    pairs = []
    for scalars in seeds.values():
        if "charts/dormant_ratio" not in scalars or "charts/action_change" not in scalars:
            continue
        ratio_steps, ratios = scalars["charts/dormant_ratio"]
        for step, change in zip(*scalars["charts/action_change"]):
            before = ratio_steps <= step
            if before.any():
                pairs.append((ratios[before][-1], change))
    return np.array(pairs).reshape(-1, 2)


def pearson(pairs):
    if len(pairs) < 3 or pairs[:, 0].std() == 0 or pairs[:, 1].std() == 0:
        return float("nan")
    return float(np.corrcoef(pairs[:, 0], pairs[:, 1])[0, 1])


def common_grid(seeds, tag):
    """(steps, values (steps, seeds)) on the steps every seed logged."""
    series = [scalars[tag] for scalars in seeds.values() if tag in scalars]
    steps = sorted(set.intersection(*(set(s.tolist()) for s, _ in series))) if series else []
    values = np.array([[dict(zip(s.tolist(), v))[step] for s, v in series] for step in steps])
    return np.array(steps), values


if __name__ == "__main__":
    args = tyro.cli(Args)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("report.py: the figures need matplotlib: pip install -r requirements-experiments.txt")
    if not os.path.isdir(args.runs_dir):
        sys.exit(f"report.py: no directory {args.runs_dir}")
    runs = load_runs(args.runs_dir)
    if not runs:
        sys.exit(f"report.py: no run directories named env__variant__seed__time in {args.runs_dir}")
    os.makedirs(args.output, exist_ok=True)
    statistic = np.mean if args.aggregate == "mean" else interquartile_mean
    rng = np.random.default_rng(args.seed)
    env_ids = sorted({env_id for env_id, _ in runs})

    lines = [f"# Report: {args.runs_dir}", "", f"{args.aggregate} over seeds [95% bootstrap confidence interval]", ""]
    for env_id in env_ids:
        variants = sorted(variant for e, variant in runs if e == env_id)
        has_success = any("eval/success_rate" in s for v in variants for s in runs[env_id, v].values())
        metrics = ["eval/episodic_return"] + (["eval/success_rate"] if has_success else [])
        for metric in metrics:
            header = "| variant | seeds | " + " | ".join(f"{budget:,}" for budget in args.budgets) + " |"
            lines += [f"## {env_id}: {metric} at frame budgets", "", header, "|---|---|" + "---|" * len(args.budgets)]
            figure, axis = plt.subplots(figsize=(6, 4))
            for variant in variants:
                seeds = runs[env_id, variant]
                cells = []
                for budget in args.budgets:
                    scores = [score_at(*s[metric], budget) for s in seeds.values() if metric in s]
                    scores = [score for score in scores if score is not None]
                    if scores:
                        point, low, high = aggregate_with_ci(scores, statistic, args.bootstrap_samples, rng)
                        cells.append(f"{point:.3g} [{low:.3g}, {high:.3g}]")
                    else:
                        cells.append("–")
                lines.append(f"| {variant} | {len(seeds)} | " + " | ".join(cells) + " |")
                steps, values = common_grid(seeds, metric)
                if len(steps):
                    point, low, high = aggregate_with_ci(values, statistic, args.bootstrap_samples, rng)
                    axis.plot(steps, point, label=variant)
                    axis.fill_between(steps, low, high, alpha=0.2)
            axis.set(xlabel="env frames", ylabel=metric, title=env_id)
            axis.legend()
            figure.savefig(os.path.join(args.output, f"{env_id}_{metric.replace('/', '_')}.png"), dpi=120, bbox_inches="tight")
            plt.close(figure)
            lines.append("")

        # DrM's internal signals over training, per variant (mean over seeds)
        figure, axes = plt.subplots(1, 3, figsize=(15, 4))
        for axis, tag in zip(axes, ["charts/dormant_ratio", "charts/exploration_std", "charts/lambda"]):
            for variant in variants:
                steps, values = common_grid(runs[env_id, variant], tag)
                if len(steps):
                    axis.plot(steps, values.mean(axis=1), label=variant)
            axis.set(xlabel="env frames", title=f"{env_id}: {tag}")
        axes[0].legend()
        figure.savefig(os.path.join(args.output, f"{env_id}_drm_signals.png"), dpi=120, bbox_inches="tight")
        plt.close(figure)

        # does a falling dormant ratio go with more active exploration?
        lines += [f"## {env_id}: actor dormant ratio vs motor activity (mean |a_t - a_(t-1)| per episode)", "",
                  "| variant | episodes | Pearson r |", "|---|---|---|"]  # fmt: skip
        figure, axis = plt.subplots(figsize=(6, 4))
        for variant in variants:
            pairs = dormant_vs_activity(runs[env_id, variant])
            correlation = pearson(pairs)
            lines.append(f"| {variant} | {len(pairs)} | {correlation:.3f} |")
            if len(pairs):
                axis.scatter(pairs[:, 0], pairs[:, 1], s=8, label=f"{variant} (r = {correlation:.2f})")
        axis.set(xlabel="actor dormant ratio", ylabel="mean |a_t - a_(t-1)|", title=env_id)
        axis.legend()
        figure.savefig(os.path.join(args.output, f"{env_id}_dormant_vs_activity.png"), dpi=120, bbox_inches="tight")
        plt.close(figure)
        lines.append("")

    with open(os.path.join(args.output, "report.md"), "w") as report:
        report.write("\n".join(lines))
    print(f"wrote {args.output}/report.md and {len(os.listdir(args.output)) - 1} figures")
