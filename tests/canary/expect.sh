#!/bin/sh
# Runs a race canary and checks ThreadSanitizer's verdict.
#   expect.sh race  PROGRAM   passes only if TSan reports a data race
#   expect.sh clean PROGRAM   passes only if the program exits 0 with no TSan report
mode=$1
prog=$2
out=$(TSAN_OPTIONS="halt_on_error=0:exitcode=66" "$prog" 2>&1)
rc=$?
printf '%s\n' "$out" | tail -n 20
case $mode in
race)
    if [ "$rc" -eq 66 ] && printf '%s' "$out" | grep -q 'WARNING: ThreadSanitizer: data race'; then
        echo "canary: TSan reported the race, as it must"
        exit 0
    fi
    echo "canary: TSan did NOT report the unsynchronised cache (exit $rc): the race gate is broken"
    exit 1
    ;;
clean)
    if [ "$rc" -eq 0 ] && ! printf '%s' "$out" | grep -q 'ThreadSanitizer'; then
        echo "canary: fixed twin ran clean"
        exit 0
    fi
    echo "canary: fixed twin failed or TSan reported (exit $rc)"
    exit 1
    ;;
esac
echo "usage: expect.sh race|clean PROGRAM"
exit 2
