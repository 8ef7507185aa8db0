"""Turns a transformers Llama / Qwen2 / Qwen3 / Mistral causal LM into a DMS model in place.

What changes: each attention module's class becomes a subclass whose forward is
``dms.attention.dms_attention_forward``; the adapter variant gets a zero-initialised
adapter under the reference implementation's names, ``self_attn.dms_proj_alpha_norm`` and
``self_attn.dms_proj_alpha`` (extra state-dict keys); the model class becomes a subclass with
the *same name* (so ``save_pretrained`` still writes the base architecture) that uses a
``DMSCache`` by default; the config gets the flat ``dms_*`` keys and the attention
implementation "dms", whose mask builder hands the 2D padding mask to the layers unchanged
(DMS builds its own visibility, and a dense [T, T] mask would defeat chunked prefill).
"""
from __future__ import annotations

import sys

import torch
from transformers.masking_utils import AttentionMaskInterface

from dms.attention.decisions import ADAPTER_NORM, ADAPTER_PROJ, add_adapter
from dms.attention.layer import DMSRuntime, checked_cache, dms_attention_forward
from dms.cache import DMSCache
from dms.compat import CACHE_ARG, either_cache
from dms.config import DMSConfig

SUPPORTED = ("llama", "qwen2", "qwen3", "mistral")
ATTN_IMPL = "dms"


def _pass_padding_mask(*, attention_mask=None, **_):
    return attention_mask


AttentionMaskInterface.register(ATTN_IMPL, _pass_padding_mask)


def check_supported(config) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED:
        raise ValueError(f"DMS does not support architecture {model_type!r} "
                         f"({', '.join(getattr(config, 'architectures', None) or [])}); "
                         f"supported: {', '.join(SUPPORTED)}")


def _decoder_layers(model):
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise ValueError(f"dms expects a *ForCausalLM model with .model.layers; got {type(model).__name__}")
    return layers


# -- class factories (cached so that every model of a class shares one subclass) --------------
_ATTN_CLASSES: dict[type, type] = {}
_MODEL_CLASSES: dict[type, type] = {}


def _attention_class(base: type) -> type:
    if base not in _ATTN_CLASSES:
        rope = sys.modules[base.__module__].apply_rotary_pos_emb

        def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None,
                    cache=None, **kwargs):
            residual = self.__dict__.pop("_dms_residual", None)
            return dms_attention_forward(self, hidden_states, position_embeddings, attention_mask,
                                         either_cache(cache, past_key_values), residual=residual, rope=rope,
                                         runtime=self._dms_runtime)

        _ATTN_CLASSES[base] = type(base.__name__, (base,), {"forward": forward, "_dms_base": base})
    return _ATTN_CLASSES[base]


def dms_model_class(base: type) -> type:
    """Subclass of a ``*ForCausalLM`` class, same name, whose __init__ installs DMS from the
    config's dms_* keys (used by dms.from_pretrained so adapter weights load as ordinary keys)."""
    if getattr(base, "_dms_base", None) is not None:
        return base
    if base not in _MODEL_CLASSES:
        def __init__(self, config, *args, dms_adapter_bias: bool = True, dms_earlier_layout: bool = False, **kwargs):
            base.__init__(self, config, *args, **kwargs)
            install(self, DMSConfig.from_model_config(config), adapter_bias=dms_adapter_bias)
            if dms_earlier_layout:  # dms.from_pretrained renames and loads the adapter itself
                self._keys_to_ignore_on_load_unexpected = {*(self._keys_to_ignore_on_load_unexpected or ()),
                                                           r"\.dms_adapter\."}
                self._keys_to_ignore_on_load_missing = {*(self._keys_to_ignore_on_load_missing or ()),
                                                        rf"\.{ADAPTER_PROJ}"}

        def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                    inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, cache=None, **kwargs):
            cache = either_cache(cache, past_key_values)
            mode = self._dms_runtime.mode
            if mode == "train":
                use_cache = False
            elif mode == "infer" and cache is None and (self.config.use_cache if use_cache is None else use_cache):
                cache = DMSCache(self)  # what the base model does with a DynamicCache
            checked_cache(cache, mode, self._dms_runtime.config.window)  # before transformers uses it
            return base.forward(self, input_ids=input_ids, attention_mask=attention_mask,
                                position_ids=position_ids, inputs_embeds=inputs_embeds, labels=labels,
                                use_cache=use_cache, logits_to_keep=logits_to_keep, **{CACHE_ARG: cache}, **kwargs)

        def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
            if (self._dms_runtime.mode == "infer" and model_kwargs.get(CACHE_ARG) is None
                    and generation_config.use_cache is not False):
                if generation_config.cache_implementation is not None:
                    raise ValueError("DMS models generate with a DMSCache; do not set cache_implementation")
                model_kwargs[CACHE_ARG] = DMSCache(self)
            return base._prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs)

        def generate(self, inputs=None, generation_config=None, **kwargs):
            chains = _chains_from_one_prefill(self, inputs, generation_config, kwargs)
            if chains is None:
                return base.generate(self, inputs, generation_config, **kwargs)
            ids, mask, cache = chains
            kwargs.update(num_return_sequences=1, attention_mask=mask, **{CACHE_ARG: cache})
            return base.generate(self, ids, generation_config, **kwargs)

        _MODEL_CLASSES[base] = type(base.__name__, (base,), {
            "__init__": __init__, "forward": forward, "_dms_base": base, "__module__": base.__module__,
            "_prepare_cache_for_generation": _prepare_cache_for_generation, "__doc__": base.__doc__,
            "generate": generate,
        })
    return _MODEL_CLASSES[base]


