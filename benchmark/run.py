"""Run an experiment grid of one script: env ids x seeds x variants, locally with parallel workers or
on a Slurm cluster through submitit. Each run is named `{env_id}__{variant}__{seed}__{time}` under
`{output_dir}/runs`, which `benchmark/report.py` reads.

    python benchmark/run.py --env-ids walker-walk cheetah-run --seeds 1 2 3 --workers 2 --dry-run
    python benchmark/run.py --script drm_metaworld.py --env-ids coffee-push --launcher slurm \\
        --extra-flags="--cuda" --sweep "threshold-0.05=--dormant-threshold 0.05"
"""
import itertools
import os
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
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
    """flags appended to every command, e.g. `--total-frames 500000 --cuda`"""
    output_dir: str = "experiments"
    """working directory of the runs: runs/, videos/ and logs/ go there"""
    launcher: Literal["local", "slurm"] = "local"
    """`local`: parallel subprocesses on this machine; `slurm`: one array job through submitit"""
    workers: int = 1
    """local runs at a time (each gets its share of the CPU threads)"""
    dry_run: bool = False
    """print the commands and exit"""
    slurm_partition: str | None = None
    slurm_timeout_min: int = 4320
    slurm_gpus_per_node: int = 1
    slurm_cpus_per_task: int = 8
    slurm_mem_gb: int = 64


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


def run_logged(name, command, output_dir, env=None):
    """Run one job with its output in `{output_dir}/logs/{name}.log`; returns its exit status."""
    os.makedirs(os.path.join(output_dir, "logs"), exist_ok=True)
    with open(os.path.join(output_dir, "logs", f"{name}.log"), "w") as log:
        return subprocess.run(command, cwd=output_dir, stdout=log, stderr=subprocess.STDOUT, env=env).returncode


def check_variants(args):
    unknown = [name for name in args.variants if name not in VARIANTS]
    if unknown:
        sys.exit(f"run.py: unknown variant(s) {', '.join(unknown)}; valid: {', '.join(VARIANTS)} (or --sweep name=flags)")
    malformed = [entry for entry in args.sweep if "=" not in entry]
    if malformed:
        sys.exit(f"run.py: --sweep entries are `name=flags`, got {', '.join(malformed)}")
    if args.workers < 1:
        sys.exit(f"run.py: --workers must be >= 1 (got {args.workers})")


if __name__ == "__main__":
    args = tyro.cli(Args)
    check_variants(args)
    jobs = expand(args)
    if args.dry_run:
        for _, command in jobs:
            print(shlex.join(command))
        sys.exit(0)
    os.makedirs(args.output_dir, exist_ok=True)

    if args.launcher == "slurm":
        try:
            import submitit
        except ImportError:
            sys.exit("run.py: --launcher slurm needs submitit: pip install -r requirements-experiments.txt")
        executor = submitit.AutoExecutor(folder=os.path.join(args.output_dir, "slurm"))
        executor.update_parameters(
            timeout_min=args.slurm_timeout_min, slurm_partition=args.slurm_partition, gpus_per_node=args.slurm_gpus_per_node,
            cpus_per_task=args.slurm_cpus_per_task, mem_gb=args.slurm_mem_gb, name="drm",
        )  # fmt: skip
        names, commands = zip(*jobs)
        submitted = executor.map_array(run_logged, names, commands, [args.output_dir] * len(jobs))
        print(f"submitted {len(submitted)} jobs as Slurm array {submitted[0].job_id.split('_')[0]}; logs in {args.output_dir}/logs")
        sys.exit(0)

    # local: split the CPU threads between the workers, so that parallel runs do not oversubscribe the cores
    threads = str(max(1, (os.cpu_count() or 1) // args.workers))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    with ThreadPoolExecutor(args.workers) as pool:
        statuses = list(pool.map(lambda job: run_logged(*job, args.output_dir, env), jobs))
    failed = [name for (name, _), status in zip(jobs, statuses) if status != 0]
    print(f"{len(jobs) - len(failed)} of {len(jobs)} runs finished; logs in {args.output_dir}/logs")
    if failed:
        sys.exit(f"run.py: failed: {', '.join(failed)}")
