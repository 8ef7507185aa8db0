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
    n_old = ks.shape[1] - T
    # Queries per step: at most ``chunk``, and few enough that the mask stays in budget.
    chunk = max(1, min(chunk, _MASK_BUDGET // (S * G * ks.shape[1])))
    out = torch.empty(S, G, T, D, dtype=torch.float32, device=q.device)
    ks, vs = ks[:, None], vs[:, None]  # one KV head per sequence, G query heads (enable_gqa)
    for a in range(0, T, chunk):
        b = min(a + chunk, T)
        allowed = visible(key_idx[:, None, : n_old + b], last[:, None, : n_old + b], q_idx[:, a:b, None])
        allowed &= valid[:, a:b, None]
        # Fused attention (softmax accumulated in fp32), never materialising the scores.
        out[:, :, a:b] = F.scaled_dot_product_attention(
            q[:, :, a:b], ks[:, :, : n_old + b], vs[:, :, : n_old + b], attn_mask=allowed[:, None],
            scale=scale, enable_gqa=True).float()
    # Pad queries see no key: their rows come out NaN (or garbage); give them zeros.
    out.masked_fill_(~valid[:, None, :, None], 0.0)
    return out.to(q.dtype)
