"""dms.apply / dms.from_pretrained / save_pretrained, the mode contract, and error cases; the
forward passes run on every device (CPU, plus CUDA when available)."""
from __future__ import annotations

import json

import pytest
import torch

import dms
from conftest import VARIANTS, forced_dms_model, left_padded, on
from dms.config import DMSConfigError
from dms.models import (DMSCheckpointError, borrowed_neuron_rows, dms_parameters, last_decisions, last_logits,
                        set_mode, set_noise_generator)
from dms.models.tiny import tiny_model


@pytest.mark.parametrize("variant", VARIANTS)
def test_save_load_round_trip(arch, variant, tmp_path, device):
    model = forced_dms_model(arch, variant, window=5)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == [type(model).__name__] and type(model).__name__.endswith("ForCausalLM")
    assert config["dms_window_size"] == 5 and config["dms_separate_alpha"] == (variant == "adapter")
    assert "auto_map" not in config and config.get("_attn_implementation") is None
    loaded = dms.from_pretrained(str(tmp_path)).to(device)
    model = model.to(device)
    assert dms.models.dms_config(loaded) == dms.models.dms_config(model)
    assert len(dms_parameters(loaded)) == (6 if variant == "adapter" else 0)
    ids, mask = on(device, left_padded([6, 9]))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits,
                                   model(input_ids=ids, attention_mask=mask).logits, atol=0, rtol=0)


def test_apply_options_and_contract(arch):
    model = tiny_model(arch)
    dms.apply(model, dms_window_size=4, dms_separate_alpha=True, dms_alpha_per="layer")
    # H_kv outputs also per layer (output 0 is read), as the reference lays the adapter out
    assert [p.shape for _, p in dms_parameters(model)][:3] == [torch.Size([64]), torch.Size([2, 64]), torch.Size([2])]
    assert borrowed_neuron_rows(model) == {}
    ids = torch.randint(3, 128, (2, 7))
    set_mode(model, "train")
    set_noise_generator(model, torch.Generator().manual_seed(0))
    model(input_ids=ids)
    logits = last_logits(model)
    assert len(logits) == 2 and all(torch.equal(x, torch.full((2, 2, 7), -5.0)) for x in logits)  # -offset
    set_mode(model, "infer")
    cache = dms.DMSCache(model)
    model(input_ids=ids, past_key_values=cache)
    assert cache.compression_ratio() == 1.0  # a zero-initialised adapter keeps everything

    neuron = tiny_model(arch)
    dms.apply(neuron, dms_window_size=4)
    rows = borrowed_neuron_rows(neuron)
    assert set(rows) == {0, 1} and rows[0].tolist() == [15, 2 * 16 + 15]  # last dim of heads 0 and 2


def test_alpha_per_layer_shares_one_logit(arch, device):
    model = forced_dms_model(arch, "neuron", dms_alpha_per="layer").to(device)
    set_mode(model, "train")
    set_noise_generator(model, torch.Generator(device=device).manual_seed(0))
    model(input_ids=torch.randint(3, 128, (1, 12), device=device))
    logits = last_logits(model)[0]
    assert torch.equal(logits[:, 0], logits[:, 1]) and (logits > 0).any() and (logits < 0).any()


def test_train_mode_calls_train_attention(arch, device):
    model = forced_dms_model(arch, "adapter").to(device)
    set_mode(model, "train")
    set_noise_generator(model, torch.Generator(device=device).manual_seed(0))
    ids, mask = on(device, left_padded([5, 8]))
    out = model(input_ids=ids, attention_mask=mask)
    assert out.past_key_values is None
    hard = last_decisions(model)
    assert hard[0].shape == (2, 2, 8) and hard[0].requires_grad
    hard[0].sum().backward()
    assert model.model.layers[0].self_attn.dms_proj_alpha.weight.grad is not None
    with pytest.raises(ValueError, match="mode must be one of"):
        set_mode(model, "eval")


def test_chunked_prefill_equals_one_shot(arch, device):
    model = forced_dms_model(arch, "neuron").to(device)
    ids, mask = on(device, left_padded([13, 20], seed=7))
    with torch.no_grad():
        one = model(input_ids=ids, attention_mask=mask, past_key_values=dms.DMSCache(model, prefill_chunk=64))
        cache = dms.DMSCache(model, prefill_chunk=3)
        parts = [model(input_ids=ids[:, a:b], attention_mask=mask[:, :b], past_key_values=cache,
                       position_ids=(mask.cumsum(-1) - 1).clamp_min(0)[:, a:b]).logits
                 for a, b in ((0, 9), (9, 10), (10, 20))]
    real = mask.bool()
    torch.testing.assert_close(torch.cat(parts, 1)[real], one.logits[real], atol=1e-4, rtol=0)
    for a, b in zip(one.past_key_values.layers, cache.layers):
        assert torch.equal(a.store.seq_lens, b.store.seq_lens) and torch.equal(a.store.num_seen, b.store.num_seen)
        assert torch.equal(a.store.ring_flags, b.store.ring_flags)


