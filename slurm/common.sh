# shellcheck shell=bash
# Shared launcher for megassm's sbatch scripts (sourced by them, never run on its own).
#
#   megassm_train CONFIG [key=value ...]     one training task per GPU (stage*.sh)
#   megassm_preprocess [ARGS ...]            one `megassm preprocess` task per GPU
#
# Each runs, inside the allocation,
#   srun --kill-on-bad-exit=1 [--cpus-per-task=N] $MEGASSM_SRUN_ARGS <rank shim> \
#       $MEGASSM_PYTHON -m megassm train CONFIG run_dir=RUN_DIR $MEGASSM_EXTRA_OVERRIDES "$@"
# with MASTER_ADDR / MASTER_PORT / WORLD_SIZE exported and RANK / LOCAL_RANK set per task
# from SLURM_PROCID / SLURM_LOCALID.
#
# Preemption (docs/architecture.md §6, §7; docs/cluster.md). The batch shell traps
#   USR1  sent by `--signal=B:USR1@<s>` before the time limit, or by
#         `scancel --signal=USR1 --batch JOBID`: forwarded to the tasks through srun; the
#         trainer writes a checkpoint and exits 0 (still starting up -- building the model,
#         loading the resume checkpoint --: exits 0 when training would start, writing
#         nothing); then `scontrol requeue`. The requeued
#         job keeps its job id, hence its run directory, and the trainer resumes from
#         RUN_DIR/checkpoints/latest. Preprocessing is requeued at once (re-running it
#         keeps finished shards).
#   TERM  preemption, scancel, time limit: forwarded the same way (checkpoint and exit)
#         but not requeued: SLURM requeues a preempted --requeue job by itself, and a
#         user's scancel must stay final.
#
# Environment (all optional; docs/cluster.md has the full table):
#   MEGASSM_ENV_SETUP        shell code eval'ed first, e.g. "source /opt/venvs/megassm/bin/activate"
#   MEGASSM_ROOT             checkout to run from (default: the one holding this file)
#   MEGASSM_PYTHON           python executable (default: python)
#   MEGASSM_RUN_DIR          run directory (default: $MEGASSM_RUNS/<job name>-<job id>)
#   MEGASSM_RUNS             parent of per-job run directories (default: $MEGASSM_ROOT/runs)
#   MEGASSM_EXTRA_OVERRIDES  config overrides (key=value, space/newline separated) before "$@"
#   MEGASSM_DEVICE           "cpu": the trainer uses CPU + gloo even where CUDA exists (passed through)
#   MEGASSM_MASTER_ADDR      rendezvous host (default: first node of the allocation)
#   MEGASSM_MASTER_PORT      rendezvous port (default: 10000 + job id % 50000, next free one)
#   MEGASSM_SRUN_ARGS        extra srun options, e.g. "--container-image=... --cpu-bind=none"
#   MEGASSM_SIGNAL_GRACE     seconds the tasks get to checkpoint after USR1 before the job
#                            is requeued anyway; set, it overrides the derived grace below
#   MEGASSM_GRACE_FALLBACK   the grace before this run has saved once (default 240; the stage
#                            scripts set `megassm plan`'s value). Otherwise the grace is derived from
#                            the run's last save, RUN_DIR/checkpoints/save_stats.json:
#                            1.5 x (t_step + S / B) rounded up to 30 s (megassm/grace.py)
#   MEGASSM_SIGNAL_LEAD      the --signal lead in seconds (default 600, the scripts' #SBATCH
#                            --signal); a grace above lead - 60 s is logged as a warning
#   MEGASSM_REQUEUE          1: requeue after USR1 (default); 0: checkpoint and stop
#   MEGASSM_DRY_RUN          1: print the environment and the srun command, run nothing
#   MEGASSM_CACHE_DIR        persistent per-user compile cache root (default: $HOME/.cache/megassm);
#                            TRITON_CACHE_DIR and TORCHINDUCTOR_CACHE_DIR default to subfolders of it
#                            and TRITON_CACHE_AUTOTUNING=1, so only a job's first start autotunes
#                            (docs/performance.md: ~119 s cold vs ~28 s warm to the first step on an H200)

set -uo pipefail

