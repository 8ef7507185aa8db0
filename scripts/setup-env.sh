#!/usr/bin/env bash
# Creates (or reuses) the virtual environment $DMS_VENV (default .venv), installs the build and
# test requirements, and builds dms into it (CUDA kernels too when a CUDA toolkit is found).
# Source it: `. scripts/setup-env.sh`; it leaves the environment activated.
# A repeat run skips what has not changed: the requirements are reinstalled only when
# requirements-test.txt changed, the extension rebuilt only when its sources, build files, build
# variables or requirements changed, or when the built library is missing or was replaced.
# Stamps live in the venv.
set -euo pipefail
DMS_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DMS_VENV="${DMS_VENV:-$DMS_ROOT/.venv}"

. "$DMS_ROOT/scripts/build-env.sh"

[ -x "$DMS_VENV/bin/python" ] || python3 -m venv "$DMS_VENV"
. "$DMS_VENV/bin/activate"
mkdir -p "$DMS_ROOT/build" "$DMS_VENV/dms-stamps"
STAMPS="$DMS_VENV/dms-stamps"

stamp_matches() { [ -f "$STAMPS/$1" ] && [ "$(cat "$STAMPS/$1")" = "$2" ]; }

req_hash="$(sha256sum "$DMS_ROOT/requirements-test.txt" | cut -d' ' -f1)"
if stamp_matches requirements "$req_hash"; then
  echo "setup-env: requirements unchanged since they were installed in $DMS_VENV"
else
  rm -f "$STAMPS/requirements"
  { python -m pip install --upgrade pip && python -m pip install -r "$DMS_ROOT/requirements-test.txt"; } \
    > "$DMS_ROOT/build/pip-install.log" 2>&1 \
    || { tail -n 40 "$DMS_ROOT/build/pip-install.log"; echo "setup-env: installing requirements failed"; exit 1; }
  echo "$req_hash" > "$STAMPS/requirements"
  echo "setup-env: requirements installed in $DMS_VENV"
fi

# Everything the compiled extension depends on: its sources and build files, the variables that
# steer the build, the installed requirements (torch above all) and the tree the editable
# install points to.
build_hash="$(
  cd "$DMS_ROOT"
  { find csrc -type f -print0 | sort -z | xargs -0 sha256sum
    sha256sum setup.py pyproject.toml CMakeLists.txt
    echo "$req_hash $DMS_ROOT ${DMS_BUILD_CUDA-} ${TORCH_CUDA_ARCH_LIST-} ${CUDA_HOME-}"
  } | sha256sum | cut -d' ' -f1
)"
# The extension as built: which file, its size and modification time (a rebuild by hand changes
# them). Empty unless the venv finds dms in this tree (its editable install) and the library is
# there. Found without importing dms, which would cost a torch import.
built_library() {
  local pkg
  pkg="$(cd / && python -c "import importlib.util as u; s = u.find_spec('dms'); print(s.submodule_search_locations[0] if s else '')")"
  [ "$pkg" = "$DMS_ROOT/dms" ] || return 0
  find "$pkg" -maxdepth 1 -name '_C*.so' -printf '%f %s %T@\n' | sort
}
if [ -n "$(built_library)" ] && stamp_matches build "$build_hash $(built_library)"; then
  echo "setup-env: extension up to date (sources unchanged since the last build; log: build-extension.log)"
else
  rm -f "$STAMPS/build"
  echo "setup-env: building the extension"
  # --no-build-isolation: build against the torch just installed, not a second download (docs/building.md #9).
  python -m pip install --no-build-isolation --no-deps -v -e "$DMS_ROOT" > "$DMS_ROOT/build-extension.log" 2>&1 \
    || { tail -n 60 "$DMS_ROOT/build-extension.log"; echo "setup-env: building the extension failed (log: build-extension.log)"; exit 1; }
  python "$DMS_ROOT/scripts/check_build.py" "$DMS_ROOT"
  echo "$build_hash $(built_library)" > "$STAMPS/build"
fi
