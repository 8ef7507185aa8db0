"""``dms eval``: accuracy and KV compression of vanilla, DMS and eviction baselines on the
synthetic tasks; prints a table, writes JSON and an accuracy-vs-compression PNG.

    dms eval BASE --dms 4=runs/dms4 --dms 8=runs/dms8 --samples 16 --out results/

Baselines at ratio r get a token budget per KV head equal to the DMS model's mean retained
tokens at r on the same task (without a DMS model for r: prompt tokens / r); see
dms.eval.runner.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def _ratio_path(text: str) -> tuple[float, str]:
    ratio, sep, path = text.partition("=")
    try:
        r = float(ratio)
    except ValueError:
        r = None
    if not sep or not path or r is None or r < 1:
        raise argparse.ArgumentTypeError(f"expected RATIO=PATH with RATIO >= 1 (e.g. 4=runs/dms4x), got {text!r}")
    return r, path


def add_common(p: argparse.ArgumentParser, samples: int, length: int, out: str) -> None:
    from dms.eval.runner import EVAL_SEED, METHODS
    from dms.tasks import TASKS

    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=sorted(TASKS), metavar="TASK",
                   help=f"tasks (default: all of {', '.join(TASKS)})")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, metavar="METHOD",
                   help=f"methods (default: all of {', '.join(METHODS)})")
    p.add_argument("--samples", type=int, default=samples, help="samples per task")
    p.add_argument("--length", type=int, default=length, help="prompt tokens (raised to a task's minimum)")
    p.add_argument("--seed", type=int, default=EVAL_SEED,
                   help=f"base seed: sample i of every task has seed SEED + i (default {EVAL_SEED}, held out: "
                        "no training path draws these seeds)")
    p.add_argument("--batch-size", type=int, default=32,
                   help="samples per generate call (vanilla and the baselines share its prompt forward)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--out", default=out, help="folder for results.json and accuracy_vs_compression.png")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description, p.formatter_class = __doc__, argparse.RawDescriptionHelpFormatter
    p.add_argument("base", help="folder of the plain model (with its tokenizer); the baselines run on it")
    p.add_argument("--dms", type=_ratio_path, action="append", default=[], metavar="RATIO=PATH",
                   help="DMS model retrofitted for RATIO (repeatable)")
    p.add_argument("--ratios", type=float, nargs="*", default=[],
                   help="extra ratios for the baselines alone (budget = prompt tokens / ratio)")
    add_common(p, samples=16, length=256, out="dms-eval")


def execute(base: str, dms_models: dict[float, str], args, ratios=(), title: str = "dms eval") -> dict:
    """Runs the evaluation, prints the table and returns where JSON and PNG went."""
    import torch

    from dms.eval import EvalConfig, evaluate, plot, save_json, table
    from dms.eval.report import pyplot

    pyplot()  # before minutes of evaluation, not after: matplotlib is an optional extra
    if args.threads:
        torch.set_num_threads(args.threads)
    config = EvalConfig(tasks=args.tasks, length=args.length, samples=args.samples, batch_size=args.batch_size,
                        methods=args.methods, ratios=list(ratios), seed=args.seed)
    rows = evaluate(base, dms_models, config, progress=not args.no_progress)
    print(f"samples: seeds {args.seed} .. {args.seed + args.samples - 1} per task", flush=True)
    print(table(rows), flush=True)
    meta = dict(base=base, dms={f"{r:g}": p for r, p in dms_models.items()}, tasks=args.tasks,
                methods=args.methods, samples=args.samples, length=args.length, ratios=list(ratios),
                seeds=f"sample i of every task: seed {args.seed} + i", seed=args.seed,
                ci="95%: Wilson per task, normal with Agresti-Coull variances for the mean (dms.eval.stats)")
    out = Path(args.out)
    paths = dict(json=save_json(rows, out / "results.json", meta),
                 png=plot(rows, out / "accuracy_vs_compression.png", title))
    print(f"wrote {paths['json']} and {paths['png']}", flush=True)
    return paths


def run(args) -> int:
    execute(args.base, dict(args.dms), args, args.ratios)  # errors: reported by dms.cli.main
    return 0
