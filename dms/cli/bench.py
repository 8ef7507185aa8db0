"""``dms bench``: decode speed and KV memory, DMS cache vs transformers DynamicCache, side by
side in one run (CPU). benchmarks/bench_decode.py runs the same thing as a script.

A KV-heavy tiny Llama (random weights) decodes at several context lengths with two caches
holding the same random keys/values: a DynamicCache with all T tokens, and a DMSCache into
which the same T tokens were appended with forced random decisions at ~8x compression. The
decisions are forced, not learned: this measures the systems cost of the cache (memory held,
time per decode step), not accuracy. During the timed steps the DMS model's adapter is set to
evict every token leaving the window, so the compression stays put.

    dms bench              # 4K, 16K, 32K
    dms bench --quick      # tiny contexts, for CI
"""
from __future__ import annotations

import argparse
import gc
import time

import torch

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
            layer.self_attn.dms_adapter.proj.bias.fill_(1.0)  # logit 100 - 5 > 0: always evict
    return dense, model


def _fill(dense, model, T: int, window: int, ratio: float, seed: int):
    """Same random post-RoPE K/V into both caches; DMS decisions evict with the probability that
    leaves T / ratio tokens (the window always stays)."""
    import dms
    from transformers import DynamicCache

    cfg = dense.config
    S, D = cfg.num_key_value_heads, cfg.head_dim
    keep_p = max(0.0, (T / ratio - window - 1) / max(1, T - window - 1))
    gen = torch.Generator().manual_seed(seed)
    dyn = DynamicCache(config=cfg)
    cache = dms.DMSCache(model)
    for i, layer in enumerate(cache.layers):
        k = torch.randn(1, S, T, D, generator=gen)
        v = torch.randn(1, S, T, D, generator=gen)
        dyn.update(k, v, i)
        layer.append(k[0], v[0], torch.rand(S, T, generator=gen) >= keep_p, None)
    return dyn, cache


def _decode(model, cache, steps: int, warmup: int) -> float:
    """tokens/s of ``steps`` single-token forwards (batch 1) after ``warmup`` untimed ones."""
    tok = torch.tensor([[5]])
    with torch.no_grad():
        for i in range(warmup + steps):
            if i == warmup:
                t0 = time.perf_counter()
            logits = model(input_ids=tok, past_key_values=cache, use_cache=True).logits
            tok = logits[:, -1:].argmax(-1)
    return steps / (time.perf_counter() - t0)


def _dense_bytes(cache) -> int:
    return sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)


def measure(contexts, steps: int, warmup: int, window: int, ratio: float, threads: int | None) -> list[dict]:
    if threads:
        torch.set_num_threads(threads)
    dense, model = _models(window)
    rows = []
    for T in contexts:
        dyn, cache = _fill(dense, model, T, window, ratio, seed=T)
        dense_tps = _decode(dense, dyn, steps, warmup)
        dms_tps = _decode(model, cache, steps, warmup)
        stats = cache.stats()
        row = dict(context=T, dense_tok_s=dense_tps, dms_tok_s=dms_tps, speedup=dms_tps / dense_tps,
                   dense_kv_bytes=_dense_bytes(dyn), dms_kv_bytes=stats["bytes"],
                   compression=stats["compression_ratio"])
        row["bytes_ratio"] = row["dense_kv_bytes"] / row["dms_kv_bytes"]
        rows.append(row)
        print(_fmt(row), flush=True)
        del dyn, cache
        gc.collect()
    return rows


def _fmt(r: dict) -> str:
    mib = 2**20
    return (f"context {r['context']:>6}: dense {r['dense_tok_s']:8.1f} tok/s {r['dense_kv_bytes'] / mib:8.1f} MiB | "
            f"dms {r['dms_tok_s']:8.1f} tok/s {r['dms_kv_bytes'] / mib:7.1f} MiB (CR {r['compression']:.2f}) | "
            f"speed-up {r['speedup']:.2f}x, KV bytes ratio {r['bytes_ratio']:.2f}x")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384, 32768])
    p.add_argument("--steps", type=int, default=32, help="timed decode steps per context and cache")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--window", type=int, default=256, help="dms_window_size")
    p.add_argument("--ratio", type=float, default=8.0, help="forced compression ratio of the filled context")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="tiny contexts and few steps (CI smoke run)")


def run(args) -> int:
    if args.quick:
        args.contexts, args.steps, args.warmup, args.window = [256, 1024], 4, 1, 32
    print(f"model {MODEL}, batch 1, fp32, window {args.window}, forced ~{args.ratio:g}x, "
          f"threads {args.threads or torch.get_num_threads()}", flush=True)
    measure(args.contexts, args.steps, args.warmup, args.window, args.ratio, args.threads)
    return 0

