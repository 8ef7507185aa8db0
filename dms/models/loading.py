"""``dms.from_pretrained``: load a DMS checkpoint in the published format (flat dms_* keys in
config.json, architecture = the base transformers class, adapter weights as extra state-dict
keys) through transformers' own from_pretrained, without trust_remote_code."""
from __future__ import annotations

from transformers import AutoConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from dms.config import DMSConfig
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
    DMSConfig.from_model_config(config)  # not a DMS checkpoint / invalid values -> DMSConfigError
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
    others = [m for m in info.get("mismatched_keys", ()) if "dms_" not in str(m)]
    if others and not allow_mismatch:
        raise RuntimeError(f"checkpoint weights with the wrong shape: {sorted(others)[:4]}")
    return model.eval()


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
