#!/usr/bin/env bash
# Builds and runs the whole test suite in three configurations: plain (RelWithDebInfo),
# ASan+UBSan, and TSan. Any failing test or sanitizer report fails the run. Ends with one line
# "tests: N passed, N failed, N skipped" over all three. TH_TEST_CONFIGS limits the set (e.g. "plain").
set -uo pipefail
cd "$(dirname "$0")/.."

jobs=$(nproc 2>/dev/null || echo 2)
configs=${TH_TEST_CONFIGS:-"plain asan tsan"}
total_pass=0
total_fail=0
total_skip=0
failed_configs=()

# The format gate runs first: it is cheap and a diff is a failure like any other.
if ! make --no-print-directory format-check; then
    failed_configs+=(format)
fi

for cfg in $configs; do
    case $cfg in
    plain) dir=build sanitize="" ;;
    asan) dir=build-asan sanitize="address,undefined" ;;
    tsan) dir=build-tsan sanitize="thread" ;;
    *) echo "test.sh: unknown configuration $cfg" >&2; exit 2 ;;
    esac
    echo "=== $cfg: configure and build ($dir) ==="
    mkdir -p "$dir"
    if ! cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DTH_SANITIZE="$sanitize" \
        -DTH_WERROR=ON >"$dir/configure.log" 2>&1; then
        cat "$dir/configure.log"
        failed_configs+=("$cfg(configure)")
        continue
    fi
    if ! cmake --build "$dir" -j "$jobs"; then
        failed_configs+=("$cfg(build)")
        continue
    fi
    echo "=== $cfg: tests ==="
    log="$dir/ctest.log"
    ctest --test-dir "$dir" --output-on-failure -j "$jobs" 2>&1 | tee "$log"
    summary=$(grep -E 'tests passed, [0-9]+ tests? failed out of [0-9]+' "$log" | tail -n 1)
    if [ -z "$summary" ]; then
        failed_configs+=("$cfg(no summary)")
        continue
    fi
    nfail=$(sed -E 's/.* ([0-9]+) tests? failed out of ([0-9]+).*/\1/' <<<"$summary")
    ntotal=$(sed -E 's/.* ([0-9]+) tests? failed out of ([0-9]+).*/\2/' <<<"$summary")
    # A skipped test (exit 77: e.g. no Chromium) is neither a pass nor a failure.
    nskip=$(grep -cE '\*\*\*Skipped' "$log" || true)
    total_pass=$((total_pass + ntotal - nfail - nskip))
    total_fail=$((total_fail + nfail))
    total_skip=$((total_skip + nskip))
    if [ "$nfail" -ne 0 ]; then
        failed_configs+=("$cfg")
    fi
done

# Static analysis over src/ with the plain build's compile database.
if [ -f build/compile_commands.json ] && ! make --no-print-directory lint BUILD=build; then
    failed_configs+=(lint)
fi

if [ ${#failed_configs[@]} -ne 0 ]; then
    echo "test.sh: failed: ${failed_configs[*]}"
    echo "tests: $total_pass passed, $((total_fail > 0 ? total_fail : 1)) failed, $total_skip skipped"
    exit 1
fi
echo "tests: $total_pass passed, $total_fail failed, $total_skip skipped"