def test_unsupported_architecture():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    with pytest.raises(ValueError, match="'gpt2'.*supported: llama, qwen2, qwen3, mistral"):
        dms.apply(model)


def test_invalid_options(arch):
    with pytest.raises(DMSConfigError, match="dms_window_size"):
        dms.apply(tiny_model(arch), dms_window_size=0)
    with pytest.raises(DMSConfigError, match="unknown DMS option.*dms_windw"):
        dms.apply(tiny_model(arch), dms_windw=4)
    model = dms.apply(tiny_model(arch))
    with pytest.raises(ValueError, match="already has DMS"):
        dms.apply(model)


def test_sliding_window_rejected():
    with pytest.raises(ValueError, match="sliding-window"):
        dms.apply(tiny_model("mistral", sliding_window=8))


def test_non_dms_checkpoint(tmp_path):
    tiny_model("qwen3").save_pretrained(tmp_path)
    with pytest.raises(DMSConfigError, match="not a DMS checkpoint"):
        dms.from_pretrained(str(tmp_path))


def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def test_missing_and_extra_dms_weights(tmp_path):
    neuron = dms.apply(tiny_model("llama"))
    neuron.save_pretrained(tmp_path / "n")
    _edit_config(tmp_path / "n", dms_separate_alpha=True)
    with pytest.raises(DMSCheckpointError, match=r"lacks DMS weights.*layers\.0\.self_attn\.dms_proj_alpha"):
        dms.from_pretrained(str(tmp_path / "n"))

    adapter = dms.apply(tiny_model("llama"), dms_separate_alpha=True)
    adapter.save_pretrained(tmp_path / "a")
    _edit_config(tmp_path / "a", dms_separate_alpha=False)
    with pytest.raises(DMSCheckpointError, match="does not use.*dms_proj_alpha"):
        dms.from_pretrained(str(tmp_path / "a"))


def test_wrong_cache_rejected(arch):
    from transformers import DynamicCache

    model = forced_dms_model(arch)
    ids = torch.randint(3, 128, (1, 5))
    with pytest.raises(TypeError, match="needs a dms.DMSCache, got a DynamicCache"):
        model(input_ids=ids, past_key_values=DynamicCache(config=model.config))
    with pytest.raises(ValueError, match="built for window 7"):
        model(input_ids=ids, past_key_values=dms.DMSCache(window=7, num_layers=2))
    set_mode(model, "train")
    with pytest.raises(ValueError, match="use_cache=False"):
        model(input_ids=ids, past_key_values=dms.DMSCache(model))
    set_mode(model, "off")  # "off" is the vanilla model: any cache works
    assert model(input_ids=ids, past_key_values=DynamicCache(config=model.config)).logits.shape == (1, 5, 128)


def test_prefill_mask_budget_splits_queries(arch, monkeypatch, device):
    """A tiny mask budget forces one query row per step: same logits as one step."""
    import dms.attention.infer as infer

    model = forced_dms_model(arch, "adapter").to(device)
    ids, mask = on(device, left_padded([6, 11], seed=8))
    with torch.no_grad():
        whole = model(input_ids=ids, attention_mask=mask, past_key_values=dms.DMSCache(model)).logits
        monkeypatch.setattr(infer, "_MASK_BUDGET", 1)
        rows = model(input_ids=ids, attention_mask=mask, past_key_values=dms.DMSCache(model)).logits
    real = mask.bool()
    torch.testing.assert_close(rows[real], whole[real], atol=1e-5, rtol=0)


def test_unwritten_pool_memory_never_read(monkeypatch, device):
    """Pool pages are allocated uninitialised; fill them with NaN: nothing may change."""
    import dms.store as store_mod

    regrow = store_mod._regrow

    def poisoned(pages, n):
        grown = regrow(pages, n)
        grown[pages.shape[0]:] = float("nan")
        return grown

    model = forced_dms_model("qwen3", "neuron").to(device)
    ids, mask = on(device, left_padded([13, 20], seed=7))
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        clean = model(input_ids=ids, attention_mask=mask, position_ids=pos,
                      past_key_values=dms.DMSCache(model)).logits
        monkeypatch.setattr(store_mod, "_regrow", poisoned)
        cache = dms.DMSCache(model, page_size=4)
        first = model(input_ids=ids[:, :9], attention_mask=mask[:, :9], position_ids=pos[:, :9],
                      past_key_values=cache).logits
        rest = model(input_ids=ids[:, 9:], attention_mask=mask, position_ids=pos[:, 9:],
                     past_key_values=cache).logits
    real = mask.bool()
    torch.testing.assert_close(torch.cat([first, rest], 1)[real], clean[real], atol=1e-4, rtol=0)
