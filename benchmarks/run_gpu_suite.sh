#!/usr/bin/env bash
# One device call: install the carried wheels, print the environment, then run the named sections
# (tests check layers step), each under its own time limit, writing into $OUT (default
# benchmarks/results). Usage: bash benchmarks/run_gpu_suite.sh tests check layers
set -u
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
# compile caches (docs/performance.md, "Cold start and the compile caches"): one root for Triton and Inductor
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/megassm-cache/triton} \
    TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/megassm-cache/inductor}
export TRITON_CACHE_AUTOTUNING=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4 PYTHONPATH=$PWD:$PWD/.ref${PYTHONPATH:+:$PYTHONPATH}
LOG=$OUT/log.txt
{
  if ls wheels/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile wheels/*.whl 2>&1 | grep -v "^WARNING" | tail -3
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,temperature.gpu --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', \
triton.__version__, torch.cuda.get_device_name(), torch.cuda.device_count())"
  python3 -c "from importlib.metadata import version as v; print('mamba_ssm', v('mamba_ssm'), 'deepspeed', \
v('deepspeed'), 'numpy', v('numpy'))"
} 2>&1 | tee -a "$LOG"
for section in "$@"; do
  echo "==== $section $(date -u +%T)" | tee -a "$LOG"
  case $section in
    tests)  timeout "${TESTS_TIMEOUT:-220}" python3 -m pytest -q -p no:cacheprovider --durations=8 ${TESTS_ARGS:-tests/unit/ops tests/gpu tests/unit/test_plan.py} ;;
    check)  timeout "${CHECK_TIMEOUT:-130}" python3 benchmarks/gpu_check.py --out "$OUT" ;;
    layers) timeout "${LAYERS_TIMEOUT:-200}" python3 benchmarks/bench_layers.py --profile --out "$OUT" ${LAYERS_ARGS:-} ;;
    step)   timeout "${STEP_TIMEOUT:-400}" python3 benchmarks/bench_step.py --out "$OUT" ${STEP_ARGS:-} ;;
    *) echo "unknown section $section" ;;
  esac 2>&1 | tee -a "$LOG"
  echo "==== $section exit ${PIPESTATUS[0]} $(date -u +%T)" | tee -a "$LOG"
done
