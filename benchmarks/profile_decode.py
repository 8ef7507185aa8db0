"""Where one DMS decode step spends its time: the share of the step inside the attention ops
(dms::append, dms::paged_decode_attention) and the projection matmuls (every Linear of the
model, the LM head included), against everything else (Python, small tensor ops, host
syncs). Same model and cache as ``dms bench``, decoded by each engine in turn: the model's
transformers forward and dms.models.decode (the fast path on the weights).

    OMP_NUM_THREADS=1 python benchmarks/profile_decode.py --context 4096 --steps 64

The kernels are timed where they run, inside the step (torch.profiler's self time of those
ops, so cache misses caused by the rest of the step count as kernel time, as they would in
production); "other" is the wall time of the profiled steps minus the kernels, which also
charges the profiler's own per-op cost to "other" (an upper bound). ``--table`` prints the
profiler's largest self times.
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

KERNELS = {"attention": ("dms::append", "dms::paged_decode_attention"),
           "projections": ("aten::mm", "aten::addmm", "aten::bmm")}


def _decode(model, cache, tok, n: int, engine: str):
    """``n`` greedy steps of batch 1 from token ``tok`` [1, 1]."""
    from dms.compat import cache_kwargs
    from dms.models.decode import decoder

    with torch.no_grad():
        if engine == "fast":
            fast, pos, tok = decoder(model), torch.tensor([cache.get_seq_length()]), tok[:, 0]
            for _ in range(n):
                tok = fast.step(cache, tok, pos).argmax(-1)
                pos = pos + 1
            return tok[:, None]
        for _ in range(n):
            tok = model(input_ids=tok, **cache_kwargs(cache), use_cache=True).logits[:, -1:].argmax(-1)
    return tok


def profile(model, cache, args, engine: str) -> None:
    tok = _decode(model, cache, torch.tensor([[5]]), 8, engine)
    t0 = time.perf_counter()
    tok = _decode(model, cache, tok, args.steps, engine)
    plain = (time.perf_counter() - t0) / args.steps * 1e3
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        _decode(model, cache, tok, args.steps, engine)
        step = (time.perf_counter() - t0) / args.steps * 1e3
    self_ms = {}
    for e in prof.key_averages():
        self_ms[e.key] = self_ms.get(e.key, 0.0) + e.self_cpu_time_total / 1e3 / args.steps
    parts = {name: sum(self_ms.get(k, 0.0) for k in keys) for name, keys in KERNELS.items()}
    other = max(0.0, step - sum(parts.values()))
    print(f"{engine:>12}: context {args.context}, CR {cache.compression_ratio():.2f}, threads {args.threads}: step "
          f"{plain:.3f} ms (profiled {step:.3f} ms = attention {parts['attention']:.3f} + projections "
          f"{parts['projections']:.3f} + other {other:.3f}: {100 * other / step:.0f}% of the step outside the kernels)",
          flush=True)
    if args.table:
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def main() -> None:
    from dms.cli.bench import _caches, _models

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--table", action="store_true")
    p.add_argument("--engine", choices=("transformers", "fast", "both"), default="both")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dense, model = _models(args.window)
    cache = _caches(dense, model, args.context, args.window, 8.0, 2 * args.steps + 8, seed=args.context)["dms"]
    engines = ("transformers", "fast") if args.engine == "both" else (args.engine,)
    for engine in engines:
        profile(model, copy.deepcopy(cache), args, engine)

if __name__ == "__main__":
    main()
