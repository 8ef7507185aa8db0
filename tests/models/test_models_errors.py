"""dms.from_pretrained on damaged checkpoints: every bad dms_* config value, unknown DMS key,
missing / extra / misshaped / non-finite DMS weight fails with a message naming the key; none
loads as a silently vanilla model. (tests/models/test_models.py covers the whole-variant mismatches.)"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import dms
from dms.config import DMSConfigError
from dms.models import DMSCheckpointError
from dms.models.tiny import tiny_model

ADAPTER = "model.layers.1.self_attn.dms_proj_alpha"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    dms.apply(tiny_model("qwen3"), dms_window_size=4, dms_separate_alpha=True).save_pretrained(root)
    return root


@pytest.fixture
def ckpt(saved, tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(saved, path)
    return path


def edit_config(path, drop=(), **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    for key in drop:
        config.pop(key)
    (path / "config.json").write_text(json.dumps(config))


def edit_weights(path, fn):
    weights = load_file(path / "model.safetensors")
    fn(weights)
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("key,value", [
    ("dms_window_size", 0), ("dms_window_size", -4), ("dms_window_size", "16"), ("dms_window_size", 16.0),
    ("dms_window_size", True), ("dms_window_size", 10**9), ("dms_window_size", None),
    ("dms_alpha_scale", 0), ("dms_alpha_scale", -1.0), ("dms_alpha_scale", "big"),
    ("dms_initial_alpha_offset", "5"), ("dms_tau", 0), ("dms_alpha_per", "tensor"),
    ("dms_separate_alpha", "yes"), ("dms_separate_alpha", 1), ("dms_cr", 0.5),
    ("dms_windw_size", 8), ("dms_disable_eviction", "yes"),
])
def test_bad_dms_config_value_names_the_key(ckpt, key, value):
    if value is None:
        edit_config(ckpt, drop=[key])
        key = "not a DMS checkpoint"
    else:
        edit_config(ckpt, **{key: value})
    with pytest.raises(DMSConfigError, match=key):
        dms.from_pretrained(str(ckpt))


def test_reference_runtime_keys_are_accepted(ckpt):
    """NVIDIA's config carries runtime-tuning dms_* keys; they must not block loading."""
    edit_config(ckpt, dms_paged_attention_block_size=256, dms_compile_limit=72, dms_manual_inference_mode=False,
                dms_chunked_prefill=None, dms_preallocate_for_tokens=4096, dms_disable_eviction=False)
    model = dms.from_pretrained(str(ckpt))
    assert dms.models.dms_config(model).dms_window_size == 4


@pytest.mark.parametrize("damage,error,key", [
    (lambda w: w.pop(f"{ADAPTER}.weight"), "lacks DMS weights", f"{ADAPTER}.weight"),
    (lambda w: w.pop("model.layers.0.self_attn.dms_proj_alpha_norm.weight"), "lacks DMS weights",
     "layers.0.self_attn.dms_proj_alpha_norm.weight"),
    (lambda w: w.__setitem__(f"{ADAPTER}.bias", torch.zeros(3)), "wrong shape", f"{ADAPTER}.bias"),
    (lambda w: w.__setitem__(f"{ADAPTER}.weight", torch.zeros(2, 63)), "wrong shape", f"{ADAPTER}.weight"),
    (lambda w: w.__setitem__("model.layers.0.self_attn.dms_proj_alpha.extra", torch.zeros(2)), "does not use",
     "dms_proj_alpha.extra"),
    (lambda w: w[f"{ADAPTER}.weight"].__setitem__((0, 5), float("nan")), "NaN or infinite", f"{ADAPTER}.weight"),
    (lambda w: w[f"{ADAPTER}.bias"].fill_(float("inf")), "NaN or infinite", f"{ADAPTER}.bias"),
])
def test_damaged_dms_weight_names_the_key(ckpt, damage, error, key):
    edit_weights(ckpt, damage)
    with pytest.raises(DMSCheckpointError, match=error) as err:
        dms.from_pretrained(str(ckpt))
    assert key in str(err.value)


def test_ignore_mismatched_sizes_does_not_cover_dms_weights(ckpt):
    edit_weights(ckpt, lambda w: w.__setitem__(f"{ADAPTER}.bias", torch.zeros(5)))
    with pytest.raises(DMSCheckpointError, match="wrong shape"):
        dms.from_pretrained(str(ckpt), ignore_mismatched_sizes=True)


def test_intact_checkpoint_loads_with_its_adapter_weights(ckpt):
    """The control: the undamaged copy loads, with the saved (not re-initialised) weights."""
    edit_weights(ckpt, lambda w: w[f"{ADAPTER}.bias"].fill_(0.25))
    model = dms.from_pretrained(str(ckpt))
    assert torch.equal(model.model.layers[1].self_attn.dms_proj_alpha.bias, torch.full((2,), 0.25))


@pytest.mark.parametrize("model", [None, "Qwen/Qwen3-0.6B", torch.nn.Linear(2, 2)])
def test_apply_rejects_what_is_not_a_causal_lm(model):
    with pytest.raises(TypeError, match="expects a transformers"):
        dms.apply(model)


def test_apply_rejects_a_window_beyond_the_ring_limit():
    from dms.config import MAX_WINDOW

    with pytest.raises(DMSConfigError, match="dms_window_size"):
        dms.apply(tiny_model("llama"), dms_window_size=MAX_WINDOW + 1)
