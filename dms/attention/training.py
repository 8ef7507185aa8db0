"""Training-time DMS attention: soft, differentiable delayed eviction (docs/design.md §1).

``train_attention`` is what every DMS attention layer calls in "train" mode. Per KV head the
eviction logit of token t decides token t-1:

    p[k]   = sigmoid((logit[k+1] + g) / tau),  g = G1 - G2, G ~ Gumbel(0, 1)
    score += log(1 - p[k])  where q - k > window   (0 inside the window, -inf above the diagonal)

The noise is always sampled: this function only runs in training ("infer" mode uses hard
decisions; "off", no eviction, runs ``causal_attention``). It comes from ``generator`` when one
is given, otherwise from torch's global RNG; the trainer uses the global RNG because activation
checkpointing replays the global RNG state (not a private generator's) when it recomputes a
layer, so the recomputed noise equals the original.

Decisions are returned aligned with ``logits``: index t is the decision produced by token t
(about token t-1). Index 0 has no target token, nor does the first real token of a
left-padded row; ``decision_mask`` marks the entries the compression loss may average over.

CPU (and any device without FlexAttention): explicit additive mask, queries in chunks; under
autograd each chunk is recomputed in backward (checkpointed), so memory stays O(chunk * T).
CUDA: FlexAttention with the bias as a ``score_mod``. That path is thin and has only been run
eagerly on CPU in the tests (no GPU on the development machine).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from dms.attention.block_masks import causal_block_mask

# Score elements (batch * query heads * query rows * keys) per chunk of the CPU path.
DEFAULT_CHUNK_ELEMENTS = 1 << 24


def eviction_probs(logits: torch.Tensor, tau: float, generator: torch.Generator | None):
    """(probs, log(1 - probs)) of the relaxed decisions, in float32, with logistic noise."""
    u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=torch.float32)
    u = u.clamp(torch.finfo(torch.float32).tiny, 1.0 - torch.finfo(torch.float32).eps)
    z = (logits.float() + torch.log(u) - torch.log1p(-u)) / tau
    return torch.sigmoid(z), F.logsigmoid(-z)


def decision_mask(padding_mask: torch.Tensor | None, batch: int, seq_len: int, device=None) -> torch.Tensor:
    """bool [B, T]: True where index t is a real decision, i.e. token t and its target t-1 are
    both real tokens (so never t = 0). Average the compression loss over these entries."""
    if padding_mask is None:
        m = torch.ones(batch, seq_len, dtype=torch.bool, device=device)
    else:
        m = padding_mask.bool()
    out = torch.zeros_like(m)
    out[:, 1:] = m[:, 1:] & m[:, :-1]
    return out


def attention_bias(log_keep: torch.Tensor, padding_mask: torch.Tensor | None, q0: int, n_rows: int,
                   window: int) -> torch.Tensor:
    """Additive score bias [B, Hkv, n_rows, q0 + n_rows] of query rows q0 .. q0+n_rows-1 over
    keys 0 .. q0+n_rows-1. ``log_keep`` [B, Hkv, T] = log(1 - p) aligned with the logits: key k
    takes entry k+1 (the newest key has no decision). -inf above the diagonal and at pad keys,
    except on the diagonal, so a pad query row still sees one key (no NaN; its output is
    zeroed later)."""
    n_keys = q0 + n_rows
    device = log_keep.device
    key_log_keep = F.pad(log_keep[..., 1:n_keys + 1], (0, max(0, n_keys - (log_keep.shape[-1] - 1))))
    dist = torch.arange(q0, n_keys, device=device)[:, None] - torch.arange(n_keys, device=device)[None, :]
    bias = torch.where(dist > window, key_log_keep[:, :, None, :], 0.0)
    hidden = dist < 0
    if padding_mask is not None:
        pad_key = ~padding_mask.bool()[:, None, None, :n_keys]
        hidden = hidden | (pad_key & (dist != 0))
    return bias.masked_fill(hidden, float("-inf"))


def _chunk(q, k, v, log_keep, padding_mask, q0: int, window: int, scale: float):
    """Attention of query rows q0 .. q0+c-1 (q: [B, Hkv, G, c, D]) over keys 0 .. q0+c-1."""
    B, Hkv, G, c, D = q.shape
    n_keys = q0 + c
    k, v = k[:, :, :n_keys], v[:, :, :n_keys]
    # Folding G into the rows lets one matmul serve the whole group without repeat_kv.
    scores = torch.matmul(q.reshape(B, Hkv, G * c, D).float(), k.float().transpose(-1, -2)) * scale
    bias = attention_bias(log_keep, padding_mask, q0, c, window)
    scores = scores.view(B, Hkv, G, c, n_keys) + bias[:, :, None]
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs.view(B, Hkv, G * c, n_keys), v.float())
    return out.view(B, Hkv, G, c, D).to(q.dtype)


def _chunked_attention(q, k, v, log_keep, padding_mask, window, scale, chunk):
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    qg = q.view(B, Hkv, Hq // Hkv, T, D)
    recompute = torch.is_grad_enabled() and T > chunk
    outs = []
    for q0 in range(0, T, chunk):
        args = (qg[:, :, :, q0:q0 + chunk], k, v, log_keep, padding_mask, q0, window, scale)
        outs.append(checkpoint(_chunk, *args, use_reentrant=False) if recompute else _chunk(*args))
    return torch.cat(outs, dim=3).view(B, Hq, T, D)


_compiled_flex = {}


def _causal(b, h, q_idx, kv_idx):
    return kv_idx <= q_idx


@functools.lru_cache(maxsize=8)
def _causal_block_mask(T: int, device: torch.device):
    """Shared by every layer (and step) of the same length: building it is not free."""
    return causal_block_mask(_causal, None, T, device)


def _flex_attention(q, k, v, log_keep, window, scale, padding_mask):
    from torch.nn.attention.flex_attention import flex_attention

    if q.device.type not in _compiled_flex:
        # Eager flex_attention materialises every score (the CPU test path); compiled it is the
        # fused kernel.
        _compiled_flex[q.device.type] = flex_attention if q.device.type == "cpu" else torch.compile(flex_attention)
    B, Hq, T, _ = q.shape
    G = Hq // k.shape[1]
    key_log_keep = F.pad(log_keep[..., 1:], (0, 1))

    def score_mod(score, b, h, q_idx, kv_idx):
        return torch.where(q_idx - kv_idx > window, score + key_log_keep[b, h // G, kv_idx], score)

    if padding_mask is None:
        block_mask = _causal_block_mask(T, q.device)
    else:
        real = padding_mask.bool()

        def mask_mod(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) & (real[b, kv_idx] | (kv_idx == q_idx))

        block_mask = causal_block_mask(mask_mod, B, T, q.device, padded=True)  # no T x T mask
    return _compiled_flex[q.device.type](q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
                                         enable_gqa=True)


def causal_attention(q, k, v, padding_mask: torch.Tensor | None, scale: float,
                     chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> torch.Tensor:
    """Plain causal attention (mode "off" without a cache, e.g. the teacher of an adapter-only
    retrofit) through torch's fused scaled_dot_product_attention, so memory is linear in the
    sequence: no [T, T] scores. q [B, Hq, T, D], k, v [B, Hkv, T, D]; padding_mask bool [B, T]
    (True = real token) hides pad keys. With padding the queries go in chunks whose boolean mask
    (SDPA converts it to an additive float one) stays within ``chunk_elements`` elements. A pad
    query sees its own key only: finite, and meaningless like every pad position's output."""
    B, _, T, _ = q.shape
    if padding_mask is None or bool(padding_mask.all()):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    real = padding_mask.bool()[:, None, None, :]
    rows = max(1, chunk_elements // (B * T))
    outs = []
    for a in range(0, T, rows):
        b = min(a + rows, T)
        query = torch.arange(a, b, device=q.device)[:, None]
        key = torch.arange(b, device=q.device)[None, :]
        allowed = (key <= query) & (real[..., :b] | (key == query))
        outs.append(F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, :b], v[:, :, :b], attn_mask=allowed,
                                                   scale=scale, enable_gqa=True))
    return torch.cat(outs, dim=2)


