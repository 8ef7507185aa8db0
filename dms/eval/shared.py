"""One prompt forward shared by several caches of the same model.

Vanilla and the eviction baselines run the same plain model on the same prompts, and every one
of them attends the whole prompt during prefill (dms.baselines: a prefill chunk attends all of
its tokens, then the policy evicts). So the prompt's projections and MLPs, most of an
evaluation's compute at 512-token prompts, are computed once: ``SharedPrefill`` hands each
layer's q, k, v to every member cache (each runs its own attention, so H2O and TOVA collect
their scores as on their own) and passes one output on. Each member then decodes on its own
from the shared first token (``generate`` continues a filled cache).

The output passed on is the plain model's: the dense member's attention when there is one
(the vanilla computation), else the first member's (a baseline's prefill attention is exact).
Members whose output would go unused and that can skip it (PolicyCache.absorb) only store and
score the tokens.
"""
from __future__ import annotations

import time

import torch
from transformers.cache_utils import Cache

from dms.attention.infer import causal_padding_mask, dense_attention
from dms.cache import AttentionCache


class SharedPrefill(AttentionCache):
    """A prefill-only cache fanning each layer's q, k, v out to ``members``: AttentionCaches
    (their ``attend``) and plain transformers caches (their ``update``)."""

    def __init__(self, members: list):
        if not members:
            raise ValueError("members must hold at least one cache")
        bad = [type(m).__name__ for m in members if not isinstance(m, Cache)]
        if bad:
            raise TypeError(f"members must be transformers Cache objects, got {bad}")
        super().__init__(layers=list(members[0].layers))
        self.members = members
        self.columns = 0

    def check_model(self, mode: str, window: int) -> None:
        for m in self.members:
            if isinstance(m, AttentionCache):
                m.check_model(mode, window)
            elif mode != "off":
                raise ValueError(f"a {type(m).__name__} member needs mode 'off' (the plain model)")

    def attend(self, layer_idx, q, k, v, decisions, padding, scale):
        if self.columns:
            raise RuntimeError("SharedPrefill serves one prompt forward; decode with each member cache")
        out = None
        for m in sorted(self.members, key=lambda m: isinstance(m, AttentionCache)):  # dense members first
            if out is not None and hasattr(m, "absorb"):
                m.absorb(layer_idx, q, k, v, decisions, padding, scale)  # its output would go unused
            elif isinstance(m, AttentionCache):
                o = m.attend(layer_idx, q, k, v, decisions, padding, scale)
                out = o if out is None else out
            else:
                ks, vs = m.update(k, v, layer_idx)
                allowed = causal_padding_mask(padding, q.shape[0], q.shape[2], ks.shape[2] - k.shape[2], q.device)
                out = dense_attention(q, ks, vs, allowed, scale)  # the vanilla computation wins
        if layer_idx == len(self.layers) - 1:
            self.columns = q.shape[2]
        return out

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.columns


@torch.no_grad()
def generate_shared(model, enc, members: list, max_new_tokens: int, eos_token_id: int, pad_token_id: int
                    ) -> list[tuple[torch.Tensor, float]]:
    """Greedy continuations of the prompts ``enc`` (input_ids, attention_mask) with each cache of
    ``members`` after one shared prompt forward. Per member: the new tokens [B, <= max_new_tokens],
    each row's tokens after its first EOS replaced by ``pad_token_id`` (as ``generate`` pads
    finished rows), and the seconds it took: its decode plus an equal share of the prompt forward."""
    from dms.compat import cache_kwargs

    t0 = time.perf_counter()
    ids, mask = enc["input_ids"], enc["attention_mask"]
    positions = (mask.long().cumsum(-1) - 1).clamp_min(0)  # as generate numbers left-padded rows
    shared = members[0] if len(members) == 1 else SharedPrefill(members)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, **cache_kwargs(shared),
                   use_cache=True, logits_to_keep=1).logits
    first = logits[:, -1].argmax(-1, keepdim=True)
    share = (time.perf_counter() - t0) / len(members)
    outs = []
    for cache in members:
        t0 = time.perf_counter()
        new = first
        if max_new_tokens > 1 and not bool((first == eos_token_id).all()):
            full = torch.cat([ids, first], dim=1)
            out = model.generate(input_ids=full, attention_mask=torch.cat([mask, torch.ones_like(first)], dim=1),
                                 **cache_kwargs(cache), max_new_tokens=max_new_tokens - 1, do_sample=False,
                                 eos_token_id=eos_token_id, pad_token_id=pad_token_id)
            new = out[:, ids.shape[1]:]
        outs.append((_cut_after_eos(new, eos_token_id, pad_token_id), share + time.perf_counter() - t0))
    return outs


def _cut_after_eos(tokens: torch.Tensor, eos: int, pad: int) -> torch.Tensor:
    """Tokens after each row's first EOS become pads (generate's own padding of finished rows)."""
    seen = (tokens == eos).long().cumsum(1)
    after = (seen - (tokens == eos).long()) > 0
    return tokens.masked_fill(after, pad)
