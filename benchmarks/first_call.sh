#!/usr/bin/env bash
# A session's first device call, in the order of what each part settles, under one deadline (device time is
# scarce: a call may be the session's only one). Each part runs under the smaller of its cap and what is left.
#   1. sample_video  issue 35 §2: `megassm sample` at full size, 360p x 129 frames (keeps its encoders and
#                    checkpoint under /tmp/fsc for part 2)
#   2. sample_image  the same at 2048 x 2048 (reuses them; removes /tmp/fsc afterwards)
#   3. memdiag       issue 34: stage 3's shape at depth 2, compiled vs eager, live memory by allocating site
#                    (speed_session.sh's step3 section with bench_step.py's *_memdiag variants)
#   4. tests         speed_session.sh's tests section (compiled vs eager, SDPA's kernel, FP8 on the hardware)
#
#   OUT=$OUT DEADLINE=580 bash benchmarks/first_call.sh          (PARTS="memdiag tests" picks parts)
set -u -o pipefail
OUT=${OUT:-benchmarks/results}
DEADLINE=${DEADLINE:-580}
mkdir -p "$OUT"
source "$(dirname "$0")/session_lib.sh"  # device_env; section NAME CAP CMD...
device_env
PARTS=${PARTS:-sample_video sample_image memdiag tests}
speed=""  # speed_session.sh sections, run after the sampling parts (set here: the block below is a subshell)
[[ " $PARTS " == *" memdiag "* ]] && speed="$speed step3"
[[ " $PARTS " == *" tests "* ]] && speed="$speed tests"
{
    device_header
    for p in $PARTS; do
        case $p in
            sample_video) section sample_video 330 python3 benchmarks/full_size_sample_cli.py --work /tmp/fsc --keep \
                              --only stage3_video_360p_129f --out "$OUT/full_size_sample_cli_video_$CARD.json" ;;
            sample_image) section sample_image 240 python3 benchmarks/full_size_sample_cli.py --work /tmp/fsc \
                              --only stage2_2k_image --out "$OUT/full_size_sample_cli_image_$CARD.json" ;;
            memdiag | tests) ;;
            *) echo "first_call.sh: unknown part '$p'; parts: sample_video sample_image memdiag tests" ;;
        esac
    done
} 2>&1 | tee "$OUT/first_call_${CARD:-nocard}.log"
if [[ -n $speed ]]; then  # its own log: $OUT/speed_log.txt
    OUT=$OUT DEADLINE=$((DEADLINE - SECONDS)) SECTIONS="$speed" STEP3_DEPTH=2 STEP3_CAP=240 \
        STEP3_VARIANTS=compile_memdiag,today_memdiag ATT_VARIANTS= bash "$(dirname "$0")/speed_session.sh"
fi
