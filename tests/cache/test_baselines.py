"""Baselines: each policy's choice on hand-made attention patterns (Quest: on hand-made keys),
and PolicyCache in generate() on a tiny model (exact budget per KV head, vanilla output when
nothing is evicted, StreamingLLM equal to a sink + sliding-window mask oracle)."""
from __future__ import annotations

import pytest
import torch

import dms
from dms.baselines import PolicyCache, PolicyLayer, h2o_keep, quest_select, streaming_keep, tova_keep
from dms.models import set_mode
from dms.models.tiny import tiny_model


def _kept(keep: torch.Tensor, positions: torch.Tensor) -> list[list[int]]:
    return [sorted(positions[s][keep[s]].tolist()) for s in range(keep.shape[0])]


def test_streaming_keeps_sinks_and_recent():
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [9, 0, 8, 1, 7, 2, 6, 3, 5, 4]])
    live = torch.ones(2, 10, dtype=torch.bool)
    keep = streaming_keep(pos, live, budget=6, sinks=2)
    assert _kept(keep, pos) == [[0, 1, 6, 7, 8, 9]] * 2  # slot order does not matter


def test_streaming_ignores_dead_slots_and_short_rows():
    pos = torch.tensor([[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5]])
    live = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    keep = streaming_keep(pos, live, budget=4, sinks=1)
    assert _kept(keep, pos) == [[0, 3, 4, 5], [0, 1, 2]]
    assert not (keep & ~live).any()


def test_h2o_keeps_recent_then_heavy_hitters():
    # Token 5 received the most attention, then token 0; tokens 6 and 7 are the recent ones
    # even though nobody attended them yet.
    pos = torch.arange(8)[None]
    scores = torch.tensor([[5.0, 0.1, 3.0, 0.2, 0.3, 9.0, 0.0, 0.0]])
    keep = h2o_keep(pos, scores, torch.ones(1, 8, dtype=torch.bool), budget=4, recent=2)
    assert _kept(keep, pos) == [[0, 5, 6, 7]]
    keep = h2o_keep(pos, scores, torch.ones(1, 8, dtype=torch.bool), budget=4, recent=0)
    assert _kept(keep, pos) == [[0, 2, 4, 5]]


def test_tova_keeps_highest_current_attention():
    pos = torch.tensor([[10, 11, 12, 13, 14]])
    att = torch.tensor([[0.30, 0.05, 0.40, 0.10, 0.15]])  # the newest token (14) may go too
    keep = tova_keep(att, torch.ones(1, 5, dtype=torch.bool), budget=3)
    assert _kept(keep, pos) == [[10, 12, 14]]
    keep = tova_keep(att, torch.ones(1, 5, dtype=torch.bool), budget=2)
    assert _kept(keep, pos) == [[10, 12]]


def test_bad_arguments_are_named():
    live = torch.ones(1, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="budget"):
        tova_keep(torch.zeros(1, 4), live, budget=0)
    with pytest.raises(ValueError, match="sinks"):
        streaming_keep(torch.arange(4)[None], live, budget=4, sinks=4)
    with pytest.raises(ValueError, match="policy"):
        PolicyCache(num_layers=2, policy="snapkv", budget=8)


def _off_model(seed: int = 0):
    model = tiny_model("qwen3", seed=seed)
    dms.apply(model, dms_window_size=4)
    set_mode(model, "off")
    return model


@pytest.mark.parametrize("policy", ["streaming", "h2o", "tova"])
def test_generate_keeps_exactly_the_budget(policy):
    model = _off_model()
    ids = torch.randint(3, 128, (2, 40), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # left padding: pads are never stored
    cache = PolicyCache(model, policy, 12, page_size=4)
    model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=10, do_sample=False,
                   pad_token_id=0)
    for layer in cache.layers:
        assert layer.store.seq_lens.tolist() == [12] * 4  # 2 batch rows x 2 KV heads
        assert layer.store.num_seen.tolist() == [49, 49, 42, 42]
        # Every page still mapped belongs to a live slot; the rest is back on the free list.
        mapped = int((layer.store.block_table >= 0).sum())
        assert mapped == 4 * 3 and mapped + int(layer.store.free_top) == layer.store.k_pages.shape[0]
        if policy == "streaming":
            pos = layer.positions[:, :12].sort(1).values
            assert pos[0].tolist() == [0, 1, 2, 3] + list(range(41, 49))
    stats = cache.stats()
    assert stats["retained"] == 2 * 4 * 12
    assert stats["compression_ratio"] == pytest.approx(((49 / 12) + (42 / 12)) / 2)


