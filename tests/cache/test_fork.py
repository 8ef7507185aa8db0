"""Forking a filled DMSCache (DMSCache.fork / select, transformers' batch_repeat_interleave /
batch_select_indices, generate(num_return_sequences=W) from one prefill): every forked chain
continues exactly like a fresh prefill of its prompt fed the same tokens, with evictions during
decode (window 2, decisions forced to evict about half of the tokens)."""
from __future__ import annotations

import pytest
import torch

from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import VARIANTS, forced_dms_model, left_padded
from dms.cache import DMSCache, DMSLayer
from dms.compat import cache_kwargs

STEPS = 10
WINDOW = 2


def _prefill(model, ids, mask):
    cache = DMSCache(model, page_size=2)
    pos = (mask.long().cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                       **cache_kwargs(cache)).logits[:, -1]
    return cache, logits


def _decode(model, cache, mask, tokens):
    """Feeds tokens [B, STEPS] one step at a time; logits [B, STEPS, V] after each."""
    out = []
    with torch.no_grad():
        for t in range(tokens.shape[1]):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            pos = mask.long().sum(-1, keepdim=True) - 1
            out.append(model(input_ids=tokens[:, t:t + 1], attention_mask=mask, position_ids=pos, use_cache=True,
                             **cache_kwargs(cache)).logits[:, -1])
    return torch.stack(out, dim=1)


def _state(cache, seqs):
    """Integer state and live keys of sequences ``seqs`` in every layer."""
    out = []
    for layer in cache.layers:
        st = layer.store
        keys, _, live = st.dense()
        out.append((st.seq_lens[seqs], st.num_seen[seqs], st.ring_slots[seqs], st.ring_flags[seqs],
                    keys[seqs], live[seqs]))
    return out


def _assert_same_state(a, b):
    for la, lb in zip(a, b):
        for x, y in zip(la[:4], lb[:4]):
            assert torch.equal(x, y)
        L = min(la[4].shape[1], lb[4].shape[1])
        assert torch.equal(la[5][:, :L], lb[5][:, :L]) and not la[5][:, L:].any() and not lb[5][:, L:].any()
        torch.testing.assert_close(la[4][:, :L], lb[4][:, :L], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_forked_chains_equal_fresh_prefills(arch, variant):
    model = forced_dms_model(arch, variant, window=WINDOW).eval()
    ids, mask = left_padded([11, 7], seed=3)
    W = 3
    tokens = torch.randint(3, 128, (ids.shape[0] * W, STEPS), generator=torch.Generator().manual_seed(5))
    cache, first = _prefill(model, ids, mask)
    assert cache.fork(W) is cache
    forked = _decode(model, cache, mask.repeat_interleave(W, 0), tokens)
    H = model.config.num_key_value_heads
    for w in range(W):
        rows = torch.arange(ids.shape[0]) * W + w  # chain w of every prompt
        fresh_cache, fresh_first = _prefill(model, ids, mask)
        torch.testing.assert_close(first, fresh_first, rtol=0, atol=0)
        fresh = _decode(model, fresh_cache, mask, tokens[rows])
        torch.testing.assert_close(forked[rows], fresh, rtol=1e-5, atol=1e-5)
        assert torch.equal(forked[rows].argmax(-1), fresh.argmax(-1))
        seqs = (rows[:, None] * H + torch.arange(H)).reshape(-1)
        _assert_same_state(_state(cache, seqs), _state(fresh_cache, torch.arange(ids.shape[0] * H)))
    st = cache.layers[0].store
    assert (st.seq_lens < st.num_seen).any(), "no eviction happened: the test would not exercise the ring"


def test_copy_fork_shares_nothing_cow_fork_shares_the_kept_pages(arch):
    model = forced_dms_model(arch, "adapter", window=WINDOW).eval()
    ids, mask = left_padded([23], seed=1)
    copied, _ = _prefill(model, ids, mask)
    copied.fork(4, share=False)
    shared, _ = _prefill(model, ids, mask)
    shared.fork(4)
    _decode(model, shared, mask.repeat_interleave(4, 0), torch.randint(3, 128, (4, 2)))
    for layer in copied.layers:
        assert int(layer.store.references().max()) == 1
    for layer in shared.layers:
        st = layer.store
        assert int(st.references().max()) == 4  # pages of tokens kept for good, one copy for 4 chains
        assert not st.shared_writable().any()
        assert st.held_slots().sum() < st.seq_lens.sum()


def test_select_keeps_exactly_the_chosen_rows():
    model = forced_dms_model("llama", "neuron", window=WINDOW).eval()
    ids, mask = left_padded([8, 12, 5], seed=2)
    tokens = torch.randint(3, 128, (ids.shape[0], STEPS), generator=torch.Generator().manual_seed(1))
    chosen = torch.tensor([2, 0, 2])
    cache, _ = _prefill(model, ids, mask)
    cache.batch_select_indices(chosen)
    H = model.config.num_key_value_heads
    assert cache.layers[0].num_seqs == len(chosen) * H
    got = _decode(model, cache, mask[chosen], tokens[chosen])
    fresh_cache, _ = _prefill(model, ids, mask)
    want = _decode(model, fresh_cache, mask, tokens)[chosen]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_batch_repeat_interleave_is_fork():
    model = forced_dms_model("qwen2", "neuron", window=WINDOW).eval()
    ids, mask = left_padded([6, 9], seed=4)
    a, _ = _prefill(model, ids, mask)
    b, _ = _prefill(model, ids, mask)
    a.batch_repeat_interleave(3)
    b.fork(3)
    for la, lb in zip(a.layers, b.layers):
        # Page contents past the live slots are uninitialised: compare the index tensors and live slots.
        assert all(torch.equal(x, y) for x, y in zip(la.store.tensors()[2:], lb.store.tensors()[2:]))
        assert all(torch.equal(x, y) for x, y in zip(la.store.dense(), lb.store.dense()))


def test_fork_and_select_errors():
    model = forced_dms_model("llama", window=WINDOW).eval()
    ids, mask = left_padded([5, 5], seed=0)
    cache, _ = _prefill(model, ids, mask)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="chains"):
            cache.fork(bad)
    with pytest.raises(ValueError, match="batch rows in"):
        cache.select([0, 2])
    with pytest.raises(ValueError, match="indices"):
        cache.select([[0]])
    assert DMSCache(model).fork(4).get_seq_length() == 0  # an empty cache has nothing to copy


