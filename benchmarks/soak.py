"""Soak: decode many tokens through the DMS cache of a tiny model whose decisions evict every
token leaving the window, so the retained set is steady; record resident memory (VmRSS) and
the page pool over time. Both must stay flat once the retained set is steady.

    OMP_NUM_THREADS=1 python benchmarks/soak.py --steps 100000 --plot benchmarks/soak.png

Prints one line per sample and a summary; exits 1 if the pool grew or RSS grew by more than
--rss-slack-mib after the warm-up (the first 10% of the steps).
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

import dms
from dms.compat import cache_kwargs
from dms.models.tiny import tiny_model


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def evicting_model(window: int, steps: int):
    """Tiny Llama, adapter variant, adapter bias set so that every logit is > 0 (evict)."""
    model = tiny_model("llama", max_position_embeddings=steps + 64)
    dms.apply(model, dms_window_size=window, dms_separate_alpha=True)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.dms_proj_alpha.bias.fill_(1.0)  # logit = 1 * alpha_scale - offset > 0
    return model


def pool_pages(cache) -> int:
    return sum(layer.store.num_pages for layer in cache.layers if layer.is_initialized)


def run(args) -> int:
    torch.manual_seed(0)
    model = evicting_model(args.window, args.steps)
    cache = dms.DMSCache(model, page_size=args.page_size)
    ids = torch.randint(3, 128, (args.batch, 1))
    samples = []  # (step, seconds, rss MiB, pool pages, retained tokens, syncs)
    start = time.perf_counter()
    with torch.inference_mode():
        for step in range(args.steps):
            pos = torch.full((args.batch, 1), step, dtype=torch.long)
            logits = model(input_ids=ids, position_ids=pos, **cache_kwargs(cache), use_cache=True).logits
            ids = logits[:, -1:].argmax(-1)
            if step % args.every == 0 or step == args.steps - 1:
                stats = cache.stats()
                syncs = sum(layer.syncs for layer in cache.layers)
                samples.append((step, time.perf_counter() - start, rss_mib(), pool_pages(cache),
                                stats["retained"], syncs))
                print("step {:>7}  {:7.1f}s  rss {:8.1f} MiB  pool {:5d} pages  retained {:6d}  syncs {:5d}"
                      .format(*samples[-1]), flush=True)
    return summarise(samples, args)


def summarise(samples, args) -> int:
    warm = [s for s in samples if s[0] >= args.steps // 10]
    first, last = warm[0], warm[-1]
    rss_growth = last[2] - first[2]
    pool_growth = max(s[3] for s in warm) - first[3]
    steps_per_s = samples[-1][0] / samples[-1][1]
    print(f"summary: {args.steps} steps, {steps_per_s:.0f} steps/s, batch {args.batch}, window {args.window}, "
          f"page size {args.page_size}")
    print(f"  after warm-up (step {first[0]} -> {last[0]}): RSS {first[2]:.1f} -> {last[2]:.1f} MiB "
          f"({rss_growth:+.1f}), pool {first[3]} -> {last[3]} pages (max growth {pool_growth}), "
          f"retained {first[4]} -> {last[4]} tokens, syncs {first[5]} -> {last[5]}")
    if args.plot:
        plot(samples, args)
    flat = pool_growth == 0 and rss_growth <= args.rss_slack_mib
    print("  flat:", "yes" if flat else "NO")
    return 0 if flat else 1


def plot(samples, args) -> None:
    from dms.eval.report import pyplot

    plt = pyplot()

    step = [s[0] for s in samples]
    fig, (ax_rss, ax_pool) = plt.subplots(2, 1, sharex=True, figsize=(7, 5))
    ax_rss.plot(step, [s[2] for s in samples])
    ax_rss.set_ylabel("RSS (MiB)")
    ax_rss.set_title(f"DMS cache soak: tiny Llama, batch {args.batch}, window {args.window}, every token evicted")
    ax_pool.plot(step, [s[3] for s in samples], label="pool pages (all layers)")
    ax_pool.plot(step, [s[4] / args.page_size for s in samples], label="retained tokens / page size")
    ax_pool.set_ylabel("pages")
    ax_pool.set_xlabel("decode step")
    ax_pool.set_ylim(bottom=0)
    ax_pool.legend()
    fig.tight_layout()
    fig.savefig(args.plot, dpi=100)
    print(f"  plot: {args.plot}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=100_000)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--every", type=int, default=1000, help="sample every N steps")
    p.add_argument("--rss-slack-mib", type=float, default=8.0,
                   help="allowed RSS growth after the warm-up (allocator noise)")
    p.add_argument("--plot", default=None, help="write a PNG of RSS and pool size over time")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
