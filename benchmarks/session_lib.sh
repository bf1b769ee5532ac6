# Shared by the one-call GPU session scripts (h200_session.sh, speed_session.sh); sourced, not run.
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
