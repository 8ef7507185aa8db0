"""Prefill time of the shipped dms-8x through transformers + DMSCache: one prompt of T random
tokens into an empty cache, median of 5 runs (OMP_NUM_THREADS sets the threads).

    OMP_NUM_THREADS=1 python benchmarks/bench_prefill.py 1024 2048
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import dms

MODEL = Path(__file__).resolve().parents[1] / "dms" / "assets" / "dms-8x"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("lengths", type=int, nargs="+", help="prompt tokens")
    args = p.parse_args()
    torch.manual_seed(0)
    model = dms.from_pretrained(str(MODEL)).eval()
    for T in args.lengths:
        ids = torch.randint(5, 150, (1, T))
        times = []
        with torch.inference_mode():
            for _ in range(5):
                cache = dms.DMSCache(model)
                start = time.perf_counter()
                model(ids, past_key_values=cache, use_cache=True)
                times.append(time.perf_counter() - start)
        print(f"T={T}: prefill median {sorted(times)[2] * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
