"""Synthetic long-context tasks (RULER-style retrieval, variable tracking, common-word
extraction) and a reasoning-trace task, with exact scoring.

``TASKS[name](length, seed, **options)`` returns a ``Sample``; ``score(task, generation,
sample)`` is the fraction of the sample's reference answers found in the generated text.
Pure Python: the tokenizer and model code live elsewhere.
"""
from __future__ import annotations

import re
from typing import Callable

from dms.tasks.generators import (CWE_UNCOMMON, LengthTooSmall, Sample, arith_trace, copy_list, count_tokens, cwe,
                                  kv_recall, niah_multikey, niah_multiquery, niah_multivalue, niah_single, vt)

TASKS: dict[str, Callable[..., Sample]] = {
    "niah_single": niah_single,
    "niah_multikey": niah_multikey,
    "niah_multivalue": niah_multivalue,
    "niah_multiquery": niah_multiquery,
    "vt": vt,
    "cwe": cwe,
    "arith_trace": arith_trace,
}

# Training-only data: generated and scored like a task, but not part of the benchmark.
AUXILIARY: dict[str, Callable[..., Sample]] = {"copy_list": copy_list, "kv_recall": kv_recall}


def generate(task: str, length: int, seed: int, **options) -> Sample:
    gen = TASKS.get(task) or AUXILIARY.get(task)
    if gen is None:
        raise KeyError(f"unknown task {task!r}; expected one of {sorted(TASKS) + sorted(AUXILIARY)}")
    return gen(length, seed, **options)


def min_length(task: str, **options) -> int:
    """The shortest prompt length (in tokens) the task accepts with these options."""
    try:
        generate(task, 1, 0, **options)
    except LengthTooSmall as e:
        return e.minimum
    return 1


def normalize(text: str) -> str:
    """Lowercase, single spaces, digit tokens joined back into numbers ("4 7 2" -> "472"),
    so a decoded token stream and a plain text compare equal."""
    text = " ".join(text.lower().split())
    return re.sub(r"(?<=\d) (?=\d)", "", text)


def score(task: str, generation: str, sample: Sample) -> float:
    """Fraction of ``sample.answers`` that occur in ``generation`` as whole words."""
    if task != sample.task:
        raise ValueError(f"task={task!r} does not match the sample's task {sample.task!r}")
    padded = f" {normalize(generation)} "
    hits = sum(f" {normalize(a)} " in padded for a in sample.answers)
    return hits / len(sample.answers)


__all__ = ["TASKS", "AUXILIARY", "CWE_UNCOMMON", "Sample", "LengthTooSmall", "generate", "min_length", "score", "normalize", "count_tokens"]
