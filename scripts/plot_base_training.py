"""Plots the teacher-forced accuracy of a base-model run (train_base_model.py's log.jsonl) over
steps, one line per benchmark task and length; several logs (the phases of one run, in order)
are drawn as one curve, with a dashed line where each later phase starts.

    python scripts/plot_base_training.py RUN/base-trunk/log.jsonl RUN/base-hard/log.jsonl \
        RUN/base/log.jsonl --out benchmarks/base_training.png --until 31062
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from dms.eval.report import pyplot
from dms.tasks import TASKS

plt = pyplot()


def read_evals(paths: list[str], until: int | None) -> tuple[dict[int, dict[str, float]], list[int]]:
    """step -> eval record; a later log overrides earlier ones from its first step on."""
    evals: dict[int, dict[str, float]] = {}
    starts: list[int] = []
    for i, path in enumerate(paths):
        records = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]
        if i:
            first = min((r["step"] for r in records if r.get("event") == "start"), default=0)
            starts.append(first)
            evals = {s: e for s, e in evals.items() if s <= first}
        evals.update({r["step"]: r["eval"] for r in records
                      if "eval" in r and (until is None or r["step"] <= until)})
    return evals, starts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("logs", nargs="+", help="log.jsonl of each phase, in order")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--until", type=int, default=None, help="last step to draw")
    p.add_argument("--metric", choices=("exact", "token"), default="token")
    args = p.parse_args(argv)
    evals, starts = read_evals(args.logs, args.until)
    steps = sorted(evals)
    suffix = ":tok" if args.metric == "token" else ""
    lengths = sorted({k.split("@")[1].split(":")[0] for e in evals.values() for k in e}, key=int)
    fig, axes = plt.subplots(1, len(lengths), figsize=(6 * len(lengths), 4.2), sharey=True, squeeze=False)
    for ax, length in zip(axes[0], lengths):
        for task in TASKS:
            key = f"{task}@{length}{suffix}"
            ax.plot(steps, [evals[s].get(key, float("nan")) for s in steps], label=task, linewidth=1.2)
        for s in starts:
            ax.axvline(s, color="grey", linestyle="--", linewidth=0.8)
        ax.set_title(f"prompts of {length} tokens")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("teacher-forced " + ("token accuracy" if args.metric == "token" else "exact match"))
    axes[0][-1].legend(fontsize=8, loc="lower right")
    fig.suptitle("base model training (dashed: next phase starts)")
    fig.tight_layout()
    fig.savefig(args.out, dpi=90)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
