"""dms.append equals dms/reference.py, keeps docs/design.md §1's retained set whatever the chunking,
and leaves the cache untouched when it refuses a chunk."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dms  # noqa: F401  (loads the ops)
from conftest import new_store
from dms import reference as ref
from dms.store import FIELDS

ops = torch.ops.dms
BOUNDED = settings(max_examples=25, deadline=None, derandomize=True)


def assert_same(a, b):
    for key in FIELDS:
        assert torch.equal(getattr(a, key), getattr(b, key)), key


def append(store, k, v, decisions, valid=None, fn=ops.append):
    store.append(k, v, decisions, valid, op=fn)


@BOUNDED
@given(S=st.integers(1, 3), page_size=st.sampled_from([1, 2, 5]), window=st.sampled_from([0, 1, 3, 50]),
       chunks=st.lists(st.integers(1, 7), min_size=1, max_size=5), p=st.floats(0, 1), masked=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), seed=st.integers(0, 2**16))
def test_append_matches_reference(S, page_size, window, chunks, p, masked, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    D = 4
    got = new_store(S, 2 * S * sum(chunks) // page_size + S, page_size, sum(chunks) // page_size + 1, window, D,
                    dtype, seed)
    want = got.clone()
    for T in chunks:
        k = torch.randn(S, T, D, generator=gen).to(dtype)
        v = torch.randn(S, T, D, generator=gen).to(dtype)
        decisions = torch.rand(S, T, generator=gen) < p
        valid = torch.rand(S, T, generator=gen) < 0.7 if masked else None
        append(got, k, v, decisions, valid)
        append(want, k, v, decisions, valid, fn=ref.append)
        assert_same(got, want)


def stored_tokens(store):
    """Per sequence, the set of token ids held by the store (keys carry their token id)."""
    packed, cu, _ = ops.gather_varlen(store.k_pages, store.block_table, store.seq_lens)
    ids = packed[:, 0].long().tolist()
    return [sorted(ids[a:b]) for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]


@pytest.mark.parametrize("window,page_size,chunk", [(0, 4, 7), (1, 3, 16), (5, 4, 9), (16, 8, 33), (64, 16, 50)])
def test_delayed_eviction_same_store_for_any_chunking(window, page_size, chunk):
    """A long random decision stream fed one token at a time and `chunk` tokens at a time
    gives the same store, whose tokens are docs/design.md §1's retained set after every step."""
    S, T, D = 3, 300, 2
    gen = torch.Generator().manual_seed(window)
    decisions = torch.rand(S, T, generator=gen) < 0.7
    valid = torch.rand(S, T, generator=gen) < 0.9
    token = torch.arange(T, dtype=torch.float32)[None, :, None].expand(S, T, D).contiguous()
    max_pages = T // page_size + 1
    one, many = (new_store(S, S * max_pages, page_size, max_pages, window, D) for _ in range(2))
    visible = ref.visibility_mask(decisions, window, valid)  # [S, q, k]
    for t in range(T):
        k, d, ok = (x[:, t:t + 1].contiguous() for x in (token, decisions, valid))
        append(one, k, -k, d, ok)
        if t % 25 == 0 or t == T - 1:
            for s, ids in enumerate(stored_tokens(one)):
                if valid[s, t]:
                    assert ids == torch.nonzero(visible[s, t]).flatten().tolist(), (s, t)
    for a in range(0, T, chunk):
        k, d, ok = (x[:, a:a + chunk].contiguous() for x in (token, decisions, valid))
        append(many, k, -k, d, ok)
    for key in ("k_pages", "v_pages"):
        g_one = ops.gather_varlen(getattr(one, key), one.block_table, one.seq_lens)
        g_many = ops.gather_varlen(getattr(many, key), many.block_table, many.seq_lens)
        for x, y in zip(g_one, g_many):
            assert torch.equal(torch.as_tensor(x), torch.as_tensor(y))
    keep, _, counts = ref.scan_flags(decisions, valid, window)
    assert stored_tokens(many) == [torch.nonzero(keep[s]).flatten().tolist() for s in range(S)]
    assert torch.equal(many.seq_lens, counts)
    assert torch.equal(many.num_seen, valid.sum(-1).int())


