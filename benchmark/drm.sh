#!/usr/bin/env bash
# The runs behind DrM's published results (Xu et al., ICLR 2024; official code XuGW-Kevin/DrM at
# commit 317116a), for a Slurm cluster: every task with an official config, DrM and the DrQ-v2 mode,
# 4 seeds each (the paper's count), plus the paper's ablations on Adroit. One Slurm array per suite,
# through benchmark/run.py; the report commands are printed at the end.
#
#   benchmark/drm.sh --slurm-partition gpu    # submit (arguments go to every run.py call, last one wins)
#   benchmark/drm.sh --dry-run                # print the 244 training commands, submit nothing
#   PYTHON=.venv/bin/python benchmark/drm.sh  # with another interpreter than the `python` on the PATH
#
# Submitting again continues every run from its checkpoint and skips the finished ones; each run
# checkpoints with its replay every 500,000 frames (1,000,000 on the 30.1M-frame tasks), and a time
# limit or a pre-emption requeues it (docs/experiments.md). State of a suite:
#   python benchmark/run.py --status --output-dir experiments/dmc-hard
#
# Cost: about 9,700 GPU-hours, an ESTIMATE from DrQ-v2's published timings, not a measurement
# (docs/experiments.md gives the assumptions and the per-suite numbers).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
GRID=(--launcher slurm --seeds 1 2 3 4)
BOTH=(--variants drm drqv2)
# DrQ-v2's published curves (git clone https://github.com/facebookresearch/drqv2), for the DMC reports
DRQV2_CURVES="${DRQV2_CURVES:-drqv2/curves}"

# DMC hard, 30.1M frames: a run is estimated at 90 to 115 GPU-hours; it asks for 3 days at a time and
# is requeued at each time limit (a cluster with a shorter limit: pass --timeout-min)
"$PYTHON" benchmark/run.py --script drm.py --output-dir experiments/dmc-hard --timeout-min 4320 \
    --env-ids dog-stand dog-walk dog-trot dog-run humanoid-stand humanoid-walk humanoid-run \
    manipulator-bring_ball acrobot-swingup_sparse "${GRID[@]}" "${BOTH[@]}" "$@"

# DMC medium, 3.1M frames: the tasks with an official DrM config, all of which DrQ-v2 published curves for
"$PYTHON" benchmark/run.py --script drm.py --output-dir experiments/dmc-medium --timeout-min 1440 \
    --env-ids acrobot-swingup cartpole-swingup_sparse cheetah-run hopper-hop quadruped-run quadruped-walk \
    reacher-easy reacher-hard walker-run \
    "${GRID[@]}" "${BOTH[@]}" "$@"

# Adroit, 6.1M frames; the paper's ablations (each mechanism removed) are on these three tasks
"$PYTHON" benchmark/run.py --script drm_adroit.py --output-dir experiments/adroit --timeout-min 2880 \
    --env-ids door hammer pen "${GRID[@]}" "${BOTH[@]}" "$@"
"$PYTHON" benchmark/run.py --script drm_adroit.py --output-dir experiments/adroit --timeout-min 2880 \
    --env-ids door hammer pen "${GRID[@]}" --variants no-perturb linear-exploration no-exploit "$@"

# Meta-World, 2.1M frames: the tasks with an official config (soccer's inherits the DMC schedule and
# cannot run: it is stale)
"$PYTHON" benchmark/run.py --script drm_metaworld.py --output-dir experiments/metaworld --timeout-min 1440 \
    --env-ids assembly coffee-push disassemble stick-pull sweep-into "${GRID[@]}" "${BOTH[@]}" "$@"

cat <<EOF
# when the jobs have finished, the tables and figures:
python benchmark/report.py experiments/dmc-hard/runs --output experiments/dmc-hard/report --budgets 5000000 15000000 30000000 --baseline-curves $DRQV2_CURVES
python benchmark/report.py experiments/dmc-medium/runs --output experiments/dmc-medium/report --budgets 500000 1000000 3000000 --baseline-curves $DRQV2_CURVES
python benchmark/report.py experiments/adroit/runs --output experiments/adroit/report --budgets 1000000 3000000 6000000
python benchmark/report.py experiments/metaworld/runs --output experiments/metaworld/report --budgets 500000 1000000 2000000
EOF
