"""Turn the TensorBoard logs of an experiment grid (run directories named
`{env_id}__{variant}__{seed}__{time}`, as `benchmark/run.py` writes them) into PNG figures and `report.md`:
- across tasks x seeds, at each frame budget, with rliable (Agarwal et al., NeurIPS 2021): the
  interquartile mean, mean and optimality gap of the normalized score with 95% stratified bootstrap
  confidence intervals, a performance profile, and the probability of improvement of every variant
  over the reference (`drqv2`);
- per task: eval return (and success rate) against frames, the mean over seeds and their range, with
  DrQ-v2's published curves beside them (`--baseline-curves`), and a table at the budgets;
- the actor's dormant ratio, the critic's and V's beside it, the exploration std and lambda over training;
- the dormant ratio against motor activity (mean |a_t - a_(t-1)| of each training episode, paired
  with the last dormant ratio logged before the episode ended), with Pearson's correlation.

    python benchmark/report.py experiments/runs --output experiments/report --budgets 100000 500000
"""

import csv
import os
import sys
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import tyro

TAGS = [
    "eval/episodic_return", "eval/success_rate", "charts/dormant_ratio", "charts/exploration_std", "charts/lambda",
    "charts/action_change", "charts/action_magnitude", "charts/dormant_ratio_critic", "charts/dormant_ratio_value",
]  # fmt: skip
DMC_MAX_RETURN = 1000.0  # a dm_control suite episode is 1000 steps with rewards in [0, 1]
# with fewer scores (runs x tasks), or one run per task, a bootstrap interval is far narrower than
# the real uncertainty (over 3 values it cannot leave their range; over 1 run per task it is a
# point), so none is printed
MIN_SCORES_FOR_INTERVALS = 10
METRICS = ["IQM", "mean", "optimality gap"]
BASELINE = "DrQ-v2 (published)"
# DrQ-v2 names the ball_in_cup domain `cup` (its dmc.py), so its file is dmc_cup_catch.csv
BASELINE_TASK_NAMES = {"ball_in_cup-catch": "cup_catch"}


@dataclass
class Args:
    runs_dir: tyro.conf.Positional[str]
    """directory holding the run directories (e.g. experiments/runs)"""
    output: str = "report"
    """where the figures and report.md go"""
    budgets: list[int] = field(default_factory=lambda: [100_000, 500_000, 1_000_000])
    """env-frame budgets of the tables and the aggregate figures"""
    reference: str = "drqv2"
    """the variant every other one is compared with (probability of improvement)"""
    baseline_curves: str | None = None
    """folder of DrQ-v2's published curves, `dmc_{domain}_{task}.csv` with columns frame, episode_reward and
    seed (the `curves/` folder of facebookresearch/drqv2), plotted and tabled beside the runs"""
    bootstrap_samples: int = 2000
    """bootstrap resamples of each interval (rliable's paper used 50,000 for its final figures)"""
    seed: int = 0
    """seed of the bootstrap resampling"""


