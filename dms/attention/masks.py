"""Eviction flags and visibility masks (docs/design.md §1), vectorised for whole batches.

The visibility rule is written here once: a key stays visible to a query ``q`` iff it is not
later than ``q`` and ``q <= last``, where ``last`` is ``index + window`` for a flagged token
and ``NEVER`` otherwise (``last_query`` and ``visible``). The cache-free forward, the prefill
over a DMS cache and the tests' comparisons all build their masks from these two functions.

Distances are counted in valid (non-pad) tokens. ``dms.reference.visibility_mask`` is the
loop-based oracle the tests compare these against.
"""
from __future__ import annotations

import torch

NEVER = torch.iinfo(torch.int64).max  # "last visible query" of a token that is never evicted


def last_query(index: torch.Tensor, flagged: torch.Tensor, window: int) -> torch.Tensor:
    """int64: the last token index whose query may see a token of index ``index``: ``index +
    window`` once flagged for eviction, ``NEVER`` otherwise."""
    return torch.where(flagged, index + window, torch.full_like(index, NEVER))


def visible(key_index: torch.Tensor, last: torch.Tensor, query_index: torch.Tensor) -> torch.Tensor:
    """bool, broadcast: a query of index ``query_index`` sees a key of index ``key_index``
    whose last visible query is ``last`` (keys of unknown index pass -1: always earlier)."""
    return (key_index <= query_index) & (query_index <= last)


def valid_index(valid: torch.Tensor, start: torch.Tensor | None = None) -> torch.Tensor:
    """int64 [S, T]: index of each token among the valid tokens of its row (offset by
    ``start`` [S], the tokens already seen); a pad gets the index of the valid token before it."""
    idx = valid.long().cumsum(-1) - 1
    return idx if start is None else idx + start.long()[:, None]


def next_valid_decision(decisions: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """bool [S, T]: flag of each token = decision of the next valid token of its row
    (False for the last valid token, whose flag is not known yet)."""
    S, T = decisions.shape
    pos = torch.arange(T, device=decisions.device).expand(S, T)
    marked = torch.where(valid, pos, torch.full_like(pos, T))
    # nearest valid position strictly after t: reverse cumulative min of the next column on
    after = torch.cat([marked[:, 1:], torch.full_like(marked[:, :1], T)], dim=1)
    nxt = after.flip(-1).cummin(-1).values.flip(-1)
    has_next = nxt < T
    flag = torch.gather(decisions.bool(), 1, nxt.clamp_max(T - 1)) & has_next
    return flag & valid


def last_visible_query(decisions: torch.Tensor, valid: torch.Tensor, window: int,
                       start: torch.Tensor | None = None) -> torch.Tensor:
    """int64 [S, T]: the last valid-token index whose query may see each token: ``k + window``
    once flagged, ``NEVER`` otherwise, -1 for pads (never visible)."""
    idx = valid_index(valid, start)
    flag = next_valid_decision(decisions, valid)
    return last_query(idx, flag, window).masked_fill(~valid, -1)


def visibility_mask(decisions: torch.Tensor, window: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """bool [S, T, T]: query q may attend key k (same contract as dms.reference.visibility_mask)."""
    if valid is None:
        valid = torch.ones_like(decisions, dtype=torch.bool)
    valid = valid.bool()
    idx = valid_index(valid)
    last = last_visible_query(decisions, valid, window)
    return visible(idx[:, None, :], last[:, None, :], idx[:, :, None]) & valid[:, :, None]