def train_attention(q, k, v, logits, *, window: int, tau: float, scale: float,
                    padding_mask: torch.Tensor | None, generator: torch.Generator | None,
                    backend: str = "auto", chunk_size: int | None = None):
    """Soft DMS attention. q [B, Hq, T, D] and k, v [B, Hkv, T, D] post-RoPE (query head
    h*G+i uses KV head h); logits [B, Hkv, T] eviction logits (already scaled and offset);
    padding_mask bool [B, T], True = real token (pads neither attend nor are attended).

    Returns out [B, Hq, T, D] (zeros at pad queries), hard [B, Hkv, T] (straight-through
    ``1[p > 0.5] - p.detach() + p``) and probs [B, Hkv, T], both aligned with ``logits``.
    ``backend``: "auto" (FlexAttention on CUDA, chunked elsewhere), "chunked" or "flex";
    ``chunk_size``: query rows per chunk of the chunked path (default: bounded memory).
    """
    B, Hq, T, D = q.shape
    if k.dim() != 4 or k.shape != v.shape or k.shape[0] != B or k.shape[2:] != (T, D):
        raise ValueError(f"k and v must be [B, Hkv, T, D] matching q {tuple(q.shape)}, got {tuple(k.shape)}, {tuple(v.shape)}")
    if Hq % k.shape[1]:
        raise ValueError(f"query heads ({Hq}) must be a multiple of KV heads ({k.shape[1]})")
    if logits.shape != (B, k.shape[1], T):
        raise ValueError(f"logits must be [B, Hkv, T] = {(B, k.shape[1], T)}, got {tuple(logits.shape)}")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if padding_mask is not None and padding_mask.shape != (B, T):
        raise ValueError(f"padding_mask must be bool [B, T] = {(B, T)}, got {tuple(padding_mask.shape)}")
    if backend not in ("auto", "chunked", "flex"):
        raise ValueError(f"backend must be 'auto', 'chunked' or 'flex', got {backend!r}")

    probs, log_keep = eviction_probs(logits, tau, generator)
    hard = (probs > 0.5).float() - probs.detach() + probs

    if backend == "auto":
        backend = "flex" if q.is_cuda else "chunked"
    if backend == "flex":
        out = _flex_attention(q, k, v, log_keep, window, scale, padding_mask)
    else:
        if chunk_size is None:
            chunk_size = max(1, DEFAULT_CHUNK_ELEMENTS // max(1, B * Hq * T))
        out = _chunked_attention(q, k, v, log_keep, padding_mask, window, scale, chunk_size)
    if padding_mask is not None:
        out = out * padding_mask[:, None, :, None].to(out.dtype)
    return out, hard, probs


__all__ = ["train_attention", "causal_attention", "attention_bias", "decision_mask", "eviction_probs"]
