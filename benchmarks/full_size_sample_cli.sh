#!/usr/bin/env bash
# Issue 35 §2 on one GPU: `megassm sample` through the real CLI with the full hth-5b (random weights), a
# T5-XXL-shaped encoder and the Wan VAE, at stage2_2k's 2048^2 and stage3_video's 360p x 129 frames
# (benchmarks/full_size_sample_cli.py; ~20 GB of disk under WORK, removed afterwards).
#   OUT=benchmarks/results bash benchmarks/full_size_sample_cli.sh
set -u -o pipefail
OUT=${OUT:-benchmarks/results}
WORK=${WORK:-/tmp/megassm_full_size_cli}
mkdir -p "$OUT"
source "$(dirname "$0")/session_lib.sh"
device_env  # and CARD
{
    device_header
    df -h "$(dirname "$WORK")" | tail -1
    timeout "${SAMPLE_CLI_LIMIT:-1500}" python3 benchmarks/full_size_sample_cli.py --work "$WORK" \
        --out "$OUT/full_size_sample_cli_$CARD.json"
    echo "full_size_sample_cli exit $?"
} 2>&1 | tee "$OUT/full_size_sample_cli_$CARD.log"
