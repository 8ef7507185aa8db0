"""The fake (meta) kernels of the dms ops (dms/_ops.py) under FakeTensorMode: valid inputs give the
right output metadata; each bad dtype, rank, size, device or stride raises while tracing, naming
the op and the argument. The same bad inputs on real CPU tensors make the C++ checks
(csrc/include/dms/checks.h) name the same argument, so the fake kernels stay in step with them."""
import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv

import dms  # noqa: F401  (loads the ops and their fake kernels)
from dms.store import FIELDS, PagedStore

ops = torch.ops.dms
f32, f16, bf16, i32, i64, b = torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.int64, torch.bool
S, T, D, P, PAGE, W1 = 2, 5, 3, 4, 2, 3  # sequences, chunk length, head dim, pages, page size, window + 1
F32_INF = 2.0**128 - 2.0**103  # the smallest double that float32 rounds to inf


def z(*shape, dtype=f32, device="cpu"):
    return torch.zeros(shape, dtype=dtype, device=device)


def strided(*shape, dtype=f32):
    """shape and dtype right, not contiguous."""
    return z(*shape[:-1], 2 * shape[-1], dtype=dtype)[..., ::2]


def store(dtype=f32):
    """The nine store tensors of an empty dms.store.PagedStore, by schema name."""
    empty = PagedStore.empty(S, D, window=W1 - 1, page_size=PAGE, pages=P, table_width=2, dtype=dtype)
    return dict(zip(FIELDS, empty.tensors()))


def paged(dtype=f32):
    """The paged-store arguments of gather_varlen / paged_decode_attention."""
    st = store(dtype)
    return {key: st[key] for key in ("k_pages", "v_pages", "block_table", "seq_lens")}


VALID = {  # arguments in schema order
    "scan_flags": lambda dtype: dict(decisions=z(S, T, dtype=b), valid=z(S, T, dtype=b), window=1),
    "compact": lambda dtype: dict(x=z(S, T, D, dtype=dtype), keep=z(S, T, dtype=b)),
    "gather_varlen": lambda dtype: dict(pages=z(P, PAGE, D, dtype=dtype), block_table=z(S, 2, dtype=i32),
                                        seq_lens=z(S, dtype=i32)),
    "paged_decode_attention": lambda dtype: dict(q=z(S, 2, D, dtype=dtype), **paged(dtype), scale=0.5),
    "append": lambda dtype: dict(**store(dtype), k=z(S, T, D, dtype=dtype), v=z(S, T, D, dtype=dtype),
                                 decisions=z(S, T, dtype=b), valid=z(S, T, dtype=b)),
}


def call(op, dtype=f32, **bad):
    return getattr(ops, op)(*{**VALID[op](dtype), **bad}.values())


def fake_mode():
    return FakeTensorMode(shape_env=ShapeEnv())  # a shape env gives compact/gather_varlen their dynamic sizes


@pytest.mark.parametrize("dtype", [f32, f16, bf16])
def test_valid_inputs_give_output_metadata(dtype):
    with fake_mode():
        for valid in (z(S, T, dtype=b), None):
            keep, offsets, counts = call("scan_flags", valid=valid)
            assert (keep.shape, keep.dtype, offsets.shape, offsets.dtype) == ((S, T), b, (S, T), i32)
            assert (counts.shape, counts.dtype) == ((S,), i32)
            assert call("append", dtype, valid=valid) is None
        for op in ("compact", "gather_varlen"):
            packed, cu_seqlens, max_seqlen = call(op, dtype)
            assert (packed.dim(), packed.shape[1], packed.dtype) == (2, D, dtype)
            assert (cu_seqlens.shape, cu_seqlens.dtype) == ((S + 1,), i32)
            assert isinstance(max_seqlen, torch.SymInt)
        for scale in (0.5, math.nextafter(F32_INF, 0)):  # the largest double still finite in float32
            out = call("paged_decode_attention", dtype, scale=scale)
            assert (out.shape, out.dtype) == ((S, 2, D), dtype)


