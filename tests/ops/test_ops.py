"""scan_flags, compact, gather_varlen and paged_decode_attention equal dms/reference.py on every
device (inputs drawn on the CPU, the reference run there); opcheck and torch.compile tracing of
all five ops; bad inputs fail with the operator's full message."""
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dms  # noqa: F401  (loads the ops and their fake kernels)
from dms import reference as ref

ops = torch.ops.dms
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BOUNDED = settings(max_examples=40, deadline=None, derandomize=True)


def _mask(gen, S, T, p):
    return torch.rand(S, T, generator=gen) < p


def _assert_packed_equal(got, want, device):
    assert got[0].device.type == got[1].device.type == device.type
    assert torch.equal(got[0].cpu(), want[0])
    assert torch.equal(got[1].cpu(), want[1])
    assert got[2] == want[2]


@BOUNDED
@given(S=st.integers(0, 4), T=st.integers(0, 40), window=st.sampled_from([0, 1, 3, 1000]),
       p=st.floats(0, 1), masked=st.booleans(), seed=st.integers(0, 2**16))
def test_scan_flags_matches_reference(device, S, T, window, p, masked, seed):
    gen = torch.Generator().manual_seed(seed)
    decisions = _mask(gen, S, T, p)
    valid = _mask(gen, S, T, 0.8) if masked else None
    got = ops.scan_flags(decisions.to(device), None if valid is None else valid.to(device), window)
    want = ref.scan_flags(decisions, valid, window)
    for g, w in zip(got, want):
        assert g.device.type == device.type and g.dtype == w.dtype and torch.equal(g.cpu(), w)


