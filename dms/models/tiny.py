"""Tiny random-initialised Llama / Qwen2 / Qwen3 / Mistral models for tests and benchmarks.

Built locally (no hub access), fp32, GQA (4 query heads over 2 KV heads) so that every code
path that groups query heads is exercised.
"""
from __future__ import annotations

from typing import Any

import torch

ARCHS = ("llama", "qwen2", "qwen3", "mistral")

_DEFAULTS: dict[str, Any] = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=65536,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def _classes(arch: str):
    import transformers as tf

    table = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
    }
    if arch not in table:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    return table[arch]


def tiny_config(arch: str, **overrides: Any):
    """A transformers config of ``arch`` with tiny sizes; ``overrides`` replace any key
    (including ``dms_*`` keys, which are stored flat like the published checkpoints)."""
    config_cls, _ = _classes(arch)
    kwargs = dict(_DEFAULTS)
    if arch in ("qwen2", "qwen3", "mistral"):
        kwargs["sliding_window"] = None  # full attention everywhere: DMS replaces the window
    kwargs.update(overrides)
    config = config_cls(**kwargs)
    config._attn_implementation = "eager"  # deterministic fp32 reference path on CPU
    return config


def tiny_model(arch: str, seed: int = 0, **overrides: Any):
    """A randomly initialised ``<Arch>ForCausalLM`` (fp32, eval mode), reproducible by ``seed``."""
    _, model_cls = _classes(arch)
    config = tiny_config(arch, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    return model.float().eval()
