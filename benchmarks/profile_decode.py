"""Where one DMS decode step spends its time: the share of the step inside the attention op
(dms::paged_decode_attention) and the projection matmuls (every nn.Linear of the model, the LM
head included), against everything else (Python, small tensor ops, the KV append, host syncs).
Same model and cache as ``dms bench``.

    OMP_NUM_THREADS=1 python benchmarks/profile_decode.py --context 4096 --steps 64

Times are CPU time of this process (``time.process_time``, one thread), so that other work on
a shared machine does not count. The step is timed as a whole; the kernels are then timed
alone on the same shapes and data (the attention op over each layer's real store, each Linear
on one token), best of ``--repeats`` blocks each. ``--profile`` adds torch.profiler's table of
the largest self times.
"""
from __future__ import annotations

import argparse
import time

import torch


def _decode(model, cache, tok, n: int):
    from dms.compat import cache_kwargs

    with torch.no_grad():
        for _ in range(n):
            tok = model(input_ids=tok, **cache_kwargs(cache), use_cache=True).logits[:, -1:].argmax(-1)
    return tok


def _best(fn, n: int, repeats: int) -> float:
    """Best CPU seconds per call of ``fn`` over ``repeats`` blocks of ``n`` calls."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.process_time()
        for _ in range(n):
            fn()
        best = min(best, (time.process_time() - t0) / n)
    return best


def _kernels(model, cache, steps: int, repeats: int) -> tuple[float, float]:
    """(attention op, all Linear layers) CPU seconds of one decode step, timed alone."""
    cfg = model.config
    G = cfg.num_attention_heads // cfg.num_key_value_heads
    attn = 0.0
    for layer in cache.layers:
        st = getattr(layer, "store", layer)  # the store (or, before it had a type, the layer's tensors)
        q = torch.randn(st.block_table.shape[0], G, cfg.head_dim)
        args = (q, st.k_pages, st.v_pages, st.block_table, st.seq_lens, cfg.head_dim ** -0.5)
        attn += _best(lambda: torch.ops.dms.paged_decode_attention(*args), steps, repeats)
    proj = 0.0
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                x = torch.randn(1, 1, m.in_features)
                proj += _best(lambda: m(x), steps, repeats)
    return attn, proj


def main() -> None:
    from dms.cli.bench import _caches, _models

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--profile", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dense, model = _models(args.window)
    budget = args.steps * (args.repeats + 3)
    cache = _caches(dense, model, args.context, args.window, 8.0, budget, seed=args.context)["dms"]
    tok = _decode(model, cache, torch.tensor([[5]]), 4)
    state = {"tok": tok}

    def block():
        state["tok"] = _decode(model, cache, state["tok"], 1)

    step = _best(block, args.steps, args.repeats) * 1e3
    attn, proj = (t * 1e3 for t in _kernels(model, cache, args.steps, args.repeats))
    other = max(0.0, step - attn - proj)
    print(f"context {args.context}, CR {cache.compression_ratio():.2f}, threads {args.threads}: step {step:.3f} ms "
          f"CPU = attention op {attn:.3f} ms + projections {proj:.3f} ms + other {other:.3f} ms "
          f"({100 * other / step:.0f}% of the step outside the kernels)")
    if args.profile:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            _decode(model, cache, state["tok"], args.steps)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
