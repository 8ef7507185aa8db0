#!/usr/bin/env bash
# The README's test command: sets up .venv, builds dms, runs the Python tests and the C++ tests.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup-env.sh

# pytest exits 5 when it collected nothing: a suite that ran no test is a failure here.
status=0
python -m pytest "$@" || status=$?
if [ "$status" -eq 5 ]; then echo "test.sh: pytest collected no tests"; exit 1; fi
[ "$status" -eq 0 ] || exit "$status"

cmake -S . -B build/cmake -G Ninja -DCMAKE_PREFIX_PATH="$(python -c 'import torch; print(torch.utils.cmake_prefix_path)')" > build/cmake-configure.log 2>&1 \
  || { cat build/cmake-configure.log; exit 1; }
cmake --build build/cmake
ctest --test-dir build/cmake --output-on-failure --no-tests=error
