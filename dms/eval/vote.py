"""Self-consistency: several sampled chains answer the same prompt, the majority answer scores.

A chain's final answer (``final_answer``): for ``arith_trace`` the first "result is N" of its
normalised text (the trace's last step; what follows it is not part of the answer); for the
other tasks the whole normalised text. A chain without an answer abstains.

Ties (``majority``): among the answers with the most votes, the one whose first occurrence comes
earliest in chain order wins. Chains are numbered in sampling order, so the rule is deterministic
and does not favour any answer's value; with one chain it is that chain's answer.
"""
from __future__ import annotations

import re

from dms.tasks import Sample, normalize, score

_RESULT = re.compile(r"\bresult is (\d+)\b")


def final_answer(task: str, text: str) -> str | None:
    """The answer a chain commits to, normalised (dms.tasks.normalize), or None."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    norm = normalize(text)
    if task == "arith_trace":
        m = _RESULT.search(norm)
        return None if m is None else f"result is {m.group(1)}"
    return norm or None


def majority(answers: list[str | None]) -> tuple[str | None, int]:
    """(winning answer, its votes): most votes, ties to the earliest first occurrence; (None, 0)
    when every chain abstains."""
    if not isinstance(answers, (list, tuple)):
        raise TypeError(f"answers must be a list, got {type(answers).__name__}")
    counts: dict[str, int] = {}
    for a in answers:
        if a is not None:
            counts[a] = counts.get(a, 0) + 1  # dicts keep first-occurrence order
    if not counts:
        return None, 0
    best = max(counts.values())
    return next(a for a, c in counts.items() if c == best), best


def vote_score(sample: Sample, texts: list[str]) -> float:
    """Score (dms.tasks.score) of the majority answer of ``texts``, the chains sampled for
    ``sample``; 0 when every chain abstains."""
    if not texts:
        raise ValueError("texts must hold at least one chain's generation")
    answer, _ = majority([final_answer(sample.task, t) for t in texts])
    return 0.0 if answer is None else score(sample.task, answer, sample)
