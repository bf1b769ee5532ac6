#!/usr/bin/env bash
# Issue 25's GPU measurements in one device call: install the carried wheels, print the environment,
# then the sections (default: cold warm grad share step), each under its own time limit and all within
# DEADLINE seconds of this script's start; everything is tee'd into $OUT/log.txt.
#
#   cold   benchmarks/cold_start.py --label cold  (empty Triton / Inductor cache directories: also the
#          one throwaway autotuning pass every later section reuses, bf16 is the only dtype used)
#   warm   benchmarks/cold_start.py --label warm  (a second process, same cache directories)
#   grad   benchmarks/hydra_bf16_check.py         (item 1)
#   share  benchmarks/bench_cp_share.py           (item 2)
#   step   benchmarks/bench_step.py --seq-lens $STEP_LENS   (items 3 and 4)
#   tests  pytest $TESTS_ARGS (default tests/gpu): the CUDA-only agreement tests
#
#   OUT=... DEADLINE=525 SECTIONS="cold warm grad share step" bash benchmarks/h200_session.sh
# FRESH=1 (default) empties $CACHE_ROOT first; FRESH=0 keeps it (a follow-up call on a warm machine).
set -u -o pipefail
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
LOG=$OUT/log.txt
DEADLINE=${DEADLINE:-525}
CACHE_ROOT=${CACHE_ROOT:-/tmp/megassm-cache}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4 PYTHONPATH=/tmp/site:$PWD:$PWD/.ref${PYTHONPATH:+:$PYTHONPATH}
export TRITON_CACHE_DIR=$CACHE_ROOT/triton TORCHINDUCTOR_CACHE_DIR=$CACHE_ROOT/inductor TRITON_CACHE_AUTOTUNING=1
[[ ${FRESH:-1} == 1 ]] && rm -rf "$CACHE_ROOT"
mkdir -p "$TRITON_CACHE_DIR" "$TORCHINDUCTOR_CACHE_DIR"

source "$(dirname "$0")/session_lib.sh"  # section NAME CAP CMD...

{
    if ls wheels/*.whl >/dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            wheels/*.whl 2>&1 | grep -v "^WARNING" | tail -3
    fi
    date -u +%FT%TZ
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv
    python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', \
triton.__version__, torch.cuda.get_device_name(), torch.cuda.device_count())"
    python3 -c "from importlib.metadata import version as v; import deepspeed, pydantic, omegaconf; \
print('mamba_ssm', v('mamba_ssm'), 'deepspeed', v('deepspeed'), 'pydantic', v('pydantic'), 'numpy', v('numpy'))" 2>&1 \
        | grep -v "real_accelerator"
    python3 -c "import sys; sys.path.insert(0, 'benchmarks'); from common import gemm_tflops; \
print(f'8192^3 bf16 GEMM {gemm_tflops():.0f} TFLOP/s')"
    echo "TRITON_CACHE_DIR=$TRITON_CACHE_DIR TORCHINDUCTOR_CACHE_DIR=$TORCHINDUCTOR_CACHE_DIR TRITON_CACHE_AUTOTUNING=1"
    for s in ${SECTIONS:-cold warm grad share step}; do
        case $s in
            cold)  section cold 240 python3 benchmarks/cold_start.py --label cold --out "$OUT" ;;
            warm)  section warm 90 python3 benchmarks/cold_start.py --label warm --out "$OUT" ;;
            grad)  section grad 100 python3 benchmarks/hydra_bf16_check.py --out "$OUT" ;;
            share) section share 110 python3 benchmarks/bench_cp_share.py --out "$OUT" ;;
            step)  section step 600 python3 benchmarks/bench_step.py --seq-lens "${STEP_LENS:-29040,16384}" \
                       --steps "${STEP_STEPS:-4}" --out "$OUT" ;;
            tests) section tests 330 python3 -m pytest -q -p no:cacheprovider --durations=10 ${TESTS_ARGS:-tests/gpu} ;;
            *) echo "unknown section $s" ;;
        esac
    done
    nvidia-smi --query-gpu=clocks.sm,temperature.gpu,power.draw --format=csv
} 2>&1 | tee -a "$LOG"
