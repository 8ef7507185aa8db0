"""DMSCache under abuse: bad arguments, refused appends leave it unchanged (or say it is
unusable), the page pool grows without losing tokens, stops growing when the retained set is
steady, and the max_pages cap gives a clear error instead of corruption."""
from __future__ import annotations

import pytest
import torch

import dms
from dms import reference
from conftest import new_store
from dms.cache import DMSCache, DMSCacheFullError, DMSLayer
from dms.store import FIELDS


def chunk(S=2, T=3, D=4, evict=0.0, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(S, T, D, generator=gen).to(dtype)
    return k, -k, torch.rand(S, T, generator=gen) < evict


def snapshot(layer: DMSLayer) -> dict:
    snap = {name: getattr(layer.store, name).clone() for name in FIELDS}
    snap["columns"] = layer.columns
    return snap


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality: unwritten pool memory may hold NaN, which torch.equal never matches."""
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def assert_unchanged(layer: DMSLayer, snap: dict) -> None:
    changed = [n for n in FIELDS if not same_bits(getattr(layer.store, n), snap[n])]
    assert not changed and layer.columns == snap["columns"], f"refused append changed {changed}"


def live_tokens(layer: DMSLayer) -> list[list[tuple]]:
    """Per sequence, the sorted live keys (slot order does not matter to attention)."""
    packed, cu, _ = dms.ops.gather_varlen(layer.store.k_pages, layer.store.block_table, layer.store.seq_lens)
    return [sorted(map(tuple, packed[cu[s]:cu[s + 1]].tolist())) for s in range(layer.num_seqs)]


@pytest.mark.parametrize("kwargs,arg", [
    (dict(window=-1, num_layers=1), "window"),
    (dict(window=1.5, num_layers=1), "window"),
    (dict(window=True, num_layers=1), "window"),
    (dict(window=2, num_layers=0), "num_layers"),
    (dict(window=2, num_layers="2"), "num_layers"),
    (dict(window=2, num_layers=1, page_size=0), "page_size"),
    (dict(window=2, num_layers=1, page_size=True), "page_size"),
    (dict(window=2, num_layers=1, page_size=4.0), "page_size"),
    (dict(window=2, num_layers=1, max_pages=-3), "max_pages"),
    (dict(window=2, num_layers=1, max_pages=2.5), "max_pages"),
    (dict(window=2, num_layers=1, prefill_chunk=0), "prefill_chunk"),
])
def test_cache_arguments_are_checked(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        DMSCache(**kwargs)


def _bad_chunks():
    k, v, d = chunk()
    return {
        "keys rank 2": ((k[0], v, d, None), "keys"),
        "keys int": ((k.int(), v.int(), d, None), "keys"),
        "keys empty chunk": ((k[:, :0], v[:, :0], d[:, :0], None), "keys"),
        "keys list": ((k.tolist(), v, d, None), "keys"),
        "values shape": ((k, v[:, :2], d, None), "values"),
        "values dtype": ((k, v.half(), d, None), "values"),
        "decisions float": ((k, v, d.float(), None), "decisions"),
        "decisions shape": ((k, v, d[:, :2], None), "decisions"),
        "decisions batch": ((k, v, d[:1], None), "decisions"),
        "valid shape": ((k, v, d, d[:, :1]), "valid"),
        "valid int": ((k, v, d, d.int()), "valid"),
        "batch changed": (chunk(S=3), "sequences"),
        "head dim changed": (chunk(D=8), "head_dim"),
        "dtype changed": (chunk(dtype=torch.float16), "float16"),
    }


@pytest.mark.parametrize("case", list(_bad_chunks()))
def test_bad_chunk_is_rejected_and_nothing_changes(case):
    args, arg = _bad_chunks()[case]
    layer = DMSLayer(window=2, page_size=2)
    layer.append(*chunk(seed=1), None)
    before = snapshot(layer)
    if len(args) == 3:
        args = (*args, None)
    with pytest.raises(ValueError, match=arg):
        layer.append(*args)
    assert_unchanged(layer, before)


def test_refused_append_at_the_cap_leaves_the_layer_unchanged_and_usable():
    layer = DMSLayer(window=1, page_size=2, max_pages=6)
    layer.append(*chunk(T=5, seed=1), None)  # 2 x 3 pages
    before, tokens = snapshot(layer), live_tokens(layer)
    with pytest.raises(DMSCacheFullError, match=r"needs 8 pages of 2 tokens but max_pages=6.*nothing was stored"):
        layer.append(*chunk(T=3, seed=2), None)  # no eviction: 2 more pages per sequence
    assert_unchanged(layer, before)
    assert live_tokens(layer) == tokens
    # Every new token evicts the one before it: the slots of flagged tokens leaving the window
    # are reused, so this fits although the worst case (every token a new slot) does not.
    k, v, _ = chunk(T=40, seed=3)
    layer.append(k, v, torch.ones(2, 40, dtype=torch.bool), None)
    assert layer.store.k_pages.shape[0] <= 6 and layer.columns == 45


def test_long_append_refused_at_the_cap_stores_no_piece():
    """A prefill longer than one internal piece (64 tokens) is refused as a whole: no first
    piece stored before a later one fails."""
    layer = DMSLayer(window=4, page_size=4, max_pages=40)
    layer.append(*chunk(T=2, seed=1), None)
    before = snapshot(layer)
    with pytest.raises(DMSCacheFullError, match="max_pages=40"):
        layer.append(*chunk(T=100, seed=2), None)  # 2 x 26 pages without eviction
    assert_unchanged(layer, before)
    layer.append(*chunk(T=70, seed=3), None)  # 2 x 18 pages: fits
    assert layer.store.seq_lens.tolist() == [72, 72]


def test_decode_at_the_cap_runs_forever_when_evictions_free_slots():
    """Steady state at the cap: the retained set fills max_pages exactly; decoding goes on."""
    S, w, ps = 2, 3, 2
    layer = DMSLayer(window=w, page_size=ps, max_pages=S * (w + 1) // ps)
    for step in range(300):
        k, v, _ = chunk(T=1, seed=step)
        layer.append(k, v, torch.ones(S, 1, dtype=torch.bool), None)
    assert layer.store.seq_lens.tolist() == [w + 1] * S and layer.store.k_pages.shape[0] == 4


def test_refusal_in_a_later_layer_makes_the_cache_unusable():
    cache = DMSCache(window=1, num_layers=2, page_size=2, max_pages=2)
    k, v, _ = chunk(T=2)
    evict, keep = torch.ones(2, 2, dtype=torch.bool), torch.zeros(2, 2, dtype=torch.bool)
    cache.layers[0].append(k, v, evict, None)  # token 0 flagged: token 2 can take its slot
    cache.layers[1].append(k, v, keep, None)  # token 2 needs a new page: the pool (2 pages) is full
    with pytest.raises(DMSCacheFullError):
        cache.layers[0].append(*chunk(T=4, seed=1), None)  # refused first: the layers still agree
    assert cache.layers[0].unusable is None
    k1, v1, d1 = chunk(T=1, seed=2)
    cache.layers[0].append(k1, v1, d1, None)
    with pytest.raises(DMSCacheFullError):
        cache.layers[1].append(k1, v1, d1, None)  # layer 0 stored the token, layer 1 cannot
    for layer in cache.layers:
        with pytest.raises(RuntimeError, match="unusable.*start a new DMSCache"):
            layer.append(k1, v1, d1, None)
        with pytest.raises(RuntimeError, match="unusable"):
            layer.decode_attention(torch.randn(2, 1, 4), 1.0)
    cache.reset()
    cache.layers[0].append(k, v, keep, None)  # a reset cache is usable again
    assert cache.layers[0].store.seq_lens.tolist() == [2, 2]


def test_model_forward_refused_mid_model_reports_the_cache_unusable():
    """Layer 0 evicts everything, layer 1 keeps everything: at the cap, layer 1 refuses a decode
    step that layer 0 stored; the next forward must fail loudly, not attend mismatched layers."""
    from dms.models.tiny import tiny_model

    model = dms.apply(tiny_model("llama"), dms_window_size=2, dms_separate_alpha=True)
    with torch.no_grad():
        model.model.layers[0].self_attn.dms_proj_alpha.bias.fill_(1.0)  # logit 95: evict
    cache = DMSCache(model, page_size=2, max_pages=8)  # layer 1: 2 KV heads x 4 pages = 8 tokens each
    ids = torch.randint(3, 128, (1, 6))
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache)
        with pytest.raises(DMSCacheFullError, match="max_pages=8"):
            for step in range(6, 20):
                model(input_ids=ids[:, :1], position_ids=torch.tensor([[step]]), past_key_values=cache)
        with pytest.raises(RuntimeError, match="unusable"):
            model(input_ids=ids[:, :1], position_ids=torch.tensor([[step + 1]]), past_key_values=cache)


def test_growing_pool_loses_no_token():
    """Start from an empty pool and let it grow many times (no eviction): every token is live."""
    layer = DMSLayer(window=2, page_size=3)
    keys = []
    for step in range(150):
        k, v, d = chunk(T=1 + step % 5, seed=step)
        layer.append(k, v, torch.zeros_like(d), None)
        keys.append(k)
    want = [sorted(map(tuple, torch.cat(keys, 1)[s].tolist())) for s in range(2)]
    assert live_tokens(layer) == want
    assert layer.syncs > 5  # the pool really grew several times


def test_pool_stops_growing_when_the_retained_set_is_steady():
    """Decisions evict almost every token: the retained set stays near window + 1, freed slots
    are reused, and the pool (and block table) stop growing after the warm-up."""
    S, w, ps = 4, 8, 4
    layer = DMSLayer(window=w, page_size=ps)
    gen = torch.Generator().manual_seed(0)
    sizes = []
    for step in range(3000):
        k = torch.randn(S, 1, 16, generator=gen)
        keep = step % 1000 == 0  # a rare kept token
        layer.append(k, k, torch.full((S, 1), not keep, dtype=torch.bool), None)
        sizes.append((layer.store.k_pages.shape[0], layer.store.block_table.shape[1]))
    assert sizes[-1] == sizes[500], f"pool grew after the warm-up: {sizes[500]} -> {sizes[-1]}"
    # window + the 2 kept tokens (999, 1999: a decision flags the token before it; step 0 has none)
    assert layer.store.seq_lens.tolist() == [w + 1 + 2] * S
    assert layer.store.num_seen.tolist() == [3000] * S


def test_cache_matches_reference_after_refusals():
    """Refused appends interleaved with accepted ones: the accepted ones alone, replayed on the
    reference store, give the same live tokens."""
    S, w, ps, D = 2, 2, 2, 4
    layer = DMSLayer(window=w, page_size=ps, max_pages=10)
    P = 64
    ref = new_store(S, P, ps, P, w, D)
    refused = 0
    for step in range(60):
        k, v, d = chunk(S, T=1 + step % 7, D=D, evict=0.7, seed=step)
        try:
            layer.append(k, v, d, None)
        except DMSCacheFullError:
            refused += 1
            continue
        ref.append(k, v, d, None, op=reference.append)
    assert refused > 0
    assert torch.equal(layer.store.seq_lens, ref.seq_lens) and torch.equal(layer.store.num_seen, ref.num_seen)
    packed, cu, _ = reference.gather_varlen(ref.k_pages, ref.block_table, ref.seq_lens)
    assert live_tokens(layer) == [sorted(map(tuple, packed[cu[s]:cu[s + 1]].tolist())) for s in range(S)]


def test_cap_refusal_with_cuda_semantics_restores_free_top(monkeypatch):
    """The CUDA append cannot raise: it leaves the state alone and sets free_top to -(pages
    needed). Simulated on the CPU op: the layer must restore free_top and raise the same error."""
    import dms.store as store_mod

    real = store_mod.ops.append

    class CudaLikeOps:
        @staticmethod
        def append(*args):
            try:
                real(*args)
            except RuntimeError as e:
                need = int(str(e).split("need ")[1].split(" pages")[0])
                args[8].fill_(-need)

    layer = DMSLayer(window=1, page_size=2, max_pages=6)
    layer.append(*chunk(T=5, seed=1), None)
    before = snapshot(layer)
    monkeypatch.setattr(store_mod, "ops", CudaLikeOps)
    with pytest.raises(DMSCacheFullError, match="needs 8 pages of 2 tokens but max_pages=6"):
        layer.append(*chunk(T=3, seed=2), None)
    assert_unchanged(layer, before)
    k, v, _ = chunk(T=4, seed=3)
    layer.append(k, v, torch.ones(2, 4, dtype=torch.bool), None)
    assert layer.columns == 9 and int(layer.store.free_top[0]) >= 0


def test_corrupt_state_signal_of_the_cuda_op_is_not_reported_as_a_full_pool(monkeypatch):
    """A CUDA append that finds the store corrupt writes nothing and sets free_top to INT32_MIN
    (csrc/torch_bindings.cpp). Simulated on the CPU: the layer restores free_top and says the
    store is corrupt, not that it needs 2^31 pages."""
    import dms.store as store_mod

    class CorruptRefusingOps:
        @staticmethod
        def append(*args):
            args[8].fill_(-(2**31))

    layer = DMSLayer(window=1, page_size=2, max_pages=6)
    layer.append(*chunk(T=5, seed=1), None)
    before = snapshot(layer)
    monkeypatch.setattr(store_mod, "ops", CorruptRefusingOps)
    with pytest.raises(RuntimeError, match="refused this layer's store as corrupt"):
        layer.append(*chunk(T=3, seed=2), None)
    assert_unchanged(layer, before)
