# The two commands a newcomer needs: `make run` and `make test`. Everything else is a helper.
# CMake does the building; this file only wires set-up, configurations and tools together.

JOBS ?= $(shell nproc 2>/dev/null || echo 2)
BUILD ?= build
CMAKE_FLAGS ?=

.PHONY: all deps build run test test-fast bench-core format format-check lint clean

all: build

deps:
	@scripts/deps.sh

$(BUILD)/CMakeCache.txt:
	cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=RelWithDebInfo $(CMAKE_FLAGS)

build: deps $(BUILD)/CMakeCache.txt
	cmake --build $(BUILD) -j $(JOBS)

## make run: set up, build, and start the service on the embedded default.
run: build
	$(BUILD)/trialhub serve

## make test: set up, build, and run every test in the plain, ASan+UBSan and TSan builds.
test: deps
	@scripts/test.sh

## make test-fast: the plain build's tests only (for the edit-compile loop).
test-fast: deps
	@TH_TEST_CONFIGS=plain scripts/test.sh

bench-core: deps
	cmake -S . -B build-bench -DCMAKE_BUILD_TYPE=Release -DTH_BUILD_TESTS=OFF
	cmake --build build-bench -j $(JOBS) --target bench_core
	build-bench/bench_core

C_FILES = $(shell git ls-files '*.c' '*.h' 2>/dev/null)

format:
	clang-format -i $(C_FILES)

format-check:
	@clang-format --dry-run --Werror $(C_FILES) && echo "format-check: clean"

lint: build
	cppcheck --quiet --error-exitcode=1 --enable=warning,performance,portability \
	  --inline-suppr --std=c11 -D__GNUC__ -I include --suppress=missingIncludeSystem \
	  --project=$(BUILD)/compile_commands.json -i tests -i bench \
	  && echo "lint: clean"

clean:
	rm -rf build build-asan build-tsan build-bench
