"""95% confidence intervals of the evaluation's accuracies.

Per task: the Wilson score interval of the mean score over n samples. A sample's score is the
fraction of its reference answers found (dms.tasks.score), in [0, 1]; a variable in [0, 1] with
mean p has variance at most p(1 - p), the variance of a 0/1 outcome, so the interval is exact
in kind for 0/1 scores and conservative for fractional ones.

Mean over tasks (each task weighted equally, as the table's "mean acc"): a normal interval
around the plain mean, with each task's variance taken Agresti-Coull style as
p~(1 - p~) / n~ (n~ = n + z^2, p~ = (n p + z^2 / 2) / n~), so that a task scored 1.000 or
0.000 still contributes its uncertainty; tasks are independent samples, so variances add.
Clipped to [0, 1].
"""
from __future__ import annotations

import math

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def _check(p: float, n: int) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p (a mean score) must be in [0, 1], got {p!r}")


def wilson(p: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a mean score ``p`` over ``n`` samples."""
    _check(p, n)
    z2 = z * z
    denom = 1 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def mean_interval(parts: list[tuple[float, int]], z: float = Z95) -> tuple[float, float]:
    """Interval of the unweighted mean of independent task scores; ``parts`` = [(p, n), ...]."""
    if not parts:
        raise ValueError("parts must hold at least one (mean score, samples) pair")
    var = 0.0
    for p, n in parts:
        _check(p, n)
        nt = n + z * z
        pt = (n * p + z * z / 2) / nt
        var += pt * (1 - pt) / nt
    mean = sum(p for p, _ in parts) / len(parts)
    half = z * math.sqrt(var) / len(parts)
    return max(0.0, mean - half), min(1.0, mean + half)
