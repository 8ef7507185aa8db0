"""Loads the compiled operator library and registers the fake (meta) kernels.

The schemas live in csrc/torch_bindings.cpp. Another engine can skip this module and call
``torch.ops.load_library(dms.library_path())`` (or the .so path) itself.
"""
from __future__ import annotations

import torch

from dms import _C  # noqa: F401  (importing runs the static TORCH_LIBRARY registration)

ops = torch.ops.dms
cuda_compiled: bool = _C.cuda_compiled


def library_path() -> str:
    """Path of the shared library holding every dms operator."""
    return _C.__file__


# Fake kernels: output metadata only, for torch.compile / FakeTensor tracing. Sizes that
# depend on tensor contents (packed row counts, max_seqlen) are fresh symbolic sizes.
# Each one first repeats the metadata checks of csrc/include/dms/checks.h (dtype, shape,
# device, contiguity; not the ones that read values), in the same order and naming the same
# argument, so a bad input fails while tracing instead of at run time or never.

_FLOAT = (torch.float32, torch.float16, torch.bfloat16)  # model tensors (check_float)


def _check(op: str, name: str, t: torch.Tensor, dtype, device: torch.device, sizes: tuple,
           layout: str) -> None:
    """check_dtype/check_float + check_arg: t has `dtype` (or one of a tuple of them), is on
    `device`, has `sizes` (-1 = any) and is contiguous. `layout` spells the expected shape."""
    allowed = dtype if isinstance(dtype, tuple) else (dtype,)
    torch._check(t.dtype in allowed,
                 lambda: f"{op}: {name} must be {' or '.join(map(str, allowed))}, got {t.dtype}")
    torch._check(t.device == device,
                 lambda: f"{op}: {name} must be on {device} like the other inputs, got {t.device}")
    torch._check(t.dim() == len(sizes), lambda: f"{op}: {name} must be {layout}, got shape {list(t.shape)}")
    for d, want in enumerate(sizes):
        if not (isinstance(want, int) and want < 0):  # sizes may be SymInts while tracing
            torch._check(t.shape[d] == want, lambda: f"{op}: {name} must be {layout} (size {want} in dim {d}), "
                                                     f"got shape {list(t.shape)}")
    torch._check(t.is_contiguous(), lambda: f"{op}: {name} must be contiguous")


def _check_paged_store(op, name, pages, block_table, seq_lens, S, device) -> None:
    _check(op, name, pages, _FLOAT, device, (-1, -1, -1), "[P, page_size, D]")
    torch._check(pages.shape[1] >= 1,
                 lambda: f"{op}: {name} must have page_size >= 1, got shape {list(pages.shape)}")
    _check(op, "block_table", block_table, torch.int32, device, (S, -1), "[S, max_pages]")
    _check(op, "seq_lens", seq_lens, torch.int32, device, (S,), "[S]")


@torch.library.register_fake("dms::scan_flags")
def _scan_flags_fake(decisions, valid, window):
    op = "dms.scan_flags"
    torch._check(window >= 0, lambda: f"{op}: window must be >= 0, got {window}")
    _check(op, "decisions", decisions, torch.bool, decisions.device, (-1, -1), "[S, T]")
    if valid is not None:
        _check(op, "valid", valid, torch.bool, decisions.device, decisions.shape, "[S, T] like decisions")
    S = decisions.shape[0]
    return (torch.empty_like(decisions, dtype=torch.bool), torch.empty_like(decisions, dtype=torch.int32),
            decisions.new_empty(S, dtype=torch.int32))


def _packed_fake(like: torch.Tensor, S: int, D: int):
    ctx = torch.library.get_ctx()
    n = ctx.new_dynamic_size()
    max_seqlen = ctx.new_dynamic_size()
    return like.new_empty(n, D), like.new_empty(S + 1, dtype=torch.int32), max_seqlen


@torch.library.register_fake("dms::compact")
def _compact_fake(x, keep):
    op = "dms.compact"
    _check(op, "x", x, _FLOAT, x.device, (-1, -1, -1), "[S, T, D]")
    _check(op, "keep", keep, torch.bool, x.device, x.shape[:2], "[S, T] like x's first two dims")
    return _packed_fake(x, x.shape[0], x.shape[2])


@torch.library.register_fake("dms::gather_varlen")
def _gather_varlen_fake(pages, block_table, seq_lens):
    _check_paged_store("dms.gather_varlen", "pages", pages, block_table, seq_lens, block_table.shape[0],
                       pages.device)
    return _packed_fake(pages, block_table.shape[0], pages.shape[2])


@torch.library.register_fake("dms::append")
def _append_fake(k_pages, v_pages, block_table, seq_lens, num_seen, ring_slots, ring_flags, free_pages,
                 free_top, k, v, decisions, valid):
    op, device = "dms.append", k_pages.device
    _check(op, "k", k, _FLOAT, device, (-1, -1, -1), "[S, T, D]")
    S, T, D = k.shape
    _check_paged_store(op, "k_pages", k_pages, block_table, seq_lens, S, device)
    P, page_size = k_pages.shape[:2]
    _check(op, "k_pages", k_pages, k.dtype, device, (P, -1, D), "[P, page_size, D] with k's D")
    _check(op, "v_pages", v_pages, k.dtype, device, (P, page_size, D), "[P, page_size, D] like k_pages")
    _check(op, "v", v, k.dtype, device, (S, T, D), "[S, T, D] like k")
    _check(op, "num_seen", num_seen, torch.int32, device, (S,), "[S]")
    _check(op, "ring_slots", ring_slots, torch.int32, device, (S, -1), "[S, window + 1]")
    torch._check(ring_slots.shape[1] >= 1, lambda: f"{op}: ring_slots must be [S, window + 1] with window >= 0, "
                                                   f"got shape {list(ring_slots.shape)}")
    _check(op, "ring_flags", ring_flags, torch.bool, device, ring_slots.shape, "[S, window + 1] like ring_slots")
    _check(op, "free_pages", free_pages, torch.int32, device, (P,), "[P] (P = k_pages.size(0))")
    _check(op, "free_top", free_top, torch.int32, device, (1,), "[1]")
    _check(op, "decisions", decisions, torch.bool, device, (S, T), "[S, T] like k")
    if valid is not None:
        _check(op, "valid", valid, torch.bool, device, (S, T), "[S, T] like k")
    return None


# float32 rounds a double to inf from 2**128 - 2**103 (halfway past its largest finite value) up.
_FLOAT32_OVERFLOW = 2.0**128 - 2.0**103


@torch.library.register_fake("dms::paged_decode_attention")
def _paged_decode_attention_fake(q, k_pages, v_pages, block_table, seq_lens, scale):
    op = "dms.paged_decode_attention"
    # The kernels scale in fp32: a double beyond float's range is as bad as inf (NaN fails too).
    torch._check(abs(scale) < _FLOAT32_OVERFLOW, lambda: f"{op}: scale must be finite in float32, got {scale}")
    _check(op, "q", q, _FLOAT, q.device, (-1, -1, -1), "[S, G, D]")
    S, _, D = q.shape
    _check_paged_store(op, "k_pages", k_pages, block_table, seq_lens, S, q.device)
    _check(op, "k_pages", k_pages, q.dtype, q.device, (-1, -1, D), "[P, page_size, D] with q's D")
    _check(op, "v_pages", v_pages, q.dtype, q.device, k_pages.shape, "[P, page_size, D] like k_pages")
    return torch.empty_like(q)
