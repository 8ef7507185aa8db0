"""Checkpoints laid out as NVIDIA's reference implementation saves them (adapter under
self_attn.dms_proj_alpha_norm / dms_proj_alpha, no bias, config without architectures, bf16)
load through dms.from_pretrained and decode like the dense oracle; dms writes the same names
back; checkpoints in dms's earlier layout (self_attn.dms_adapter.*) load unchanged;
dms_disable_eviction runs the model without eviction."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import dms
from conftest import left_padded
from dms.compat import cache_kwargs
from dms.models import dms_parameters
from dms.models.tiny import save_reference_checkpoint

KEYS = dict(dms_window_size=4, dms_paged_attention_block_size=2)
ATOL = 2e-4


def _load(path):
    return dms.from_pretrained(str(path), dtype=torch.float32)


def _names(path):
    with safe_open(path / "model.safetensors", "pt") as f:
        return set(f.keys())


def _greedy(model, ids, mask, n=10):
    cache = dms.DMSCache(model, prefill_chunk=4)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                         return_dict_in_generate=True, output_logits=True, pad_token_id=0, eos_token_id=None,
                         **cache_kwargs(cache))
    return out.sequences, torch.stack(out.logits, 1), cache


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    path = tmp_path_factory.mktemp("reference")
    return path, save_reference_checkpoint(path, **KEYS)


def test_reference_checkpoint_loads_its_adapter(reference):
    path, written = reference
    config = json.loads((path / "config.json").read_text())
    assert "architectures" not in config and "auto_map" in config and config["dms_separate_alpha"] is True
    model = _load(path)
    assert type(model).__name__ == "Qwen3ForCausalLM"
    params = dict(dms_parameters(model))
    assert sorted(params) == sorted(k for k in written if ".dms_proj_alpha" in k)  # no bias, as written
    for name, p in params.items():
        assert torch.equal(p, written[name].float()), name
    assert all(layer.self_attn.dms_proj_alpha.bias is None for layer in model.model.layers)


def test_reference_checkpoint_decodes_like_the_dense_oracle(reference, dense_oracle):
    model = _load(reference[0])
    ids, mask = left_padded([9, 14], seed=1)
    seqs, logits, cache = _greedy(model, ids, mask)
    P = ids.shape[1]
    for i in range(logits.shape[1]):
        full_mask = torch.cat([mask, mask.new_ones(2, i)], 1)
        torch.testing.assert_close(logits[:, i], dense_oracle(model, seqs[:, :P + i], full_mask)[:, -1],
                                   atol=ATOL, rtol=0)
    assert cache.compression_ratio() > 1.3  # the adapter really evicts: the equality covers eviction


def test_save_writes_the_reference_names(reference, tmp_path):
    path, _ = reference
    model = _load(path)
    model.save_pretrained(tmp_path)
    assert _names(tmp_path) == _names(path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert "auto_map" not in config and config["architectures"] == ["Qwen3ForCausalLM"]  # no remote code
    ids, mask = left_padded([6, 11], seed=2)
    with torch.no_grad():
        torch.testing.assert_close(_load(tmp_path)(input_ids=ids, attention_mask=mask).logits,
                                   model(input_ids=ids, attention_mask=mask).logits, atol=0, rtol=0)


def _to_earlier_layout(src, dst, one_output: bool = False):
    """dst: src's checkpoint under dms's earlier names (always with a bias; one output per layer
    when ``one_output``)."""
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    old = {}
    for name, t in load_file(src / "model.safetensors").items():
        if ".dms_proj_alpha." in name:
            t = t[:1] if one_output else t
            old[name.replace(".dms_proj_alpha.", ".dms_adapter.proj.")] = t
            old[name.replace(".dms_proj_alpha.weight", ".dms_adapter.proj.bias")] = torch.zeros(t.shape[0])
        else:
            old[name.replace(".dms_proj_alpha_norm.", ".dms_adapter.norm.")] = t
    save_file(old, dst / "model.safetensors", metadata={"format": "pt"})
    return old


@pytest.mark.parametrize("alpha_per", ["head", "layer"])
def test_earlier_layout_loads_like_the_reference_layout(tmp_path, alpha_per):
    save_reference_checkpoint(tmp_path / "ref", dms_alpha_per=alpha_per, **KEYS)
    old = _to_earlier_layout(tmp_path / "ref", tmp_path / "old", one_output=alpha_per == "layer")
    assert not any(".dms_proj_alpha" in k for k in old)
    ref, earlier = _load(tmp_path / "ref"), _load(tmp_path / "old")
    proj = earlier.model.layers[1].self_attn.dms_proj_alpha
    assert torch.equal(proj.bias, torch.zeros(2))  # the earlier layout's bias is kept
    if alpha_per == "layer":  # output 0 is the one logit; the padding rows are unused
        assert torch.equal(proj.weight[1:], torch.zeros(1, 64))
    ids, mask = left_padded([7, 12], seed=3)
    _, want, want_cache = _greedy(ref, ids, mask)
    _, got, got_cache = _greedy(earlier, ids, mask)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert got_cache.compression_ratio() == want_cache.compression_ratio() > 1.2


@pytest.mark.parametrize("name", ["dms-4x", "dms-8x"])
def test_shipped_assets_load_unchanged_in_either_layout(name):
    from pathlib import Path

    folder = Path(dms.__file__).parent / "assets" / name
    stored = {k: t for k, t in load_file(folder / "model.safetensors").items() if ".dms_" in k}
    model = _load(folder)
    params = dict(dms_parameters(model))
    assert len(params) == len(stored) == 3 * model.config.num_hidden_layers
    for key, t in stored.items():
        new = key.replace(".dms_adapter.norm.", ".dms_proj_alpha_norm.").replace(".dms_adapter.proj.",
                                                                               ".dms_proj_alpha.")
        assert torch.equal(params[new], t), key


def test_disable_eviction_runs_the_adapter_model_as_vanilla(reference, tmp_path):
    """The reference: dms_disable_eviction "turns adapter DMS models into vanilla models"."""
    from transformers import AutoModelForCausalLM

    path, _ = reference
    for f in ("model.safetensors", "config.json"):
        (tmp_path / f).write_bytes((path / f).read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "dms_disable_eviction": True}))
    model = _load(tmp_path)
    assert dms.models.dms_config(model).dms_disable_eviction is True
    vanilla = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32)  # ignores the dms_* keys
    ids, mask = left_padded([9, 14], seed=4)
    seqs, logits, cache = _greedy(model, ids, mask)
    assert cache.compression_ratio() == 1.0
    out = vanilla.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                           return_dict_in_generate=True, output_logits=True, pad_token_id=0, eos_token_id=None)
    assert torch.equal(seqs, out.sequences)
    torch.testing.assert_close(logits, torch.stack(out.logits, 1), atol=ATOL, rtol=0)


@pytest.mark.parametrize("variant", ["neuron", "adapter"])
def test_disable_eviction_in_every_path(variant):
    """Train mode, the cache-free and the cached forward, the fast decode step: no token is ever
    evicted, and the rest is the DMS computation (the borrowed neuron still zeroed, as in the
    reference): the logits of a model whose window covers the whole prompt."""
    from conftest import forced_dms_model
    from dms.models import last_decisions, set_mode
    from dms.models.decode import decoder

    model = forced_dms_model("qwen3", variant, dms_disable_eviction=True)
    ids, mask = left_padded([9, 14], seed=5)
    set_mode(model, "train")
    model(input_ids=ids, attention_mask=mask)
    assert all(not bool(d.any()) for d in last_decisions(model))
    set_mode(model, "infer")
    cache = dms.DMSCache(model)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, **cache_kwargs(cache))
        decoder(model).step(cache, torch.tensor([5, 6]), torch.tensor([9, 14]))
    assert cache.compression_ratio() == 1.0
    wide = forced_dms_model("qwen3", variant, window=64)  # same weights: nothing leaves its window
    vanilla = forced_dms_model("qwen3", variant, window=64)
    set_mode(vanilla, "off")
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(got, wide(input_ids=ids, attention_mask=mask).logits, atol=1e-5, rtol=0)
        real = mask.bool()  # pad positions' own outputs are not defined alike in every mode
        differs = (got - vanilla(input_ids=ids, attention_mask=mask).logits)[real].abs().max() > 1e-3
    assert differs == (variant == "neuron")  # only the neuron variant changes the vanilla computation
