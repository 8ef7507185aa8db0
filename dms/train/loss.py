"""Retrofit loss: KL(student || teacher) on next-token distributions + the compression term
(the paper's one-sided term, or the opt-in calibrated one), and the compression-ratio
curriculum (docs/design.md §1)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def compression_ratio_at(step: int, target_cr: float, ramp_steps: int) -> float:
    """CR(step): linear from 1 at step 0 to ``target_cr`` at ``ramp_steps``, then constant.
    ``step`` counts optimizer steps already taken (0 for the first)."""
    if ramp_steps <= 0:
        return float(target_cr)
    return 1.0 + (target_cr - 1.0) * min(1.0, step / ramp_steps)


def target_fraction(step: int, target_cr: float, ramp_steps: int) -> float:
    """Fraction of tokens to evict at ``step``: 1 - 1/CR(step)."""
    return 1.0 - 1.0 / compression_ratio_at(step, target_cr, ramp_steps)


def evicted_fraction(decisions: list[torch.Tensor], valid: torch.Tensor, per_row: bool = False) -> torch.Tensor:
    """Mean of the (straight-through) decisions [B, Hkv, T] of every layer over the entries
    ``valid`` [B, T] marks (see ``dms.attention.training.decision_mask``); with ``per_row``, one
    mean per sequence [B]."""
    w = valid.to(decisions[0].dtype)[:, None, :]
    dims = (1, 2) if per_row else (0, 1, 2)
    total = sum((d * w).sum(dims) for d in decisions)
    count = sum(w.sum(dims) * d.shape[1] for d in decisions)
    return total / count.clamp(min=1)


def mean_abs_logit(logits: list[torch.Tensor], valid: torch.Tensor) -> torch.Tensor:
    """Mean |eviction logit| over the ``valid`` decisions of every layer: a saturation gauge.
    A fresh model sits at alpha_offset; the relaxed decision has gradient p(1 - p) / tau, which
    vanishes once |logit| is many times the logistic noise (std 1.8), so a mean in the tens says
    the KL can no longer move most decisions (lower alpha_scale or the learning rate)."""
    return evicted_fraction([l.abs() for l in logits], valid)


def compression_loss(fraction: torch.Tensor, target_frac: float) -> torch.Tensor:
    """max(0, target_frac - fraction): pushes eviction up to the target, never beyond."""
    return F.relu(target_frac - fraction)


def window_fraction(cr: float, lengths: torch.Tensor, window: int, cap: float) -> torch.Tensor:
    """Per sequence of ``lengths`` [B] tokens, the evicted fraction that leaves it at compression
    ratio ``cr`` once all of it is in the cache: the newest ``window`` + 1 tokens are always held,
    so holding T / cr tokens means evicting 1 - (T / cr - window - 1) / (T - window - 1) of the
    older ones. Clamped to [0, ``cap``]: short sequences cannot reach a high ratio at all (T /
    (window + 1) is the most), and asking for it would teach the model to drop everything."""
    lengths = lengths.to(torch.float32)
    older = (lengths - window - 1).clamp(min=1)
    return (1.0 - (lengths / cr - window - 1) / older).clamp(0.0, cap)


def calibrated_compression_loss(row_fraction: torch.Tensor, lengths: torch.Tensor, cr: float, window: int,
                                tolerance: float, cap: float) -> torch.Tensor:
    """Opt-in replacement of the paper's term. Two-sided and per sequence: each sequence's evicted
    fraction is held between the fractions that give it ratio cr * (1 - tolerance) and
    cr * (1 + tolerance) at its own length (``window_fraction``). The paper's term sees one mean
    over a batch of mixed lengths, so the achieved ratio drifts with length (a constant eviction
    rate gives T / (window + 1 + keep * (T - window - 1)), which grows with T) and it never pulls
    back a ratio past the target."""
    lo = window_fraction(cr * (1.0 - tolerance), lengths, window, cap)
    hi = window_fraction(cr * (1.0 + tolerance), lengths, window, cap)
    return (F.relu(lo - row_fraction) + F.relu(row_fraction - hi)).mean()


def smoothed_fraction(fraction: torch.Tensor, running: float | None, beta: float) -> torch.Tensor:
    """The value beta * running + (1 - beta) * fraction with the gradient of ``fraction``: the
    compression term judges a running mean over steps but still acts on this batch's decisions.
    Per micro-batch of a few sequences the evicted fraction scatters around its mean, and the
    one-sided term then pushes up on every batch below the target and on none above, so the mean
    settles past it (10x at target 8x with 4 sequences); a running mean barely scatters."""
    if running is None or beta == 0:
        return fraction
    return fraction + beta * (running - fraction.detach())


def _kl_rows(student_h, teacher_h, student_w, teacher_w):
    s = F.log_softmax((student_h @ student_w.T).float(), dim=-1)
    with torch.no_grad():
        t = F.log_softmax((teacher_h @ teacher_w.T).float(), dim=-1)
    return (s.exp() * (s - t)).sum()


def kl_student_teacher(student_h: torch.Tensor, teacher_h: torch.Tensor, student_head: torch.nn.Linear,
                       teacher_head: torch.nn.Linear, valid: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    """Mean over ``valid`` [B, T] positions of KL(student || teacher) between the next-token
    distributions of final hidden states [B, T, H]. The vocabulary projection runs on
    ``chunk_tokens`` positions at a time and is recomputed in backward, so at most one chunk
    of [chunk_tokens, vocab] logits is alive (a 150K vocabulary fits)."""
    if student_head.bias is not None or teacher_head.bias is not None:
        raise NotImplementedError("kl_student_teacher supports bias-free output heads only")
    s, t = student_h[valid], teacher_h[valid]
    n = s.shape[0]
    if n == 0:
        return student_h.sum() * 0.0
    total = s.new_zeros((), dtype=torch.float32)
    for i in range(0, n, chunk_tokens):
        args = (s[i:i + chunk_tokens], t[i:i + chunk_tokens], student_head.weight, teacher_head.weight)
        total = total + (checkpoint(_kl_rows, *args, use_reentrant=False) if torch.is_grad_enabled() else _kl_rows(*args))
    return total / n
