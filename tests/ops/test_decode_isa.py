"""Every CPU kernel of paged_decode_attention this machine can run, forced one at a time with
DMS_CPU_ISA (read by the op on every call), equals dms/reference.py for fp32, fp16 and bf16,
G = 1, 2, 4, 8, random shapes, shuffled pages and empty sequences; with several threads the
pages (visited in pool order) are split between them and each sequence's shares merged. A forced
kernel the CPU lacks, or an unknown name, raises."""
import platform

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dms  # noqa: F401  (loads the ops)
from dms import reference as ref

ops = torch.ops.dms
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2)}
BOUNDED = settings(max_examples=25, deadline=None, derandomize=True)


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


# What each kernel needs, read independently of the op's own detection.
NEEDS = {"scalar": set(), "avx2": {"avx2", "fma", "f16c"},
         "avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq"},
         "avx512_bf16": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16"}}
X86 = platform.machine() in ("x86_64", "AMD64")
FLAGS = _cpu_flags()
AVAILABLE = [isa for isa, need in NEEDS.items() if isa == "scalar" or (X86 and need <= FLAGS)]
MISSING = [isa for isa in NEEDS if isa not in AVAILABLE]


def _store(gen, S, page_size, max_pages, D, dtype, lens=None, spare=3):
    """Shuffled distinct pages, random lengths (0 included) unless given; spare pages in the pool."""
    if lens is None:
        lens = torch.randint(0, max_pages * page_size + 1, (S,), generator=gen, dtype=torch.int32)
    lens = torch.as_tensor(lens, dtype=torch.int32)
    P = S * max_pages + spare
    table = torch.full((S, max_pages), -1, dtype=torch.int32)
    ids = torch.randperm(P, generator=gen).int()
    for s, n in enumerate(lens.tolist()):
        used = -(-n // page_size)
        table[s, :used] = ids[s * max_pages:s * max_pages + used]
    k = torch.randn(P, page_size, D, generator=gen).to(dtype)
    v = torch.randn(P, page_size, D, generator=gen).to(dtype)
    return k, v, table, lens


def _check(isa, q, k, v, table, lens, scale):
    with pytest.MonkeyPatch.context() as mp:  # per hypothesis example, not per test
        mp.setenv("DMS_CPU_ISA", isa)
        got = ops.paged_decode_attention(q, k, v, table, lens, scale)
    want = ref.paged_decode_attention(q, k, v, table, lens, scale)
    assert got.dtype == q.dtype
    torch.testing.assert_close(got, want, **TOL[q.dtype])
    assert not got[lens == 0].any(), "an empty sequence must give zeros"


@pytest.mark.parametrize("G", [1, 2, 4, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("isa", AVAILABLE)
@BOUNDED
@given(S=st.integers(0, 5), page_size=st.sampled_from([1, 3, 8, 16, 17]), max_pages=st.integers(1, 6),
       D=st.sampled_from([1, 5, 8, 16, 19, 32, 64, 128]), factor=st.floats(0.05, 4.0), seed=st.integers(0, 2**16))
def test_forced_isa_matches_reference(isa, dtype, G, S, page_size, max_pages, D, factor, seed):
    # Scores of a model's size (scale ~ 1/sqrt(D)): with scores near 60 the fp32 reference is
    # itself off by 2e-5, more than the SIMD kernels.
    scale = factor / D**0.5
    gen = torch.Generator().manual_seed(seed)
    k, v, table, lens = _store(gen, S, page_size, max_pages, D, dtype)
    q = torch.randn(S, G, D, generator=gen).to(dtype)
    _check(isa, q, k, v, table, lens, scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("isa", AVAILABLE)
@pytest.mark.parametrize("lens", [[3000], [2049, 0], [1, 1500, 777]], ids=str)
@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("spare", [3, 5000], ids=["dense", "sparse"])
def test_threads_split_and_merge(isa, dtype, lens, threads, spare):
    # One share of the pool per thread: every sequence here has pages in several shares (the
    # one-slot sequence in one only), and the shares' states are merged. In the sparse pool the
    # pages are put in pool order by a comparison sort, not by counting.
    gen = torch.Generator().manual_seed(len(lens))
    k, v, table, lens = _store(gen, len(lens), 16, 200, 64, dtype, lens, spare)
    q = torch.randn(len(lens), 4, 64, generator=gen).to(dtype)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _check(isa, q, k, v, table, lens, 0.125)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_threads_give_the_same_result_on_every_call(dtype):
    # The threads take the shares in turn, in whatever order they come: the shares themselves
    # and the order of their merge must not depend on it.
    gen = torch.Generator().manual_seed(7)
    k, v, table, lens = _store(gen, 3, 16, 200, 64, dtype, [3000, 2049, 1500])
    q = torch.randn(3, 4, 64, generator=gen).to(dtype)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        first = ops.paged_decode_attention(q, k, v, table, lens, 0.125)
        for _ in range(10):
            assert torch.equal(ops.paged_decode_attention(q, k, v, table, lens, 0.125), first)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_auto_picks_the_best_kernel(monkeypatch, dtype):
    gen = torch.Generator().manual_seed(0)
    k, v, table, lens = _store(gen, 3, 16, 8, 64, dtype)
    q = torch.randn(3, 4, 64, generator=gen).to(dtype)
    monkeypatch.setenv("DMS_CPU_ISA", AVAILABLE[-1])
    best = ops.paged_decode_attention(q, k, v, table, lens, 0.3)
    monkeypatch.setenv("DMS_CPU_ISA", "auto")
    assert torch.equal(ops.paged_decode_attention(q, k, v, table, lens, 0.3), best)
    monkeypatch.delenv("DMS_CPU_ISA")
    assert torch.equal(ops.paged_decode_attention(q, k, v, table, lens, 0.3), best)


def _call(monkeypatch, isa):
    monkeypatch.setenv("DMS_CPU_ISA", isa)
    k, v, table, lens = _store(torch.Generator().manual_seed(0), 2, 4, 2, 8, torch.float32)
    return ops.paged_decode_attention(torch.randn(2, 1, 8), k, v, table, lens, 0.5)


@pytest.mark.parametrize("isa", MISSING or [pytest.param("none", marks=pytest.mark.skip(
    reason="this CPU has every kernel"))])
def test_missing_isa_raises(monkeypatch, isa):
    available = ", ".join(AVAILABLE)
    with pytest.raises(RuntimeError, match=rf"dms\.paged_decode_attention: DMS_CPU_ISA={isa} is not available on "
                                           rf"this CPU or build \(available: {available}\)"):
        _call(monkeypatch, isa)


def test_unknown_isa_raises(monkeypatch):
    with pytest.raises(RuntimeError, match=r"dms\.paged_decode_attention: DMS_CPU_ISA=avx9 is not one of auto, "
                                           r"scalar, avx2, avx512, avx512_bf16$"):
        _call(monkeypatch, "avx9")