def load_runs(runs_dir):
    """{(env_id, variant): {seed: {tag: (steps, values)}}} from every run directory under `runs_dir`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs, directories = defaultdict(dict), defaultdict(list)
    for name in sorted(os.listdir(runs_dir), key=lambda name: name.rsplit("__", 1)[-1].zfill(20)):  # oldest first
        parts = name.split("__")
        if len(parts) != 4 or not os.path.isdir(os.path.join(runs_dir, name)):
            continue
        env_id, variant, seed, _ = parts
        directories[env_id, variant, seed].append(name)
        events = EventAccumulator(os.path.join(runs_dir, name), size_guidance={"scalars": 0})
        events.Reload()
        available = set(events.Tags()["scalars"])
        runs[env_id, variant][int(seed)] = {
            tag: (np.array([e.step for e in events.Scalars(tag)]), np.array([e.value for e in events.Scalars(tag)]))
            for tag in TAGS
            if tag in available
        }
    for (env_id, variant, seed), names in directories.items():
        if len(names) > 1:  # benchmark/run.py makes one per run; a run started by hand again makes another
            print(
                f"report.py: {len(names)} run directories for {env_id}__{variant}__{seed}; reading the newest, {names[-1]}", file=sys.stderr
            )
    return runs


def load_baseline_curves(folder):
    """{env_id: {seed: {"eval/episodic_return": (frames, returns)}}} from DrQ-v2's published curves,
    one `dmc_{domain}_{task}.csv` per task (other columns of the files are ignored)."""
    curves = {}
    for name in sorted(os.listdir(folder)):
        if not (name.startswith("dmc_") and name.endswith(".csv")):
            continue
        with open(os.path.join(folder, name), newline="") as file:
            rows = list(csv.DictReader(file))
        missing = {"frame", "episode_reward", "seed"} - set(rows[0] if rows else ())
        if missing:
            sys.exit(f"report.py: --baseline-curves: {name} has no column(s) {', '.join(sorted(missing))}")
        points = defaultdict(list)
        for row in rows:
            points[int(float(row["seed"]))].append((float(row["frame"]), float(row["episode_reward"])))
        curves[name[len("dmc_") : -len(".csv")]] = {
            seed: {"eval/episodic_return": tuple(np.array(column) for column in zip(*sorted(pairs), strict=True))}
            for seed, pairs in points.items()
        }  # fmt: skip
    if not curves:
        sys.exit(f"report.py: --baseline-curves: no dmc_{{domain}}_{{task}}.csv file in {folder}")
    return curves


def baseline_for(curves, env_id):
    """The published curves of a `domain-task` env id (None if there are none)."""
    return curves.get(BASELINE_TASK_NAMES.get(env_id, env_id.replace("-", "_")))


def score_at(steps, values, budget):
    """The last evaluation at or before `budget` frames, if the run got there: its evaluations reach
    the budget or end less than one evaluation interval before it (a finished run's last evaluation
    can fall just short). None for a run that stopped or is still running before the budget."""
    before = steps <= budget
    if not before.any():
        return None
    interval = steps[-1] - steps[-2] if len(steps) > 1 else 0
    return values[before][-1] if steps[-1] + interval >= budget else None


def normalized_score(scalars, budget):
    """A run's score in [0, 1] at `budget`: its success rate where it logs one (Adroit, Meta-World),
    else its return over the largest possible return (DMC)."""
    if "eval/success_rate" in scalars:
        return score_at(*scalars["eval/success_rate"], budget)
    if "eval/episodic_return" in scalars:
        score = score_at(*scalars["eval/episodic_return"], budget)
        return None if score is None else score / DMC_MAX_RETURN
    return None


def score_matrices(runs, budget):
    """(tasks, {variant: scores (runs, tasks)}) at `budget`, rliable's layout, on the tasks that every
    variant with a score at the budget has reached it; each variant keeps as many runs per task as its
    task with the fewest (the lowest seeds)."""
    scores = defaultdict(dict)
    for (env_id, variant), seeds in runs.items():
        reached = [normalized_score(seeds[seed], budget) for seed in sorted(seeds)]
        if reached := [score for score in reached if score is not None]:
            scores[variant][env_id] = reached
    tasks = sorted(set.intersection(*(set(by_task) for by_task in scores.values()))) if scores else []
    matrices = {}
    for variant, by_task in sorted(scores.items()):
        runs_per_task = min((len(by_task[task]) for task in tasks), default=0)
        if runs_per_task:
            matrices[variant] = np.array([by_task[task][:runs_per_task] for task in tasks]).T
    return tasks, matrices


def aggregates(scores):
    """IQM, mean and optimality gap of a (runs, tasks) score matrix."""
    from rliable import metrics

    return np.array([metrics.aggregate_iqm(scores), metrics.aggregate_mean(scores), metrics.aggregate_optimality_gap(scores)])


def interval_estimates(scores, statistic, samples, seed):
    """rliable's point estimate and 95% stratified bootstrap interval (2, ...) of `statistic` on one
    score matrix, or list of matrices (independent samples). rliable draws its resamples from NumPy's
    global generator, seeded here for each call, so that every interval can be reproduced alone."""
    from rliable import library as rly

    np.random.seed(seed)
    points, intervals = rly.get_interval_estimates({"scores": scores}, statistic, reps=samples)
    return points["scores"], intervals["scores"]


def score_distribution(scores, thresholds):
    """The performance profile of a (runs, tasks) score matrix: the share of runs scoring above each
    threshold (rliable's score distribution, computed for all thresholds at once)."""
    return (scores[..., None] > thresholds).mean(axis=(0, 1))


def enough_for_intervals(*matrices):
    return all(matrix.size >= MIN_SCORES_FOR_INTERVALS and matrix.shape[0] > 1 for matrix in matrices)


def dormant_vs_activity(seeds):
    """Pairs (dormant ratio, motor activity): each training episode's mean |a_t - a_(t-1)| with the
    last actor dormant ratio logged at or before the episode's end."""
    pairs = []
    for scalars in seeds.values():
        if "charts/dormant_ratio" not in scalars or "charts/action_change" not in scalars:
            continue
        ratio_steps, ratios = scalars["charts/dormant_ratio"]
        for step, change in zip(*scalars["charts/action_change"], strict=True):
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
    values = np.array([[dict(zip(s.tolist(), v, strict=True))[step] for s, v in series] for step in steps])
    return np.array(steps), values


def number(value):
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"


def seeds_cell(seeds, metric, budget):
    """'mean (lowest-highest)' over the seeds that reached `budget`, with their number if some did not."""
    scores = [score_at(*scalars[metric], budget) for scalars in seeds.values() if metric in scalars]
    scores = [score for score in scores if score is not None]
    if not scores:
        return "–"
    cell = f"{number(np.mean(scores))} ({number(min(scores))}–{number(max(scores))})"
    return cell if len(scores) == len(seeds) else f"{cell}, {len(scores)} seeds"


def aggregate_section(runs, budget, args):
    """report.md lines and figures of the rliable aggregates at one budget."""
    import matplotlib.pyplot as plt
    from rliable import library as rly
    from rliable import metrics, plot_utils

    tasks, matrices = score_matrices(runs, budget)
    lines = [f"## Aggregates at {budget:,} frames", ""]
    if not matrices:
        return lines + ["No run has reached this budget.", ""]
    lines += [f"Tasks: {', '.join(tasks)}.", "",
              "| variant | runs x tasks | " + " | ".join(METRICS) + " |", "|---|---|---|---|---|"]  # fmt: skip
    points, intervals = {}, {}
    for variant, scores in matrices.items():
        if enough_for_intervals(scores):
            points[variant], intervals[variant] = interval_estimates(scores, aggregates, args.bootstrap_samples, args.seed)
            cells = [f"{p:.3f} [{low:.3f}, {high:.3f}]" for p, low, high in zip(points[variant], *intervals[variant], strict=True)]
        else:
            cells = [f"{p:.3f}" for p in aggregates(scores)]
        lines.append(f"| {variant} | {scores.shape[0]} x {scores.shape[1]} | " + " | ".join(cells) + " |")
    few = [variant for variant, scores in matrices.items() if not enough_for_intervals(scores)]
    if few:
        lines += ["", f"{', '.join(few)}: too few scores for an interval (fewer than {MIN_SCORES_FOR_INTERVALS} runs x tasks, "
                  "or one run per task): the uncertainty is wide, and a bootstrap over so few scores would look "
                  "falsely narrow. Add seeds or tasks."]  # fmt: skip
    if points:
        # the label sits a fixed distance below the axes, in a figure 0.6 inch per variant tall
        figure, _ = plot_utils.plot_interval_estimates(points, intervals, METRICS, row_height=0.6, xlabel_y_coordinate=-1 / len(points),
                                                       xlabel=f"normalized score at {budget:,} frames")  # fmt: skip
        figure.savefig(os.path.join(args.output, f"aggregates_at_{budget}.png"), dpi=120, bbox_inches="tight")
        plt.close(figure)

    thresholds = np.linspace(0.0, 1.0, 51)
    profiles = {variant: score_distribution(scores, thresholds) for variant, scores in matrices.items()}
    with_intervals = {variant: scores for variant, scores in matrices.items() if enough_for_intervals(scores)}
    np.random.seed(args.seed)
    _, profile_intervals = rly.create_performance_profile(with_intervals, thresholds, custom_profile_func=score_distribution,
                                                          reps=args.bootstrap_samples)  # fmt: skip
    figure, axis = plt.subplots(figsize=(7, 4.5))
    plot_utils.plot_performance_profiles(profiles, thresholds, performance_profile_cis=profile_intervals, ax=axis, legend=True,
                                         xlabel=r"normalized score $\tau$", ylabel=r"fraction of runs with score $> \tau$")  # fmt: skip
    axis.set_title(f"{budget:,} frames")
    figure.savefig(os.path.join(args.output, f"performance_profile_at_{budget}.png"), dpi=120, bbox_inches="tight")
    plt.close(figure)

    lines.append("")
    if args.reference not in matrices:
        return lines + [f"No `{args.reference}` runs at this budget: no probability of improvement (see --reference).", ""]
    lines += [f"| X | P(X > {args.reference}) |", "|---|---|"]
    pair_points, pair_intervals = {}, {}
    for variant, scores in matrices.items():
        if variant == args.reference:
            continue
        pair = [scores, matrices[args.reference]]
        if enough_for_intervals(*pair):
            point, interval = interval_estimates(pair, metrics.probability_of_improvement, args.bootstrap_samples, args.seed)
            low, high = interval[:, 0]
            pair_points[f"{variant},{args.reference}"], pair_intervals[f"{variant},{args.reference}"] = point, (low, high)
            lines.append(f"| {variant} | {point:.3f} [{low:.3f}, {high:.3f}] |")
        else:
            lines.append(f"| {variant} | {metrics.probability_of_improvement(*pair):.3f} |")
    if pair_points:
        figure, axis = plt.subplots(figsize=(4.5, 0.6 + 0.5 * len(pair_points)))
        plot_utils.plot_probability_of_improvement(pair_points, pair_intervals, ax=axis, xticks=[0.0, 0.25, 0.5, 0.75, 1.0],
                                                   xlabel=f"P(X > Y) at {budget:,} frames")  # fmt: skip
        figure.savefig(os.path.join(args.output, f"probability_of_improvement_at_{budget}.png"), dpi=120, bbox_inches="tight")
        plt.close(figure)
    return lines + [""]


def check_args(args):
    if not os.path.isdir(args.runs_dir):
        sys.exit(f"report.py: no directory {args.runs_dir}")
    if args.baseline_curves is not None and not os.path.isdir(args.baseline_curves):
        sys.exit(f"report.py: --baseline-curves: no directory {args.baseline_curves}")
    if not args.budgets or min(args.budgets) <= 0:
        sys.exit(f"report.py: --budgets must be positive frame counts (got {args.budgets})")
    if args.bootstrap_samples < 1:
        sys.exit(f"report.py: --bootstrap-samples must be >= 1 (got {args.bootstrap_samples})")


if __name__ == "__main__":
    args = tyro.cli(Args)
    check_args(args)
    baseline = load_baseline_curves(args.baseline_curves) if args.baseline_curves else {}
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("report.py: the figures need matplotlib: pip install -r requirements-experiments.txt")
    try:
        from rliable import library, plot_utils  # noqa: F401
    except ImportError:
        sys.exit("report.py: the statistics need rliable: pip install -r requirements-experiments.txt")
    runs = load_runs(args.runs_dir)
    if not runs:
        sys.exit(f"report.py: no run directories named env__variant__seed__time in {args.runs_dir}")
    os.makedirs(args.output, exist_ok=True)
    env_ids = sorted({env_id for env_id, _ in runs})

    lines = ["# Experiment report", "", f"Runs: `{args.runs_dir}`.", "",
             "Normalized score of a run: its success rate where it logs one (Adroit, Meta-World), else its return / "
             f"{DMC_MAX_RETURN:.0f} (DMC), at the last evaluation at or before the budget. Aggregates over runs x tasks "
             f"with rliable: 95% stratified bootstrap intervals ({args.bootstrap_samples} resamples, seed {args.seed}).",
             ""]  # fmt: skip
    if args.baseline_curves:
        covered = [env_id for env_id in env_ids if baseline_for(baseline, env_id)]
        lines += [f"{BASELINE}: curves of {', '.join(covered) or 'none of these tasks'} from `{args.baseline_curves}`.", ""]
    for budget in args.budgets:
        lines += aggregate_section(runs, budget, args)

    for env_id in env_ids:
        variants = {variant: runs[env_id, variant] for e, variant in sorted(runs) if e == env_id}
        has_success = any("eval/success_rate" in s for seeds in variants.values() for s in seeds.values())
        for metric in ["eval/episodic_return"] + (["eval/success_rate"] if has_success else []):
            header = "| variant | seeds | " + " | ".join(f"{budget:,}" for budget in args.budgets) + " |"
            lines += [f"## {env_id}: {metric} at frame budgets", "", "mean over seeds (lowest–highest seed)", "",
                      header, "|---|---|" + "---|" * len(args.budgets)]  # fmt: skip
            figure, axis = plt.subplots(figsize=(6, 4))
            published = baseline_for(baseline, env_id) if metric == "eval/episodic_return" else None
            # the published curves run to 1M frames or more: show them only as far as these runs or budgets go
            last_evaluations = [scalars[metric][0][-1] for seeds in variants.values() for scalars in seeds.values() if metric in scalars]
            shown_until = max([*args.budgets, *last_evaluations])
            for variant, seeds in {**variants, **({BASELINE: published} if published else {})}.items():
                cells = [seeds_cell(seeds, metric, budget) for budget in args.budgets]
                lines.append(f"| {variant} | {len(seeds)} | " + " | ".join(cells) + " |")
                steps, values = common_grid(seeds, metric)
                if variant == BASELINE:
                    shown = steps <= shown_until
                    steps, values = steps[shown], values[shown]
                if len(steps):
                    style = dict(color="black", linestyle="--") if variant == BASELINE else {}
                    line = axis.plot(steps, values.mean(axis=1), label=variant, **style)[0]
                    axis.fill_between(steps, values.min(axis=1), values.max(axis=1), color=line.get_color(), alpha=0.15)
            axis.set(xlabel="env frames", ylabel=metric, title=f"{env_id} (mean and range over seeds)")
            axis.legend()
            figure.savefig(os.path.join(args.output, f"{env_id}_{metric.replace('/', '_')}.png"), dpi=120, bbox_inches="tight")
            plt.close(figure)
            lines.append("")

        # DrM's internal signals over training, per variant (mean over seeds): the actor's dormant ratio that
        # drives them, the critic's and V's beside it, the exploration std and λ
        signals = [
            "charts/dormant_ratio",
            "charts/dormant_ratio_critic",
            "charts/dormant_ratio_value",
            "charts/exploration_std",
            "charts/lambda",
        ]
        figure, axes = plt.subplots(1, len(signals), figsize=(5 * len(signals), 4))
        for axis, tag in zip(axes, signals, strict=True):
            for variant, seeds in variants.items():
                steps, values = common_grid(seeds, tag)
                if len(steps):
                    axis.plot(steps, values.mean(axis=1), label=variant)
            axis.set(xlabel="env frames", title=f"{env_id}: {tag}")
            axis.locator_params(axis="x", nbins=5)
        axes[0].legend()
        figure.savefig(os.path.join(args.output, f"{env_id}_drm_signals.png"), dpi=120, bbox_inches="tight")
        plt.close(figure)

        # does a falling dormant ratio go with more active exploration?
        lines += [f"## {env_id}: actor dormant ratio vs motor activity (mean |a_t - a_(t-1)| per episode)", "",
                  "| variant | episodes | Pearson r |", "|---|---|---|"]  # fmt: skip
        figure, axis = plt.subplots(figsize=(6, 4))
        for variant, seeds in variants.items():
            pairs = dormant_vs_activity(seeds)
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