def _chains_from_one_prefill(model, inputs, generation_config, kwargs):
    """``generate(num_return_sequences=W)`` without beams in infer mode: the prompts (all but
    their last token) are prefilled once and the DMSCache forked into W chains, instead of
    transformers prefilling each prompt W times. Returns (input_ids, attention_mask, cache)
    repeated W times for generate to continue (it feeds the last prompt token), or None when
    generate should run as usual (a cache given, beams, embeddings, a one-token prompt)."""
    config = generation_config if generation_config is not None else model.generation_config
    chains = kwargs.get("num_return_sequences") or config.num_return_sequences or 1
    beams = kwargs.get("num_beams") or config.num_beams or 1
    ids = inputs if inputs is not None else kwargs.get("input_ids")
    if (chains == 1 or beams > 1 or model._dms_runtime.mode != "infer" or not isinstance(ids, torch.Tensor)
            or ids.dim() != 2 or ids.shape[1] < 2 or kwargs.get(CACHE_ARG) is not None
            or kwargs.get("past_key_values") is not None or kwargs.get("inputs_embeds") is not None
            or kwargs.get("use_cache", config.use_cache) is False):
        return None
    kwargs.pop("input_ids", None)
    mask = kwargs.pop("attention_mask", None)
    mask = torch.ones_like(ids) if mask is None else mask
    positions = (mask.long().cumsum(-1) - 1).clamp_min(0)  # as generate numbers left-padded rows
    cache = DMSCache(model)
    with torch.no_grad():
        model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1], use_cache=True,
              logits_to_keep=1, **{CACHE_ARG: cache})
    cache.fork(chains)
    return ids.repeat_interleave(chains, 0), mask.repeat_interleave(chains, 0), cache


def _keep_residual(layer, args, kwargs):
    hidden = args[0] if args else kwargs["hidden_states"]
    layer.self_attn.__dict__["_dms_residual"] = hidden


def install(model, dms_config: DMSConfig, adapter_bias: bool = True) -> None:
    """Add DMS to ``model`` in place (idempotent per model: raises if already installed).
    ``adapter_bias`` False: the adapter has no bias, as in a reference checkpoint without one."""
    check_supported(model.config)
    if getattr(model, "_dms_runtime", None) is not None:
        raise ValueError("this model already has DMS installed; change modes with dms.models.set_mode")
    layers = _decoder_layers(model)
    cfg = model.config
    # Mistral applies config.sliding_window to every layer; Qwen2/3 set it per layer.
    windowed = [i for i, layer in enumerate(layers) if getattr(layer.self_attn, "sliding_window", None) is not None
                or (cfg.model_type == "mistral" and getattr(cfg, "sliding_window", None) is not None)]
    if windowed:
        raise ValueError(f"layers {windowed} use sliding-window attention, which DMS does not combine with "
                         "eviction; load the model with sliding_window=None")
    n_kv = cfg.num_key_value_heads
    if cfg.num_attention_heads % n_kv:
        raise ValueError(f"num_attention_heads={cfg.num_attention_heads} is not a multiple of "
                         f"num_key_value_heads={n_kv}")
    dms_config.to_model_config(cfg)
    runtime = DMSRuntime(dms_config)
    param = next(model.parameters())
    for layer in layers:
        attn = layer.self_attn
        attn.__class__ = _attention_class(type(attn))
        attn._dms_runtime = runtime
        if dms_config.dms_separate_alpha:
            add_adapter(attn, cfg.hidden_size, n_kv, cfg.rms_norm_eps, bias=adapter_bias)
            if param.device.type != "meta":
                for name in (ADAPTER_NORM, ADAPTER_PROJ):
                    getattr(attn, name).to(device=param.device, dtype=param.dtype)
            layer.register_forward_pre_hook(_keep_residual, with_kwargs=True)
    model._dms_runtime = runtime
    cfg._attn_implementation_internal = ATTN_IMPL


def apply(model, **dms_config):
    """Make a plain Llama/Qwen2/Qwen3/Mistral ``*ForCausalLM`` a DMS model in place (and return it).
    Keyword arguments are the dms_* keys of dms.config.DMSConfig."""
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"dms.apply expects a transformers *ForCausalLM model, got {type(model).__name__}")
    check_supported(model.config)
    unknown = sorted(set(dms_config) - set(DMSConfig.keys()))
    if unknown:
        from dms.config import DMSConfigError

        raise DMSConfigError(f"unknown DMS option(s) {unknown}; expected some of {', '.join(DMSConfig.keys())}")
    config = DMSConfig(**dms_config)
    install(model, config)
    model.__class__ = dms_model_class(type(model))
    return model


def runtime(model) -> DMSRuntime:
    rt = getattr(model, "_dms_runtime", None)
    if rt is None:
        raise ValueError(f"{type(model).__name__} is not a DMS model: use dms.apply(model, ...) or dms.from_pretrained")
    return rt


def dms_modules(model):
    return [layer.self_attn for layer in _decoder_layers(model)]
