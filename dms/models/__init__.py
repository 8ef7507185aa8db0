"""Model-level DMS API: retrofit (``apply``) and load (``from_pretrained``) Llama, Qwen2, Qwen3
and Mistral causal LMs, and the mode contract the trainer codes against.

Modes (``set_mode``): "infer" = hard decisions 1[logit > 0] and DMS visibility (the default);
"train" = dms.attention.training.train_attention; "off" = no eviction and the vanilla
computation (borrowed neuron kept, adapter unused), so logits equal the plain model's.
"""
from __future__ import annotations

import torch

from dms.attention.decisions import neuron_heads
from dms.attention.layer import MODES
from dms.cache import DMSCache
from dms.models.loading import DMSCheckpointError, from_pretrained
from dms.models.patch import SUPPORTED, apply, dms_modules, runtime


def set_mode(model, mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    runtime(model).mode = mode


def get_mode(model) -> str:
    return runtime(model).mode


def _per_layer(model, recorded: dict[int, torch.Tensor], modes: str) -> list[torch.Tensor]:
    n = len(dms_modules(model))
    if set(recorded) != set(range(n)):
        raise RuntimeError(f"no decisions recorded: run a forward in {modes} mode first")
    return [recorded[i] for i in range(n)]


def last_decisions(model) -> list[torch.Tensor]:
    """Per layer, the straight-through hard decisions [B, H_kv, T] (with grad) of the most
    recent train-mode forward (an inference forward stores none: a DMSCache holds its result)."""
    return _per_layer(model, runtime(model).last_decisions, "'train'")


def last_logits(model) -> list[torch.Tensor]:
    """Per layer, the eviction logits [B, H_kv, T] (detached, before noise) of the most recent
    train-mode forward."""
    return _per_layer(model, runtime(model).last_logits, "'train'")


def set_noise_generator(model, gen: torch.Generator | None) -> None:
    """Source of the Gumbel noise used in train mode (None = torch's global RNG)."""
    if gen is not None and not isinstance(gen, torch.Generator):
        raise TypeError(f"gen must be a torch.Generator or None, got {type(gen).__name__}")
    runtime(model).generator = gen


def borrowed_neuron_rows(model) -> dict[int, torch.Tensor]:
    """q_proj output rows used as decision neurons, per layer (empty for the adapter variant)."""
    cfg = runtime(model).config
    if cfg.dms_separate_alpha:
        return {}
    c = model.config
    D = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    heads = neuron_heads(c.num_attention_heads, c.num_key_value_heads, cfg.dms_alpha_per)
    rows = torch.tensor([h * D + D - 1 for h in heads], dtype=torch.long)
    return {i: rows.clone() for i in range(len(dms_modules(model)))}


def dms_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    """The adapter parameters (empty for the borrowed-neuron variant)."""
    runtime(model)
    return [(n, p) for n, p in model.named_parameters() if ".dms_proj_alpha" in n]


def dms_config(model):
    return runtime(model).config


__all__ = ["apply", "from_pretrained", "set_mode", "get_mode", "last_decisions", "last_logits", "set_noise_generator",
           "borrowed_neuron_rows", "dms_parameters", "dms_config", "DMSCache", "DMSCheckpointError", "SUPPORTED"]
