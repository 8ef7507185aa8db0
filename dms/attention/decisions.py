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


class DMSAdapter(nn.Module):
    """``Linear(hidden -> n_logits)(RMSNorm(x_residual))``, zero-initialised so that a fresh
    adapter gives logit ``-alpha_offset`` (keep everything). n_logits = H_kv, or 1 per layer."""

    def __init__(self, hidden_size: int, n_logits: int, eps: float):
        super().__init__()
        self.norm = RMSNorm(hidden_size, eps)
        self.proj = nn.Linear(hidden_size, n_logits, bias=True)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def logits(self, residual: torch.Tensor, n_kv_heads: int, scale: float, offset: float) -> torch.Tensor:
        """residual [B, T, hidden] -> logits [B, H_kv, T]."""
        out = self.proj(self.norm(residual)).transpose(1, 2) * scale - offset
        return out.expand(-1, n_kv_heads, -1)
