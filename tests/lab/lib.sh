# Helpers for lab payload scripts (busybox sh): `. /etc/lab/lib.sh`.
#
# Results are lines `LAB-RESULT key=value ...` on the payload's output; the
# host harness (tests/src/lab.rs) collects them for the test to assert on.
#
# /bin/sh is dash, which finds commands on PATH (iproute2's `ip` before
# busybox's). Debian's busybox prefers its own applets when one of them
# runs a program by a bare name (`timeout 5 ip ...`, `setsid sh`, `taskset
# -c 1 ip ...`): name real programs by absolute path there
# (`timeout 5 /usr/bin/ip ...`).

# Failures counted by lab_check; a payload ends with `exit "$LAB_FAILED"`
# (or its own status) so the verdict says whether every check held.
LAB_FAILED=0

# lab_result KEY=VALUE...: report values.
lab_result() {
    echo "LAB-RESULT $*"
}

# lab_check NAME COMMAND...: run COMMAND; report NAME=ok, or print its
# output and report NAME=fail-RC and count the failure.
lab_check() {
    lab_check_name=$1
    shift
    if lab_check_out=$("$@" 2>&1); then
        echo "LAB-RESULT $lab_check_name=ok"
    else
        lab_check_rc=$?
        [ -n "$lab_check_out" ] && echo "$lab_check_out"
        echo "LAB-RESULT $lab_check_name=fail-$lab_check_rc"
        LAB_FAILED=$((LAB_FAILED + 1))
    fi
}

# lab_uptime_ms: milliseconds since boot.
lab_uptime_ms() {
    sed 's/^\([0-9]*\)\.\([0-9][0-9]\).*/\1\20/' /proc/uptime
}
