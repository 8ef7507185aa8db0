"""``dms bench``: decode speed and KV memory, DMS cache vs transformers DynamicCache, side by
side in one run (CPU). benchmarks/bench_decode.py runs the same thing as a script.

A KV-heavy tiny Llama (random weights) decodes at several context lengths with three caches
holding the same random keys/values: transformers' DynamicCache (the generate() default; it
concatenates, i.e. copies, the whole cache at every step) and StaticCache (preallocated, no
copy, attends its whole length) with all T tokens, and a DMSCache into which the same T tokens
were appended with forced random decisions at ~8x compression. The
decisions are forced, not learned: this measures the systems cost of the cache (memory held,
time per decode step), not accuracy. During the timed steps the DMS model's adapter is set to
evict every token leaving the window, so the compression stays put.

    dms bench              # 4K, 16K, 32K
    dms bench --quick      # tiny contexts, for CI

Batched mode, the paper's throughput claim at equal memory: a fixed KV budget (``--kv-budget-mib``)
holds the largest batch of 8K-token sequences each cache fits, a StaticCache of exactly the
context per sequence vs a DMSCache at ~8x (its measured pool + index bytes, slack included,
after the timed steps); both decode the same number of steps and report tokens/s (batch x
steps / seconds), batch size and bytes.

    dms bench --batched --kv-budget-mib 1024
"""
from __future__ import annotations

import argparse
import copy
import gc
import time

import torch

ENGINES = ("transformers", "fast", "both")
MODEL = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=16,
             num_key_value_heads=8, head_dim=64, vocab_size=512)


def _models(window: int):
    import dms
    from dms.models.tiny import tiny_model

    dense = tiny_model("llama", seed=0, **MODEL)
    dense.set_attn_implementation("sdpa")  # the fastest stock CPU path for the baseline
    model = tiny_model("llama", seed=0, **MODEL)
    dms.apply(model, dms_window_size=window, dms_separate_alpha=True)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.dms_proj_alpha.bias.fill_(1.0)  # logit 100 - 5 > 0: always evict
    return dense, model


def _caches(dense, model, T: int, window: int, ratio: float, steps: int, seed: int) -> dict:
    """The same random post-RoPE K/V of T tokens in a DynamicCache, a StaticCache (sized for the
    run) and a DMSCache whose decisions evict with the probability that leaves T / ratio tokens
    (the window always stays)."""
    import dms
    from transformers import DynamicCache, StaticCache

    cfg = dense.config
    S, D = cfg.num_key_value_heads, cfg.head_dim
    keep_p = max(0.0, (T / ratio - window - 1) / max(1, T - window - 1))
    gen = torch.Generator().manual_seed(seed)
    caches = dict(dynamic=DynamicCache(config=cfg), static=StaticCache(config=cfg, max_cache_len=T + steps),
                  dms=dms.DMSCache(model))
    for i, layer in enumerate(caches["dms"].layers):
        k = torch.randn(1, S, T, D, generator=gen)
        v = torch.randn(1, S, T, D, generator=gen)
        caches["dynamic"].update(k, v, i)
        caches["static"].update(k, v, i)
        layer.append(k[0], v[0], torch.rand(S, T, generator=gen) >= keep_p, None)
    return caches


def _steps(model, cache, tok, n: int, engine: str = "transformers") -> tuple[torch.Tensor, float]:
    """``n`` single-token forwards of ``tok`` [B, 1]: (last token, seconds). Engine "fast" is
    dms.models.decode on a DMS model (RoPE positions = tokens fed so far, as the forward numbers
    them without position_ids)."""
    from dms.compat import cache_kwargs
    from dms.models.decode import decoder

    t0 = time.perf_counter()
    with torch.no_grad():
        if engine == "fast":
            fast, tok = decoder(model), tok[:, 0]
            pos = torch.full_like(tok, cache.get_seq_length())
            for _ in range(n):
                tok = fast.step(cache, tok, pos).argmax(-1)
                pos = pos + 1
            return tok[:, None], time.perf_counter() - t0
        for _ in range(n):
            tok = model(input_ids=tok, **cache_kwargs(cache), use_cache=True).logits[:, -1:].argmax(-1)
    return tok, time.perf_counter() - t0


def _kv_bytes(cache) -> int:
    from dms.cache import DMSCache

    if isinstance(cache, DMSCache):
        return cache.stats()["bytes"]
    return sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)


