#!/usr/bin/env bash
# Creates (or reuses) the virtual environment $DMS_VENV (default .venv), installs the build and
# test requirements, and builds dms into it (CUDA kernels too when a CUDA toolkit is found).
# Source it: `. scripts/setup-env.sh`; it leaves the environment activated.
set -euo pipefail
DMS_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DMS_VENV="${DMS_VENV:-$DMS_ROOT/.venv}"

. "$DMS_ROOT/scripts/build-env.sh"

[ -x "$DMS_VENV/bin/python" ] || python3 -m venv "$DMS_VENV"
. "$DMS_VENV/bin/activate"
mkdir -p "$DMS_ROOT/build"
{ python -m pip install --upgrade pip && python -m pip install -r "$DMS_ROOT/requirements-test.txt"; } \
  > "$DMS_ROOT/build/pip-install.log" 2>&1 \
  || { tail -n 40 "$DMS_ROOT/build/pip-install.log"; echo "setup-env: installing requirements failed"; exit 1; }
echo "setup-env: requirements installed in $DMS_VENV; building the extension"
# --no-build-isolation: build against the torch just installed, not a second download (BUILD-NOTES #9).
python -m pip install --no-build-isolation --no-deps -v -e "$DMS_ROOT" > "$DMS_ROOT/build-extension.log" 2>&1 \
  || { tail -n 60 "$DMS_ROOT/build-extension.log"; echo "setup-env: building the extension failed (log: build-extension.log)"; exit 1; }
python "$DMS_ROOT/scripts/check_build.py" "$DMS_ROOT"
