"""Paired comparison of two ``dms eval`` results scored on the same prompts.

Two results with the same base seed, prompt length and sample count scored the same samples, so
per-sample differences d_i = B_i - A_i cancel the samples' own difficulty: their variance is far
smaller than that of either accuracy, and a gain of 0.01 can be resolved where each result's own
interval is +-0.03. Per task: mean(d) +- z * sd(d) / sqrt(n) (sd with n - 1). Mean over tasks
(equal weight, as the eval's "mean acc"): the mean of the task differences, tasks independent so
the variances of their mean differences add: +- z * sqrt(sum sd_t^2 / n_t) / T.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from dms.eval.stats import Z95


@dataclass(frozen=True)
class Diff:
    """B - A on one task (or the mean over tasks): accuracies, difference and its 95% interval,
    and how many samples B scored higher / lower than A."""
    task: str
    a: float
    b: float
    diff: float
    low: float
    high: float
    better: int
    worse: int


@dataclass(frozen=True)
class Comparison:
    label_a: str
    label_b: str
    tasks: list[Diff]
    mean: Diff

    @property
    def verdict(self) -> str:
        if self.mean.low > 0:
            return "B is better than A at 95%"
        if self.mean.high < 0:
            return "B is worse than A at 95%"
        return "no difference resolved at 95%"


def load(path: str | Path) -> dict:
    """A results.json, given as its path or the folder holding it."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"no such results file: {path}")
    return json.loads(path.read_text())


def _labels(doc: dict) -> list[str]:
    return list(dict.fromkeys(r["label"] for r in doc["rows"]))


def _choose(a: dict, b: dict, label_a: str | None, label_b: str | None) -> tuple[str, str]:
    """The labels to compare: as given (one given names both sides), else the one label both
    files hold."""
    label_a, label_b = label_a or label_b, label_b or label_a
    held_a, held_b = _labels(a), _labels(b)
    if label_a is None:
        common = [label for label in held_a if label in held_b]
        if len(common) == 1:
            return common[0], common[0]
        why = "no label is in both" if not common else f"{len(common)} labels are in both"
        raise ValueError(f"{why} results: choose with --label, or --label-a and --label-b "
                         f"(A has {', '.join(held_a)}; B has {', '.join(held_b)})")
    for side, held, label in (("A", held_a, label_a), ("B", held_b, label_b)):
        if label not in held:
            raise ValueError(f"{side} has no rows labelled {label!r} (it has {', '.join(held)})")
    return label_a, label_b


def _scores(doc: dict, label: str, side: str) -> dict[str, list[float]]:
    """task -> per-sample scores of the rows labelled ``label``."""
    out = {}
    for r in doc["rows"]:
        if r["label"] != label:
            continue
        if r["task"] in out:
            raise ValueError(f"{side} has two rows labelled {label!r} for task {r['task']}")
        if len(r.get("scores") or []) != r["samples"]:
            raise ValueError(f"{side} row {label} / {r['task']} lacks its per-sample scores")
        out[r["task"]] = r["scores"]
    return out


def _check_same_prompts(a: dict, b: dict, sa: dict, sb: dict) -> None:
    for key in ("seed", "length"):
        va, vb = a["meta"].get(key), b["meta"].get(key)
        if va is None or va != vb:
            raise ValueError(f"the results were scored on different prompts ({key} {va} in A, {vb} in B): "
                             "a paired comparison needs the same seed and length")
    one_side = set(sa) ^ set(sb)
    if one_side:
        raise ValueError(f"only one of the results scores {', '.join(sorted(one_side))}: "
                         "a paired comparison needs the same tasks")
    for task in sa:
        if len(sa[task]) != len(sb[task]):
            raise ValueError(f"{task} has {len(sa[task])} samples in A and {len(sb[task])} in B: "
                             "a paired comparison needs the same samples")
        if len(sa[task]) < 2:
            raise ValueError(f"{task} has {len(sa[task])} sample: a paired interval needs at least 2")


def _paired(task: str, a: list[float], b: list[float], z: float) -> tuple[Diff, float]:
    """The task's Diff and the variance of its mean difference."""
    n = len(a)
    d = [y - x for x, y in zip(a, b)]
    mean = sum(d) / n
    # Equal differences are exact: no rounding residue may widen the point into an interval.
    var = 0.0 if len(set(d)) == 1 else sum((x - mean) ** 2 for x in d) / (n - 1) / n
    half = z * math.sqrt(var)
    return Diff(task, sum(a) / n, sum(b) / n, mean, mean - half, mean + half,
                better=sum(x > 0 for x in d), worse=sum(x < 0 for x in d)), var


def compare(a: dict, b: dict, label_a: str | None = None, label_b: str | None = None, z: float = Z95) -> Comparison:
    """B - A per task and on the mean over tasks, for two loaded results (``load``)."""
    label_a, label_b = _choose(a, b, label_a, label_b)
    sa, sb = _scores(a, label_a, "A"), _scores(b, label_b, "B")
    _check_same_prompts(a, b, sa, sb)
    pairs = [_paired(task, sa[task], sb[task], z) for task in sa]
    tasks = [p for p, _ in pairs]
    T = len(tasks)
    diff = sum(t.diff for t in tasks) / T
    half = z * math.sqrt(sum(v for _, v in pairs)) / T
    mean = Diff("mean", sum(t.a for t in tasks) / T, sum(t.b for t in tasks) / T, diff, diff - half, diff + half,
                better=sum(t.better for t in tasks), worse=sum(t.worse for t in tasks))
    return Comparison(label_a, label_b, tasks, mean)


def table(c: Comparison) -> str:
    """Markdown table of a Comparison, then its verdict."""
    head = f"| task | A: {c.label_a} | B: {c.label_b} | B - A [95% CI] | B better / worse |"
    lines = [head, "|---|---|---|---|---|"]
    for t in c.tasks + [c.mean]:
        lines.append(f"| {t.task} | {t.a:.3f} | {t.b:.3f} | {t.diff:+.3f} [{t.low:+.3f}, {t.high:+.3f}] "
                     f"| {t.better} / {t.worse} |")
    return "\n".join(lines + ["", f"{c.verdict} (mean B - A: {c.mean.diff:+.3f} [{c.mean.low:+.3f}, "
                                  f"{c.mean.high:+.3f}])"])