_megassm_log() { echo "[megassm-slurm $(date '+%F %T')] $*"; }
_megassm_die() { _megassm_log "error: $*" >&2; exit 2; }

# --- setup ----------------------------------------------------------------------------
_megassm_setup() {
    if [[ -n ${MEGASSM_ENV_SETUP:-} ]]; then
        eval "$MEGASSM_ENV_SETUP" || _megassm_die "MEGASSM_ENV_SETUP failed: $MEGASSM_ENV_SETUP"
    fi
    # The stage script found this file through the job record (sbatch runs a spool copy of
    # the script); the checkout is this file's parent directory.
    MEGASSM_ROOT=${MEGASSM_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
    cd "$MEGASSM_ROOT" || _megassm_die "cannot cd to MEGASSM_ROOT=$MEGASSM_ROOT"
    if [[ -z ${SLURM_JOB_ID:-} ]]; then
        [[ ${MEGASSM_DRY_RUN:-0} == 1 ]] || _megassm_die "not inside a SLURM job: submit with sbatch (or set MEGASSM_DRY_RUN=1)"
        # Dry run outside SLURM: pretend to be a one-node, one-task job.
        SLURM_JOB_ID=0 SLURM_NTASKS=1 SLURM_JOB_NODELIST=$(hostname -s) SLURM_JOB_NAME=dry-run
        MEGASSM_MASTER_ADDR=${MEGASSM_MASTER_ADDR:-$SLURM_JOB_NODELIST}
    fi
    _megassm_dist_env
    _megassm_nccl_env
    _megassm_cache_env
}

_megassm_cache_env() {
    # Triton's compiled kernels + autotuning results and Inductor's compiled graphs on persistent
    # storage, per user: later jobs (and requeues) skip the 1-2 minutes of autotuning and compiling
    # before the first step. Kernels whose autotuning configs carry a pre_hook (some of mamba-ssm's
    # backward kernels) are still re-timed each start, from cached binaries (a few seconds).
    # The caches are keyed by GPU, driver, Triton and torch versions, so one directory can serve
    # nodes of one kind; set MEGASSM_CACHE_DIR to a node-local or project path if $HOME is slow.
    local root=${MEGASSM_CACHE_DIR:-${HOME:-/tmp}/.cache/megassm}
    export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$root/triton}
    export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$root/inductor}
    export TRITON_CACHE_AUTOTUNING=${TRITON_CACHE_AUTOTUNING:-1}
    [[ ${MEGASSM_DRY_RUN:-0} == 1 ]] || mkdir -p "$TRITON_CACHE_DIR" "$TORCHINDUCTOR_CACHE_DIR" ||
        _megassm_log "warning: cannot create compile cache directories under $root"
}

