"""``dms retention``: which tokens each (layer, KV head) of a DMS model kept on one sample of a
task, as a heat map (PNG) and a summary on stdout (dms.eval.retention).

    dms retention dms/assets/dms-8x --tokenizer dms/assets/base --task arith_trace --index 3

The sample is the one ``dms eval`` scores as number INDEX of the task (seed SEED + INDEX, the
same prompt length rule), so a failing row of an evaluation can be looked at directly.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    from dms.eval.runner import EVAL_SEED
    from dms.tasks import TASKS

    p.description, p.formatter_class = __doc__, argparse.RawDescriptionHelpFormatter
    p.add_argument("model", help="folder of the DMS model")
    p.add_argument("--tokenizer", default=None, help="folder of its tokenizer (default: the model folder)")
    p.add_argument("--task", required=True, choices=sorted(TASKS))
    p.add_argument("--length", type=int, default=512, help="prompt tokens (raised to the task's minimum)")
    p.add_argument("--seed", type=int, default=EVAL_SEED, help=f"base seed, as dms eval's (default {EVAL_SEED})")
    p.add_argument("--index", type=int, default=0, help="sample number: the sample has seed SEED + INDEX")
    p.add_argument("--out", type=Path, default=None, help="PNG path (default: retention_TASK_SEED.png)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")


def run(args) -> int:
    import torch

    import dms
    from dms.eval.retention import describe, plot_retention, retention_map
    from dms.eval.runner import load_tokenizer, task_samples

    if args.index < 0 or args.seed < 0:
        raise ValueError(f"--seed and --index must be >= 0, got {args.seed} and {args.index}")
    if args.threads:
        torch.set_num_threads(args.threads)
    (sample,) = task_samples(args.task, args.length, 1, seed=args.seed + args.index)
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    model = dms.from_pretrained(args.model, dtype=torch.float32).eval()
    m = retention_map(model, tokenizer, sample)
    print(describe(m), flush=True)
    out = args.out or Path(f"retention_{args.task}_{sample.seed}.png")
    plot_retention(m, out, title=f"{args.model}: tokens kept per (layer, KV head)")
    print(f"wrote {out}", flush=True)
    return 0
