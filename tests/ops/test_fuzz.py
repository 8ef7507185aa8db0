"""Property tests: long random sequences of appends (the op and DMSCache) against
dms/reference.py, comparing the full state, and random inputs to every op.

Hypothesis profiles: "dms-fuzz-ci" (default: few examples, derandomized, the file stays well
under a minute on one core) and "dms-fuzz-long" (many random examples, for local runs):

    DMS_FUZZ_PROFILE=dms-fuzz-long OMP_NUM_THREADS=1 pytest tests/ops/test_fuzz.py

A failing example that hypothesis shrinks becomes a regular test at the end of this file.
"""
from __future__ import annotations

import math
import os

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from conftest import new_store

import dms  # noqa: F401  (loads the ops)
from dms import reference
from dms.cache import DMSCacheFullError, DMSLayer
from dms.store import FIELDS

ops = torch.ops.dms
settings.register_profile("dms-fuzz-ci", max_examples=80, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("dms-fuzz-long", max_examples=500, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FUZZ = settings.get_profile(os.environ.get("DMS_FUZZ_PROFILE", "dms-fuzz-ci"))

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
WINDOWS = st.one_of(st.integers(0, 3), st.sampled_from([7, 16, 100]))


@st.composite
def chunk_lists(draw, S, D, dtype, max_chunks=25):
    """Random chunks: T in 1..9 with runs of decode steps (T=1), per-chunk eviction rate, and
    valid masks (None, random, or all pads for some rows)."""
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    chunks = []
    for _ in range(draw(st.integers(1, max_chunks))):
        T = draw(st.one_of(st.just(1), st.integers(1, 9)))
        p = draw(st.sampled_from([0.0, 0.3, 0.8, 1.0]))
        k = torch.randn(S, T, D, generator=gen).to(dtype)
        v = torch.randn(S, T, D, generator=gen).to(dtype)
        d = torch.rand(S, T, generator=gen) < p
        mode = draw(st.sampled_from(["none", "random", "pad rows"]))
        valid = None if mode == "none" else torch.rand(S, T, generator=gen) < 0.75
        if mode == "pad rows":
            valid[torch.rand(S, generator=gen) < 0.5] = False
        chunks.append((k, v, d, valid))
    return chunks


def replay(store, chunks, fn):
    """Feeds every chunk; a refused chunk (pool or block table too small) is recorded, not fatal."""
    refused = []
    for i, (k, v, d, valid) in enumerate(chunks):
        try:
            store.append(k, v, d, valid, op=fn)
        except RuntimeError as e:
            refused.append((i, str(e).split(":")[1].strip() if ":" in str(e) else str(e)))
    return refused


@FUZZ
@given(data=st.data(), S=st.integers(1, 4), page_size=st.integers(1, 6), window=WINDOWS, D=st.integers(1, 5),
       dtype=st.sampled_from(DTYPES), tight=st.booleans())
def test_append_op_sequence_equals_reference(data, S, page_size, window, D, dtype, tight):
    """The compiled op and the reference, fed the same chunks, end in the same state (every
    tensor, bit for bit, incl. which page ids were popped); with a tight pool both refuse the
    same chunks and leave the state as it was."""
    chunks = data.draw(chunk_lists(S, D, dtype))
    tokens = sum(c[0].shape[1] for c in chunks)
    max_pages = math.ceil(tokens / page_size) + 1
    P = data.draw(st.integers(1, S * max_pages // 2 + 1)) if tight else S * max_pages
    a = new_store(S, P, page_size, max_pages, window, D, dtype, seed=P)
    b = a.clone()
    assert replay(a, chunks, ops.append) == replay(b, chunks, reference.append)
    for key in FIELDS:
        assert torch.equal(getattr(a, key), getattr(b, key)), key
    used = sum(math.ceil(n / page_size) for n in a.seq_lens.tolist())
    assert used == P - int(a.free_top[0]), "pages leaked or double counted"


@FUZZ
@given(data=st.data(), S=st.integers(1, 4), page_size=st.integers(1, 6), window=WINDOWS, D=st.integers(1, 4),
       cap=st.one_of(st.none(), st.integers(1, 12)))
def test_dms_cache_sequence_equals_reference(data, S, page_size, window, D, cap):
    """DMSLayer (pool growing from empty, long chunks split in pieces, optional max_pages cap)
    equals the reference store on a pool large enough for everything; refused chunks are skipped
    in the reference. Slots are logical, so the live tokens in slot order, the ring and the
    counters must match exactly; only page ids may differ."""
    chunks = data.draw(chunk_lists(S, D, torch.float32))
    if data.draw(st.booleans()):  # a long prefill, fed to the op in 64-token pieces by the cache
        gen = torch.Generator().manual_seed(len(chunks))
        T = data.draw(st.integers(65, 150))
        chunks.insert(0, (torch.randn(S, T, D, generator=gen), torch.randn(S, T, D, generator=gen),
                          torch.rand(S, T, generator=gen) < 0.5, None))
    layer = DMSLayer(window=window, page_size=page_size, max_pages=cap)
    tokens = sum(c[0].shape[1] for c in chunks)
    max_pages = math.ceil(tokens / page_size) + 1
    ref = new_store(S, S * max_pages, page_size, max_pages, window, D, torch.float32, seed=0)
    columns = 0
    for k, v, d, valid in chunks:
        try:
            layer.append(k, v, d, valid)
        except DMSCacheFullError:
            assert cap is not None
            continue
        ref.append(k, v, d, valid, op=reference.append)
        columns += k.shape[1]
        assert layer.store.num_pages <= (cap or layer.store.num_pages)
    if not layer.is_initialized:
        return
    got = layer.store
    for key in ("seq_lens", "num_seen", "ring_slots", "ring_flags"):
        assert torch.equal(getattr(got, key), getattr(ref, key)), key
    for pages in ("k_pages", "v_pages"):
        have = ops.gather_varlen(getattr(got, pages), got.block_table, got.seq_lens)
        want = reference.gather_varlen(getattr(ref, pages), ref.block_table, ref.seq_lens)
        assert torch.equal(have[0], want[0]) and torch.equal(have[1], want[1]) and have[2] == want[2]
    used = sum(math.ceil(n / page_size) for n in got.seq_lens.tolist())
    assert used == got.num_pages - int(got.free_top[0]), "pages leaked"
    assert layer.columns == columns


@FUZZ
@given(S=st.integers(0, 4), T=st.integers(0, 40), window=WINDOWS, p=st.floats(0, 1), masked=st.booleans(),
       seed=st.integers(0, 2**16))
def test_scan_flags_random(S, T, window, p, masked, seed):
    gen = torch.Generator().manual_seed(seed)
    d = torch.rand(S, T, generator=gen) < p
    valid = torch.rand(S, T, generator=gen) < 0.8 if masked else None
    for got, want in zip(ops.scan_flags(d, valid, window), reference.scan_flags(d, valid, window)):
        assert torch.equal(got, want)


@FUZZ
@given(S=st.integers(0, 4), T=st.integers(0, 30), D=st.integers(1, 9), p=st.floats(0, 1),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_compact_random(S, T, D, p, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(S, T, D, generator=gen).to(dtype)
    keep = torch.rand(S, T, generator=gen) < p
    got, want = ops.compact(x, keep), reference.compact(x, keep)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and got[2] == want[2]


@st.composite
def paged_stores(draw):
    """Random paged store: shuffled page ids, random lengths up to each row's capacity (some
    empty, some exactly full), unused table entries -1 or stale ids."""
    S, page_size, D = draw(st.integers(0, 4)), draw(st.integers(1, 5)), draw(st.integers(1, 9))
    max_pages = draw(st.integers(1, 4))
    extra = draw(st.integers(0, 3))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    P = S * max_pages + extra
    pages = torch.randn(P, page_size, D, generator=gen).to(dtype)
    v_pages = torch.randn(P, page_size, D, generator=gen).to(dtype)
    table = torch.randperm(P, generator=gen)[:S * max_pages].view(S, max_pages).int()
    lens = torch.tensor([draw(st.integers(0, max_pages * page_size)) for _ in range(S)], dtype=torch.int32)
    for s in range(S):
        unused = math.ceil(int(lens[s]) / page_size)
        if draw(st.booleans()):
            table[s, unused:] = -1
    return pages, v_pages, table, lens, seed


@FUZZ
@given(store=paged_stores())
def test_gather_varlen_random(store):
    pages, _, table, lens, _ = store
    got, want = ops.gather_varlen(pages, table, lens), reference.gather_varlen(pages, table, lens)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and got[2] == want[2]


@FUZZ
@given(store=paged_stores(), G=st.integers(1, 5), scale=st.sampled_from([0.05, 0.5, 3.0]))
def test_paged_decode_attention_random(store, G, scale):
    k_pages, v_pages, table, lens, seed = store
    q = torch.randn(table.shape[0], G, k_pages.shape[2], generator=torch.Generator().manual_seed(seed)).to(k_pages.dtype)
    got = ops.paged_decode_attention(q, k_pages, v_pages, table, lens, scale)
    want = reference.paged_decode_attention(q, k_pages, v_pages, table, lens, scale)
    tol = 1e-5 if q.dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    assert torch.equal(got[lens == 0], torch.zeros_like(got[lens == 0]))


def test_refused_chunk_then_more_tokens_matches_reference():
    """A chunk refused for the block table width, then decode steps; both
    implementations must agree on what was stored."""
    S, ps, w, D = 2, 1, 1, 2
    a = new_store(S, 8, ps, 3, w, D, torch.float32, seed=1)
    b = a.clone()
    big = (torch.ones(S, 4, D), torch.ones(S, 4, D), torch.zeros(S, 4, dtype=torch.bool), None)
    steps = [(torch.full((S, 1, D), float(i)), torch.zeros(S, 1, D), torch.ones(S, 1, dtype=torch.bool), None)
             for i in range(6)]
    chunks = [big] + steps
    assert replay(a, chunks, ops.append) == replay(b, chunks, reference.append)
    assert replay(a, chunks[:1], ops.append)  # still refused
    for key in FIELDS:
        assert torch.equal(getattr(a, key), getattr(b, key)), key
    assert a.seq_lens.tolist() == [w + 1] * S