@pytest.mark.parametrize("policy", ["streaming", "h2o", "tova"])
def test_large_budget_generates_like_the_plain_model(policy):
    model, plain = _off_model(), tiny_model("qwen3")
    ids = torch.randint(3, 128, (2, 30), generator=torch.Generator().manual_seed(1))
    ref = plain.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    out = model.generate(ids, past_key_values=PolicyCache(model, policy, 64), max_new_tokens=8, do_sample=False,
                         pad_token_id=0)
    assert torch.equal(out, ref)


def test_streaming_token_by_token_equals_sink_window_mask():
    """Fed one token per forward, StreamingLLM at budget b with s sinks lets query t see keys
    k < s and t - k <= b - s: the plain model under that 4D mask gives the same logits."""
    b, s, T = 9, 2, 24
    model, plain = _off_model(), tiny_model("qwen3")
    ids = torch.randint(3, 128, (1, T), generator=torch.Generator().manual_seed(2))
    cache = PolicyCache(model, "streaming", b, sinks=s, page_size=4)
    with torch.no_grad():
        steps = [model(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits for t in range(T)]
        t, k = torch.arange(T)[:, None], torch.arange(T)[None, :]
        allowed = (k <= t) & ((k < s) | (t - k <= b - s))
        mask = torch.zeros(1, 1, T, T).masked_fill_(~allowed, float("-inf"))
        ref = plain(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(torch.cat(steps, 1), ref, rtol=1e-4, atol=1e-4)


def test_policy_cache_needs_mode_off():
    model = tiny_model("qwen3")
    dms.apply(model, dms_window_size=4)
    with pytest.raises(ValueError, match="'off'"):
        model(input_ids=torch.tensor([[5, 6, 7]]), past_key_values=PolicyCache(model, "h2o", 8))


def test_streaming_chunked_prefill_equals_chunk_mask():
    """Prompt fed in chunks of c: a query of the chunk starting at a sees the chunk causally
    plus what the cache kept after the previous chunk (sinks and the b - s newest before a)."""
    b, s, c, T = 10, 3, 7, 28
    model, plain = _off_model(seed=1), tiny_model("qwen3", seed=1)
    ids = torch.randint(3, 128, (1, T), generator=torch.Generator().manual_seed(3))
    cache = PolicyCache(model, "streaming", b, sinks=s, page_size=4)
    with torch.no_grad():
        steps = [model(input_ids=ids[:, a:a + c], past_key_values=cache, use_cache=True).logits
                 for a in range(0, T, c)]
        t, k = torch.arange(T)[:, None], torch.arange(T)[None, :]
        a = t // c * c
        allowed = (k <= t) & ((k >= a) | (k < s) | (k >= a - (b - s)))
        mask = torch.zeros(1, 1, T, T).masked_fill_(~allowed, float("-inf"))
        ref = plain(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(torch.cat(steps, 1), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("policy", ["h2o", "tova"])
def test_layer_scores_come_from_the_attention_it_computed(policy):
    """A prefill of T tokens on one PolicyLayer: output = causal attention, and the kept tokens
    are those the policy picks from the probabilities of that attention (H2O: summed over
    queries and heads of the group, 2 recent protected; TOVA: the newest query, head mean)."""
    S, G, T, D, budget = 3, 2, 9, 8, 5
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(S, G, T, D, generator=gen)
    k, v = torch.randn(S, T, D, generator=gen), torch.randn(S, T, D, generator=gen)
    layer = PolicyLayer(policy, budget, page_size=2, recent=2)
    out = layer.attend(q, k, v, None, 0.5)
    scores = torch.einsum("sgtd,skd->sgtk", q, k) * 0.5
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    torch.testing.assert_close(out, probs @ v[:, None], rtol=1e-5, atol=1e-5)
    pos = torch.arange(T).expand(S, T)
    live = torch.ones(S, T, dtype=torch.bool)
    if policy == "h2o":
        want = h2o_keep(pos, probs.sum((1, 2)), live, budget, recent=2)
    else:
        want = tova_keep(probs[:, :, -1].mean(1), live, budget)
    got = [sorted(layer.positions[s, :budget].tolist()) for s in range(S)]
    assert layer.store.seq_lens.tolist() == [budget] * S
    assert got == _kept(want, pos)
    # The kept keys moved into slots 0..budget-1 intact.
    kept_keys, _, _ = layer.store.dense()
    for s in range(S):
        torch.testing.assert_close(kept_keys[s], k[s, layer.positions[s, :budget]])


def test_quest_reads_the_pages_with_the_highest_bound():
    # Pages of 2 slots; with q = [1, 0] the bound of a page is its largest first key channel.
    keys = torch.tensor([[[0.0, 0.0], [0.0, 1.0], [5.0, 0.0], [4.0, 0.0],
                          [-3.0, 0.0], [1.0, 0.0], [0.0, 0.0], [0.0, 0.0]]])
    live = torch.ones(1, 8, dtype=torch.bool)
    slots = lambda sel: torch.nonzero(sel[0]).flatten().tolist()  # noqa: E731
    q = torch.tensor([[[1.0, 0.0]]])
    assert slots(quest_select(q, keys, live, 2, budget=2)) == [2, 3, 6, 7]  # best page + the newest
    assert slots(quest_select(q, keys, live, 2, budget=4)) == [2, 3, 4, 5, 6, 7]
    # q = [-1, 0]: the bound uses the channel minimum, page 2 (min -3) wins.
    assert slots(quest_select(-q, keys, live, 2, budget=2)) == [4, 5, 6, 7]
    # The newest live slot decides the newest page; dead slots are never read.
    live[0, 6:] = False
    assert slots(quest_select(q, keys, live, 2, budget=2)) == [2, 3, 4, 5]


def test_quest_keeps_everything_and_decode_reads_the_selected_pages():
    S, G, T, D, ps, budget = 2, 2, 11, 4, 2, 4
    gen = torch.Generator().manual_seed(5)
    k, v = torch.randn(S, T + 1, D, generator=gen), torch.randn(S, T + 1, D, generator=gen)
    q = torch.randn(S, G, T + 1, D, generator=gen)
    layer = PolicyLayer("quest", budget, page_size=ps)
    layer.attend(q[:, :, :T], k[:, :T], v[:, :T], None, 1.0)
    out = layer.attend(q[:, :, T:], k[:, T:], v[:, T:], None, 1.0)
    assert layer.store.seq_lens.tolist() == [T + 1] * S  # nothing evicted
    sel = quest_select(q[:, :, T], k, torch.ones(S, T + 1, dtype=torch.bool), ps, budget)
    assert layer.read.tolist() == sel.sum(1).tolist() == [6, 6]  # 2 best pages + the newest, 2 slots each
    scores = torch.einsum("sgd,skd->sgk", q[:, :, T], k).masked_fill(~sel[:, None], float("-inf"))
    torch.testing.assert_close(out[:, :, 0], scores.softmax(-1) @ v, rtol=1e-5, atol=1e-5)


def test_quest_in_generate():
    model, plain = _off_model(), tiny_model("qwen3")
    ids = torch.randint(3, 128, (2, 40), generator=torch.Generator().manual_seed(6))
    ref = plain.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    big = PolicyCache(model, "quest", 64, page_size=4)  # every page selected: the plain model
    assert torch.equal(model.generate(ids, past_key_values=big, max_new_tokens=6, do_sample=False,
                                      pad_token_id=0), ref)
    small = PolicyCache(model, "quest", 8, page_size=4)
    model.generate(ids, past_key_values=small, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert all(layer.store.seq_lens.tolist() == [45] * 4 for layer in small.layers)
    assert small.stats()["compression_ratio"] == 1.0
    assert small.read_ratio() == pytest.approx(45 / 9)  # 2 pages of 4 + the newest page's 1 slot


def _eager_reference(self, q, qpos, ok, scale, before=None, output=True):
    """PolicyLayer's attention as first written: every forward eager over all live slots, the
    whole probability matrix at once."""
    S, G, T, D = q.shape
    keys, values, live = self.store.dense()
    self.read = live.sum(1)
    L = keys.shape[1]
    allowed = live[:, None, :] & (self.positions[:, None, :L] <= qpos[:, :, None])
    s = torch.einsum("sgtd,sld->sgtl", q, keys) * scale
    p = s.masked_fill(~allowed[:, None], float("-inf")).softmax(-1).nan_to_num(0.0)
    if self.policy == "h2o":
        self.scores[:, :L] += p.sum((1, 2))
    elif self.policy == "tova":
        last = torch.where(ok, torch.arange(T)[None, :], -1).argmax(1)
        self.scores[:, :L] = torch.where(ok.any(1)[:, None], p[torch.arange(S), :, last].mean(1), self.scores[:, :L])
    return torch.einsum("sgtl,sld->sgtd", p, values)


def _quest_decode_reference(self, q, scale, output=True):
    """A Quest decode step as first written: page bounds from every live key, attention over
    all slots with the unchosen ones masked."""
    keys, values, live = self.store.dense()
    live = quest_select(q, keys, live, self.page_size, self.budget)
    self.read = live.sum(1)
    s = torch.einsum("sgd,sld->sgl", q, keys) * scale
    return torch.einsum("sgl,sld->sgd", s.masked_fill(~live[:, None], float("-inf")).softmax(-1), values)[:, :, None]


@pytest.mark.parametrize("chunk,padded", [(None, False), (None, True), (7, True)])
@pytest.mark.parametrize("policy", ["streaming", "h2o", "tova", "quest"])
def test_fast_prefill_equals_the_eager_attention(policy, chunk, padded, monkeypatch):
    """The prefill's fused attention (SDPA, plain causal without pads; H2O: blocks that skip
    the causally hidden keys) and Quest's decode (page bounds kept per page, only the chosen
    pages read) give the logits, kept tokens and scores of plain eager attention, also with
    left padding and with the prompt fed in chunks on top of what the cache kept."""
    model = _off_model(seed=2)
    ids = torch.randint(3, 128, (3, 30), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :9] = 0  # the first chunk of 7 is all pads on this row
        mask[2, :3] = 0

    def run():
        cache = PolicyCache(model, policy, 10, page_size=4)
        out = model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=6, do_sample=False,
                             pad_token_id=0, prefill_chunk_size=chunk, output_logits=True,
                             return_dict_in_generate=True)
        return out, cache

    monkeypatch.setattr("dms.baselines.cache._SCORE_BUDGET", 1024)  # H2O's prefill in blocks of a few queries
    fast, fast_cache = run()
    monkeypatch.setattr(PolicyLayer, "_dense_attend", _eager_reference)
    monkeypatch.setattr(PolicyLayer, "_quest_decode", _quest_decode_reference)
    ref, ref_cache = run()
    assert torch.equal(fast.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(fast.logits), torch.stack(ref.logits), rtol=1e-5, atol=1e-5)
    for a, b in zip(fast_cache.layers, ref_cache.layers):
        n = int(a.store.seq_lens.max())
        assert torch.equal(a.store.seq_lens, b.store.seq_lens)
        assert torch.equal(a.positions[:, :n], b.positions[:, :n])
        torch.testing.assert_close(a.scores[:, :n], b.scores[:, :n], rtol=1e-5, atol=1e-6)
        assert torch.equal(a.read, b.read)


@pytest.mark.parametrize("policy", ["streaming", "h2o", "tova", "quest"])
def test_absorb_stores_and_scores_like_attend(policy):
    """absorb (no attention output, dms.eval.shared) leaves the cache as attend does."""
    model = _off_model()
    B, Hq, Hkv, T, D = 2, 4, 2, 20, 16
    gen = torch.Generator().manual_seed(8)
    q, k, v = torch.randn(B, Hq, T, D, generator=gen), torch.randn(B, Hkv, T, D, generator=gen), \
        torch.randn(B, Hkv, T, D, generator=gen)
    padding = torch.ones(B, T, dtype=torch.bool)
    padding[1, :5] = False
    full, quiet = (PolicyCache(model, policy, 8, page_size=4) for _ in range(2))
    assert full.attend(0, q, k, v, None, padding, 0.25).shape == (B, Hq, T, D)
    assert quiet.absorb(0, q, k, v, None, padding, 0.25) is None
    a, b = full.layers[0], quiet.layers[0]
    assert all(torch.equal(x, y) for x, y in zip(a.store.dense(), b.store.dense()))  # free pages hold garbage
    assert torch.equal(a.positions, b.positions) and torch.equal(a.scores, b.scores) and torch.equal(a.read, b.read)