_megassm_port_in_use() { (: <"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

_megassm_dist_env() {
    # The batch shell runs on the first node of the allocation, which is also rank 0's
    # node: the rendezvous (TCPStore) listens there, so probing ports here is meaningful.
    export MASTER_ADDR=${MEGASSM_MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)}
    if [[ -n ${MEGASSM_MASTER_PORT:-} ]]; then
        export MASTER_PORT=$MEGASSM_MASTER_PORT
    else
        # Stable per job and different for concurrent jobs sharing a node; skip ports in use.
        local port=$((10000 + SLURM_JOB_ID % 50000)) tries=0
        while _megassm_port_in_use "$port" && ((tries++ < 50)); do port=$((port + 1)); done
        export MASTER_PORT=$port
    fi
    export WORLD_SIZE=$SLURM_NTASKS
}

_megassm_nccl_env() {
    # NVLink multicast / NVLS stays off: a program using it can take a shared host's GPUs
    # out of service for a long time; NCCL falls back to its ring/tree all-reduce.
    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
    # A failed or timed-out collective aborts the process instead of hanging until the
    # time limit; srun --kill-on-bad-exit then ends the whole step.
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
    # Network interfaces / IB HCAs are site specific: set NCCL_SOCKET_IFNAME, NCCL_IB_HCA,
    # ... in MEGASSM_ENV_SETUP (docs/cluster.md).
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
    export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
}

# srun command for one task per allocated task slot; the inline shim sets the per-task
# ranks and execs, so the task's process is python itself and srun's signals reach it.
_megassm_srun_cmd() {
    local -a srun_args=()
    # Split on spaces and newlines, without globbing.
    read -r -d '' -a srun_args <<<"${MEGASSM_SRUN_ARGS:-}"
    # srun does not inherit --cpus-per-task from sbatch in every SLURM version; without it
    # each task may be bound to one core and starve its data loader workers.
    [[ -n ${SLURM_CPUS_PER_TASK:-} ]] && srun_args=(--cpus-per-task="$SLURM_CPUS_PER_TASK" "${srun_args[@]}")
    # shellcheck disable=SC2016
    _megassm_cmd=(srun --kill-on-bad-exit=1 "${srun_args[@]}"
        bash -c 'export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID; exec "$@"' megassm-task
        "${MEGASSM_PYTHON:-python}" -m megassm "$@")
}

# --- signals --------------------------------------------------------------------------
_megassm_srun_pid=""
_megassm_signal=""        # USR1 or TERM once one arrived (USR1 wins)
_megassm_interrupted=0    # a trapped signal cut the current `wait` short
_megassm_usr1_action=checkpoint   # checkpoint: forward and wait; requeue: requeue at once

_megassm_on_signal() {
    local sig=$1
    _megassm_interrupted=1
    [[ $sig == USR1 || -z $_megassm_signal ]] && _megassm_signal=$sig
    if [[ $sig == USR1 && $_megassm_usr1_action == requeue && ${MEGASSM_REQUEUE:-1} == 1 ]]; then
        _megassm_log "got SIGUSR1"
        _megassm_requeue
    fi
    _megassm_log "got SIG$sig; forwarding it to the tasks (checkpoint, then exit)"
    if [[ -n $_megassm_srun_pid ]] && kill -0 "$_megassm_srun_pid" 2>/dev/null; then
        kill -"$sig" "$_megassm_srun_pid" 2>/dev/null
    fi
}

# The grace the tasks get after USR1 (sets _megassm_grace_s and logs it with its inputs):
# MEGASSM_SIGNAL_GRACE if set, else derived from the run's measured save rate (megassm/grace.py,
# docs/cluster.md), else MEGASSM_GRACE_FALLBACK; warns when it does not fit the --signal lead.
_megassm_grace_s=${MEGASSM_GRACE_FALLBACK:-240}
_megassm_grace() {
    local run_dir=$1 out="" lead=${MEGASSM_SIGNAL_LEAD:-600} fallback=${MEGASSM_GRACE_FALLBACK:-240}
    local -a explicit=()
    [[ -n ${MEGASSM_SIGNAL_GRACE:-} ]] && explicit=(--explicit "$MEGASSM_SIGNAL_GRACE")
    out=$("${MEGASSM_PYTHON:-python}" -m megassm.grace "$run_dir/checkpoints/save_stats.json" \
        --fallback "$fallback" --lead "$lead" "${explicit[@]}" 2>&1)
    if [[ $out =~ ^([0-9]+)$'\t'(.*)$ ]]; then
        _megassm_grace_s=${BASH_REMATCH[1]}
        _megassm_log "${BASH_REMATCH[2]}"
    else
        _megassm_grace_s=${MEGASSM_SIGNAL_GRACE:-$fallback}
        _megassm_log "warning: could not derive the SIGUSR1 grace (${out:-no output}); using $_megassm_grace_s s"
    fi
}

# Wait for srun, surviving trapped signals (bash's `wait` returns early on each one).
# After USR1 the tasks get _megassm_grace_s seconds to checkpoint and exit; past that
# the job is requeued anyway (which ends the step): after the time limit it could not be.
_megassm_wait_srun() {
    local rc deadline=""
    while :; do
        if [[ $_megassm_signal == USR1 && ${MEGASSM_REQUEUE:-1} == 1 ]]; then
            deadline=${deadline:-$((SECONDS + _megassm_grace_s))}
            while kill -0 "$_megassm_srun_pid" 2>/dev/null; do
                if ((SECONDS >= deadline)); then
                    _megassm_log "tasks still running $_megassm_grace_s s after SIGUSR1"
                    _megassm_requeue
                fi
                sleep 1
            done
        fi
        _megassm_interrupted=0
        wait "$_megassm_srun_pid"
        rc=$?
        ((_megassm_interrupted)) || return "$rc"
    done
}

_megassm_requeue() {
    _megassm_log "requeueing job $SLURM_JOB_ID (restart $((${SLURM_RESTART_COUNT:-0} + 1)))"
    # Requeueing a running job ends it, this shell included; the exit is for the failure path.
    scontrol requeue "$SLURM_JOB_ID" && exit 0
    _megassm_log "error: scontrol requeue $SLURM_JOB_ID failed; submit the job again to resume" >&2
    exit 1
}

# Run "${_megassm_cmd[@]}" in the background and wait; sets _megassm_rc.
_megassm_run() {
    _megassm_log "job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}: $SLURM_NTASKS tasks on $SLURM_JOB_NODELIST," \
        "MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT device=${MEGASSM_DEVICE:-auto}"
    _megassm_log "command: $(printf '%q ' "${_megassm_cmd[@]}")"
    if [[ ${MEGASSM_DRY_RUN:-0} == 1 ]]; then exit 0; fi
    trap '_megassm_on_signal USR1' USR1
    trap '_megassm_on_signal TERM' TERM
    "${_megassm_cmd[@]}" &
    _megassm_srun_pid=$!
    # A signal that came during setup, before srun existed, is acted on now.
    [[ -n $_megassm_signal ]] && _megassm_on_signal "$_megassm_signal"
    _megassm_wait_srun
    _megassm_rc=$?
    _megassm_log "tasks exited with code $_megassm_rc"
}

# --- entry points ---------------------------------------------------------------------
# megassm_train CONFIG [key=value ...]
megassm_train() {
    local config=$1 arg
    shift
    for arg in "$@"; do
        [[ $arg == run_dir=* ]] && _megassm_die "set the run directory with MEGASSM_RUN_DIR=..., not '$arg' (the launcher needs it to resume)"
    done
    _megassm_setup
    [[ -f $config ]] || _megassm_die "config '$config' not found under MEGASSM_ROOT=$MEGASSM_ROOT"

    # One directory per job id: a requeued job keeps its id, finds its checkpoints there
    # and resumes. Array tasks get one each.
    local id=$SLURM_JOB_ID run_dir
    [[ -n ${SLURM_ARRAY_JOB_ID:-} ]] && id=${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}
    run_dir=${MEGASSM_RUN_DIR:-${MEGASSM_RUNS:-$MEGASSM_ROOT/runs}/${SLURM_JOB_NAME:-megassm}-$id}
    _megassm_log "run dir: $run_dir"
    if [[ ${MEGASSM_DRY_RUN:-0} != 1 ]]; then
        mkdir -p "$run_dir" || _megassm_die "cannot create run directory $run_dir"
        echo "$(date '+%F %T') job=$SLURM_JOB_ID restart=${SLURM_RESTART_COUNT:-0} nodes=$SLURM_JOB_NODELIST tasks=$SLURM_NTASKS" \
            >>"$run_dir/slurm_jobs.log"
    fi

    local -a extra=()
    read -r -d '' -a extra <<<"${MEGASSM_EXTRA_OVERRIDES:-}"
    _megassm_srun_cmd train "$config" "run_dir=$run_dir" "${extra[@]}" "$@"
    _megassm_grace "$run_dir"
    _megassm_usr1_action=checkpoint
    _megassm_run

    if [[ $_megassm_signal == USR1 && ${MEGASSM_REQUEUE:-1} == 1 ]]; then
        if [[ -e $run_dir/DONE ]]; then
            _megassm_log "training finished before the signal took effect; not requeueing"
        elif [[ $_megassm_rc != 0 ]]; then
            _megassm_log "error: tasks failed (code $_megassm_rc) after SIGUSR1; not requeueing a failing run" >&2
        else
            _megassm_log "tasks exited 0 after SIGUSR1; the requeued job resumes from $run_dir/checkpoints/latest"
            _megassm_requeue
        fi
    fi
    exit "$_megassm_rc"
}

# megassm_preprocess [megassm preprocess arguments ...]
megassm_preprocess() {
    _megassm_setup
    _megassm_srun_cmd preprocess "$@"
    _megassm_usr1_action=requeue
    _megassm_run
    exit "$_megassm_rc"
}
