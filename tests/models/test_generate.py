"""generate() through the DMS cache equals a dense recomputation with the reference mask, on every
device (CPU, plus CUDA when available)."""
from __future__ import annotations

import pytest
import torch

import dms
from conftest import VARIANTS, forced_dms_model, left_padded, on
from dms.compat import cache_kwargs

ATOL = 2e-4


def _generate(model, ids, mask, n, cache=None, **kw):
    cache = cache if cache is not None else dms.DMSCache(model, prefill_chunk=4)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                         **cache_kwargs(cache), return_dict_in_generate=True, output_logits=True,
                         pad_token_id=0, eos_token_id=None, **kw)
    return out.sequences, torch.stack(out.logits, 1), cache


def _assert_steps_match_dense(oracle, model, seqs, mask, step_logits):
    """step_logits[:, i] was produced after seqs[:, :P + i]; recompute each without cache."""
    P = seqs.shape[1] - step_logits.shape[1]
    for i in range(step_logits.shape[1]):
        full_mask = torch.cat([mask, mask.new_ones(mask.shape[0], i)], 1)
        dense = oracle(model, seqs[:, : P + i], full_mask)[:, -1]
        torch.testing.assert_close(step_logits[:, i], dense, atol=ATOL, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_decode_matches_dense_left_padded(arch, variant, dense_oracle, device):
    model = forced_dms_model(arch, variant).to(device)
    ids, mask = on(device, left_padded([9, 14], seed=1))
    seqs, logits, cache = _generate(model, ids, mask, 12)
    _assert_steps_match_dense(dense_oracle, model, seqs, mask, logits)
    stats = cache.stats()
    assert stats["compression_ratio"] > 1.3, stats  # evictions really happened
    # per layer and KV head: the valid prompt tokens + the 11 generated tokens fed back (pads never stored)
    assert stats["seen"] == 2 * 2 * (9 + 14 + 2 * 11)


def test_multi_turn_appends_to_compressed_cache(arch, dense_oracle, device):
    model = forced_dms_model(arch, "neuron").to(device)
    ids, mask = on(device, left_padded([7, 11], seed=2))
    seqs, _, cache = _generate(model, ids, mask, 6)
    ratio_before = cache.compression_ratio()
    turn2, turn2_mask = on(device, left_padded([5, 3], seed=3))  # row 1: pads in the middle of its history
    ids2 = torch.cat([seqs, turn2], 1)
    mask2 = torch.cat([mask, mask.new_ones(2, 6), turn2_mask], 1)
    seqs2, logits2, cache = _generate(model, ids2, mask2, 6, cache=cache)
    assert ratio_before > 1.0
    # fed per row: prompt + 5 generated, then 1 + turn 2 + 5 (last token of turn 1, turn 2, its outputs)
    assert cache.stats()["seen"] == 2 * 2 * (7 + 11 + 2 * (5 + 1 + 5) + 5 + 3)
    _assert_steps_match_dense(dense_oracle, model, seqs2, mask2, logits2)


def test_long_generation_and_sampling(arch, device):
    """Thousands of decode steps keep the retained set bounded; sampling runs through the cache."""
    model = forced_dms_model(arch, "adapter", window=8).to(device)
    ids, mask = on(device, left_padded([5, 3], seed=4))
    n = 1500 if arch == "llama" else 200  # one long run is enough; the others check sampling
    torch.manual_seed(0)
    cache = dms.DMSCache(model)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=True, top_k=20,
                         pad_token_id=0, eos_token_id=None, **cache_kwargs(cache))
    assert out.shape[1] == ids.shape[1] + n
    stats = cache.stats()
    assert stats["compression_ratio"] > 1.3
    assert stats["bytes"] > 0 and stats["retained"] < stats["seen"]


def test_default_cache_is_dms(arch, device):
    model = forced_dms_model(arch).to(device)
    ids, mask = on(device, left_padded([6, 6]))
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                         return_dict_in_generate=True, pad_token_id=0)
    assert isinstance(out.past_key_values, dms.DMSCache)


def test_off_mode_generates_like_vanilla(arch, device):
    from dms.models import set_mode
    from dms.models.tiny import tiny_model

    vanilla = tiny_model(arch, seed=0)
    model = forced_dms_model(arch, "neuron")
    with torch.no_grad():  # forced_dms_model changed q_proj rows: give the vanilla model the same weights
        vanilla.load_state_dict(model.state_dict())
    vanilla, model = vanilla.to(device), model.to(device)
    set_mode(model, "off")
    ids, mask = on(device, left_padded([8, 12], seed=5))
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(**kw), vanilla.generate(**kw))
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits,
                               vanilla(input_ids=ids, attention_mask=mask).logits, atol=0, rtol=0)
    # With a DMSCache, "off" stores everything: same tokens, nothing evicted.
    cache = dms.DMSCache(model)
    assert torch.equal(model.generate(**kw, **cache_kwargs(cache)), vanilla.generate(**kw))
    assert cache.compression_ratio() == 1.0


def test_generate_prefill_chunk_size_matches_one_shot(arch, device):
    """generate(prefill_chunk_size=...) feeds the prompt in pieces on top of the compressed cache."""
    model = forced_dms_model(arch, "neuron").to(device)
    ids, mask = on(device, left_padded([10, 17], seed=6))
    _, one, _ = _generate(model, ids, mask, 5)
    _, chunked, _ = _generate(model, ids, mask, 5, prefill_chunk_size=4)
    torch.testing.assert_close(chunked, one, atol=ATOL, rtol=0)
