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


# The dms_* keys NVIDIA's reference Qwen3ConfigDMS writes to config.json (its defaults, adapter
# variant); it also drops "architectures" and adds an auto_map to its remote code.
REFERENCE_DMS_KEYS: dict[str, Any] = dict(
    dms_alpha_scale=100.0, dms_initial_alpha_offset=5.0, dms_window_size=512, dms_paged_attention_block_size=256,
    dms_cr=8, dms_disable_eviction=False, dms_separate_alpha=True, dms_alpha_per="head", dms_tau=0.1,
    dms_manual_inference_mode=False, dms_chunked_prefill=None, dms_preallocate_for_tokens=4096)
REFERENCE_AUTO_MAP = {"AutoConfig": "configuration_qwen3_dms.Qwen3ConfigDMS",
                      "AutoModelForCausalLM": "modeling_qwen3_dms.Qwen3ForCausalLMDMS"}


def save_reference_checkpoint(path, seed: int = 0, adapter_scale: float = 0.05, **dms_keys: Any):
    """Writes a random tiny Qwen3 adapter-variant DMS checkpoint to the folder ``path`` laid out as
    the reference implementation saves one: bfloat16 safetensors with the adapter under
    ``self_attn.dms_proj_alpha_norm.weight`` and ``self_attn.dms_proj_alpha.weight`` [H_kv,
    hidden] (no bias: attention_bias is false), and a config.json without ``architectures``.
    ``dms_keys`` override REFERENCE_DMS_KEYS. Returns {tensor name: tensor} as written."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    model = tiny_model("qwen3", seed=seed)
    c = model.config
    config = {k: v for k, v in c.to_dict().items() if k != "architectures" and not k.startswith("_")}
    config.update(REFERENCE_DMS_KEYS, **dms_keys)
    config.update(auto_map=REFERENCE_AUTO_MAP, dtype="bfloat16")
    tensors = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(seed + 1)
    for i in range(c.num_hidden_layers):
        attn = f"model.layers.{i}.self_attn."
        tensors[attn + "dms_proj_alpha_norm.weight"] = (1 + 0.1 * torch.randn(c.hidden_size, generator=gen)).bfloat16()
        tensors[attn + "dms_proj_alpha.weight"] = (
            adapter_scale * torch.randn(c.num_key_value_heads, c.hidden_size, generator=gen)).bfloat16()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return tensors
