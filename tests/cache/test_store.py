"""dms.store.PagedStore: construction, the op calls, growth and the rewrites the eviction
baselines use, each against dms/reference.py or a hand-computed expectation; and the cache
interface (dms.cache.AttentionCache) the attention layer talks to."""
from __future__ import annotations

import pytest
import torch

import dms
from conftest import forced_dms_model, new_store
from dms import reference
from dms.baselines import PolicyCache
from dms.cache import AttentionCache, DMSCache
from dms.store import FIELDS, PagedStore, pool_tensor


def filled(S=2, P=12, page_size=2, window=1, D=3, T=5, p=0.5, seed=0):
    """A store after one random chunk, and the chunk."""
    gen = torch.Generator().manual_seed(seed)
    store = new_store(S, P, page_size, P, window, D, seed=seed)
    k, v = torch.randn(S, T, D, generator=gen), torch.randn(S, T, D, generator=gen)
    d = torch.rand(S, T, generator=gen) < p
    store.append(k, v, d)
    return store, (k, v, d)


def test_empty_store_layout():
    st = PagedStore.empty(3, 4, window=2, page_size=5, pages=6, table_width=2, dtype=torch.bfloat16)
    assert [tuple(t.shape) for t in st.tensors()] == [(6, 5, 4), (6, 5, 4), (3, 2), (3,), (3,), (3, 3), (3, 3), (6,),
                                                     (1,)]
    assert (st.num_seqs, st.head_dim, st.page_size, st.window, st.num_pages, st.table_width) == (3, 4, 5, 2, 6, 2)
    assert st.k_pages.dtype == torch.bfloat16 and st.block_table.dtype == torch.int32
    assert (st.block_table == -1).all() and int(st.free_top[0]) == 6
    assert sorted(st.free_pages.tolist()) == list(range(6))
    assert st.free_pages.tolist()[-1] == 0  # popped first: pages in increasing id order


@pytest.mark.parametrize("kwargs,message", [
    (dict(window=-1), "window must be an int >= 0, got -1"),
    (dict(page_size=0), "page_size must be an int >= 1, got 0"),
    (dict(pages=2.0), "pages must be an int >= 0, got 2.0"),
    (dict(table_width=True), "table_width must be an int >= 0, got True"),
])
def test_empty_store_rejects_bad_sizes(kwargs, message):
    args = dict(window=1, page_size=2, pages=4, table_width=2) | kwargs
    with pytest.raises(ValueError, match=f"^{message}$"):
        PagedStore.empty(2, 3, **args)


def test_append_through_the_store_equals_the_reference_op():
    store, chunk = filled()
    want = new_store(2, 12, 2, 12, 1, 3, seed=0)
    want.append(*chunk, op=reference.append)
    assert store.equal(want)
    assert int(store.num_seen.sum()) == 10


def test_decode_attention_and_gather_equal_the_reference():
    store, _ = filled(p=0.7, T=9)
    q = torch.randn(2, 3, 3, generator=torch.Generator().manual_seed(1))
    want = reference.paged_decode_attention(q, store.k_pages, store.v_pages, store.block_table, store.seq_lens, 0.4)
    torch.testing.assert_close(store.decode_attention(q, 0.4), want, atol=1e-6, rtol=1e-5)
    keys, values, cu, max_len = store.gather()
    ref_k, ref_cu, ref_max = reference.gather_varlen(store.k_pages, store.block_table, store.seq_lens)
    ref_v, _, _ = reference.gather_varlen(store.v_pages, store.block_table, store.seq_lens)
    assert torch.equal(keys, ref_k) and torch.equal(values, ref_v) and torch.equal(cu, ref_cu) and max_len == ref_max


def test_dense_pads_with_zeros_past_each_length():
    store, _ = filled(p=0.9, T=9)
    store.k_pages[store.block_table.clamp_min(0).long()] = float("nan")  # stale memory past the lengths...
    store.append(torch.ones(2, 1, 3), torch.ones(2, 1, 3), torch.zeros(2, 1, dtype=torch.bool))
    keys, values, live = store.dense()
    assert live.sum(1).tolist() == store.seq_lens.tolist()
    assert not keys[~live].any() and not values[~live].any()  # ...never shows up as padding


