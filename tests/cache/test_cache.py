"""DMSCache bookkeeping: amortised pool growth, the cap, statistics, the prefill view."""
from __future__ import annotations

import pytest
import torch

import dms
from dms import reference
from conftest import new_store
from dms.cache import DMSCache, DMSCacheFullError, DMSLayer


def _random_chunks(S, D, lengths, p_evict, seed):
    gen = torch.Generator().manual_seed(seed)
    for T in lengths:
        k, v = torch.randn(S, T, D, generator=gen), torch.randn(S, T, D, generator=gen)
        d = torch.rand(S, T, generator=gen) < p_evict
        valid = torch.rand(S, T, generator=gen) < 0.9
        yield k, v, d, valid


def _live_rows(store):
    packed, cu, _ = reference.gather_varlen(store.k_pages, store.block_table, store.seq_lens)
    return [sorted(map(tuple, packed[cu[s]:cu[s + 1]].tolist())) for s in range(store.num_seqs)]


def test_growing_pool_matches_reference_store():
    """Appends through a pool that starts empty and grows equal the reference op on a pool
    sized for everything (same live keys per sequence; page ids may differ)."""
    S, D, w, ps = 3, 4, 2, 2
    layer = DMSLayer(window=w, page_size=ps)
    P = 300
    ref = new_store(S, P, ps, P, w, D)
    for k, v, d, valid in _random_chunks(S, D, [5, 1, 1, 7, 1, 1, 1, 150, 1], 0.6, seed=0):  # 150: fed in pieces
        layer.append(k, v, d, valid)
        ref.append(k, v, d, valid, op=reference.append)
        assert torch.equal(layer.store.seq_lens, ref.seq_lens) and torch.equal(layer.store.num_seen, ref.num_seen)
        assert _live_rows(layer.store) == _live_rows(ref)
    assert layer.columns == 168


def test_prefill_view_marks_the_ring_tokens_and_their_flags():
    S, D, w = 2, 4, 3
    layer = DMSLayer(window=w, page_size=2)
    chunks = list(_random_chunks(S, D, [9, 1, 1], 0.5, seed=1))
    for k, v, d, valid in chunks:
        layer.append(k, v, d, valid)
    view = layer.prefill_view()
    ds = torch.cat([c[2] for c in chunks], 1)
    valid = torch.cat([c[3] for c in chunks], 1)
    flags = reference.flags_from_decisions(ds, valid)
    for s in range(S):
        keys = torch.cat([c[0] for c in chunks], 1)[s][valid[s]]
        idx_of = {tuple(row.tolist()): i for i, row in enumerate(keys)}
        n = int(valid[s].sum())
        assert int(view.num_seen[s]) == n
        assert view.live[s].sum() == int(layer.store.seq_lens[s])
        for j in range(int(layer.store.seq_lens[s])):
            i = idx_of[tuple(view.keys[s, j].tolist())]
            flagged = bool(flags[s][valid[s]][i])
            in_ring = i >= n - w - 1
            assert in_ring or not flagged  # flagged tokens out of the window were evicted
            assert int(view.token_index[s, j]) == (i if in_ring else -1)
            assert bool(view.flagged[s, j]) == flagged  # the newest token's flag is not known yet: False
        assert idx_of[tuple(view.keys[s, int(view.newest_slot[s])].tolist())] == n - 1


def test_pool_grows_rarely_and_stays_tight():
    S, D = 4, 8
    layer = DMSLayer(window=4, page_size=4)
    for k, v, d, valid in _random_chunks(S, D, [16] + [1] * 2000, 0.9, seed=2):
        layer.append(k, v, d, None)
    used_pages = sum((int(n) + 3) // 4 for n in layer.store.seq_lens)
    assert layer.store.k_pages.shape[0] <= 1.1 * used_pages + S * 32 // 4  # + the 32-token headroom
    assert layer.syncs <= 2000 // 32 + 2  # a host sync only when the bound reaches the pool, not per step


def test_max_pages_cap_raises():
    layer = DMSLayer(window=2, page_size=2, max_pages=4)
    k = torch.randn(2, 8, 4)
    with pytest.raises(DMSCacheFullError, match="needs 8 pages of 2 tokens but max_pages=4"):
        layer.append(k, k, torch.zeros(2, 8, dtype=torch.bool), None)


def test_stats_and_errors():
    cache = DMSCache(window=1, num_layers=2, page_size=2)
    assert cache.stats()["compression_ratio"] == 1.0
    k = torch.randn(2, 6, 4)
    d = torch.tensor([[0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    for layer in cache.layers:
        layer.append(k, k, d, None)
    stats = cache.stats()
    # row 0 flags tokens 0-4, so only its window (tokens 4, 5) stays; row 1 keeps all 6. The ratio
    # is 12 seen / 8 retained (what memory sees), not the mean of the rows' ratios 6/2 and 6/6.
    assert stats["retained_per_layer"][0].tolist() == [2, 6]
    assert stats["compression_ratio"] == pytest.approx(12 / 8)
    assert stats["bytes"] >= stats["retained_bytes"] == 2 * 2 * 8 * 4 * 4
    assert cache.get_seq_length() == 6
    with pytest.raises(NotImplementedError, match="append"):
        cache.update(k, k, 0)
    with pytest.raises(ValueError, match="max_pages"):
        DMSCache(window=1, num_layers=1, max_pages=0)
    with pytest.raises(ValueError, match="window= and num_layers="):
        DMSCache()
    from dms.models.tiny import tiny_model

    with pytest.raises(ValueError, match="is not a DMS model"):
        DMSCache(tiny_model("llama"))
    assert dms.DMSCache is DMSCache
