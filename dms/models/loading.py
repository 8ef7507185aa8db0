"""``dms.from_pretrained``: load a DMS checkpoint in the published format (flat dms_* keys in
config.json, model_type of the base transformers class, adapter weights as extra state-dict
keys) through transformers' own from_pretrained, without trust_remote_code.

The adapter is read and written under the reference implementation's names
(``self_attn.dms_proj_alpha_norm.weight``, ``self_attn.dms_proj_alpha.{weight,bias}``, the
bias only with ``attention_bias``). Checkpoints dms wrote earlier (``self_attn.dms_adapter.norm``
/ ``.proj``, always with a bias, one output per layer for ``dms_alpha_per="layer"``) still load:
their tensors are renamed (and the per-layer output padded to H_kv rows) on the way in.
"""
from __future__ import annotations

import json

import torch
from transformers import AutoConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from dms.config import DMSConfig, DMSConfigError
from dms.attention.decisions import ADAPTER_NORM, ADAPTER_PROJ
from dms.models.patch import check_supported, dms_model_class

# from_pretrained arguments that also locate the config.
_CONFIG_KWARGS = ("revision", "cache_dir", "token", "local_files_only", "subfolder", "force_download", "proxies")


class DMSCheckpointError(ValueError):
    """DMS weights of a checkpoint are missing, unexpected or wrongly shaped."""


def from_pretrained(path_or_id, **hf_kwargs):
    """Load a DMS model (in infer mode). ``hf_kwargs`` go to transformers' from_pretrained
    (dtype, device_map, revision, ...). Raises DMSConfigError for a checkpoint without dms_*
    keys, ValueError for an unsupported architecture, DMSCheckpointError for bad DMS weights."""
    if hf_kwargs.get("trust_remote_code"):
        raise ValueError("dms.from_pretrained never runs remote code; drop trust_remote_code")
    hub = {k: hf_kwargs[k] for k in _CONFIG_KWARGS if k in hf_kwargs}
    config = hf_kwargs.pop("config", None)
    if config is None:
        config = AutoConfig.from_pretrained(path_or_id, **hub)
    check_supported(config)
    _check_dms_keys(config)
    if getattr(config, "auto_map", None) is not None:
        # A reference checkpoint points at its remote code; the model is a plain transformers
        # class here, and save_pretrained would write the pointer without the code.
        del config.auto_map
    base = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    if hf_kwargs.get("attn_implementation") not in (None, "eager", "sdpa"):
        raise ValueError("DMS models bring their own attention; attn_implementation must be left unset")
    hf_kwargs.pop("attn_implementation", None)
    hf_kwargs.pop("output_loading_info", None)
    names = _checkpoint_names(path_or_id, hub)
    earlier = sorted(n for n in names if ".dms_adapter." in n)
    bias = bool(getattr(config, "attention_bias", False)) or bool(earlier) \
        or any(n.endswith(f".{ADAPTER_PROJ}.bias") for n in names)
    # Shape mismatches come back in the loading info (instead of transformers' generic error) so
    # that the DMS ones can be named; the others still raise unless the caller allowed them.
    allow_mismatch = hf_kwargs.pop("ignore_mismatched_sizes", False)
    model, info = dms_model_class(base).from_pretrained(
        path_or_id, config=config, output_loading_info=True, ignore_mismatched_sizes=True,
        dms_adapter_bias=bias, dms_earlier_layout=bool(earlier), **hf_kwargs)
    if earlier:
        info = _read_earlier_adapter(model, info, _checkpoint_tensors(path_or_id, earlier, hub))
    _check_dms_weights(info)
    _check_finite(model)
    others = [m for m in info.get("mismatched_keys", ()) if "dms_" not in str(m)]
    if others and not allow_mismatch:
        raise RuntimeError(f"checkpoint weights with the wrong shape: {sorted(others)[:4]}")
    return model.eval()


# Keys of NVIDIA's reference implementation that tune its runtime, not the model: ignored.
_RUNTIME_KEYS = ("dms_paged_attention_block_size", "dms_compile_limit", "dms_manual_inference_mode",
                 "dms_chunked_prefill", "dms_preallocate_for_tokens")


def _check_dms_keys(config) -> None:
    """Not a DMS checkpoint / a dms_* value out of range -> DMSConfigError naming the key. An
    unknown dms_* key (a typo) would otherwise be ignored and its default used silently."""
    cfg = DMSConfig.from_model_config(config)
    keys = config.to_dict()
    known = set(DMSConfig.keys()) | set(_RUNTIME_KEYS)
    unknown = sorted(k for k in keys if k.startswith("dms_") and k not in known)
    if unknown:
        raise DMSConfigError(f"unknown DMS key(s) {unknown} in the checkpoint config; expected some of "
                             f"{', '.join(DMSConfig.keys())}")
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and cfg.dms_window_size > limit:
        # The cache keeps a ring of window + 1 slots per sequence: a window beyond any position
        # the model can reach only costs memory, and usually means a corrupted config.
        raise DMSConfigError(f"dms_window_size={cfg.dms_window_size} exceeds max_position_embeddings={limit}")


