#!/usr/bin/env bash
# A session's first device call, in the order of what each part settles, under one deadline (device time is
# scarce: a call may be the session's only one). Each part runs under the smaller of its cap and what is left.
#   conv          issue 34: FP8 vs bf16 vs another seed through `megassm train`, the three runs at once (CONV_CAP 330)
#   step2         stage 2's shape (16,384 tokens, depth 12): today vs fp8 (compiled + FP8), side by side (STEP2_CAP 330)
#   (by name)
#   att3          stage 3's shape, the all-attention stack: today vs fp8 (the hybrid's rows: step_speed3_h100_session7)
#   prof3         stage 3's shape, the hybrid under compile + FP8 with the step profiled (where the 604 ms go)
#   step3         stage 3's shape (29,040 tokens, depth $STEP3_DEPTH, default 8), $STEP3_VARIANTS
#                 (default today,compile_persist,fp8), each in a fresh process, in one call so that ratios count
#   tests         the CUDA tests of the compiled paths (compiled vs eager, compiled Hydra runs mamba-ssm's
#                 kernels from a fresh process, SDPA's kernel under compile, FP8 on the hardware)
#   memdiag       step3 at depth 2 with the allocator's history: live memory by allocating site
#   fa4           FlashAttention-4 installed from fa4wheels/ (two parts over two calls: session_lib.sh fa4_env), then
#                 bench_attention.py cuDNN vs FA4 at 29,040 and 16,384 and the FA4 CUDA tests (FA4_CAP 200)
#   exit          how `megassm train` ends on the GPU (NCCL at world 1) through end_process: benchmarks/gpu_exit_check.sh
#                 (plain, torchrun, SIGUSR1; ~4 min on a fresh machine, EXIT_CAP 330: the first run compiles the kernels)
#   hydra         the Hydra CUDA tests: state passing (rerun after its fix on 2026-12-07), the fused module and its
#                 TP/CP cut (HYDRA_CAP 240; the CP cut's 16 passed on an H200 and an H100)
#   sample_video, sample_image
#                 issue 35 §2: `megassm sample` at full size, 360p x 129 frames / 2048 x 2048 (run on an H100 on
#                 2026-12-07; the video part keeps its encoders and checkpoint under /tmp/fsc)
#
#   OUT=$OUT DEADLINE=570 bash benchmarks/first_call.sh          (PARTS="att3 tests" picks parts)
# With FA4: call 1 carry ["wheels", "fa4wheels/a"], any PARTS; call 2 at once, carry ["fa4wheels/b"], PARTS=fa4
set -u -o pipefail
OUT=${OUT:-benchmarks/results}
DEADLINE=${DEADLINE:-570}
mkdir -p "$OUT"
source "$(dirname "$0")/session_lib.sh"  # device_env; section NAME CAP CMD...
device_env
fa4_stash  # FA4's parts, whichever call brought them (session_lib.sh fa4_env)
PARTS=${PARTS:-conv step2}
speed=""  # speed_session.sh sections, run after the sampling parts (set here: the block below is a subshell)
depth=${STEP3_DEPTH:-8} variants=${STEP3_VARIANTS:-today,compile_persist,fp8} att= profile=
add() { [[ " $speed " == *" $1 "* ]] || speed="$speed $1"; }  # att3 + prof3: one step3 run with both
for p in $PARTS; do
    case $p in
        conv | step2 | tests | step3) add "$p" ;;
        att3) add step3 && att=today,fp8 && [[ " $PARTS " != *" prof3 "* ]] && variants= ;;
        prof3) add step3 && variants=fp8 profile=29040 ;;
        memdiag) add step3 && depth=2 variants=compile_memdiag,today_memdiag ;;
        sample_video | sample_image | fa4 | exit | hydra) ;;
        *) echo "first_call.sh: unknown part '$p'; parts: conv step2 att3 prof3 step3 tests memdiag fa4 exit hydra sample_video sample_image" ;;
    esac
done
{
    device_header
    for p in $PARTS; do
        case $p in
            exit) section exit "${EXIT_CAP:-330}" env OUT="$OUT" bash "$(dirname "$0")/gpu_exit_check.sh" ;;
            hydra) section hydra "${HYDRA_CAP:-240}" python3 -m pytest -v -p no:cacheprovider \
                       tests/gpu/test_hydra_state_passing_cuda.py tests/gpu/test_hydra_fused_cuda.py \
                       tests/gpu/test_parallel_hydra_fused_cuda.py ;;
            sample_video) section sample_video 330 python3 benchmarks/full_size_sample_cli.py --work /tmp/fsc --keep \
                              --only stage3_video_360p_129f --out "$OUT/full_size_sample_cli_video_$CARD.json" ;;
            sample_image) section sample_image 240 python3 benchmarks/full_size_sample_cli.py --work /tmp/fsc \
                              --only stage2_2k_image --out "$OUT/full_size_sample_cli_image_$CARD.json" ;;
            fa4) fa4_env
                 section fa4_attn "${FA4_CAP:-200}" python3 benchmarks/bench_attention.py --seq-lens 29040,16384 \
                     --backends cudnn,fa4 --out "$OUT"
                 section fa4_tests "${FA4_CAP:-200}" python3 -m pytest -q -p no:cacheprovider -k fa4 \
                     tests/gpu/test_block_cuda.py ;;
        esac
    done
} 2>&1 | tee "$OUT/first_call_${CARD:-nocard}.log"
if [[ -n $speed ]]; then  # its own log: $OUT/speed_log.txt
    # the tests take what step3 leaves: on a cold machine compiling the test stacks alone takes minutes
    OUT=$OUT DEADLINE=$((DEADLINE - SECONDS)) SECTIONS="$speed" STEP3_DEPTH=$depth STEP3_CAP=${STEP3_CAP:-400} \
        STEP3_VARIANTS=$variants ATT_VARIANTS=$att STEP3_PROFILE=$profile STEP2_VARIANTS=${STEP2_VARIANTS:-today,fp8} \
        STEP2_CAP=${STEP2_CAP:-330} CONV_CAP=${CONV_CAP:-330} TESTS_CAP=${TESTS_CAP:-300} \
        bash "$(dirname "$0")/speed_session.sh"
fi
