#!/usr/bin/env bash
# The README's main-job command: sets up .venv, builds dms, runs `dms demo` on the shipped models.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup-env.sh
dms demo "$@"
