"""Retrofit training throughput (tokens/s) on CPU for tiny random models, every configuration
in one process, side by side. Prints a markdown table for BENCHMARKS.md.

    OMP_NUM_THREADS=2 python scripts/bench_retrofit.py [--steps 12] [--skip 2]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile

import torch

from dms.models.tiny import tiny_model
from dms.train import retrofit

SIZES = {
    # name: (tiny_model overrides, seq_len, batch)
    "tiny (2 layers, hidden 64, vocab 128)": ({}, 256, 4),
    "small (4 layers, hidden 256, 8q/2kv heads x 32, vocab 4096)":
        (dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
              num_key_value_heads=2, head_dim=32, vocab_size=4096), 512, 2),
}
RUNS = {
    "adapter-only, neuron": dict(variant="neuron"),
    "adapter-only, adapter": dict(variant="adapter"),
    "adapter-only, neuron, activation checkpointing": dict(variant="neuron", activation_checkpointing=True),
    "full fine-tune, neuron": dict(variant="neuron", train_mode="full"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--skip", type=int, default=2, help="warm-up steps left out of the median")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, steps {args.steps} (median of the last "
          f"{args.steps - args.skip})\n")
    print("| model | seq x batch | run | tokens/s | s/step |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for size, (overrides, seq_len, batch) in SIZES.items():
            vocab = overrides.get("vocab_size", 128)
            data = os.path.join(tmp, f"data{vocab}.jsonl")
            g = torch.Generator().manual_seed(0)
            with open(data, "w") as f:
                for _ in range(64):
                    f.write(json.dumps({"input_ids": torch.randint(3, vocab, (seq_len,), generator=g).tolist()}) + "\n")
            for run, extra in RUNS.items():
                out = os.path.join(tmp, "out")
                retrofit(tiny_model("llama", **overrides), data=[data], output_dir=out, steps=args.steps,
                         seq_len=seq_len, batch_size=batch, window=16, target_cr=4.0, progress=False, **extra)
                with open(os.path.join(out, "train_log.jsonl")) as f:
                    log = [json.loads(line) for line in f][args.skip:]
                tps = statistics.median(r["tokens_per_s"] for r in log)
                sec = statistics.median(r["seconds"] for r in log)
                print(f"| {size} | {seq_len} x {batch} | {run} | {tps:,.0f} | {sec:.3f} |", flush=True)


if __name__ == "__main__":
    main()
