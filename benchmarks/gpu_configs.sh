#!/usr/bin/env bash
# Issue 35 §1 on one GPU: every shipped config through the real CLI in miniature (benchmarks/gpu_configs.py),
# then the CUDA-only agreement tests. Wheels for what the GPU image lacks in wheels/ (docs/performance.md).
#   OUT=benchmarks/results bash benchmarks/gpu_configs.sh        # a user with one GPU: the same command
set -u -o pipefail
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
source "$(dirname "$0")/session_lib.sh"
device_env  # and CARD
{
    device_header
    python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', \
triton.__version__, torch.cuda.get_device_name())"
    python3 -c "from importlib.metadata import version as v; print(*[f'{p} {v(p)}' for p in ('deepspeed', 'mamba_ssm', \
'diffusers', 'transformers', 'omegaconf', 'av')])"
    timeout "${CONFIGS_LIMIT:-480}" python3 benchmarks/gpu_configs.py --work /tmp/megassm_gpu_configs \
        --out "$OUT/gpu_configs_$CARD.json"
    echo "gpu_configs exit $?"
    if [[ ${GPU_TESTS:-1} == 1 ]]; then timeout "${TESTS_LIMIT:-90}" python3 -m pytest -q -x tests/gpu -p no:cacheprovider; fi
} 2>&1 | tee "$OUT/gpu_configs_$CARD.log"