@pytest.mark.parametrize("variant", VARIANTS)
def test_generate_samples_chains_from_one_prefill(variant):
    model = forced_dms_model("qwen3", variant, window=WINDOW).eval()
    ids, mask = left_padded([10, 7], seed=6)
    W, new = 4, 8
    prompt_forwards = []
    hook = model.model.register_forward_pre_hook(
        lambda mod, args, kw: prompt_forwards.append(kw["input_ids"].shape) if kw["input_ids"].shape[1] > 1 else None,
        with_kwargs=True)
    torch.manual_seed(0)
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, num_return_sequences=W,
                         max_new_tokens=new, min_new_tokens=new, top_k=0, return_dict_in_generate=True,
                         output_logits=True, pad_token_id=0)
    hook.remove()
    assert prompt_forwards == [torch.Size([2, ids.shape[1] - 1])]  # one prefill, of the 2 prompts
    sampled = out.sequences[:, ids.shape[1]:]
    assert sampled.shape == (ids.shape[0] * W, new)
    assert len({tuple(r) for r in sampled.tolist()}) > ids.shape[0], "chains did not diverge"
    logits = torch.stack(out.logits, dim=1)  # [B * W, new, V]
    # Each chain = a fresh prefill of its prompt fed the tokens it sampled.
    for row in range(ids.shape[0] * W):
        b = row // W
        cache, first = _prefill(model, ids[b:b + 1], mask[b:b + 1])
        rest = _decode(model, cache, mask[b:b + 1], sampled[row:row + 1, :-1])
        torch.testing.assert_close(torch.cat([first[:, None], rest], dim=1), logits[row:row + 1],
                                   rtol=1e-4, atol=1e-4)


@st.composite
def _streams(draw):
    """A prefill, then a random stream of appends (1-3 tokens, random decisions and pads) and
    re-forks (random rows, repeats allowed)."""
    S = draw(st.integers(1, 3))
    steps = []
    for _ in range(draw(st.integers(1, 12))):
        if draw(st.integers(0, 4)) == 0:
            steps.append(("select", draw(st.lists(st.integers(0, 63), min_size=1, max_size=4))))
        else:
            steps.append(("append", draw(st.integers(1, 3))))
    return dict(S=S, window=draw(st.integers(0, 3)), page_size=draw(st.integers(1, 4)),
                prompt=draw(st.integers(1, 12)), chains=draw(st.integers(2, 3)), steps=steps,
                seed=draw(st.integers(0, 2 ** 16)))


def _chunk(gen, S, T, D=4):
    k, v = torch.randn(S, T, D, generator=gen), torch.randn(S, T, D, generator=gen)
    decisions = torch.rand(S, T, generator=gen) < 0.6
    valid = torch.rand(S, T, generator=gen) < 0.85
    return k, v, decisions, valid


@settings(max_examples=40, deadline=None)
@given(_streams())
def test_no_append_writes_a_shared_page(case):
    """Copy-on-write fork vs copying fork under the same random stream: after every append no
    shared page is writable (so no later append can reach one), pages shared before and after an
    append are unchanged, and every sequence holds exactly what its private copy holds."""
    gen = torch.Generator().manual_seed(case["seed"])
    cow, copy = (DMSLayer(case["window"], case["page_size"]) for _ in range(2))
    first = _chunk(gen, case["S"], case["prompt"])
    for layer in (cow, copy):
        layer.append(*first)
    rows = torch.arange(case["S"]).repeat_interleave(case["chains"])
    cow.take(rows, share=True)
    copy.take(rows, share=False)
    for kind, arg in case["steps"]:
        if kind == "select":
            pick = torch.tensor([i % cow.num_seqs for i in arg])
            cow.take(pick, share=True)
            copy.take(pick, share=False)
            continue
        before = cow.store.references() > 1
        saved = cow.store.k_pages[before].clone(), cow.store.v_pages[before].clone()
        chunk = _chunk(gen, cow.num_seqs, arg)
        cow.append(*chunk)
        copy.append(*chunk)
        still = (cow.store.references() > 1)[: before.numel()][before]
        assert torch.equal(cow.store.k_pages[: before.numel()][before][still], saved[0][still])
        assert torch.equal(cow.store.v_pages[: before.numel()][before][still], saved[1][still])
        assert not cow.store.shared_writable().any()
        for name in ("seq_lens", "num_seen", "ring_slots", "ring_flags"):
            assert torch.equal(getattr(cow.store, name), getattr(copy.store, name))
        for a, b in zip(cow.store.dense(), copy.store.dense()):
            assert torch.equal(a, b)
        assert float(cow.store.held_slots().sum()) <= int(cow.store.seq_lens.sum())
