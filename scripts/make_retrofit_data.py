"""Writes DMS retrofit training data from the synthetic tasks: one JSONL line per sample,
{"prompt": ..., "completion": target}, a format `dms retrofit --data` reads (tokenized with the
model folder's tokenizer; only the completion is distilled: the prompts are mostly filler whose
next-token distribution no eviction changes). Tasks take turns (a task of --weight N takes N turns
in a row); lengths cycle through --lengths once every task has had its turns.

    python scripts/make_retrofit_data.py --out runs/retrofit.jsonl --samples 4000 --lengths 128 256 512

Seeds start at --seed (default 2 * 10**9), away from the evaluation seeds (dms.eval.runner
uses 10**9 + i), so a retrofit never trains on the samples `dms eval` / `dms demo` score.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from tqdm import tqdm

from dms.tasks import CWE_UNCOMMON, TASKS, generate, min_length


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSONL file to write")
    p.add_argument("--samples", type=int, default=4000)
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512], help="prompt tokens")
    p.add_argument("--tasks", nargs="+", default=sorted(TASKS), choices=sorted(TASKS))
    p.add_argument("--seed", type=int, default=2 * 10 ** 9)
    p.add_argument("--cwe-uncommon", choices=CWE_UNCOMMON, default="even",
                   help="draw of cwe's uncommon words (dms.tasks.cwe); 'random' reproduces the shipped retrofits' data")
    p.add_argument("--weight", nargs="+", default=[], metavar="TASK=N",
                   help="give TASK N turns in each cycle instead of 1 (e.g. arith_trace=3 cwe=2)")
    args = p.parse_args(argv)
    if args.samples < 1:
        p.error("--samples must be >= 1")
    weights = {}
    for item in args.weight:
        task, _, n = item.partition("=")
        if task not in args.tasks or not n.isdigit() or int(n) < 1:
            p.error(f"--weight {item!r}: expected TASK=N with TASK one of --tasks and N a positive integer")
        weights[task] = int(n)
    cycle = [task for task in args.tasks for _ in range(weights.get(task, 1))]
    for task in args.tasks:
        shortest = min_length(task)
        if min(args.lengths) < shortest:
            p.error(f"task {task} needs prompts of at least {shortest} tokens; got --lengths {args.lengths}")

    options = {"cwe": {"uncommon": args.cwe_uncommon}}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        for i in tqdm(range(args.samples), desc="samples", unit="sample"):
            task = cycle[i % len(cycle)]
            length = args.lengths[(i // len(cycle)) % len(args.lengths)]
            sample = generate(task, length, args.seed + i, **options.get(task, {}))
            f.write(json.dumps({"prompt": sample.prompt, "completion": sample.target}) + "\n")
    print(f"wrote {args.samples} samples of {len(args.tasks)} tasks to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
