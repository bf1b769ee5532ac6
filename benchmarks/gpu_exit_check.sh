#!/usr/bin/env bash
# How `megassm train` ends on a GPU (NCCL process group, world 1), through the real CLI: megassm.cli.entry ->
# end_process (docs/architecture.md §6.4). Three runs of configs/smoke.yaml, each must exit as stated with no
# "terminate called" in its output:
#   plain      python -m megassm train, 12 steps                                  -> exit 0, final checkpoint
#   torchrun   the same under torchrun (the launcher the stage scripts use)       -> exit 0
#   sigusr1    torchrun, SIGUSR1 to the worker after its first step              -> checkpoint on signal, exit 0
#   OUT=$OUT bash benchmarks/gpu_exit_check.sh          (wheels/ as docs/performance.md says; ~4 min on a fresh machine:
#   the first run compiles the Triton kernels: it took 118 s on an H100 on 2026-12-07, the second 31 s)
set -u -o pipefail
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
source "$(dirname "$0")/session_lib.sh"
device_env
log=$OUT/gpu_exit_check_${CARD:-nocard}.log
common=(configs/smoke.yaml train.steps=12 train.ckpt_every=6 train.progress_bar=false train.log_every=1
        train.sample_every=100000)
check() {  # NAME EXPECTED_RC RC OUTPUT_FILE SECONDS
    local verdict=ok
    [[ $3 == "$2" ]] || verdict="FAILED (exit $3, expected $2)"
    grep -q "terminate called" "$4" && verdict="FAILED (terminate called)"
    echo "== $1: $verdict in $5 s; $(grep -c 'megassm.train' "$4") log lines; last: $(grep 'megassm.train' "$4" | tail -1 | cut -c1-160)"
}
{
    device_header
    t0=$SECONDS
    timeout 150 python3 -m megassm train "${common[@]}" run_dir=/tmp/gx/plain >/tmp/gx_plain.txt 2>&1
    check plain 0 $? /tmp/gx_plain.txt $((SECONDS - t0))
    t0=$SECONDS
    timeout 120 torchrun --standalone --nproc_per_node=1 -m megassm train "${common[@]}" run_dir=/tmp/gx/torchrun \
        >/tmp/gx_torchrun.txt 2>&1
    check torchrun 0 $? /tmp/gx_torchrun.txt $((SECONDS - t0))
    t0=$SECONDS
    timeout 150 torchrun --standalone --nproc_per_node=1 -m megassm train "${common[@]}" train.steps=100000 \
        run_dir=/tmp/gx/sigusr1 >/tmp/gx_sig.txt 2>&1 &
    launcher=$!
    for _ in $(seq 1200); do grep -q "Hydra mixers:" /tmp/gx_sig.txt && break; sleep 0.1; done
    for p in $(pgrep -f "run_dir=/tmp/gx/sigusr1"); do  # the worker: torchrun gave it LOCAL_RANK
        tr '\0' '\n' <"/proc/$p/environ" 2>/dev/null | grep -qx "LOCAL_RANK=0" && kill -USR1 "$p" && echo "SIGUSR1 -> $p"
    done
    wait "$launcher"
    check sigusr1 0 $? /tmp/gx_sig.txt $((SECONDS - t0))
    grep -h "checkpoint written on signal\|written (final)" /tmp/gx_*.txt
} 2>&1 | tee "$log"
