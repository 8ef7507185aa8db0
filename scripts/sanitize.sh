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

# Runtime options (libtorch itself is not instrumented):
# - LD_PRELOAD is not needed: the test executables are linked with -fsanitize=address, so the
#   ASan runtime is loaded first. (To run Python against build/sanitize/libdms_ops.so instead,
#   preload libasan and libubsan, since python is not instrumented.)
# - LeakSanitizer stays on (the default): libtorch's process-lifetime allocations (operator
#   registry, thread pools) are still reachable from globals at exit, so LSan does not report
#   them; checked with this build: no report. Set ASAN_OPTIONS=detect_leaks=0 only if a
#   torch upgrade starts reporting leaks inside libtorch frames.
# - detect_stack_use_after_return=1: off by default in GCC's ASan; catches references to a
#   kernel's locals that outlive it.
# - UBSan needs no halt option: -fno-sanitize-recover=all (CMakeLists.txt) makes any report
#   abort the test; print_stacktrace=1 names the call path.
# Any report therefore ends the test with a nonzero status and ctest fails.
export ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_stack_use_after_return=1"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:+$UBSAN_OPTIONS:}print_stacktrace=1"
ctest --test-dir "$BUILD" --output-on-failure --no-tests=error
