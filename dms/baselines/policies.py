"""Eviction choices of the baseline policies, as pure functions over per-slot tensors.

Every function sees the slots of ``S`` sequences (one per batch row and KV head) as ``[S, L]``
tensors: ``positions`` (int64 token index within the sequence), ``live`` (bool) and, where the
policy needs it, ``scores`` (float). It returns ``keep`` bool ``[S, L]``: the live slots to
retain, exactly ``min(budget, live count)`` of them per row.

* StreamingLLM (Xiao et al. 2023): the first ``sinks`` tokens (attention sinks) and the most
  recent ``budget - sinks``.
* H2O (Zhang et al. 2023): the ``recent`` newest tokens, then the heavy hitters: the highest
  attention accumulated since the token entered the cache.
* TOVA (Oren et al. 2024): the highest attention from the current (newest) query.

Quest (Tang et al. 2024) evicts nothing: ``quest_select`` picks, per decode step, the pages
(``page_size`` consecutive slots) whose keys can score highest against the current query,
by the per-channel min/max bound ``sum_d max(q_d * min_d, q_d * max_d)``.
"""
from __future__ import annotations

import torch

POLICIES = ("streaming", "h2o", "tova", "quest")


def _check(live: torch.Tensor, budget: int) -> None:
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
        raise ValueError(f"budget must be an int >= 1 (tokens per KV head), got {budget!r}")
    if live.dtype != torch.bool or live.dim() != 2:
        raise ValueError(f"live must be a bool [S, L] tensor, got {live.dtype} {tuple(live.shape)}")


def _top(priority: torch.Tensor, live: torch.Tensor, budget: int) -> torch.Tensor:
    """The ``budget`` live slots of highest priority per row (all live slots if fewer)."""
    L = live.shape[1]
    if L <= budget:
        return live.clone()
    prio = priority.double().masked_fill(~live, float("-inf"))
    idx = prio.topk(budget, dim=1).indices
    keep = torch.zeros_like(live).scatter_(1, idx, True)
    return keep & live


def _newest(positions: torch.Tensor, live: torch.Tensor, n: int) -> torch.Tensor:
    """bool [S, L]: the ``n`` live slots of largest position per row."""
    return _top(positions, live, n) if n > 0 else torch.zeros_like(live)


def streaming_keep(positions: torch.Tensor, live: torch.Tensor, budget: int, sinks: int = 4) -> torch.Tensor:
    _check(live, budget)
    if not 0 <= sinks < budget:
        raise ValueError(f"sinks must be in [0, budget) so that recent tokens fit; got sinks={sinks}, "
                         f"budget={budget}")
    big = float(torch.iinfo(torch.int64).max)
    prio = torch.where(positions < sinks, big, positions.double())
    return _top(prio, live, budget)


def h2o_keep(positions: torch.Tensor, scores: torch.Tensor, live: torch.Tensor, budget: int,
             recent: int) -> torch.Tensor:
    _check(live, budget)
    if recent < 0:
        raise ValueError(f"recent must be >= 0, got {recent}")
    protected = _newest(positions, live, min(recent, budget))
    prio = scores.double().masked_fill(protected, float("inf"))
    return _top(prio, live, budget)


def tova_keep(scores: torch.Tensor, live: torch.Tensor, budget: int) -> torch.Tensor:
    _check(live, budget)
    return _top(scores, live, budget)


def page_bounds(keys: torch.Tensor, live: torch.Tensor, page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per page of ``page_size`` consecutive slots, the min and max of every key channel over
    its live slots: keys [S, L, D], live [S, L] -> kmin, kmax float [S, ceil(L / page_size), D]
    (+inf / -inf for a page without a live slot)."""
    S, L, D = keys.shape
    P = -(-L // page_size)
    pad = P * page_size - L
    k = torch.nn.functional.pad(keys.float(), (0, 0, 0, pad)).view(S, P, page_size, D)
    alive = torch.nn.functional.pad(live, (0, pad)).view(S, P, page_size, 1)
    return k.masked_fill(~alive, float("inf")).amin(2), k.masked_fill(~alive, float("-inf")).amax(2)


def quest_pages(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor, lens: torch.Tensor, page_size: int,
                budget: int) -> torch.Tensor:
    """Pages a decode query reads under Quest, from ``page_bounds``: the ``max(1, budget //
    page_size)`` pages with the highest bound (summed over the G query heads of the sequence)
    plus the page of the newest slot (slots fill in order: Quest never evicts). q [S, G, D],
    kmin/kmax [S, P, D], lens [S] live slots -> bool [S, P]."""
    S, P, _ = kmin.shape
    qf = q.float()[:, :, None, :]  # [S, G, 1, D]
    bound = torch.maximum(qf * kmin[:, None], qf * kmax[:, None]).sum(-1).sum(1)  # [S, P]
    page_live = kmin[..., 0] <= kmax[..., 0]
    bound = bound.masked_fill(~page_live, float("-inf"))
    chosen = torch.zeros_like(page_live)
    chosen.scatter_(1, bound.topk(min(P, max(1, budget // page_size)), dim=1).indices, True)
    newest = (lens.long() - 1).clamp_min(0) // page_size
    chosen[torch.arange(S, device=q.device), newest] = True
    return chosen & page_live


def quest_select(q: torch.Tensor, keys: torch.Tensor, live: torch.Tensor, page_size: int, budget: int) -> torch.Tensor:
    """Slots a decode query reads under Quest (``quest_pages`` over the pages of ``keys``).
    q [S, G, D], keys [S, L, D], live [S, L] (the first slots of each row) -> bool [S, L]."""
    _check(live, budget)
    kmin, kmax = page_bounds(keys, live, page_size)
    chosen = quest_pages(q, kmin, kmax, live.sum(1), page_size, budget)
    return chosen.repeat_interleave(page_size, dim=1)[:, :keys.shape[1]] & live
