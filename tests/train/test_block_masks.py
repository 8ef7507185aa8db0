"""dms.attention.block_masks: the causal FlexAttention block mask built from block indices (no
T x T mask) covers exactly what create_block_mask's does."""
import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from dms.attention.block_masks import causal_block_mask


def _causal(b, h, q, k):
    return k <= q


@pytest.mark.parametrize("T", [5, 128, 300, 513])
def test_same_blocks_and_same_attention_as_create_block_mask(T):
    reference = create_block_mask(_causal, None, None, T, T, device="cpu")
    ours = causal_block_mask(_causal, None, T, "cpu")
    assert torch.equal(ours.to_dense(), reference.to_dense())
    real = torch.ones(2, T, dtype=torch.bool)
    real[0, : T // 3] = False  # a left-padded row

    def padded(b, h, q, k):
        return (k <= q) & (real[b, k] | (k == q))

    g = torch.Generator().manual_seed(T)
    q, k, v = (torch.randn(2, 2, T, 16, generator=g) for _ in range(3))
    for mask_mod, ours, reference in [
            (padded, causal_block_mask(padded, 2, T, "cpu", padded=True), create_block_mask(padded, 2, None, T, T, device="cpu")),
            (_causal, ours, reference)]:
        torch.testing.assert_close(flex_attention(q, k, v, block_mask=ours), flex_attention(q, k, v, block_mask=reference),
                                   rtol=0, atol=0)


def test_memory_is_per_block_not_per_token():
    mask = causal_block_mask(_causal, None, 32768, "cpu")
    assert mask.kv_indices.shape == (1, 1, 256, 256)  # 128-token blocks: 256 KiB of int32, not 1 GiB of bool