def test_chunk_crossing_pages_and_evicting_everything_outside_the_window():
    S, T, D, window, page_size = 2, 23, 3, 2, 4
    store = new_store(S, 16, page_size, 8, window, D)
    want = store.clone()
    k = torch.randn(S, T, D)
    decisions = torch.ones(S, T, dtype=torch.bool)  # every token evicted once it leaves the window
    append(store, k, -k, decisions)
    append(want, k, -k, decisions, fn=ref.append)
    assert_same(store, want)
    assert store.seq_lens.tolist() == [window + 1] * S  # only the window survives
    head = k[:, :9].contiguous()
    append(store, head, head, torch.zeros(S, 9, dtype=torch.bool))  # crosses pages again
    append(want, head, head, torch.zeros(S, 9, dtype=torch.bool), fn=ref.append)
    assert_same(store, want)
    # The first `window` new tokens take the slots of the flagged tokens leaving the window.
    assert store.seq_lens.tolist() == [window + 1 + 9 - window] * S


def test_pool_exhaustion_raises_and_leaves_the_state_unchanged():
    S, D = 3, 2
    store = new_store(S, 5, 2, 8, 1, D)
    append(store, torch.ones(S, 2, D), torch.ones(S, 2, D), torch.zeros(S, 2, dtype=torch.bool))  # 3 pages
    before = store.clone()
    with pytest.raises(RuntimeError, match="page pool exhausted: need 3 pages, 2 free"):
        append(store, torch.ones(S, 2, D), torch.ones(S, 2, D), torch.zeros(S, 2, dtype=torch.bool))
    assert_same(store, before)


def test_block_table_overflow_raises_and_leaves_the_state_unchanged():
    store = new_store(2, 20, 2, 2, 0, 2)
    before = store.clone()
    valid = torch.tensor([[True] * 4 + [False], [True] * 5])
    with pytest.raises(RuntimeError, match="block_table has room for 2 pages per sequence; sequence 1 needs more"):
        append(store, torch.ones(2, 5, 2), torch.ones(2, 5, 2), torch.zeros(2, 5, dtype=torch.bool), valid)
    assert_same(store, before)


def _bad(key, value):
    def call():
        store = new_store(2, 8, 4, 4, 2, 3)
        args = dict(zip(FIELDS, store.tensors()), k=torch.ones(2, 2, 3), v=torch.ones(2, 2, 3), decisions=torch.zeros(2, 2, dtype=torch.bool),
                    valid=None)
        args[key] = value
        ops.append(*args.values())
    return call


@pytest.mark.parametrize("call,arg", [
    (_bad("k", torch.ones(2, 2, 4)), "k_pages"),
    (_bad("v", torch.ones(2, 3, 3)), "v"),
    (_bad("k_pages", torch.ones(8, 4, 3, dtype=torch.float16)), "k_pages"),
    (_bad("v_pages", torch.ones(8, 2, 3)), "v_pages"),
    (_bad("block_table", torch.zeros(3, 4, dtype=torch.int32)), "block_table"),
    (_bad("seq_lens", torch.zeros(2, dtype=torch.int64)), "seq_lens"),
    (_bad("num_seen", torch.zeros(2, 1, dtype=torch.int32)), "num_seen"),
    (_bad("ring_slots", torch.zeros(2, 0, dtype=torch.int32)), "ring_slots"),
    (_bad("ring_flags", torch.zeros(2, 4, dtype=torch.bool)), "ring_flags"),
    (_bad("free_pages", torch.zeros(7, dtype=torch.int32)), "free_pages"),
    (_bad("free_top", torch.tensor([9], dtype=torch.int32)), "free_top"),
    (_bad("free_top", torch.tensor([1, 2], dtype=torch.int32)), "free_top"),
    (_bad("decisions", torch.zeros(2, 2)), "decisions"),
    (_bad("valid", torch.ones(2, 3, dtype=torch.bool)), "valid"),
    (_bad("k", torch.ones(2, 3, 2).transpose(1, 2)), "k"),
])
def test_bad_input_names_the_argument(call, arg):
    with pytest.raises(RuntimeError, match=arg):
        call()
