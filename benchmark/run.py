"""Run an experiment grid of one script: env ids x seeds x variants, as a submitit job array, on
this machine (`--launcher local`, submitit's local executor) or on a Slurm cluster (`--launcher
slurm`) with the same code. Each run writes `{output_dir}/runs/{env_id}__{variant}__{seed}__{time}`
(read by `benchmark/report.py`), its output goes to `{output_dir}/logs/{env_id}__{variant}__{seed}.log`
and submitit's own files (pickled jobs, wrapper logs) to `{output_dir}/submitit`.

    python benchmark/run.py --env-ids walker-walk cheetah-run --seeds 1 2 3 --workers 2 --dry-run
    python benchmark/run.py --script drm_metaworld.py --env-ids coffee-push --launcher slurm \\
        --slurm-partition gpu --sweep "threshold-0.05=--dormant-threshold 0.05"
"""
import itertools
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Literal

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the ablations of the three DrM mechanisms; drqv2 switches all three off
VARIANTS = {
    "drm": [],
    "no-perturb": ["--no-perturb"],
    "linear-exploration": ["--exploration", "linear"],
    "no-exploit": ["--no-exploit"],
    "drqv2": ["--no-perturb", "--exploration", "linear", "--no-exploit"],
}


@dataclass
class Args:
    env_ids: list[str]
    """tasks of the script, e.g. walker-walk cheetah-run"""
    script: Literal["drm.py", "drm_adroit.py", "drm_metaworld.py"] = "drm.py"
    """the training script"""
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    """variants to run, from: drm, no-perturb, linear-exploration, no-exploit, drqv2"""
    sweep: list[str] = field(default_factory=list)
    """extra variants as `name=flags`, e.g. `threshold-0.05=--dormant-threshold 0.05`"""
    extra_flags: str = ""
    """flags appended to every command, e.g. `--total-frames 500000 --no-cuda`"""
    output_dir: str = "experiments"
    """working directory of the runs: runs/, videos/, logs/ and submitit/ go there"""
    launcher: Literal["local", "slurm"] = "local"
    """`local`: the job array runs on this machine (submitit's local executor); `slurm`: it is submitted to Slurm"""
    workers: int = 1
    """local only: runs at a time (each gets its share of the CPU threads); on Slurm every run is its own array task"""
    timeout_min: int = 4320
    """time limit of one run in minutes (Slurm's --time; locally, a worker's limit is this times its number of runs)"""
    dry_run: bool = False
    """print the commands and exit"""
    slurm_partition: str | None = None
    """Slurm partition (None: the cluster's default)"""
    slurm_gpus_per_node: int = 1
    """GPUs of each run"""
    slurm_cpus_per_task: int = 8
    """CPU cores of each run, also its OMP_NUM_THREADS"""
    slurm_mem_gb: int = 64
    """host memory of each run"""
    slurm_options: list[str] = field(default_factory=list)
    """more sbatch options as `key=value`, e.g. `account=my-lab qos=high constraint=a100`"""


def expand(args):
    """(name, command) of every run of the grid."""
    variants = {name: VARIANTS[name] for name in args.variants}
    for entry in args.sweep:
        name, _, flags = entry.partition("=")
        variants[name] = shlex.split(flags)
    jobs = []
    for env_id, variant, seed in itertools.product(args.env_ids, variants, args.seeds):
        command = [sys.executable, os.path.join(ROOT, args.script), "--env-id", env_id, "--seed", str(seed),
                   "--exp-name", variant, *variants[variant], *shlex.split(args.extra_flags)]  # fmt: skip
        jobs.append((f"{env_id}__{variant}__{seed}", command))
    return jobs


def run_logged(runs, output_dir, env_changes):
    """One task of the job array: run the (name, command) pairs one after another in `output_dir`,
    each with its output in `{output_dir}/logs/{name}.log`; returns their exit statuses.
    `env_changes` sets variables of the runs' environment (None: unset it)."""
    env = {key: value for key, value in {**os.environ, **env_changes}.items() if value is not None}
    os.makedirs(os.path.join(output_dir, "logs"), exist_ok=True)
    statuses = []
    for name, command in runs:
        with open(os.path.join(output_dir, "logs", f"{name}.log"), "w") as log:
            statuses.append(subprocess.run(command, cwd=output_dir, stdout=log, stderr=subprocess.STDOUT, env=env).returncode)
    return statuses


