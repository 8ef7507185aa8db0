"""The forward of one DMS attention layer, written against the attribute names shared by the
transformers Llama / Qwen2 / Qwen3 / Mistral attention modules (q/k/v/o_proj, optional
q_norm/k_norm, head_dim, scaling, layer_idx). dms.models installs it."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dms.attention.decisions import neuron_heads, neuron_logits, zero_neuron
from dms.attention.infer import (causal_padding_mask, decode_attention, dense_attention,
                                 prefill_attention)
from dms.attention.masks import visibility_mask
from dms.attention.training import train_attention
from dms.cache import DMSCache
from dms.config import DMSConfig

MODES = ("infer", "train", "off")


@dataclass
class DMSRuntime:
    """State shared by the DMS layers of one model."""

    config: DMSConfig
    mode: str = "infer"
    generator: torch.Generator | None = None
    last_decisions: dict[int, torch.Tensor] = field(default_factory=dict)
    last_logits: dict[int, torch.Tensor] = field(default_factory=dict)  # train mode, detached


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
    cfg, mode = runtime.config, runtime.mode
    B, T, _ = hidden_states.shape
    D = module.head_dim
    shape = (B, T, -1, D)
    q = module.q_proj(hidden_states).view(shape)
    k = module.k_proj(hidden_states).view(shape)
    v = module.v_proj(hidden_states).view(shape).transpose(1, 2)
    if hasattr(module, "q_norm"):
        q, k = module.q_norm(q), module.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    Hkv = k.shape[1]
    logits = heads = None
    if mode != "off":
        if cfg.dms_separate_alpha:
            logits = module.dms_adapter.logits(residual, Hkv, cfg.dms_alpha_scale, cfg.dms_initial_alpha_offset)
        else:
            logits, q = neuron_logits(q, Hkv, cfg.dms_alpha_per, cfg.dms_alpha_scale, cfg.dms_initial_alpha_offset)
            heads = neuron_heads(q.shape[1], Hkv, cfg.dms_alpha_per)
    cos, sin = position_embeddings
    q, k = rope(q, k, cos, sin)
    if heads is not None:
        q = zero_neuron(q, heads)  # RoPE mixed the zeroed dimension with its pair: zero it again
    padding = _padding(attention_mask, T)

    if mode == "train":
        if past_key_values is not None:
            raise ValueError("DMS train mode runs without a KV cache: call the model with use_cache=False")
        out, hard, _ = train_attention(q, k, v, logits, window=cfg.window, tau=cfg.dms_tau,
                                          scale=module.scaling, padding_mask=padding,
                                          generator=runtime.generator)
        runtime.last_decisions[module.layer_idx] = hard
        runtime.last_logits[module.layer_idx] = logits.detach()
    elif isinstance(past_key_values, DMSCache):
        decisions = logits > 0 if mode == "infer" else torch.zeros(B, Hkv, T, dtype=torch.bool, device=q.device)
        out = _cached(module, q, k, v, decisions, padding, past_key_values, cfg.window)
        if mode == "infer":
            runtime.last_decisions[module.layer_idx] = decisions.float()
    elif hasattr(past_key_values, "policy_attend"):  # eviction baselines (dms.baselines.PolicyCache)
        if mode != "off":
            raise ValueError("an eviction-policy cache runs the plain model's attention: call "
                             "dms.models.set_mode(model, 'off') first")
        out = past_key_values.policy_attend(module.layer_idx, q, k, v, padding, module.scaling)
    elif mode == "infer":
        if past_key_values is not None:
            raise TypeError(
                f"DMS infer mode needs a dms.DMSCache, got a {type(past_key_values).__name__}; pass "
                "dms.DMSCache(model) as the cache (generate and the *ForCausalLM forward do this by "
                "default), or use_cache=False for a cache-free forward")
        # Cache-free forward (scoring, evaluation): a dense [T, T] visibility mask, fine at
        # training lengths; long prompts go through a DMSCache, whose prefill is chunked.
        decisions = logits > 0
        S = B * Hkv
        valid = None if padding is None else padding[:, None, :].expand(B, Hkv, T).reshape(S, T)
        allowed = visibility_mask(decisions.reshape(S, T), cfg.window, valid).view(B, Hkv, T, T)
        out = dense_attention(q, k, v, allowed, module.scaling)
        runtime.last_decisions[module.layer_idx] = decisions.float()
    else:  # "off" with a plain transformers cache or none: the vanilla computation
        past = 0
        if past_key_values is not None:
            past = past_key_values.get_seq_length(module.layer_idx)
            k, v = past_key_values.update(k, v, module.layer_idx)
        allowed = causal_padding_mask(attention_mask, B, T, past, q.device)
        out = dense_attention(q, k, v, allowed, module.scaling)
    out = out.transpose(1, 2).reshape(B, T, -1).contiguous()
    return module.o_proj(out), None


def _cached(module, q, k, v, decisions, padding, cache: DMSCache, window: int):
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    S = B * Hkv
    if cache.window != window:
        raise ValueError(f"this DMSCache was built for window {cache.window}, the model uses dms_window_size={window}; "
                         "create it with DMSCache(model)")
    layer = cache.layers[module.layer_idx]
    ks, vs, ds = k.reshape(S, T, D), v.reshape(S, T, D), decisions.reshape(S, T)
    valid = None if padding is None else padding[:, None, :].expand(B, Hkv, T).reshape(S, T)
    if T == 1 and layer.is_initialized:
        layer.append(ks, vs, ds, valid)
        return decode_attention(layer, q, module.scaling)
    view = layer.prefill_view() if layer.is_initialized else None
    ok = valid if valid is not None else torch.ones(S, T, dtype=torch.bool, device=q.device)
    out = prefill_attention(q, k, v, ds, ok, view, window, module.scaling, cache.prefill_chunk)
    layer.append(ks, vs, ds, valid)
    return out
