"""FlexAttention block masks for causal (optionally left-padded) training attention, built from
block indices instead of ``create_block_mask``, which evaluates the mask on every (query, key)
pair: a [B, 1, T, T] boolean (1 GiB per row at 32K tokens, 16 GiB at 128K). Here memory is
(T / block)^2 int32 per row (256 KiB at 32K with 128-token blocks); ``mask_mod`` still decides
inside the blocks marked partial.

Without padding the blocks below the diagonal are full (every key visible) and the diagonal one
is partial. With padding every block up to the diagonal is partial, so ``mask_mod`` hides the pads.
"""
from __future__ import annotations

import torch

BLOCK = 128  # FlexAttention's default sparse block size


def causal_block_mask(mask_mod, batch: int | None, T: int, device, padded: bool = False, block: int = BLOCK):
    """A BlockMask over T x T for ``mask_mod`` (which must hide everything above the diagonal);
    ``batch`` rows (None: one, broadcast)."""
    from torch.nn.attention.flex_attention import BlockMask

    n = -(-T // block)
    rows = 1 if batch is None else batch
    q_block = torch.arange(n, device=device, dtype=torch.int32)
    every = torch.arange(n, device=device, dtype=torch.int32).expand(rows, 1, n, n).contiguous()
    if padded:
        num = (q_block + 1).expand(rows, 1, n).contiguous()
        return BlockMask.from_kv_blocks(num, every, BLOCK_SIZE=block, mask_mod=mask_mod, seq_lengths=(T, T))
    diagonal = torch.ones(rows, 1, n, dtype=torch.int32, device=device)
    diagonal_idx = every.clone()
    diagonal_idx[..., 0] = q_block
    full = q_block.expand(rows, 1, n).contiguous()
    return BlockMask.from_kv_blocks(diagonal, diagonal_idx, full, every, BLOCK_SIZE=block, mask_mod=mask_mod,
                                    seq_lengths=(T, T))
