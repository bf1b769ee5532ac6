# Shared by the one-call GPU scripts (speed_session.sh, gpu_configs.sh, full_size_sample_cli.sh, h200_session.sh);
# sourced, not run.

# device_env: what the GPU image lacks, from wheels/ (docs/performance.md says how they are built) into /tmp/site,
# and the environment every run there uses (caches under /tmp, DeepSpeed ops built just in time). The install is
# skipped when /tmp/site already holds this set of wheels (a script calling another, or a later call on a warm
# machine): its stamp is the wheels' names and sizes.
device_env() {
    local stamp
    if ls wheels/*.whl >/dev/null 2>&1; then
        stamp=$(ls -l wheels/*.whl | awk '{print $5, $NF}')
        if [[ $stamp != "$(cat /tmp/site/.wheels 2>/dev/null)" ]]; then
            python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
                wheels/*.whl 2>&1 | grep -v "^WARNING" | tail -3
            [[ ${PIPESTATUS[0]} == 0 ]] && echo "$stamp" >/tmp/site/.wheels
        fi
    fi
    export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
    export PYTHONUNBUFFERED=1 DS_BUILD_OPS=0 TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/megassm-ext}
    export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/megassm-cache/triton} TRITON_CACHE_AUTOTUNING=1
    export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/megassm-cache/inductor}
    CARD=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr ' ' '_' | tr -cd 'A-Za-z0-9_-')
}

# device_header: the log's first lines (when, which card and driver).
device_header() {
    date -u +%FT%TZ
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
}

# section NAME CAP_SECONDS CMD...: run CMD under the smaller of CAP_SECONDS and what is left of $DEADLINE
# (seconds since the script started), skipping it when under 20 s remain; start / exit lines for the log.
section() {
    local name=$1 cap=$2 t rc
    shift 2
    t=$((DEADLINE - SECONDS))
    ((t > cap)) && t=$cap
    if ((t < 20)); then
        echo "==== $name skipped: ${t}s left"
        return
    fi
    echo "==== $name start $(date -u +%T) limit ${t}s (t=${SECONDS}s)"
    timeout "$t" "$@"
    rc=$?
    echo "==== $name exit $rc $(date -u +%T) (t=${SECONDS}s)"
}

# fa4_env: FlashAttention-4 (model.attention_backend: fa4) into /tmp/site. Its CuTe DSL library wheel
# (nvidia-cutlass-dsl-libs-cu13, 92 MB) is more than one call carries, so it travels in two parts over two calls
# on one warm machine (kept in /tmp/fa4parts), checked against its sha256 when both are there. The parts sit in
# two ignored folders prepared before the first call, so that the second call can follow the first at once (a
# warm machine is given back after 30 s idle; swapping files between the calls lost one on 2026-12-07):
#   fa4wheels/a: cu13whl.part00 + cu13whl.sha256            carry ["wheels", "fa4wheels/a"]
#   fa4wheels/b: cu13whl.part01 + cu13whl.sha256 + the small wheels (flash-attn-4, the CuTe DSL's base / core,
#                quack-kernels, apache-tvm-ffi, torch-c-dlpack-ext)   carry ["fa4wheels/b"] (wheels/ stays there)
# (wheels/fa4/ is read too, the layout before.) The image has cuda-bindings and einops. Prints whether megassm
# can run FA4 here.
fa4_stash() {  # whichever parts this call brought wait in /tmp/fa4parts for the call that has both
    mkdir -p /tmp/fa4parts
    cp fa4wheels/*/* wheels/fa4/* /tmp/fa4parts/ 2>/dev/null
    return 0
}
fa4_env() {
    fa4_stash
    if [[ -f /tmp/fa4parts/cu13whl.part00 && -f /tmp/fa4parts/cu13whl.part01 && ! -f /tmp/site/.fa4 ]]; then
        local whl
        whl=/tmp/fa4parts/$(awk '{print $2}' /tmp/fa4parts/cu13whl.sha256)
        cat /tmp/fa4parts/cu13whl.part0* >"$whl"
        if (cd /tmp/fa4parts && sha256sum -c cu13whl.sha256); then
            python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
                /tmp/fa4parts/*.whl 2>&1 | grep -v "^WARNING" | tail -3
            [[ ${PIPESTATUS[0]} == 0 ]] && touch /tmp/site/.fa4
        fi
    fi
    python3 -c "import torch; from megassm.ops.flash4 import fa4_unsupported as u; \
print('fa4:', u(torch.device('cuda')) or 'ready')"
}