_EARLIER = {".dms_adapter.norm.": f".{ADAPTER_NORM}.", ".dms_adapter.proj.": f".{ADAPTER_PROJ}."}


def _read_earlier_adapter(model, info: dict, tensors: dict[str, torch.Tensor]) -> dict:
    """Copies the adapter of a checkpoint in dms's earlier layout into the reference-named
    parameters (the model told transformers to leave both names to it); returns the loading
    info with what is missing, unexpected or misshaped among them."""
    params = {n: p for n, p in model.named_parameters() if f".{ADAPTER_PROJ}" in n}
    per_layer = model.config.dms_alpha_per == "layer"
    unexpected = list(info.get("unexpected_keys", ()))
    mismatched = list(info.get("mismatched_keys", ()))
    placed = set()
    with torch.no_grad():
        for k, t in tensors.items():
            new = k
            for old, ref in _EARLIER.items():
                new = new.replace(old, ref)
            if new not in params:
                unexpected.append(k)
                continue
            p = params[new]
            if per_layer and ".dms_adapter.proj." in k and t.shape[:1] == (1,):
                t = torch.cat([t, t.new_zeros((p.shape[0] - 1, *t.shape[1:]))])  # outputs 1.. are unused
            if t.shape != p.shape:
                mismatched.append((k, tuple(t.shape), tuple(p.shape)))
            else:
                p.copy_(t)
            placed.add(new)
    missing = list(info.get("missing_keys", ())) + sorted(set(params) - placed)
    return {**info, "unexpected_keys": unexpected, "missing_keys": missing, "mismatched_keys": mismatched}


def _checkpoint_files(path_or_id, hub: dict) -> dict[str, str] | None:
    """Tensor name -> safetensors file of the checkpoint, or None if it has no safetensors."""
    from transformers.utils import cached_file

    index = cached_file(path_or_id, "model.safetensors.index.json", _raise_exceptions_for_missing_entries=False,
                        **hub)
    if index is not None:
        with open(index) as f:
            return json.load(f)["weight_map"]
    single = cached_file(path_or_id, "model.safetensors", _raise_exceptions_for_missing_entries=False, **hub)
    if single is None:
        return None
    from safetensors import safe_open

    with safe_open(single, "pt") as f:
        return dict.fromkeys(f.keys(), "model.safetensors")


def _checkpoint_names(path_or_id, hub: dict) -> list[str]:
    """The checkpoint's tensor names (empty for a checkpoint without safetensors, which then
    loads as the reference layout)."""
    return list(_checkpoint_files(path_or_id, hub) or ())


def _checkpoint_tensors(path_or_id, names: list[str], hub: dict) -> dict[str, torch.Tensor]:
    from safetensors import safe_open
    from transformers.utils import cached_file

    files = _checkpoint_files(path_or_id, hub)
    out = {}
    for file in sorted({files[n] for n in names}):
        with safe_open(cached_file(path_or_id, file, **hub), "pt") as f:
            out.update({n: f.get_tensor(n) for n in names if files[n] == file})
    return out


def _check_finite(model) -> None:
    """A NaN adapter weight makes every logit NaN, and NaN > 0 is False: the model would never
    evict, silently behaving like the vanilla model."""
    bad = [n for n, p in model.named_parameters() if f".{ADAPTER_PROJ}" in n and not bool(p.isfinite().all())]
    if bad:
        raise DMSCheckpointError(f"DMS weights with NaN or infinite values: {bad[:4]}")


def _check_dms_weights(info: dict) -> None:
    missing = [k for k in info.get("missing_keys", ()) if "dms_" in k]
    unexpected = [k for k in info.get("unexpected_keys", ()) if "dms_" in k]
    mismatched = [m for m in info.get("mismatched_keys", ()) if "dms_" in str(m)]
    if missing:
        raise DMSCheckpointError(
            f"checkpoint lacks DMS weights {sorted(missing)[:4]}{' ...' if len(missing) > 4 else ''}: its config "
            "asks for the adapter variant (dms_separate_alpha=True) but the weights are not there")
    if unexpected:
        raise DMSCheckpointError(
            f"checkpoint has DMS weights the config does not use: {sorted(unexpected)[:4]} (check "
            "dms_separate_alpha / dms_alpha_per in config.json)")
    if mismatched:
        raise DMSCheckpointError(f"DMS weights with the wrong shape: {mismatched[:4]} (check dms_alpha_per)")
