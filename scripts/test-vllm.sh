#!/usr/bin/env bash
# The vLLM plugin's tests (tests/vllm), in the vLLM environment: creates or updates it first
# (scripts/setup-vllm-env.sh, fast when nothing changed). Arguments go to pytest.
# The main suite does not collect tests/vllm (pytest.ini: norecursedirs).
set -euo pipefail
DMS_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${DMS_VLLM_VENV:-$(dirname "$DMS_ROOT")/vllm-venv}"
bash "$DMS_ROOT/scripts/setup-vllm-env.sh"
# From tests/vllm, so that the installed dms is imported, not the source tree's (whose
# extension is built for the main environment's torch).
cd "$DMS_ROOT/tests/vllm"
DMS_ASSETS="$DMS_ROOT/dms/assets" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" exec "$VENV/bin/python" -m pytest "$@"