@BOUNDED
@given(S=st.integers(0, 4), T=st.integers(0, 40), D=st.integers(1, 9), p=st.floats(0, 1),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_compact_matches_reference(device, S, T, D, p, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(S, T, D, generator=gen).to(dtype)
    keep = _mask(gen, S, T, p)
    _assert_packed_equal(ops.compact(x.to(device), keep.to(device)), ref.compact(x, keep), device)


def random_store(gen, S, P, page_size, max_pages, D, dtype):
    """A paged store in a valid state: random lengths, distinct random pages."""
    lens = torch.randint(0, max_pages * page_size + 1, (S,), generator=gen, dtype=torch.int32)
    table = torch.full((S, max_pages), -1, dtype=torch.int32)
    ids = torch.randperm(P, generator=gen).int().tolist()
    for s, n in enumerate(lens.tolist()):
        used = -(-n // page_size)
        table[s, :used] = torch.tensor(ids[:used], dtype=torch.int32)
        ids = ids[used:]
    k = torch.randn(P, page_size, D, generator=gen).to(dtype)
    v = torch.randn(P, page_size, D, generator=gen).to(dtype)
    return k, v, table, lens


@BOUNDED
@given(S=st.integers(0, 4), page_size=st.sampled_from([1, 3, 16]), max_pages=st.integers(1, 4),
       D=st.integers(1, 9), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_gather_varlen_matches_reference(device, S, page_size, max_pages, D, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    k, _, table, lens = random_store(gen, S, S * max_pages + 2, page_size, max_pages, D, dtype)
    got = ops.gather_varlen(*(t.to(device) for t in (k, table, lens)))
    _assert_packed_equal(got, ref.gather_varlen(k, table, lens), device)


TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2)}


@BOUNDED
@given(S=st.integers(0, 4), G=st.integers(1, 4), page_size=st.sampled_from([1, 3, 16]),
       max_pages=st.integers(1, 5), D=st.sampled_from([1, 5, 8, 19, 64]), dtype=st.sampled_from(DTYPES),
       scale=st.floats(0.05, 2.0), seed=st.integers(0, 2**16))
def test_paged_decode_attention_matches_reference(device, S, G, page_size, max_pages, D, dtype, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    k, v, table, lens = random_store(gen, S, S * max_pages + 2, page_size, max_pages, D, dtype)
    q = torch.randn(S, G, D, generator=gen).to(dtype)
    got = ops.paged_decode_attention(*(t.to(device) for t in (q, k, v, table, lens)), scale)
    want = ref.paged_decode_attention(q, k, v, table, lens, scale)
    assert got.dtype == dtype and got.device.type == device.type
    got = got.cpu()
    torch.testing.assert_close(got, want, **TOL[dtype])
    assert not got[lens == 0].any(), "an empty sequence must give zeros"


def _small_store():
    gen = torch.Generator().manual_seed(0)
    return random_store(gen, 3, 12, 4, 3, 8, torch.float32)


def _append_args(T=3):
    S, P, ps, W1, D = 2, 8, 4, 3, 8
    return (torch.zeros(P, ps, D), torch.zeros(P, ps, D), torch.full((S, 4), -1, dtype=torch.int32),
            torch.zeros(S, dtype=torch.int32), torch.zeros(S, dtype=torch.int32),
            torch.zeros(S, W1, dtype=torch.int32), torch.zeros(S, W1, dtype=torch.bool),
            torch.arange(P, dtype=torch.int32), torch.tensor([P], dtype=torch.int32),
            torch.randn(S, T, D), torch.randn(S, T, D), torch.rand(S, T) < 0.5, torch.rand(S, T) < 0.8)


def _opcheck_cases():
    torch.manual_seed(0)
    k, v, table, lens = _small_store()
    x = torch.randn(3, 7, 8)
    keep = torch.rand(3, 7) < 0.5
    return [
        ("scan_flags", (keep, None, 2)),
        ("scan_flags", (keep, torch.rand(3, 7) < 0.7, 0)),
        ("compact", (x, keep)),
        ("gather_varlen", (k, table, lens)),
        ("paged_decode_attention", (torch.randn(3, 2, 8), k, v, table, lens, 0.3)),
        ("append", _append_args()),
    ]


@pytest.mark.parametrize("name,args", _opcheck_cases(), ids=lambda c: c if isinstance(c, str) else "")
def test_opcheck(device, name, args):
    args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(getattr(ops, name).default, args)


def test_torch_compile_traces_every_op_fullgraph(device):
    def step(q, k, v, table, lens, x, keep, state):
        ops.append(*state)
        out = ops.paged_decode_attention(q, k, v, table, lens, 0.5)
        packed, cu, _ = ops.compact(x, keep)
        gathered, _, _ = ops.gather_varlen(k, table, lens)
        kept, offsets, counts = ops.scan_flags(keep, None, 1)
        return out * 2, packed.sum(0), cu, gathered.shape[0], kept, offsets, counts

    torch._dynamo.reset()
    k, v, table, lens = _small_store()
    inputs = (torch.randn(3, 2, 8), k, v, table, lens, torch.randn(3, 7, 8), torch.rand(3, 7) < 0.5)
    inputs = tuple(t.to(device) for t in inputs)
    state_a = tuple(t.to(device) for t in _append_args())
    state_b = tuple(t.clone() for t in state_a)
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(*inputs, state_a)
    want = step(*inputs, state_b)
    for g, w in zip(got, want):
        if isinstance(w, torch.Tensor):
            torch.testing.assert_close(g, w)
        else:
            assert g == w
    for a, b in zip(state_a, state_b):
        assert torch.equal(a, b), "the compiled append must mutate the cache like eager"


def _z(d, *shape, dtype=torch.float32):
    return torch.zeros(*shape, dtype=dtype, device=d)


B, I32 = torch.bool, torch.int32
# Shape, dtype and layout checks run on the host before any kernel: the same message on every
# device. (The value checks of the paged store, CPU kernels, are in test_ops_errors.py.)
BAD_INPUTS = [
    (lambda d: ops.scan_flags(_z(d, 2, 3), None, 1), "dms.scan_flags: decisions must be Bool, got Float"),
    (lambda d: ops.scan_flags(_z(d, 2, 3, dtype=B), None, -1), "dms.scan_flags: window must be >= 0, got -1"),
    (lambda d: ops.scan_flags(_z(d, 2, 3, dtype=B), _z(d, 2, 4, dtype=B), 1),
     "dms.scan_flags: valid must be [S, T] like decisions (size 3 in dim 1), got shape [2, 4]"),
    (lambda d: ops.compact(_z(d, 2, 3, 4, dtype=I32), _z(d, 2, 3, dtype=B)),
     "dms.compact: x must be float32, float16 or bfloat16, got Int"),
    (lambda d: ops.compact(_z(d, 2, 3, 4), _z(d, 2, 4, dtype=B)),
     "dms.compact: keep must be [S, T] like x's first two dims (size 3 in dim 1), got shape [2, 4]"),
    (lambda d: ops.compact(_z(d, 2, 4, 3).transpose(1, 2), _z(d, 2, 3, dtype=B)), "dms.compact: x must be contiguous"),
    (lambda d: ops.gather_varlen(_z(d, 4, 2, 3), _z(d, 2, 2, dtype=torch.int64), _z(d, 2, dtype=I32)),
     "dms.gather_varlen: block_table must be Int, got Long"),
    (lambda d: ops.gather_varlen(_z(d, 4, 2, 3), _z(d, 2, 2, dtype=I32), _z(d, 3, dtype=I32)),
     "dms.gather_varlen: seq_lens must be [S] (size 2 in dim 0), got shape [3]"),
    (lambda d: ops.gather_varlen(_z(d, 4, 0, 3), _z(d, 2, 2, dtype=I32), _z(d, 2, dtype=I32)),
     "dms.gather_varlen: pages must have page_size >= 1, got shape [4, 0, 3]"),
    (lambda d: ops.paged_decode_attention(_z(d, 2, 1, 5), _z(d, 4, 2, 3), _z(d, 4, 2, 3), _z(d, 2, 2, dtype=I32),
                                          _z(d, 2, dtype=I32), 1.0),
     "dms.paged_decode_attention: k_pages must be [P, page_size, D] with q's D (size 5 in dim 2), got shape "
     "[4, 2, 3]"),
    (lambda d: ops.paged_decode_attention(_z(d, 2, 1, 3), _z(d, 4, 2, 3), _z(d, 4, 2, 3, dtype=torch.float16),
                                          _z(d, 2, 2, dtype=I32), _z(d, 2, dtype=I32), 1.0),
     "dms.paged_decode_attention: v_pages must be Float, got Half"),
    (lambda d: ops.paged_decode_attention(_z(d, 3, 1, 3), _z(d, 4, 2, 3), _z(d, 4, 2, 3), _z(d, 2, 2, dtype=I32),
                                          _z(d, 2, dtype=I32), 1.0),
     "dms.paged_decode_attention: block_table must be [S, max_pages] (size 3 in dim 0), got shape [2, 2]"),
]


@pytest.mark.parametrize("call,message", BAD_INPUTS,
                         ids=[" ".join(m.split()[:2]).rstrip(":") for _, m in BAD_INPUTS])
def test_bad_input_fails_with_its_message(device, call, message):
    with pytest.raises(RuntimeError, match=f"(?m)^{re.escape(message)}$"):
        call(device)
