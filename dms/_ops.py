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

@torch.library.register_fake("dms::scan_flags")
def _scan_flags_fake(decisions, valid, window):
    torch._check(window >= 0, lambda: f"dms.scan_flags: window must be >= 0, got {window}")
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
    return _packed_fake(x, x.shape[0], x.shape[2])


@torch.library.register_fake("dms::gather_varlen")
def _gather_varlen_fake(pages, block_table, seq_lens):
    return _packed_fake(pages, block_table.shape[0], pages.shape[2])


@torch.library.register_fake("dms::append")
def _append_fake(k_pages, v_pages, block_table, seq_lens, num_seen, ring_slots, ring_flags, free_pages,
                 free_top, k, v, decisions, valid):
    return None


@torch.library.register_fake("dms::paged_decode_attention")
def _paged_decode_attention_fake(q, k_pages, v_pages, block_table, seq_lens, scale):
    return torch.empty_like(q)
