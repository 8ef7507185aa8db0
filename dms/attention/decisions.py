"""Eviction logits (docs/design.md §1): the borrowed query neuron or the separate adapter."""
from __future__ import annotations

import torch
from torch import nn


def neuron_heads(n_q_heads: int, n_kv_heads: int, alpha_per: str) -> list[int]:
    """Query heads whose last dimension is borrowed: the first head of each GQA group, or
    only head 0 when one logit is shared by the layer (``alpha_per="layer"``)."""
    group = n_q_heads // n_kv_heads
    return [0] if alpha_per == "layer" else [h * group for h in range(n_kv_heads)]


def neuron_logits(q: torch.Tensor, n_kv_heads: int, alpha_per: str, scale: float, offset: float):
    """q [B, Hq, T, D] after q_norm, before RoPE -> (logits [B, H_kv, T], q with the borrowed
    dimension zeroed). Zeroing multiplies by a constant mask so gradients still reach q."""
    heads = neuron_heads(q.shape[1], n_kv_heads, alpha_per)
    logits = q[:, heads, :, -1] * scale - offset
    if alpha_per == "layer":
        logits = logits.expand(-1, n_kv_heads, -1)
    return logits, zero_neuron(q, heads)


def zero_neuron(q: torch.Tensor, heads: list[int]) -> torch.Tensor:
    keep = torch.ones(q.shape[1], q.shape[-1], dtype=q.dtype, device=q.device)
    keep[heads, -1] = 0
    return q * keep[None, :, None, :]


class RMSNorm(nn.Module):
    """Same arithmetic as the Llama/Qwen RMSNorm (fp32 statistics)."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


# The adapter's module names in NVIDIA's reference implementation (self_attn.<name>), which dms
# reads and writes; dms's earlier checkpoints used self_attn.dms_adapter.{norm,proj}.
ADAPTER_NORM, ADAPTER_PROJ = "dms_proj_alpha_norm", "dms_proj_alpha"


def add_adapter(attn: nn.Module, hidden_size: int, n_kv_heads: int, eps: float, bias: bool = True) -> None:
    """Gives the attention module the adapter ``Linear(hidden -> H_kv)(RMSNorm(x_residual))``,
    zero-initialised so that a fresh adapter gives logit ``-alpha_offset`` (keep everything).
    H_kv outputs also for ``alpha_per="layer"`` (which reads output 0), as in the reference.
    The reference has a bias only with ``attention_bias``; a dms adapter has one unless it
    loads a checkpoint that has none (dms.from_pretrained decides)."""
    norm = RMSNorm(hidden_size, eps)
    proj = nn.Linear(hidden_size, n_kv_heads, bias=bias)
    nn.init.zeros_(proj.weight)
    if bias:
        nn.init.zeros_(proj.bias)
    setattr(attn, ADAPTER_NORM, norm)
    setattr(attn, ADAPTER_PROJ, proj)


def adapter_logits(attn: nn.Module, residual: torch.Tensor, alpha_per: str, scale: float,
                   offset: float) -> torch.Tensor:
    """residual [B, T, hidden] (the decoder layer's input, before its input norm) -> logits
    [B, H_kv, T]."""
    out = getattr(attn, ADAPTER_PROJ)(getattr(attn, ADAPTER_NORM)(residual)).transpose(1, 2)
    if alpha_per == "layer":
        out = out[:, :1].expand_as(out)
    return out * scale - offset
