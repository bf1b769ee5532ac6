#!/bin/bash
# megassm stage 3 (video): 360p video (352x640, 129 frames @ 16 fps, 29,040 tokens/sample), HTH-5B
# warm-started from stage 2, ZeRO-3 + Ulysses CP
# (configs/stage3_video.yaml). One task per GPU.
#
#   sbatch slurm/stage3_video.sh [key=value ...]        # from the repository root
#
# Arguments are config overrides for `megassm train`, e.g. init_from=runs/megassm-stage2-2k-1234.
# Resources: sbatch options on the command line win over the #SBATCH lines below
# (sbatch --nodes=4 --time=4:00:00 slurm/stage3_video.sh). Keep --time above the
# --signal lead (600 s).
#
# Preemption: SIGUSR1 arrives 600 s before the time limit (or with
# `scancel --signal=USR1 --batch JOBID`); the tasks checkpoint, the job requeues itself
# and resumes from runs/megassm-stage3-video-JOBID/checkpoints/latest.
#
# Environment: MEGASSM_ENV_SETUP (e.g. "source /opt/venvs/megassm/bin/activate"),
# MEGASSM_RUN_DIR, MEGASSM_RUNS, MEGASSM_EXTRA_OVERRIDES, MEGASSM_DEVICE,
# MEGASSM_SRUN_ARGS, MEGASSM_SIGNAL_GRACE, ...: see slurm/common.sh and docs/cluster.md.
# The SIGUSR1 grace is derived from the run's measured save rate; MEGASSM_SIGNAL_GRACE overrides it.
#
# CPU smoke run of this same script (tiny model, built-in procedural data, 2 gloo ranks):
#   MEGASSM_DEVICE=cpu MEGASSM_EXTRA_OVERRIDES="$(cat slurm/cpu_tiny.overrides)" \
#   sbatch --nodes=1 --ntasks-per-node=2 --cpus-per-task=1 --gpus-per-node=0 --time=30 \
#     slurm/stage3_video.sh train.steps=20
#
#SBATCH --job-name=megassm-stage3-video
#SBATCH --nodes=32
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm/logs/%x-%j.out

: "${MEGASSM_SIGNAL_LEAD:=600}"     # = the #SBATCH --signal lead above (set both to change it)
: "${MEGASSM_GRACE_FALLBACK:=480}"  # before the first save: 5B ZeRO-3 at >= 0.3 GB/s (docs/cluster.md);
                                   # later the grace is derived from the run's measured save rate
# sbatch runs a spool copy of this file: find the checkout from the submitted path.
_root=${MEGASSM_ROOT:-$(scontrol show job "${SLURM_JOB_ID:-0}" 2>/dev/null | sed -n 's|^ *Command=\(/.*\)/slurm/[^/ ]*$|\1|p')}
source "${_root:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh" || exit 2
megassm_train configs/stage3_video.yaml "$@"
