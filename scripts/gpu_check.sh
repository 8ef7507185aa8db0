#!/usr/bin/env bash
# For a machine with a GPU: runs on CUDA what the CPU-only development machine never could.
#   1. the op and model tests on their CUDA parameter ("cuda" in the test id), plus the modules
#      collected only where CUDA exists (*_cuda.py: the CUDA append kernel against
#      dms/reference.py, the flash-attn decode branch when flash_attn is installed, the compiled
#      FlexAttention training path);
#   2. a decode benchmark on CUDA: DMSCache vs transformers' DynamicCache at 4K-32K context;
#   3. the C++ operator benchmark (build/bench_ops: CPU, and cuda:0 when present) when it was built.
# Usage: bash scripts/gpu_check.sh [extra pytest arguments]   (uses the active Python; run
# `. scripts/setup-env.sh` first so that dms is built with its CUDA kernels)
set -euo pipefail
cd "$(dirname "$0")/.."

python - <<'EOF' || exit 1
import sys
import torch
if not torch.cuda.is_available():
    sys.exit("gpu_check.sh: no CUDA device visible to torch (torch.cuda.is_available() is False); "
             "run it on a machine with a GPU")
import dms  # noqa: F401
try:
    torch.ops.dms.scan_flags(torch.zeros(1, 1, dtype=torch.bool, device="cuda"), None, 0)
except (NotImplementedError, RuntimeError) as e:
    sys.exit(f"gpu_check.sh: dms has no CUDA kernels ({str(e).splitlines()[0]}); rebuild it with "
             "`. scripts/setup-env.sh` on this machine")
print(f"gpu_check.sh: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
EOF

echo "== op and model tests on CUDA"
status=0
python -m pytest tests/ops tests/models tests/cache/test_cache_visibility.py tests/cache/test_flash_decode_cuda.py \
  tests/train/test_flex_attention_cuda.py -k cuda -q "$@" || status=$?
# pytest exits 5 when it selected nothing: on a GPU machine that means the CUDA cases vanished.
if [ "$status" -eq 5 ]; then echo "gpu_check.sh: no CUDA test case was selected"; exit 1; fi
[ "$status" -eq 0 ] || exit "$status"

echo "== decode benchmark on CUDA (bf16, page size 256: flash-attn reads the pages when installed)"
python - <<'EOF'
import time

import torch
from transformers import DynamicCache

import dms
import dms.store
from dms.cli.bench import MODEL
from dms.compat import cache_kwargs
from dms.models.tiny import tiny_model

WINDOW, RATIO, STEPS = 256, 8.0, 64
dev, dtype = torch.device("cuda"), torch.bfloat16
dense = tiny_model("llama", seed=0, **MODEL).to(dev, dtype)
dense.set_attn_implementation("sdpa")
model = dms.apply(tiny_model("llama", seed=0, **MODEL), dms_window_size=WINDOW, dms_separate_alpha=True)
with torch.no_grad():
    for layer in model.model.layers:
        layer.self_attn.dms_proj_alpha.bias.fill_(1.0)  # evict every token leaving the window
model = model.to(dev, dtype)
flash = dms.store.flash_attn_with_kvcache is not None
print(f"decode kernel: {'flash_attn_with_kvcache' if flash else 'torch.ops.dms.paged_decode_attention'}")


def steps(m, cache, n):
    tok = torch.tensor([[5]], device=dev)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.no_grad():
        for _ in range(n):
            tok = m(input_ids=tok, **cache_kwargs(cache), use_cache=True).logits[:, -1:].argmax(-1)
    torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


S, D = MODEL["num_key_value_heads"], MODEL["head_dim"]
for T in (4096, 16384, 32768):
    gen = torch.Generator(device=dev).manual_seed(T)
    keep_p = (T / RATIO - WINDOW - 1) / (T - WINDOW - 1)
    dyn, cache = DynamicCache(config=dense.config), dms.DMSCache(model, page_size=256)
    for i, layer in enumerate(cache.layers):
        k = torch.randn(1, S, T, D, generator=gen, device=dev, dtype=dtype)
        v = torch.randn(1, S, T, D, generator=gen, device=dev, dtype=dtype)
        dyn.update(k, v, i)
        layer.append(k[0], v[0], torch.rand(S, T, generator=gen, device=dev) >= keep_p, None)
    steps(dense, dyn, 4), steps(model, cache, 4)  # warm-up
    dyn_rate, dms_rate = steps(dense, dyn, STEPS), steps(model, cache, STEPS)
    print(f"context {T:>6}: DynamicCache {dyn_rate:8.1f} tok/s | DMSCache {dms_rate:8.1f} tok/s "
          f"(CR {cache.compression_ratio():.2f}) | speed-up {dms_rate / dyn_rate:.2f}x")
EOF

if [ -x build/bench_ops ]; then
  echo "== build/bench_ops (operator benchmark: CPU and cuda:0, GB/s)"
  ./build/bench_ops 5
else
  echo "== build/bench_ops not built (see BENCHMARKS.md to build it); skipped"
fi
echo "gpu_check.sh: done"
