"""dms.models.decode: the fast decode path gives the transformers path's logits step by step
and leaves the cache in the same state (all four architectures, both eviction variants,
left-padded batches, evictions during decode); its generate equals model.generate; bad input
is refused with a clear error."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import VARIANTS, forced_dms_model, left_padded

import dms
from dms.compat import cache_kwargs
from dms.models.decode import FastDecoder, decoder, generate
from dms.models.tiny import tiny_model


def _prefilled(model, ids, mask, cache=None):
    cache = dms.DMSCache(model) if cache is None else cache
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                       **cache_kwargs(cache)).logits[:, -1]
    return cache, logits, mask.sum(-1)


def _layer_state(cache):
    return [(layer.columns, layer.store.seq_lens.clone(), layer.store.num_seen.clone(), layer.store.ring_slots.clone(),
             layer.store.ring_flags.clone()) for layer in cache.layers]


def _assert_same_state(ref_cache, fast_cache):
    for a, b in zip(_layer_state(ref_cache), _layer_state(fast_cache)):
        assert a[0] == b[0]
        for x, y in zip(a[1:], b[1:]):
            assert torch.equal(x, y)


def _assert_follows_transformers_path(model, fuse=None, evicts=True):
    """12 fast steps on a copy of a prefilled cache give the transformers path's logits and
    leave both caches in the same state; ``evicts``: some token was evicted during decode."""
    ids, mask = left_padded([9, 5, 7])
    ref_cache, logits, pos = _prefilled(model, ids, mask)
    fast_cache = copy.deepcopy(ref_cache)
    fast = FastDecoder(model, fuse=fuse)
    tok = logits.argmax(-1)
    evicted = 0
    for _ in range(12):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        with torch.no_grad():
            ref = model(input_ids=tok[:, None], attention_mask=mask, position_ids=pos[:, None], use_cache=True,
                        **cache_kwargs(ref_cache)).logits[:, -1]
        got = fast.step(fast_cache, tok, pos)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        _assert_same_state(ref_cache, fast_cache)
        evicted += int((ref_cache.layers[0].store.num_seen - ref_cache.layers[0].store.seq_lens).sum())
        tok, pos = ref.argmax(-1), pos + 1
    assert (evicted > 0) == evicts
    assert fast_cache.stats()["compression_ratio"] == ref_cache.stats()["compression_ratio"]


@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_and_cache_equal_transformers_path(arch, variant, fuse):
    _assert_follows_transformers_path(forced_dms_model(arch, variant, window=3), fuse)


@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("variant", VARIANTS)
def test_one_logit_per_layer_and_disabled_eviction(variant, fuse):
    """alpha_per="layer" (one logit row shared by the KV heads) and dms_disable_eviction."""
    _assert_follows_transformers_path(forced_dms_model("llama", variant, window=3, dms_alpha_per="layer"), fuse)
    model = forced_dms_model("llama", variant, window=3, dms_disable_eviction=True)
    _assert_follows_transformers_path(model, fuse, evicts=False)


def test_step_at_the_page_cap_follows_transformers_path():
    """A cache with ``max_pages``: fast steps give the transformers path's logits and cache
    state while evictions leave room, and both refuse the same token with DMSCacheFullError
    once the pool is full."""
    from dms.cache import DMSCacheFullError

    model = forced_dms_model("llama", "adapter", window=3)
    ids, mask = left_padded([9, 5, 7])
    ref_cache, logits, pos = _prefilled(model, ids, mask, dms.DMSCache(model, page_size=2, max_pages=40))
    fast_cache, fast, tok = copy.deepcopy(ref_cache), FastDecoder(model), logits.argmax(-1)
    for _ in range(40):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        try:
            with torch.no_grad():
                ref = model(input_ids=tok[:, None], attention_mask=mask, position_ids=pos[:, None], use_cache=True,
                            **cache_kwargs(ref_cache)).logits[:, -1]
        except DMSCacheFullError:
            with pytest.raises(DMSCacheFullError, match="max_pages=40"):
                fast.step(fast_cache, tok, pos)
            break
        torch.testing.assert_close(fast.step(fast_cache, tok, pos), ref, rtol=1e-5, atol=1e-5)
        _assert_same_state(ref_cache, fast_cache)
        tok, pos = ref.argmax(-1), pos + 1
    else:
        pytest.fail("the cap was never reached")


@pytest.mark.parametrize("rope", [dict(rope_type="linear", factor=2.0),
                                  dict(rope_type="yarn", factor=2.0, original_max_position_embeddings=8),
                                  dict(rope_type="dynamic", factor=2.0)])
def test_scaled_rope_follows_transformers_path(rope):
    """cos/sin computed by the decoder (linear; yarn, whose attention scaling is not 1) or by
    the rotary module (dynamic)."""
    model = forced_dms_model("llama", "adapter", window=3)
    cfg = copy.deepcopy(model.config)
    cfg.rope_parameters = dict(rope, rope_theta=cfg.rope_parameters["rope_theta"])
    model.model.rotary_emb = type(model.model.rotary_emb)(cfg)
    assert (FastDecoder(model).rope is None) == (rope["rope_type"] == "dynamic")
    _assert_follows_transformers_path(model)


@pytest.mark.parametrize("variant", VARIANTS)
def test_generate_equals_model_generate(arch, variant):
    model = forced_dms_model(arch, variant, window=3)
    ids, mask = left_padded([8, 4, 6], seed=1)
    eos = model.generation_config.eos_token_id  # generate stops rows there by default
    ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    out = generate(model, ids, mask, max_new_tokens=10, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(out, ref)


def test_generate_stops_at_eos_and_pads_finished_rows():
    model = forced_dms_model("llama", "adapter")
    ids, mask = left_padded([5, 7], seed=2)
    free = generate(model, ids, mask, max_new_tokens=6)
    eos = int(free[0, ids.shape[1] + 1])  # row 0's second new token
    out = generate(model, ids, mask, max_new_tokens=6, eos_token_id=eos, pad_token_id=0)
    ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                         eos_token_id=eos, pad_token_id=0)
    assert torch.equal(out, ref)
    assert (out[0, ids.shape[1] + 2:] == 0).all()


def test_sampling_is_reproducible_and_respects_top_k():
    model = forced_dms_model("qwen3", "neuron")
    ids, mask = left_padded([6, 6], seed=3)
    runs = [generate(model, ids, mask, max_new_tokens=8, do_sample=True, top_k=1,
                     generator=torch.Generator().manual_seed(s)) for s in (0, 1)]
    greedy = generate(model, ids, mask, max_new_tokens=8)
    assert torch.equal(runs[0], greedy) and torch.equal(runs[1], greedy)  # top_k=1 is greedy
    a, b = (generate(model, ids, mask, max_new_tokens=8, do_sample=True, top_p=0.9, temperature=1.5,
                     generator=torch.Generator().manual_seed(7)) for _ in range(2))
    assert torch.equal(a, b)


def test_decoder_is_rebuilt_when_weights_change():
    model = forced_dms_model("llama", "neuron")
    first = decoder(model)
    assert decoder(model) is first
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.mul_(2)
    assert decoder(model) is not first


def test_bad_input_is_refused():
    model = forced_dms_model("llama", "adapter")
    ids, mask = left_padded([5, 4])
    cache, logits, pos = _prefilled(model, ids, mask)
    fast = FastDecoder(model)
    tok = logits.argmax(-1)
    with pytest.raises(ValueError, match="not a DMS model"):
        FastDecoder(tiny_model("llama"))
    with pytest.raises(TypeError, match="dms.DMSCache"):
        fast.step(object(), tok, pos)
    with pytest.raises(ValueError, match="cache is empty"):
        fast.step(dms.DMSCache(model), tok, pos)
    other = dms.apply(tiny_model("llama", num_key_value_heads=4), dms_window_size=3, dms_separate_alpha=True)
    other_cache, _, _ = _prefilled(other, ids, mask)
    with pytest.raises(ValueError, match="another model"):
        fast.step(other_cache, tok, pos)
    with pytest.raises(ValueError, match="another model or batch"):
        fast.step(cache, tok[:1], pos[:1])
    with pytest.raises(ValueError, match="positions must be"):
        fast.step(cache, tok, pos[:1])
    dms.models.set_mode(model, "off")
    with pytest.raises(ValueError, match="infer mode only"):
        fast.step(cache, tok, pos)
    with pytest.raises(ValueError, match="infer mode only"):
        generate(model, ids, mask)
    dms.models.set_mode(model, "infer")
    with pytest.raises(ValueError, match="cache must be empty"):
        generate(model, ids, mask, cache=cache)
    with pytest.raises(ValueError, match="pad_token_id"):
        generate(model, ids, mask, eos_token_id=2)
    with pytest.raises(ValueError, match="attention_mask"):
        generate(model, ids, mask[:, 1:])


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_bf16_follows_transformers_path(arch):
    """The non-fp32 RMSNorm branch (statistics in fp32, weight in bf16, as transformers)."""
    model = forced_dms_model(arch, "neuron", window=3).to(torch.bfloat16)
    ids, mask = left_padded([7, 5])
    ref_cache, logits, pos = _prefilled(model, ids, mask)
    fast_cache = copy.deepcopy(ref_cache)
    tok = logits.argmax(-1)
    for _ in range(6):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        with torch.no_grad():
            ref = model(input_ids=tok[:, None], attention_mask=mask, position_ids=pos[:, None], use_cache=True,
                        **cache_kwargs(ref_cache)).logits[:, -1]
        got = decoder(model).step(fast_cache, tok, pos)
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2)
        tok, pos = ref.argmax(-1), pos + 1
    for a, b in zip(ref_cache.layers, fast_cache.layers):
        assert torch.equal(a.store.seq_lens, b.store.seq_lens)
