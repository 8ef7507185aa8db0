"""``dms.from_pretrained``: load a DMS checkpoint in the published format (flat dms_* keys in
config.json, architecture = the base transformers class, adapter weights as extra state-dict
keys) through transformers' own from_pretrained, without trust_remote_code."""
from __future__ import annotations

from transformers import AutoConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from dms.config import DMSConfig, DMSConfigError
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
    config = hf_kwargs.pop("config", None)
    if config is None:
        config = AutoConfig.from_pretrained(path_or_id, **{k: hf_kwargs[k] for k in _CONFIG_KWARGS if k in hf_kwargs})
    check_supported(config)
    _check_dms_keys(config)
    base = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    if hf_kwargs.get("attn_implementation") not in (None, "eager", "sdpa"):
        raise ValueError("DMS models bring their own attention; attn_implementation must be left unset")
    hf_kwargs.pop("attn_implementation", None)
    hf_kwargs.pop("output_loading_info", None)
    # Shape mismatches come back in the loading info (instead of transformers' generic error) so
    # that the DMS ones can be named; the others still raise unless the caller allowed them.
    allow_mismatch = hf_kwargs.pop("ignore_mismatched_sizes", False)
    model, info = dms_model_class(base).from_pretrained(path_or_id, config=config, output_loading_info=True,
                                                        ignore_mismatched_sizes=True, **hf_kwargs)
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
    if keys.get("dms_disable_eviction"):
        raise DMSConfigError("dms_disable_eviction=True: this checkpoint asks for no eviction; set it to false "
                             "and switch eviction off with dms.models.set_mode(model, 'off') after loading")
    known = set(DMSConfig.keys()) | set(_RUNTIME_KEYS) | {"dms_disable_eviction"}
    unknown = sorted(k for k in keys if k.startswith("dms_") and k not in known)
    if unknown:
        raise DMSConfigError(f"unknown DMS key(s) {unknown} in the checkpoint config; expected some of "
                             f"{', '.join(DMSConfig.keys())}")
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and cfg.dms_window_size > limit:
        # The cache keeps a ring of window + 1 slots per sequence: a window beyond any position
        # the model can reach only costs memory, and usually means a corrupted config.
        raise DMSConfigError(f"dms_window_size={cfg.dms_window_size} exceeds max_position_embeddings={limit}")


def _check_finite(model) -> None:
    """A NaN adapter weight makes every logit NaN, and NaN > 0 is False: the model would never
    evict, silently behaving like the vanilla model."""
    bad = [n for n, p in model.named_parameters() if ".dms_adapter." in n and not bool(p.isfinite().all())]
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