# (op, bad arguments, argument the message names, what it says)
BAD = {
    "scan/decisions float": ("scan_flags", lambda: dict(decisions=z(S, T)), "decisions", "must be torch.bool"),
    "scan/decisions rank 3": ("scan_flags", lambda: dict(decisions=z(S, T, 1, dtype=b)), "decisions",
                              r"must be \[S, T\], got shape \[2, 5, 1\]"),
    "scan/decisions strided": ("scan_flags", lambda: dict(decisions=strided(S, T, dtype=b)), "decisions",
                               "contiguous"),
    "scan/valid int": ("scan_flags", lambda: dict(valid=z(S, T, dtype=i32)), "valid", "must be torch.bool"),
    "scan/valid other T": ("scan_flags", lambda: dict(valid=z(S, T + 1, dtype=b)), "valid",
                           r"like decisions \(size 5 in dim 1\), got shape \[2, 6\]"),
    "scan/valid other S": ("scan_flags", lambda: dict(valid=z(S + 1, T, dtype=b)), "valid", "size 2 in dim 0"),
    "scan/valid device": ("scan_flags", lambda: dict(valid=z(S, T, dtype=b, device="cuda")), "valid",
                          "must be on cpu like the other inputs, got cuda"),
    "scan/window": ("scan_flags", lambda: dict(window=-1), "window", "must be >= 0, got -1"),
    "compact/x int": ("compact", lambda: dict(x=z(S, T, D, dtype=i32)), "x",
                      "must be torch.float32 or torch.float16 or torch.bfloat16, got torch.int32"),
    "compact/x float64": ("compact", lambda: dict(x=z(S, T, D, dtype=torch.float64)), "x", "got torch.float64"),
    "compact/x rank 2": ("compact", lambda: dict(x=z(S, T)), "x", r"must be \[S, T, D\]"),
    "compact/x strided": ("compact", lambda: dict(x=strided(S, T, D)), "x", "contiguous"),
    "compact/keep float": ("compact", lambda: dict(keep=z(S, T)), "keep", "must be torch.bool"),
    "compact/keep other T": ("compact", lambda: dict(keep=z(S, T + 1, dtype=b)), "keep",
                             r"must be \[S, T\] like x's first two dims \(size 5 in dim 1\), got shape \[2, 6\]"),
    "compact/keep other S": ("compact", lambda: dict(keep=z(1, T, dtype=b)), "keep", "size 2 in dim 0"),
    "compact/keep strided": ("compact", lambda: dict(keep=strided(S, T, dtype=b)), "keep", "contiguous"),
    "compact/keep device": ("compact", lambda: dict(keep=z(S, T, dtype=b, device="cuda")), "keep", "must be on cpu"),
    "gather/pages int": ("gather_varlen", lambda: dict(pages=z(P, PAGE, D, dtype=i32)), "pages", "got torch.int32"),
    "gather/pages rank 2": ("gather_varlen", lambda: dict(pages=z(P, D)), "pages", r"must be \[P, page_size, D\]"),
    "gather/pages strided": ("gather_varlen", lambda: dict(pages=strided(P, PAGE, D)), "pages", "contiguous"),
    "gather/page_size 0": ("gather_varlen", lambda: dict(pages=z(P, 0, D)), "pages", "page_size >= 1"),
    "gather/block_table int64": ("gather_varlen", lambda: dict(block_table=z(S, 2, dtype=i64)), "block_table",
                                 "must be torch.int32, got torch.int64"),
    "gather/block_table rank 1": ("gather_varlen", lambda: dict(block_table=z(S, dtype=i32)), "block_table",
                                  r"must be \[S, max_pages\]"),
    "gather/block_table device": ("gather_varlen", lambda: dict(block_table=z(S, 2, dtype=i32, device="cuda")),
                                  "block_table", "must be on cpu"),
    "gather/seq_lens int64": ("gather_varlen", lambda: dict(seq_lens=z(S, dtype=i64)), "seq_lens", "torch.int32"),
    "gather/seq_lens other S": ("gather_varlen", lambda: dict(seq_lens=z(S + 1, dtype=i32)), "seq_lens",
                                r"must be \[S\] \(size 2 in dim 0\)"),
    "attention/q int": ("paged_decode_attention", lambda: dict(q=z(S, 2, D, dtype=i32)), "q", "got torch.int32"),
    "attention/q rank 2": ("paged_decode_attention", lambda: dict(q=z(S, D)), "q", r"must be \[S, G, D\]"),
    "attention/q strided": ("paged_decode_attention", lambda: dict(q=strided(S, 2, D)), "q", "contiguous"),
    "attention/q other D": ("paged_decode_attention", lambda: dict(q=z(S, 2, D + 1)), "k_pages",
                            r"with q's D \(size 4 in dim 2\)"),
    "attention/q other S": ("paged_decode_attention", lambda: dict(q=z(S + 1, 2, D)), "block_table",
                            "size 3 in dim 0"),
    "attention/k_pages dtype": ("paged_decode_attention", lambda: dict(k_pages=z(P, PAGE, D, dtype=f16)), "k_pages",
                                "must be torch.float32, got torch.float16"),
    "attention/page_size 0": ("paged_decode_attention", lambda: dict(k_pages=z(P, 0, D)), "k_pages", "page_size"),
    "attention/v_pages dtype": ("paged_decode_attention", lambda: dict(v_pages=z(P, PAGE, D, dtype=bf16)), "v_pages",
                                "must be torch.float32"),
    "attention/v_pages pool": ("paged_decode_attention", lambda: dict(v_pages=z(P + 1, PAGE, D)), "v_pages",
                               r"like k_pages \(size 4 in dim 0\)"),
    "attention/v_pages strided": ("paged_decode_attention", lambda: dict(v_pages=strided(P, PAGE, D)), "v_pages",
                                  "contiguous"),
    "attention/seq_lens device": ("paged_decode_attention", lambda: dict(seq_lens=z(S, dtype=i32, device="cuda")),
                                  "seq_lens", "must be on cpu"),
    "attention/scale nan": ("paged_decode_attention", lambda: dict(scale=math.nan), "scale", "finite in float32"),
    "attention/scale -inf": ("paged_decode_attention", lambda: dict(scale=-math.inf), "scale", "finite"),
    "attention/scale inf in float32": ("paged_decode_attention", lambda: dict(scale=F32_INF), "scale", "finite"),
    "append/k int": ("append", lambda: dict(k=z(S, T, D, dtype=i32)), "k", "got torch.int32"),
    "append/k rank 2": ("append", lambda: dict(k=z(S, D)), "k", r"must be \[S, T, D\]"),
    "append/k strided": ("append", lambda: dict(k=strided(S, T, D)), "k", "contiguous"),
    "append/k device": ("append", lambda: dict(k=z(S, T, D, device="cuda")), "k", "must be on cpu"),
    "append/k other D": ("append", lambda: dict(k=z(S, T, D + 1), v=z(S, T, D + 1)), "k_pages",
                         r"with k's D \(size 4 in dim 2\)"),
    "append/k other S": ("append", lambda: dict(k=z(S + 1, T, D), v=z(S + 1, T, D), decisions=z(S + 1, T, dtype=b)),
                         "block_table", "size 3 in dim 0"),
    "append/k dtype vs pages": ("append", lambda: dict(k=z(S, T, D, dtype=f16), v=z(S, T, D, dtype=f16)), "k_pages",
                                "must be torch.float16, got torch.float32"),
    "append/v other T": ("append", lambda: dict(v=z(S, T + 1, D)), "v", r"like k \(size 5 in dim 1\)"),
    "append/v dtype": ("append", lambda: dict(v=z(S, T, D, dtype=f16)), "v", "must be torch.float32"),
    "append/k_pages rank 2": ("append", lambda: dict(k_pages=z(P, PAGE * D)), "k_pages", "got shape"),
    "append/page_size 0": ("append", lambda: dict(k_pages=z(P, 0, D)), "k_pages", "page_size >= 1"),
    "append/v_pages pool": ("append", lambda: dict(v_pages=z(P - 1, PAGE, D)), "v_pages", "like k_pages"),
    "append/block_table int64": ("append", lambda: dict(block_table=z(S, 2, dtype=i64)), "block_table", "int32"),
    "append/seq_lens other S": ("append", lambda: dict(seq_lens=z(S + 1, dtype=i32)), "seq_lens", "size 2"),
    "append/num_seen rank 2": ("append", lambda: dict(num_seen=z(S, 1, dtype=i32)), "num_seen", r"must be \[S\]"),
    "append/num_seen float": ("append", lambda: dict(num_seen=z(S)), "num_seen", "must be torch.int32"),
    "append/ring_slots width 0": ("append", lambda: dict(ring_slots=z(S, 0, dtype=i32)), "ring_slots",
                                  "window >= 0"),
    "append/ring_slots int64": ("append", lambda: dict(ring_slots=z(S, W1, dtype=i64)), "ring_slots", "int32"),
    "append/ring_slots other S": ("append", lambda: dict(ring_slots=z(S + 1, W1, dtype=i32)), "ring_slots",
                                  "size 2 in dim 0"),
    "append/ring_flags width": ("append", lambda: dict(ring_flags=z(S, W1 + 1, dtype=b)), "ring_flags",
                                r"like ring_slots \(size 3 in dim 1\)"),
    "append/ring_flags int": ("append", lambda: dict(ring_flags=z(S, W1, dtype=i32)), "ring_flags", "torch.bool"),
    "append/free_pages length": ("append", lambda: dict(free_pages=z(P - 1, dtype=i32)), "free_pages",
                                 r"\(size 4 in dim 0\)"),
    "append/free_pages int64": ("append", lambda: dict(free_pages=z(P, dtype=i64)), "free_pages", "int32"),
    "append/free_top shape": ("append", lambda: dict(free_top=z(2, dtype=i32)), "free_top", r"must be \[1\]"),
    "append/free_top device": ("append", lambda: dict(free_top=z(1, dtype=i32, device="cuda")), "free_top",
                               "must be on cpu"),
    "append/decisions float": ("append", lambda: dict(decisions=z(S, T)), "decisions", "torch.bool"),
    "append/decisions other T": ("append", lambda: dict(decisions=z(S, T - 1, dtype=b)), "decisions",
                                 r"like k \(size 5 in dim 1\)"),
    "append/decisions strided": ("append", lambda: dict(decisions=strided(S, T, dtype=b)), "decisions",
                                 "contiguous"),
    "append/valid other T": ("append", lambda: dict(valid=z(S, T + 1, dtype=b)), "valid", "size 5 in dim 1"),
    "append/valid float": ("append", lambda: dict(valid=z(S, T)), "valid", "torch.bool"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_fake_kernel_rejects_bad_input_naming_op_and_argument(case):
    op, bad, arg, what = BAD[case]
    with fake_mode(), pytest.raises(RuntimeError, match=rf"^dms\.{op}: {arg} .*{what}"):
        call(op, **bad())


@pytest.mark.parametrize("case", [c for c in BAD if "device" not in c])  # no CUDA device needed
def test_cpu_kernel_names_the_same_argument(case):
    op, bad, arg, _ = BAD[case]
    with pytest.raises(RuntimeError, match=rf"dms\.{op}: {arg} "):
        call(op, **bad())


def test_meta_tensors_get_the_same_checks():
    with pytest.raises(RuntimeError, match=r"^dms\.compact: keep must be \[S, T\] like x's first two dims"):
        ops.compact(z(S, T, D, device="meta"), z(S, T + 1, dtype=b, device="meta"))
