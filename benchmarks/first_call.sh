#!/usr/bin/env bash
# A session's first device call, in the order of what each part settles, under one deadline (device time is
# scarce: a call may be the session's only one). Each part runs under the smaller of its cap and what is left.
#   1. sample_video  issue 35 §2: `megassm sample` at full size, 360p x 129 frames (keeps its encoders and
#                    checkpoint under /tmp/fsc for part 2)
#   2. sample_image  the same at 2048 x 2048 (reuses them; removes /tmp/fsc afterwards)
#   3. memdiag       issue 34: stage 3's shape at depth 2, compiled vs eager, live memory by allocating site
#                    (what a compiled block keeps that eager does not; bench_step.py's *_memdiag variants)
#   4. tests         tests/gpu/test_block_cuda.py + test_speed_cuda.py (compiled vs eager, SDPA's kernel, FP8)
#
#   OUT=$OUT DEADLINE=580 bash benchmarks/first_call.sh          (PARTS="memdiag tests" picks parts)
set -u -o pipefail
OUT=${OUT:-benchmarks/results}
DEADLINE=${DEADLINE:-580}
mkdir -p "$OUT"
source "$(dirname "$0")/session_lib.sh"  # device_env; section NAME CAP CMD...
device_env
export OMP_NUM_THREADS=4 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
{
    device_header
    for p in ${PARTS:-sample_video sample_image memdiag tests}; do
        case $p in
            sample_video) section sample_video 330 python3 benchmarks/full_size_sample_cli.py --work /tmp/fsc --keep \
                              --only stage3_video_360p_129f --out "$OUT/full_size_sample_cli_video_$CARD.json" ;;
            sample_image) section sample_image 240 python3 benchmarks/full_size_sample_cli.py --work /tmp/fsc \
                              --only stage2_2k_image --out "$OUT/full_size_sample_cli_image_$CARD.json" ;;
            memdiag) section memdiag 240 python3 benchmarks/bench_step.py --seq-lens 29040 --depth 2 --steps 3 \
                         --tag memdiag --variants compile_memdiag,today_memdiag --attention-variants "" --out "$OUT" ;;
            tests) section tests 200 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_block_cuda.py \
                       tests/gpu/test_speed_cuda.py ;;
            *) echo "first_call.sh: unknown part '$p'; parts: sample_video sample_image memdiag tests" ;;
        esac
    done
    echo "==== done t=${SECONDS}s"
} 2>&1 | tee "$OUT/first_call_${CARD:-nocard}.log"
