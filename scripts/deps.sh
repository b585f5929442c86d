#!/usr/bin/env bash
# Installs the Debian packages that building, running and testing trialhub need
# (`scripts/deps.sh`), or those plus what the benchmarks need (`scripts/deps.sh bench`:
# wrk, GLib, nginx, and Go with the Debian packages the Go peer builds from).
# Idempotent: packages already present are skipped, and apt is not touched when
# nothing is missing. Needs root (or sudo) only when something must be installed.
set -euo pipefail

# Build and run.
pkgs_build=(build-essential cmake pkg-config
    libmicrohttpd-dev libwslay-dev libjansson-dev libsqlite3-dev libssl-dev libcairo2-dev
    libcurl4-openssl-dev fonts-dejavu-core)
# Tests and the sanitizer runs (clang and its runtime give TSan/ASan/libFuzzer; Chromium runs
# the dashboard test through playwright-core).
pkgs_test=(libcmocka-dev clang libclang-rt-14-dev curl python3 procps prometheus
    chromium poppler-utils dcmtk python3-pydicom python3-numpy)
# Code-quality targets (make format-check, make lint).
pkgs_lint=(clang-format cppcheck)
# Benchmarks only (make bench-*).
pkgs_bench=(libglib2.0-dev wrk nginx-light golang-go golang-github-gin-gonic-gin-dev
    golang-github-mattn-go-sqlite3-dev)

want=("${pkgs_build[@]}" "${pkgs_test[@]}" "${pkgs_lint[@]}")
if [ "${1:-}" = bench ]; then
    want+=("${pkgs_bench[@]}")
fi

missing=()
for p in "${want[@]}"; do
    if ! dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null | grep -qx installed; then
        missing+=("$p")
    fi
done

# Node.js runs the test clients (fhir-kit-client) and the OpenAPI linter. A machine that
# already has node and npm (from Debian or elsewhere) keeps them.
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    missing+=(nodejs npm)
fi

if [ ${#missing[@]} -ne 0 ]; then
    echo "deps: installing ${missing[*]}" >&2
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        sudo="sudo"
    fi
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# npm packages for the test clients only, pinned by tests/node/package-lock.json.
here=$(cd "$(dirname "$0")/.." && pwd)
if [ ! -f "$here/tests/node/node_modules/.package-lock.json" ] ||
    [ "$here/tests/node/package-lock.json" -nt "$here/tests/node/node_modules/.package-lock.json" ]; then
    echo "deps: npm ci in tests/node" >&2
    (cd "$here/tests/node" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
fi
