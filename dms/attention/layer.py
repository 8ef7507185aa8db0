"""The forward of one DMS attention layer, written against the attribute names shared by the
transformers Llama / Qwen2 / Qwen3 / Mistral attention modules (q/k/v/o_proj, optional
q_norm/k_norm, head_dim, scaling, layer_idx). dms.models installs it.

``dms_attention_forward`` projects q, k, v (and the eviction logits unless the mode is
"off"), applies RoPE, then hands over to one function per mode: ``_train`` (soft
eviction, no cache), ``_infer`` and ``_off``. A cache that runs attention itself
(``dms.cache.AttentionCache``: the DMS cache, the eviction baselines) gets q, k, v and the
decisions; everything else about the cache is its own business."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache

from dms.attention.decisions import adapter_logits, neuron_heads, neuron_logits, zero_neuron
from dms.attention.infer import causal_padding_mask, dense_attention
from dms.attention.masks import visibility_mask
from dms.attention.training import causal_attention, train_attention
from dms.cache import AttentionCache
from dms.config import DMSConfig

MODES = ("infer", "train", "off")
# The logit of every token under dms_disable_eviction (the reference's value): finite, so that
# train mode's noise and sigmoid stay finite too.
NEVER_EVICT = -1000.0


@dataclass
class DMSRuntime:
    """State shared by the DMS layers of one model."""

    config: DMSConfig
    mode: str = "infer"
    generator: torch.Generator | None = None
    # Train mode only (the trainer's compression term reads them): an inference forward
    # stores nothing.
    last_decisions: dict[int, torch.Tensor] = field(default_factory=dict)
    last_logits: dict[int, torch.Tensor] = field(default_factory=dict)  # detached


def _padding(attention_mask, T: int) -> torch.Tensor | None:
    """The 2D padding mask of the new tokens [B, T] (True = real token), or None."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise ValueError(
            "DMS attention needs the 2D padding mask [batch, positions] (True/1 = real token); got a "
            f"{attention_mask.dim()}D mask. Pass attention_mask as a 2D tensor.")
    return attention_mask[:, -T:].bool()


def dms_attention_forward(module, hidden_states, position_embeddings, attention_mask,
                          past_key_values=None, *, residual, rope, runtime: DMSRuntime):
    """Returns (attn_output [B, T, hidden], None). ``attention_mask`` is the model's 2D padding
    mask (DMS models register a mask builder that passes it through); ``residual`` is the
    layer's input (the adapter's input); ``rope`` the model file's apply_rotary_pos_emb."""
    B, T, _ = hidden_states.shape
    mode = runtime.mode
    cache = checked_cache(past_key_values, mode, runtime.config.window)
    q, k, v, logits = _project(module, hidden_states, position_embeddings, residual, rope, runtime)
    padding = _padding(attention_mask, T)
    if mode == "train":
        out = _train(module, q, k, v, logits, padding, runtime)
    elif mode == "infer":
        out = _infer(module, q, k, v, logits, padding, cache, runtime.config.window)
    else:
        out = _off(module, q, k, v, attention_mask, padding, cache)
    return module.o_proj(out.transpose(1, 2).reshape(B, T, -1)), None


def checked_cache(cache, mode: str, window: int):
    """The cache if it can serve ``mode``; a clear error for anything else."""
    if cache is None:
        return None
    if isinstance(cache, AttentionCache):
        cache.check_model(mode, window)
        return cache
    if not isinstance(cache, Cache):
        raise TypeError(f"past_key_values must be a dms.DMSCache, a dms.baselines.PolicyCache or (mode 'off') a "
                        f"transformers Cache, got a {type(cache).__name__}")
    if mode == "train":
        raise ValueError("DMS train mode runs without a KV cache: call the model with use_cache=False")
    if mode == "infer":
        raise TypeError(
            f"DMS infer mode needs a dms.DMSCache, got a {type(cache).__name__}; pass "
            "dms.DMSCache(model) as the cache (generate and the *ForCausalLM forward do this by "
            "default), or use_cache=False for a cache-free forward")
    return cache


def _project(module, hidden_states, position_embeddings, residual, rope, runtime: DMSRuntime):
    """q [B, Hq, T, D], k, v [B, Hkv, T, D] post-RoPE and the eviction logits [B, Hkv, T]
    (None in mode "off")."""
    cfg = runtime.config
    B, T, _ = hidden_states.shape
    shape = (B, T, -1, module.head_dim)
    q = module.q_proj(hidden_states).view(shape)
    k = module.k_proj(hidden_states).view(shape)
    v = module.v_proj(hidden_states).view(shape).transpose(1, 2)
    if hasattr(module, "q_norm"):
        q, k = module.q_norm(q), module.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    Hkv = k.shape[1]
    logits = heads = None
    if runtime.mode != "off":
        if cfg.dms_separate_alpha:
            logits = adapter_logits(module, residual, cfg.dms_alpha_per, cfg.dms_alpha_scale,
                                    cfg.dms_initial_alpha_offset)
        else:
            logits, q = neuron_logits(q, Hkv, cfg.dms_alpha_per, cfg.dms_alpha_scale, cfg.dms_initial_alpha_offset)
            heads = neuron_heads(q.shape[1], Hkv, cfg.dms_alpha_per)
        if cfg.dms_disable_eviction:
            logits = torch.full_like(logits, NEVER_EVICT)
    cos, sin = position_embeddings
    q, k = rope(q, k, cos, sin)
    if heads is not None:
        q = zero_neuron(q, heads)  # RoPE mixed the zeroed dimension with its pair: zero it again
    return q, k, v, logits


def _train(module, q, k, v, logits, padding, runtime: DMSRuntime):
    cfg = runtime.config
    out, hard, _ = train_attention(q, k, v, logits, window=cfg.window, tau=cfg.dms_tau, scale=module.scaling,
                                   padding_mask=padding, generator=runtime.generator)
    runtime.last_decisions[module.layer_idx] = hard
    runtime.last_logits[module.layer_idx] = logits.detach()
    return out


def _infer(module, q, k, v, logits, padding, cache, window: int):
    decisions = logits > 0
    if cache is not None:
        return cache.attend(module.layer_idx, q, k, v, decisions, padding, module.scaling)
    # Cache-free forward (scoring, evaluation): a dense [T, T] visibility mask, fine at
    # training lengths; long prompts go through a DMSCache, whose prefill is chunked.
    B, Hkv, T = decisions.shape
    S = B * Hkv
    valid = None if padding is None else padding[:, None, :].expand(B, Hkv, T).reshape(S, T)
    allowed = visibility_mask(decisions.reshape(S, T), window, valid).view(B, Hkv, T, T)
    return dense_attention(q, k, v, allowed, module.scaling)


def _off(module, q, k, v, attention_mask, padding, cache):
    """No eviction: a DMS cache stores everything (decisions all 0), a baseline cache evicts by
    its policy, a plain transformers cache or none gives the vanilla computation: fused and
    memory-linear without a cache (a retrofit's teacher runs here at training lengths), eager
    (transformers' arithmetic) over a plain cache."""
    if isinstance(cache, AttentionCache):
        return cache.attend(module.layer_idx, q, k, v, None, padding, module.scaling)
    if cache is None:
        return causal_attention(q, k, v, padding, module.scaling)
    B, _, T, _ = q.shape
    past = cache.get_seq_length(module.layer_idx)
    k, v = cache.update(k, v, module.layer_idx)
    allowed = causal_padding_mask(attention_mask, B, T, past, q.device)
    return dense_attention(q, k, v, allowed, module.scaling)