def test_ring_tokens_name_the_window():
    S, W = 1, 3
    store = new_store(S, 8, 2, 8, W, 1)
    store.append(torch.arange(6.0).view(1, 6, 1), torch.zeros(1, 6, 1), torch.zeros(1, 6, dtype=torch.bool))
    slot, index, flagged = store.ring_tokens()
    assert sorted(index[0].tolist()) == [2, 3, 4, 5]  # the last W + 1 tokens
    assert torch.equal(slot, index)  # nothing evicted: token i sits in slot i
    assert not flagged.any()
    fresh = new_store(S, 8, 2, 8, W, 1)
    assert fresh.ring_tokens()[1].tolist() == [[-1] * (W + 1)]


def test_growth_keeps_the_tokens_and_the_free_list():
    store, chunk = filled()
    before = store.clone()
    store.grow_pool(20)
    store.grow_table(15)
    assert (store.num_pages, store.table_width) == (20, 15)
    assert int(store.free_top[0]) == int(before.free_top[0]) + 8
    assert sorted(store.free_pages[: int(store.free_top[0])].tolist()) == sorted(
        before.free_pages[: int(before.free_top[0])].tolist() + list(range(12, 20)))
    for a, b in zip(store.gather(), before.gather()):
        assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))
    store.grow_pool(5)  # never shrinks
    store.grow_table(3)
    assert (store.num_pages, store.table_width) == (20, 15)


def _huge_kib_at(address: int) -> int:
    """AnonHugePages (KiB) of the mapping of this process that holds ``address`` (/proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "AnonHugePages:":
                return int(line.split()[1])
    raise AssertionError(f"no mapping holds {address:#x}")


def _thp_mode() -> str | None:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[")[1].split("]")[0]
    except OSError:
        return None


@pytest.mark.skipif(_thp_mode() is None, reason="needs Linux with transparent huge pages compiled in")
@pytest.mark.parametrize("grown", [False, True])
def test_cpu_pool_is_backed_by_huge_pages(grown):
    """The pool of a new or a grown store sits on 2 MiB pages wherever the system allows it
    (THP "always" or "madvise"), and on none under "never"; the other fields are untouched."""
    shape = (2048, 16, 128)  # 16 MiB of fp32 per pool
    if grown:
        store = PagedStore.empty(2, 128, window=1, page_size=16, pages=1)
        store.grow_pool(2048)
    else:
        store = PagedStore.empty(2, 128, window=1, page_size=16, pages=2048)
    store.k_pages.fill_(1.0)
    huge = _huge_kib_at(store.k_pages.data_ptr() + store.k_pages.nbytes // 2)
    if _thp_mode() == "never":
        assert huge == 0
    else:
        assert huge >= 14 * 1024, f"{huge} KiB of the 16 MiB pool on huge pages"
    assert tuple(store.k_pages.shape) == shape and (store.block_table == -1).all()


def test_pool_tensor_advises_only_real_memory(monkeypatch):
    """The advice goes to the tensor's own aligned memory; never to a tensor too small to hold an
    aligned 2 MiB, nor to a FakeTensor's (which has none: its data_ptr() is 0)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    import dms.store

    calls = []
    monkeypatch.setattr(dms.store, "_madvise", lambda addr, n, advice: calls.append((addr, n, advice)) or 0)
    real = pool_tensor((1024, 16, 128), torch.float32, "cpu")  # 8 MiB
    start, end = real.data_ptr(), real.data_ptr() + real.nbytes
    assert [c[2] for c in calls] == [14, 4]  # MADV_HUGEPAGE, then MADV_DONTNEED
    for addr, n, _ in calls:
        assert addr % (2 << 20) == 0 and n % (2 << 20) == 0 and start <= addr and addr + n <= end
        assert n >= real.nbytes - (4 << 20)
    calls.clear()
    small = pool_tensor((3, 2, 4), torch.bfloat16, "cpu")
    assert small.shape == (3, 2, 4) and small.dtype == torch.bfloat16 and calls == []
    with FakeTensorMode():
        fake = pool_tensor((1024, 16, 128), torch.float32, "cpu")
    assert fake.shape == (1024, 16, 128) and calls == []


def test_snapshot_restore_undoes_growth():
    store, _ = filled()
    saved = store.snapshot()
    before = store.clone()
    store.grow_pool(30)
    store.grow_table(20)
    store.restore(saved)
    assert store.equal(before)


