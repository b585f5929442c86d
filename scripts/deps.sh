#!/usr/bin/env bash
# Installs the Debian packages that building, running and testing trialhub need.
# Idempotent: packages already present are skipped, and apt is not touched when
# nothing is missing. Needs root (or sudo) only when something must be installed.
set -euo pipefail

# Build and run.
pkgs_build=(build-essential cmake pkg-config
    libmicrohttpd-dev libjansson-dev libsqlite3-dev libssl-dev)
# Tests and the sanitizer runs (clang and its runtime give TSan/ASan/libFuzzer).
pkgs_test=(libcmocka-dev clang libclang-rt-14-dev curl python3 procps)
# Code-quality targets (make format-check, make lint).
pkgs_lint=(clang-format cppcheck)
# Benchmarks only (make bench-*).
pkgs_bench=(libglib2.0-dev wrk)

want=("${pkgs_build[@]}" "${pkgs_test[@]}" "${pkgs_lint[@]}" "${pkgs_bench[@]}")

missing=()
for p in "${want[@]}"; do
    if ! dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null | grep -qx installed; then
        missing+=("$p")
    fi
done

if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi

echo "deps: installing ${missing[*]}" >&2
sudo=""
if [ "$(id -u)" -ne 0 ]; then
    sudo="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
