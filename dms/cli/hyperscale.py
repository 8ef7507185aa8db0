"""``dms hyperscale``: accuracy of W sampled chains per prompt (majority vote) against peak KV
memory and KV reads, for the plain model and DMS models, across a reasoning task's difficulty;
prints a table, writes hyperscale.json and hyperscale.png (accuracy vs peak memory and vs KV
reads, each method's Pareto frontier drawn).

    dms hyperscale dms/assets/base --dms 8=dms/assets/dms-8x --task vt --levels 4 6 8 --chains 1 2 4 8 16

Accounting and the fairness rule (vanilla's prompt cache shared by its chains and counted
once; same temperature and top-p for every method; greedy at W = 1): dms.eval.hyperscale.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    from dms.cli.eval import _ratio_path
    from dms.eval.hyperscale import CHAINS, DIFFICULTY, EVAL_SEED

    p.description, p.formatter_class = __doc__, argparse.RawDescriptionHelpFormatter
    p.add_argument("base", help="folder of the plain model (with its tokenizer)")
    p.add_argument("--dms", type=_ratio_path, action="append", default=[], metavar="RATIO=PATH",
                   help="DMS model retrofitted for RATIO (repeatable)")
    # vt by default: on the shipped base its accuracy falls step by step with the hops, while
    # arith_trace collapses past the 4 terms it was trained on (BENCHMARKS.md, dms hyperscale).
    p.add_argument("--task", default="vt", choices=sorted(DIFFICULTY),
                   help="reasoning task; its difficulty option: "
                        + ", ".join(f"{t}: {k}" for t, k in DIFFICULTY.items()))
    p.add_argument("--levels", type=int, nargs="+", default=[4, 6, 8],
                   help="values of the difficulty option (default 4 6 8; the tasks' own defaults: vt 3 hops, "
                        "arith_trace 4 terms)")
    p.add_argument("--chains", type=int, nargs="+", default=list(CHAINS), help="chains per prompt (W)")
    p.add_argument("--samples", type=int, default=16, help="prompts per level")
    p.add_argument("--length", type=int, default=256, help="prompt tokens")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=EVAL_SEED,
                   help=f"sample i has seed SEED + i (default {EVAL_SEED}, held out: no training path draws it)")
    p.add_argument("--sampling-seed", type=int, default=0, help="seed of the chains' sampling")
    p.add_argument("--batch-size", type=int, default=4, help="prompts per batch (each with W chains)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--out", default="dms-hyperscale", help="folder for hyperscale.json and hyperscale.png")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    import torch

    from dms.eval.hyperscale import HyperscaleConfig, hyperscale
    from dms.eval.hyperscale_report import plot, save_json, table
    from dms.eval.report import pyplot

    pyplot()  # before the run, not after: matplotlib is an optional extra
    if args.threads:
        torch.set_num_threads(args.threads)
    config = HyperscaleConfig(task=args.task, levels=args.levels, chains=args.chains, length=args.length,
                              samples=args.samples, batch_size=args.batch_size, temperature=args.temperature,
                              top_p=args.top_p, seed=args.seed, sampling_seed=args.sampling_seed)
    dms_models = dict(args.dms)
    points = hyperscale(args.base, dms_models, config, progress=not args.no_progress)
    print(f"{args.task} at {args.length} tokens, seeds {args.seed} .. {args.seed + args.samples - 1} per level, "
          f"T={args.temperature} top-p={args.top_p}", flush=True)
    print(table(points, config.knob), flush=True)
    meta = dict(base=args.base, dms={f"{r:g}": p for r, p in dms_models.items()}, task=args.task, knob=config.knob,
                levels=args.levels, chains=args.chains, samples=args.samples, length=args.length,
                temperature=args.temperature, top_p=args.top_p, seed=args.seed, sampling_seed=args.sampling_seed,
                seeds=f"sample i of every level: seed {args.seed} + i",
                ci="95% Wilson interval of the vote accuracy (dms.eval.stats)")
    out = Path(args.out)
    js = save_json(points, out / "hyperscale.json", meta)
    png = plot(points, out / "hyperscale.png", config.knob)
    print(f"wrote {js} and {png}", flush=True)
    return 0
