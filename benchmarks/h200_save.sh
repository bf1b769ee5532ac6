#!/bin/bash
# Issue 27 on one H200 host: checkpoint save time and size against model size, synchronous and
# non-blocking (bench_init.py's save phase on the GPU: ZeRO-3 bf16, AdamW, one rank), written to the
# host's local disk. Run by the device tool from the repository root with the wheels carried in .whl/.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 2
export TORCH_EXTENSIONS_DIR=/tmp/torch_ext PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
df -h /tmp | tail -1
note="one NVIDIA H200 host (16 CPU cores, 128 GiB), nothing else running; checkpoint on the host's /tmp"
for size in "1024 8" "2048 16" "2560 16"; do
  set -- $size
  rm -rf /tmp/megassm_bench_init
  timeout 280 python3 benchmarks/bench_init.py --device cuda --world 1 --d-model "$1" --blocks "$2" \
    --phases save,resume --ckpt /tmp/megassm_bench_init/ckpt --note "$note" --out "$OUT/save_h200.json" 2>&1 \
    | grep -v -i "warn" | tail -4
  du -sh /tmp/megassm_bench_init/ckpt/bench 2>/dev/null
done
