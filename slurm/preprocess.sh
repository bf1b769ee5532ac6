#!/bin/bash
# megassm preprocessing: encode images/videos + captions into latent shards with the VAE and
# text encoder (docs/architecture.md §5), one `megassm preprocess` task per GPU; each task takes
# its share of the input (RANK / WORLD_SIZE) and the last one to finish writes the manifest.
#
#   sbatch slurm/preprocess.sh --input /data/imgs --output /lustre/lat256 \
#       --vae /models/vae --text-encoder /models/t5-v1_1-xxl --resolution 256
#   sbatch slurm/preprocess.sh --input /data/clips.jsonl --output /lustre/lat360p \
#       --vae /models/wan2.1-vae --text-encoder /models/umt5-xxl \
#       --resolution 352x640 --frames 129 --fps 16 --num-workers 8
#
# Arguments go to `megassm preprocess` (see `megassm preprocess --help`). Resources:
# sbatch options on the command line win over the #SBATCH lines below.
#
# Preemption: re-running the same command keeps finished shards, so on SIGUSR1 (60 s
# before the time limit, or `scancel --signal=USR1 --batch JOBID`) the job requeues itself
# at once and redoes only unfinished shards.
#
# Environment: MEGASSM_ENV_SETUP, MEGASSM_SRUN_ARGS, MEGASSM_PYTHON, ...: see
# slurm/common.sh and docs/cluster.md. CPU run (tiny encoders, 2 tasks):
#   sbatch --nodes=1 --ntasks-per-node=2 --cpus-per-task=1 --gpus-per-node=0 --time=30 \
#     slurm/preprocess.sh --device cpu --num-workers 0 --input ... --output ... --vae ... --text-encoder ...
#
#SBATCH --job-name=megassm-preprocess
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@60
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm/logs/%x-%j.out

# sbatch runs a spool copy of this file: find the checkout from the submitted path.
_root=${MEGASSM_ROOT:-$(scontrol show job "${SLURM_JOB_ID:-0}" 2>/dev/null | sed -n 's|^ *Command=\(/.*\)/slurm/[^/ ]*$|\1|p')}
source "${_root:-${SLURM_SUBMIT_DIR:-.}}/slurm/common.sh" || exit 2
megassm_preprocess "$@"
