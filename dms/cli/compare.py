"""``dms compare``: paired comparison of two ``dms eval`` results on the same seeds, e.g. a
candidate retrofit (B) against the shipped one (A).

    dms compare runs/shipped-8x runs/candidate-8x --label dms@8x

Each sample was scored by both, so the table gives per task B - A with a 95% paired interval
(far narrower than either result's own) and how many samples B scored higher / lower; the last
line says whether the mean over tasks resolves a difference (dms.eval.compare).
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description, p.formatter_class = __doc__, argparse.RawDescriptionHelpFormatter
    p.add_argument("a", help="results.json of dms eval (or its folder): the reference")
    p.add_argument("b", help="results.json of dms eval (or its folder): the candidate")
    p.add_argument("--label", default=None,
                   help="row label on both sides, e.g. dms@8x (default: the one label both files hold)")
    p.add_argument("--label-a", default=None, help="row label of A (overrides --label)")
    p.add_argument("--label-b", default=None, help="row label of B (overrides --label)")
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the comparison as JSON")


def run(args) -> int:
    from dms.eval.compare import compare, load, table

    a, b = load(args.a), load(args.b)
    c = compare(a, b, args.label_a or args.label, args.label_b or args.label)
    print(f"A: {args.a}\nB: {args.b}\n", flush=True)
    print(table(c), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        doc = dict(a=str(args.a), b=str(args.b), **asdict(c), verdict=c.verdict)
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {args.json}", flush=True)
    return 0
