#!/usr/bin/env bash
# Builds the CPU op library and the C++ tests with AddressSanitizer + UBSan (-DDMS_SANITIZE=ON)
# in build/sanitize and runs them with CTest; any sanitizer report fails the run.
#   bash scripts/sanitize.sh            (uses the active Python environment's torch)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/build-env.sh
BUILD="${DMS_SANITIZE_BUILD:-build/sanitize}"
TORCH_PREFIX="$(python -c 'import torch; print(torch.utils.cmake_prefix_path)')"

cmake -S . -B "$BUILD" -G Ninja -DDMS_SANITIZE=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_PREFIX_PATH="$TORCH_PREFIX" > "$BUILD.configure.log" 2>&1 \
  || { cat "$BUILD.configure.log"; exit 1; }
cmake --build "$BUILD"

# Why each option (libtorch itself is not instrumented):
# - detect_leaks=0: libtorch keeps process-lifetime allocations (operator registry, thread
#   pools, allocator caches) that it never frees; LeakSanitizer would report them at exit.
# - halt_on_error=1 / abort_on_error=1: the first report stops the test with a nonzero status,
#   so ctest fails (also for UBSan, whose -fno-sanitize-recover=all is set at compile time).
# - print_stacktrace=1: UBSan reports name the line.
# LD_PRELOAD is not needed: the test executables are linked with -fsanitize=address, so the
# ASan runtime is the first library loaded.
export ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_leaks=0:halt_on_error=1:abort_on_error=1"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:+$UBSAN_OPTIONS:}halt_on_error=1:print_stacktrace=1"
ctest --test-dir "$BUILD" --output-on-failure --no-tests=error
