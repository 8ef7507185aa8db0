#!/usr/bin/env bash
# Regenerates the models shipped in dms/assets, from scratch, on the CPU:
#   1. the base model (scripts/train_base_model.py; resumable: rerun this script to continue),
#   2. its DMS retrofits at 4x and 8x (dms retrofit, adapter variant, base frozen),
#   3. copies them to dms/assets/{base,dms-4x,dms-8x}.
# Usage: bash scripts/build_shipped_models.sh RUN_DIR   (run inside the dms environment)
# Every step is deterministic (seeded data, seeded init); wall time on 2 cores: see BENCHMARKS.md.
set -euo pipefail
RUN="${1:?usage: build_shipped_models.sh RUN_DIR}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
ASSETS="$ROOT/dms/assets"
mkdir -p "$RUN"

python "$ROOT/scripts/train_base_model.py" --out "$RUN/base" \
  --arch llama --layers 4 --hidden 128 --heads 4 --kv-heads 2 --intermediate 512 \
  --mix "niah_single=1,niah_multikey=1,niah_multivalue=1,niah_multiquery=1,vt=1,cwe=1,arith_trace=1,copy_list=2,kv_recall=3" \
  --copy-warmup-steps 800 --min-len 16 --start-len 64 --max-len 512 --curriculum-steps 12000 \
  --batch-tokens 2048 --lr 3e-3 --warmup 300 --steps "${DMS_BASE_STEPS:-16000}" --decay-frac 0.1 \
  --threads 1 --eval-every 500 --eval-samples 16 --eval-lengths 128,512 --final-eval

python "$ROOT/scripts/make_retrofit_data.py" --out "$RUN/retrofit.jsonl" --samples 4000 --lengths 128 256 512
for r in 4 8; do
  [ -f "$RUN/dms-${r}x/config.json" ] || dms retrofit "$RUN/base/final" --data "$RUN/retrofit.jsonl" \
    --output-dir "$RUN/dms-${r}x" --target-cr "$r" --window 16 --steps 600 --ramp-steps 400 \
    --batch-size 4 --seq-len 640 --no-pack --lr 1e-3 --warmup-steps 30 --variant adapter --train-mode adapter-only
done

# Only the model folders are replaced: dms/assets/README.md (the model card) is kept.
rm -rf "$ASSETS/base" "$ASSETS/dms-4x" "$ASSETS/dms-8x"
cp -r "$RUN/base/final" "$ASSETS/base"
for r in 4 8; do
  mkdir -p "$ASSETS/dms-${r}x"
  cp "$RUN/dms-${r}x"/{config.json,generation_config.json,model.safetensors} "$ASSETS/dms-${r}x/"
done
echo "shipped models in $ASSETS; run: dms demo"
