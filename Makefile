# The two commands a newcomer needs: `make run` and `make test`. Everything else is a helper.
# CMake does the building; this file only wires set-up, configurations and tools together.

JOBS ?= $(shell nproc 2>/dev/null || echo 2)
BUILD ?= build
CMAKE_FLAGS ?=

.PHONY: all deps build run test test-fast bench-deps bench-core bench-ingest bench-progress bench-report bench-collect bench-analysis fuzz format format-check lint clean

all: build

deps:
	@scripts/deps.sh

$(BUILD)/CMakeCache.txt:
	cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=RelWithDebInfo $(CMAKE_FLAGS)

build: deps $(BUILD)/CMakeCache.txt
	cmake --build $(BUILD) -j $(JOBS)

## make run: set up, build, and start the service on the embedded default (SQLite in ./data),
## with a demo trial and freshly printed keys.
run: build
	$(BUILD)/trialhub serve --demo

## make test: set up, build, and run every test in the plain, ASan+UBSan and TSan builds.
test: deps
	@scripts/test.sh

## make test-fast: the plain build's tests only (for the edit-compile loop).
test-fast: deps
	@TH_TEST_CONFIGS=plain scripts/test.sh

bench-deps:
	@scripts/deps.sh bench

build-bench/CMakeCache.txt:
	cmake -S . -B build-bench -DCMAKE_BUILD_TYPE=Release -DTH_BUILD_TESTS=OFF

bench-core: bench-deps build-bench/CMakeCache.txt
	cmake --build build-bench -j $(JOBS) --target bench_core
	build-bench/bench_core

# The Go peer (../shared/peers/go-seed), built from a writable copy with Debian's Go packages
# into build-bench/go-seed; without it the bench measures trialhub alone.
define build_go_seed
@if [ -d ../shared/peers/go-seed ]; then \
  rm -rf build-bench/go-seed-src && cp -r ../shared/peers/go-seed build-bench/go-seed-src && \
  chmod -R u+w build-bench/go-seed-src && \
  (cd build-bench/go-seed-src && GO111MODULE=off GOPATH=/usr/share/gocode GOCACHE=$(CURDIR)/build-bench/go-cache \
    go build -o ../go-seed .); \
else echo "$@: ../shared/peers/go-seed not found: measuring trialhub alone"; fi
endef

## make bench-ingest: trialhub vs the Go peer (../shared/peers/go-seed) vs nginx; see bench/README.md
bench-ingest: bench-deps build-bench/CMakeCache.txt
	cmake --build build-bench -j $(JOBS) --target trialhub
	$(build_go_seed)
	python3 bench/ingest/bench.py $(BENCH_ARGS)

build-bench-rwlock/CMakeCache.txt:
	cmake -S . -B build-bench-rwlock -DCMAKE_BUILD_TYPE=Release -DTH_BUILD_TESTS=OFF \
	  -DTH_PROGRESS_RWLOCK=ON

## make bench-progress: GET /v1/trials/T1/progress vs /healthz, alone and beside a POST writer, on
## trialhub (th_snapshot), trialhub built with a pthread_rwlock_t, and the Go peer; see bench/README.md
bench-progress: bench-deps build-bench/CMakeCache.txt build-bench-rwlock/CMakeCache.txt
	cmake --build build-bench -j $(JOBS) --target trialhub
	cmake --build build-bench-rwlock -j $(JOBS) --target trialhub
	$(build_go_seed)
	python3 bench/progress/bench.py $(BENCH_ARGS)

## make bench-report: GET /v1/trials/T1/report (JSON, PDF) at 10k, 100k and 1M responses (time,
## size, peak RSS) and the latency of 100 abandoned reports; see bench/README.md
bench-report: bench-deps build-bench/CMakeCache.txt
	cmake --build build-bench -j $(JOBS) --target trialhub
	python3 bench/report/bench.py $(BENCH_ARGS)

## make bench-collect: one collection from 200 simulated sites (500 records each, 0-200 ms per
## page) with --collect-max-in-flight 1, 4, 16, 64: time, records/s, peak RSS; see bench/README.md
bench-collect: bench-deps build-bench/CMakeCache.txt
	cmake --build build-bench -j $(JOBS) --target trialhub
	python3 bench/collect/bench.py $(BENCH_ARGS)

## make bench-analysis: image uploads (512 KiB at 16 and 64 connections, 32 MiB at 16; peak RSS),
## queue throughput with a no-op analyzer (1, 2, 4 workers), upload-to-result p50/p99 at 20/s
bench-analysis: bench-deps build-bench/CMakeCache.txt
	cmake --build build-bench -j $(JOBS) --target trialhub
	python3 bench/analysis/bench.py $(BENCH_ARGS)

## make fuzz: libFuzzer (clang, ASan+UBSan) on the QuestionnaireResponse and DICOM parsers;
## FUZZ_SECONDS=60 each
FUZZ_SECONDS ?= 60
fuzz: deps
	cmake -S . -B build-fuzz -DCMAKE_C_COMPILER=clang -DTH_SANITIZE=address,undefined \
	  -DTH_LIBFUZZER=ON >/dev/null
	cmake --build build-fuzz -j $(JOBS) --target fuzz_qr fuzz_dicom
	mkdir -p build-fuzz/corpus-qr build-fuzz/corpus-dicom
	build-fuzz/tests/fuzz_qr -max_total_time=$(FUZZ_SECONDS) build-fuzz/corpus-qr tests/fuzz/corpus/qr
	build-fuzz/tests/fuzz_dicom -max_total_time=$(FUZZ_SECONDS) build-fuzz/corpus-dicom \
	  tests/fuzz/corpus/dicom

C_FILES = $(shell find include src tests bench -name '*.[ch]' -not -path '*/node_modules/*' 2>/dev/null | sort)

format:
	clang-format -i $(C_FILES)

format-check:
	@bad=0; for f in $(C_FILES); do \
	  clang-format --dry-run --Werror "$$f" >/dev/null 2>&1 || { echo "format-check: $$f differs (make format)"; bad=1; }; \
	done; [ $$bad -eq 0 ] && echo "format-check: clean"

lint: build
	cppcheck --quiet --error-exitcode=1 --enable=warning,performance,portability \
	  --inline-suppr --std=c11 -D__GNUC__ -I include --suppress=missingIncludeSystem \
	  --project=$(BUILD)/compile_commands.json -i tests -i bench \
	  && echo "lint: clean"

clean:
	rm -rf build build-asan build-tsan build-bench build-bench-rwlock build-fuzz