def measure(contexts, steps: int, warmup: int, window: int, ratio: float, threads: int | None,
            block: int = 4, engine: str = "both") -> list[dict]:
    """Per context, the caches decode in turns of ``block`` steps (so that load changes on
    a shared machine hit all of them alike) until each did ``steps`` timed steps. ``engine``
    runs the DMS model through its transformers forward, dms.models.decode ("fast"), or both
    (DMSCache "dms" and "dms_fast", each on its own copy of the same cache); the dense caches
    always run through transformers."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if threads:
        torch.set_num_threads(threads)
    dense, model = _models(window)
    rows = []
    n = block * ((steps + block - 1) // block)
    for T in contexts:
        caches = _caches(dense, model, T, window, ratio, warmup + n, seed=T)
        engines = dict(dynamic="transformers", static="transformers",
                       dms="fast" if engine == "fast" else "transformers")
        if engine == "both":
            caches["dms_fast"], engines["dms_fast"] = copy.deepcopy(caches["dms"]), "fast"
        runner = dict(dynamic=dense, static=dense, dms=model, dms_fast=model)
        toks = {name: torch.tensor([[5]]) for name in caches}
        secs = dict.fromkeys(caches, 0.0)
        for name in caches:
            toks[name], _ = _steps(runner[name], caches[name], toks[name], warmup, engines[name])
        for _ in range(0, n, block):
            for name in caches:
                toks[name], dt = _steps(runner[name], caches[name], toks[name], block, engines[name])
                secs[name] += dt
        row = dict(context=T, compression=caches["dms"].stats()["compression_ratio"], engine=engine)
        for name, cache in caches.items():
            row[f"{name}_tok_s"] = n / secs[name]
            row[f"{name}_kv_bytes"] = _kv_bytes(cache)
        row["speedup"] = row["dms_tok_s"] / row["dynamic_tok_s"]
        row["speedup_static"] = row["dms_tok_s"] / row["static_tok_s"]
        row["bytes_ratio"] = row["dynamic_kv_bytes"] / row["dms_kv_bytes"]
        if engine == "both":
            row["speedup_static_fast"] = row["dms_fast_tok_s"] / row["static_tok_s"]
        rows.append(row)
        print(_fmt(row), flush=True)
        del caches
        gc.collect()
    return rows


def _fmt(r: dict) -> str:
    mib = 2**20
    label = "DMSCache (fast)" if r["engine"] == "fast" else "DMSCache"
    fast = (f"DMSCache (fast) {r['dms_fast_tok_s']:7.1f} tok/s, {r['speedup_static_fast']:.2f}x static | "
            if r["engine"] == "both" else "")
    return (f"context {r['context']:>6}: DynamicCache {r['dynamic_tok_s']:7.1f} tok/s "
            f"{r['dynamic_kv_bytes'] / mib:6.1f} MiB | StaticCache {r['static_tok_s']:7.1f} tok/s | "
            f"{label} {r['dms_tok_s']:7.1f} tok/s {r['dms_kv_bytes'] / mib:6.1f} MiB (CR {r['compression']:.2f}) | "
            f"speed-up {r['speedup']:.2f}x (vs static {r['speedup_static']:.2f}x) | {fast}"
            f"KV bytes ratio {r['bytes_ratio']:.2f}x")


def _fill_dms(model, batch: int, T: int, window: int, ratio: float, seed: int):
    """A DMSCache of ``batch`` sequences holding T random tokens, ~T / ratio kept (forced decisions),
    appended in time chunks so that the random K/V never exist for the whole context at once."""
    import dms

    cfg = model.config
    S, D = batch * cfg.num_key_value_heads, cfg.head_dim
    keep_p = max(0.0, (T / ratio - window - 1) / max(1, T - window - 1))
    gen = torch.Generator().manual_seed(seed)
    cache = dms.DMSCache(model)
    for layer in cache.layers:
        for a in range(0, T, 512):
            n = min(512, T - a)
            layer.append(torch.randn(S, n, D, generator=gen), torch.randn(S, n, D, generator=gen),
                         torch.rand(S, n, generator=gen) >= keep_p, None)
    return cache


def _fill_static(dense, batch: int, T: int, length: int, seed: int):
    """A StaticCache of ``length`` positions per sequence, the first T filled with random K/V."""
    from transformers import StaticCache

    cfg = dense.config
    gen = torch.Generator().manual_seed(seed)
    cache = StaticCache(config=cfg, max_cache_len=length)
    shape = (batch, cfg.num_key_value_heads, 0, cfg.head_dim)
    for i in range(cfg.num_hidden_layers):
        for a in range(0, T, 512):
            n = min(512, T - a)
            cache.layers[i].update(torch.randn(*shape[:2], n, shape[3], generator=gen),
                                   torch.randn(*shape[:2], n, shape[3], generator=gen))
    return cache


def measure_batched(context: int, budget: int, steps: int, warmup: int, window: int, ratio: float,
                    threads: int | None) -> dict:
    """Largest batch of ``context``-token sequences within ``budget`` bytes of KV for a StaticCache
    and a DMSCache, and the decode throughput of each (see the module docstring)."""
    if threads:
        torch.set_num_threads(threads)
    dense, model = _models(window)
    cfg = dense.config
    T = context - steps - warmup  # the StaticCache holds exactly `context` positions per sequence
    if T < 2 * window:
        raise ValueError(f"context={context} is too short for window {window} and {steps + warmup} steps")
    per_dense = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * context * cfg.head_dim * 4
    b_dense = budget // per_dense
    if b_dense < 1:
        raise ValueError(f"kv budget {budget} bytes holds no {context}-token sequence of a StaticCache "
                         f"({per_dense} bytes each)")

    # Per-sequence DMS bytes from one sequence, then the largest batch whose bytes (after as many
    # steps as the timed run) fit; the pool's slack per sequence shrinks as the batch grows.
    probe = _fill_dms(model, 1, T, window, ratio, seed=1)
    _steps(model, probe, torch.full((1, 1), 5), warmup + steps)
    b_dms = max(1, budget // _kv_bytes(probe))
    del probe
    while True:
        cache = _fill_dms(model, b_dms, T, window, ratio, seed=2)
        tok_dms, _ = _steps(model, cache, torch.full((b_dms, 1), 5), warmup + steps)
        if _kv_bytes(cache) <= budget or b_dms == 1:
            break
        b_dms = max(1, b_dms * budget // _kv_bytes(cache))
        del cache
        gc.collect()
    static = _fill_static(dense, b_dense, T, context, seed=3)
    tok_static, _ = _steps(dense, static, torch.full((b_dense, 1), 5), warmup)
    # Timed: alternating blocks of 4 steps, so that load changes on a shared machine hit both alike.
    secs = dict(static=0.0, dms=0.0)
    for done in range(0, steps, 4):
        n = min(4, steps - done)
        tok_static, dt = _steps(dense, static, tok_static, n)
        secs["static"] += dt
        tok_dms, dt = _steps(model, cache, tok_dms, n)
        secs["dms"] += dt
    static_tok_s, static_bytes = b_dense * steps / secs["static"], _kv_bytes(static)
    dms_tok_s, dms_bytes = b_dms * steps / secs["dms"], _kv_bytes(cache)
    compression = cache.stats()["compression_ratio"]
    row = dict(context=context, budget=budget, static_batch=b_dense, static_tok_s=static_tok_s,
               static_kv_bytes=static_bytes, dms_batch=b_dms, dms_tok_s=dms_tok_s, dms_kv_bytes=dms_bytes,
               compression=compression, batch_ratio=b_dms / b_dense, throughput_ratio=dms_tok_s / static_tok_s)
    mib = 2 ** 20
    print(f"context {context}, KV budget {budget / mib:.0f} MiB: StaticCache batch {b_dense} "
          f"{static_tok_s:.1f} tok/s {static_bytes / mib:.1f} MiB | DMSCache (CR {compression:.2f}) batch {b_dms} "
          f"{dms_tok_s:.1f} tok/s {dms_bytes / mib:.1f} MiB | batch {row['batch_ratio']:.2f}x, "
          f"tokens/s {row['throughput_ratio']:.2f}x", flush=True)
    return row


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384, 32768])
    p.add_argument("--steps", type=int, default=32, help="timed decode steps per context and cache")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--window", type=int, default=256, help="dms_window_size")
    p.add_argument("--ratio", type=float, default=8.0, help="forced compression ratio of the filled context")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="tiny contexts and few steps (CI smoke run)")
    p.add_argument("--engine", choices=ENGINES, default="both",
                   help="DMS decode through the transformers forward, dms.models.decode, or both side by side "
                        "(the dense caches always run through transformers)")
    p.add_argument("--batched", action="store_true",
                   help="throughput at equal KV memory: the largest batch each cache fits in --kv-budget-mib")
    p.add_argument("--context", type=int, default=8192, help="batched mode: tokens per sequence")
    p.add_argument("--kv-budget-mib", type=float, default=1024.0, help="batched mode: KV bytes allowed (MiB)")


def run(args) -> int:
    if args.batched:
        if args.quick:
            args.context, args.kv_budget_mib, args.steps, args.warmup, args.window = 512, 16.0, 4, 1, 32
        print(f"model {MODEL}, fp32, window {args.window}, forced ~{args.ratio:g}x, "
              f"threads {args.threads or torch.get_num_threads()}", flush=True)
        measure_batched(args.context, int(args.kv_budget_mib * 2 ** 20), args.steps, args.warmup, args.window,
                        args.ratio, args.threads)
        return 0
    if args.quick:
        args.contexts, args.steps, args.warmup, args.window = [256, 1024], 4, 1, 32
    print(f"model {MODEL}, batch 1, fp32, window {args.window}, forced ~{args.ratio:g}x, "
          f"threads {args.threads or torch.get_num_threads()}", flush=True)
    measure(args.contexts, args.steps, args.warmup, args.window, args.ratio, args.threads, engine=args.engine)
    return 0