def check_args(args):
    unknown = [name for name in args.variants if name not in VARIANTS]
    if unknown:
        sys.exit(f"run.py: unknown variant(s) {', '.join(unknown)}; valid: {', '.join(VARIANTS)} (or --sweep name=flags)")
    malformed = [entry for entry in args.sweep if "=" not in entry]
    if malformed:
        sys.exit(f"run.py: --sweep entries are `name=flags`, got {', '.join(malformed)}")
    malformed = [entry for entry in args.slurm_options if "=" not in entry]
    if malformed:
        sys.exit(f"run.py: --slurm-options entries are `key=value`, got {', '.join(malformed)}")
    if args.workers < 1:
        sys.exit(f"run.py: --workers must be >= 1 (got {args.workers})")
    if args.timeout_min < 1:
        sys.exit(f"run.py: --timeout-min must be >= 1 (got {args.timeout_min})")


if __name__ == "__main__":
    args = tyro.cli(Args)
    check_args(args)
    jobs = expand(args)
    if args.dry_run:
        for _, command in jobs:
            print(shlex.join(command))
        sys.exit(0)
    try:
        import submitit
    except ImportError:
        sys.exit("run.py: the launcher needs submitit: pip install -r requirements-experiments.txt")
    if args.launcher == "slurm" and not (shutil.which("sbatch") and shutil.which("srun")):
        sys.exit("run.py: --launcher slurm needs Slurm's sbatch and srun on the PATH (run it where you submit Slurm jobs)")
    output_dir = os.path.abspath(args.output_dir)  # the jobs may start in another directory

    if args.launcher == "slurm":
        groups = [[job] for job in jobs]
        env_changes = {"OMP_NUM_THREADS": str(args.slurm_cpus_per_task), "MKL_NUM_THREADS": str(args.slurm_cpus_per_task)}
    else:
        # one array task per worker, each running its share of the grid, so that at most `workers`
        # runs share this machine; they split its CPU threads instead of oversubscribing the cores
        groups = [jobs[worker :: args.workers] for worker in range(min(args.workers, len(jobs)))]
        threads = str(max(1, (os.cpu_count() or 1) // len(groups)))
        # submitit's local executor hides every GPU (CUDA_VISIBLE_DEVICES=""): the runs get those this shell sees
        env_changes = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
                       "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES")}  # fmt: skip
    executor = submitit.AutoExecutor(folder=os.path.join(output_dir, "submitit"), cluster=args.launcher)
    # the slurm_* parameters apply only on Slurm
    executor.update_parameters(
        name="drm", timeout_min=args.timeout_min * max(len(group) for group in groups),
        slurm_partition=args.slurm_partition, slurm_gpus_per_node=args.slurm_gpus_per_node,
        slurm_cpus_per_task=args.slurm_cpus_per_task, slurm_mem_gb=args.slurm_mem_gb,
        slurm_additional_parameters=dict(entry.split("=", 1) for entry in args.slurm_options),
    )  # fmt: skip
    submitted = executor.map_array(run_logged, groups, [output_dir] * len(groups), [env_changes] * len(groups))
    if args.launcher == "slurm":
        print(f"submitted {len(jobs)} runs as Slurm array {submitted[0].job_id.split('_')[0]}; "
              f"logs in {output_dir}/logs, runs in {output_dir}/runs")  # fmt: skip
        sys.exit(0)

    statuses = [status for job in submitted for status in job.result()]
    names = [name for group in groups for name, _ in group]
    failed = [name for name, status in zip(names, statuses) if status != 0]
    print(f"{len(jobs) - len(failed)} of {len(jobs)} runs finished; logs in {output_dir}/logs, runs in {output_dir}/runs")
    if failed:
        sys.exit(f"run.py: failed: {', '.join(failed)} (see their logs)")
