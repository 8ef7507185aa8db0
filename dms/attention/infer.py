"""Inference-time DMS attention kernels in plain PyTorch: the prefill over a DMS cache
(chunked, exact mask across the cache boundary; dms.cache calls it) and the dense path used
without a cache. Decode reads the paged store through dms.store.PagedStore.decode_attention.

Sequence s = b * H_kv + h holds the G query heads h*G .. h*G+G-1 as G query rows (no repeat_kv).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dms.attention.masks import last_query, last_visible_query, valid_index, visible


# Mask elements (sequences * query heads * query rows * keys) of one prefill step.
_MASK_BUDGET = 1 << 24


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None,
                    scale: float) -> torch.Tensor:
    """Eager attention (same arithmetic as transformers' eager_attention_forward, so that
    "off" mode reproduces the plain model): allowed bool [B, 1 or H_kv, Tq, Tk] or None."""
    B, Hq, _, D = q.shape
    G = Hq // k.shape[1]
    k = k.repeat_interleave(G, dim=1)
    v = v.repeat_interleave(G, dim=1)
    scores = torch.matmul(q, k.transpose(2, 3)) * scale
    if allowed is not None:
        allowed = allowed.repeat_interleave(G, dim=1) if allowed.shape[1] > 1 else allowed
        bias = torch.zeros(allowed.shape, dtype=scores.dtype, device=scores.device)
        scores = scores + bias.masked_fill_(~allowed, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)


def causal_padding_mask(padding: torch.Tensor | None, batch: int, q_len: int, past: int,
                        device) -> torch.Tensor:
    """bool [B, 1, q_len, past + q_len]: causal mask with the 2D padding mask (over all
    positions so far) applied to the keys, as transformers builds it."""
    kv = past + q_len
    qpos = torch.arange(past, kv, device=device)[:, None]
    allowed = (torch.arange(kv, device=device)[None, :] <= qpos)[None, None].expand(batch, 1, q_len, kv)
    if padding is not None:
        allowed = allowed & padding[:, None, None, -kv:].bool()
    return allowed


def attend_visible(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, key_index: torch.Tensor,
                   last: torch.Tensor, query_index: torch.Tensor, scale: float, block: int,
                   valid: torch.Tensor | None = None) -> torch.Tensor:
    """Attention by the visibility rule (dms.attention.masks.visible): q [S, G, T, D] with token
    indices query_index [S, T] (nondecreasing), keys/values [S, K, D] with key_index and last
    [S, K] (key_index -1: earlier than any query; last -1: never visible) -> [S, G, T, D].

    One SDPA call per ``block`` queries, over only the keys some query of the block sees:
    neither later keys (the masked upper triangle) nor keys evicted before the block's first
    query (at a retrofit's ratio, most of the older ones). They are gathered per row, rows with
    fewer padded with invisible keys. ``valid`` [S, T] (optional): pad queries see no key and
    come out NaN. An additive mask and K/V expanded over the group (views): on CPU this takes
    SDPA's fused kernel, several times faster than a boolean mask with enable_gqa."""
    S, G, T, D = q.shape
    out = []
    for a in range(0, T, block):
        b = min(a + block, T)
        keep = (key_index <= query_index[:, b - 1 : b]) & (last >= torch.maximum(key_index, query_index[:, a : a + 1]))
        n = max(1, int(keep.sum(1).max()))
        order = torch.argsort((~keep).to(torch.uint8), dim=1, stable=True)[:, :n]  # kept keys first
        last_b = last.gather(1, order).masked_fill_(~keep.gather(1, order), -1)
        allowed = visible(key_index.gather(1, order)[:, None, :], last_b[:, None, :], query_index[:, a:b, None])
        if valid is not None:
            allowed &= valid[:, a:b, None]
        rows = order[:, :, None].expand(-1, -1, D)
        kg = keys.gather(1, rows)[:, None].expand(-1, G, -1, -1)
        vg = values.gather(1, rows)[:, None].expand(-1, G, -1, -1)
        bias = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill_(~allowed, float("-inf"))
        out.append(F.scaled_dot_product_attention(q[:, :, a:b], kg, vg, attn_mask=bias[:, None], scale=scale))
    return torch.cat(out, dim=2)


def prefill_attention(q, k, v, decisions, valid, view, window: int, scale: float, chunk: int):
    """Attention of T new tokens over the live slots of an existing cache (``view``, a
    dms.cache.PrefillView, or None for an empty cache) and over each other, with DMS
    visibility. q [S, G, T, D], k/v [S, T, D], decisions/valid bool [S, T] -> [S, G, T, D].
    Queries go ``chunk`` at a time so memory stays O(chunk * keys). Pad queries get zeros."""
    S, G, T, D = q.shape
    start = view.num_seen if view is not None else torch.zeros(S, dtype=torch.long, device=q.device)
    q_idx = valid_index(valid, start)  # [S, T]
    last = last_visible_query(decisions, valid, window, start)
    key_idx, ks, vs = q_idx, k, v
    if view is not None and view.keys.shape[1] > 0:
        # The newest cached token's flag is the decision of the chunk's first valid token.
        first = valid.long().argmax(-1)
        newest_flag = decisions.gather(1, first[:, None]).squeeze(1) & valid.any(-1) & (view.newest_slot >= 0)
        flagged = view.flagged.clone()
        rows = torch.nonzero(newest_flag).flatten()
        flagged[rows, view.newest_slot[rows]] = True
        old_last = last_query(view.token_index, flagged, window).masked_fill_(~view.live, -1)
        ks = torch.cat([view.keys, k], dim=1)
        vs = torch.cat([view.values, v], dim=1)
        last = torch.cat([old_last, last], dim=1)
        key_idx = torch.cat([torch.full_like(old_last, -1), q_idx], dim=1)
    # Queries per step: at most ``chunk``, and few enough that the mask stays in budget.
    chunk = max(1, min(chunk, _MASK_BUDGET // (S * G * ks.shape[1])))
    out = attend_visible(q, ks, vs, key_idx, last, q_idx, scale, chunk, valid).float()
    # Pad queries see no key: their rows come out NaN (or garbage); give them zeros.
    out.masked_fill_(~valid[:, None, :, None], 0.0)
    return out.to(q.dtype)