def test_move_slots_and_truncate_release_pages():
    S, ps = 1, 2
    store = new_store(S, 4, ps, 4, 0, 1)
    store.append(torch.arange(7.0).view(1, 7, 1), torch.zeros(1, 7, 1), torch.zeros(1, 7, dtype=torch.bool))
    assert int(store.free_top[0]) == 0  # 4 pages in use
    store.move_slots(torch.tensor([0, 0]), torch.tensor([5, 6]), torch.tensor([1, 2]))
    store.truncate(torch.tensor([3]))
    keys, _, _ = store.dense()
    assert keys[0, :, 0].tolist() == [0.0, 5.0, 6.0]
    assert store.seq_lens.tolist() == [3] and int(store.free_top[0]) == 2
    assert (store.block_table[0, 2:] == -1).all()
    # The released pages are handed out again: 5 more tokens fit in the 4-page pool.
    store.append(torch.ones(1, 5, 1), torch.ones(1, 5, 1), torch.zeros(1, 5, dtype=torch.bool))
    assert store.seq_lens.tolist() == [8] and int(store.free_top[0]) == 0
    with pytest.raises(ValueError, match=r"^lens must be \[S\] = \[1\], got \(2,\)$"):
        store.truncate(torch.tensor([1, 1]))


def test_fields_are_the_schema_order():
    assert FIELDS == ("k_pages", "v_pages", "block_table", "seq_lens", "num_seen", "ring_slots", "ring_flags",
                      "free_pages", "free_top")


# -- the cache interface ---------------------------------------------------------------------------

def test_dms_and_policy_caches_implement_the_interface():
    assert issubclass(DMSCache, AttentionCache) and issubclass(PolicyCache, AttentionCache)
    with pytest.raises(TypeError, match="abstract"):
        AttentionCache()


class ForeignCache:
    """Looks like the old duck-typed baseline cache, but implements no interface."""

    def policy_attend(self, *args):
        raise AssertionError("never called")


@pytest.mark.parametrize("mode", ["infer", "off", "train"])
def test_foreign_cache_object_is_a_type_error(mode):
    model = forced_dms_model("qwen3")
    dms.models.set_mode(model, mode)
    with pytest.raises(TypeError, match=r"^past_key_values must be a dms\.DMSCache, a dms\.baselines\.PolicyCache or "
                                        r"\(mode 'off'\) a transformers Cache, got a ForeignCache$"):
        model(input_ids=torch.randint(3, 128, (1, 4)), past_key_values=ForeignCache())


def test_policy_cache_refuses_dms_modes():
    model = forced_dms_model("qwen3")
    ids = torch.randint(3, 128, (1, 4))
    with pytest.raises(ValueError, match=r"^an eviction-policy cache runs the plain model's attention: call "
                                         r"dms\.models\.set_mode\(model, 'off'\) first$"):
        model(input_ids=ids, past_key_values=PolicyCache(model, "h2o", 8))
    dms.models.set_mode(model, "train")
    with pytest.raises(ValueError, match=r"^DMS train mode runs without a KV cache: call the model with "
                                         r"use_cache=False$"):
        model(input_ids=ids, past_key_values=PolicyCache(model, "h2o", 8))
    with pytest.raises(ValueError, match=r"^an eviction-policy cache takes no DMS decisions \(mode 'off'\)$"):
        PolicyCache(model, "h2o", 8).attend(0, torch.zeros(1, 4, 1, 16), torch.zeros(1, 2, 1, 16),
                                            torch.zeros(1, 2, 1, 16), torch.zeros(1, 2, 1, dtype=torch.bool), None, 1.0)


def test_a_custom_attention_cache_gets_q_k_v_and_decisions():
    """The interface is all the layer needs: a cache implementing it receives every layer's
    post-RoPE q, k, v and the hard decisions, and its output is what the layer projects."""
    seen = []

    class Recorder(AttentionCache):
        def __init__(self):
            super().__init__(layers=[])

        def check_model(self, mode, window):
            seen.append(("check", mode, window))

        def attend(self, layer_idx, q, k, v, decisions, padding, scale):
            seen.append((layer_idx, tuple(q.shape), tuple(k.shape), decisions.dtype, decisions.shape))
            return torch.zeros_like(q)

    model = forced_dms_model("llama")
    with torch.no_grad():
        model(input_ids=torch.randint(3, 128, (1, 5)), past_key_values=Recorder())
    assert seen[0] == ("check", "infer", 3)
    assert (0, (1, 4, 5, 16), (1, 2, 5, 16), torch.bool, (1, 2, 5)) in seen
    assert {s[0] for s in seen if s[0] != "check"} == {0, 1}
