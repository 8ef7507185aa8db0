"""Plain-PyTorch reference of every ``torch.ops.dms`` operator: the test oracle.

Written from docs/design.md §1-§3 for clarity, not speed: loops over sequences and tokens.
Signatures mirror the schemas in ``csrc/torch_bindings.cpp``; the stateful ``append``
mutates its arguments in place exactly like the compiled operator, so it runs on a
``dms.store.PagedStore`` as ``store.append(k, v, decisions, valid, op=reference.append)``.
"""
from __future__ import annotations

import torch


def _valid_rows(valid: torch.Tensor | None, S: int, T: int) -> torch.Tensor:
    if valid is None:
        return torch.ones(S, T, dtype=torch.bool)
    return valid.bool().cpu()


def flags_from_decisions(decisions: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """flag[s, t] = decision of the next valid token of s (the newest token has no flag)."""
    S, T = decisions.shape
    ok = _valid_rows(valid, S, T)
    d = decisions.bool().cpu()
    flags = torch.zeros(S, T, dtype=torch.bool)
    for s in range(S):
        idx = torch.nonzero(ok[s]).flatten().tolist()
        for a, b in zip(idx[:-1], idx[1:]):
            flags[s, a] = d[s, b]
    return flags.to(decisions.device)


def visibility_mask(decisions: torch.Tensor, window: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """bool [S, T, T]: query t may attend key k iff both are valid, k <= q and
    (q - k <= window or flag[k] == 0), distances counted in valid tokens (docs/design.md §1)."""
    S, T = decisions.shape
    ok = _valid_rows(valid, S, T)
    flags = flags_from_decisions(decisions, valid).cpu()
    pos = ok.long().cumsum(-1) - 1  # token index among valid tokens
    q = pos[:, :, None]
    k = pos[:, None, :]
    both = ok[:, :, None] & ok[:, None, :]
    visible = (k <= q) & ((q - k <= window) | ~flags[:, None, :])
    return (visible & both).to(decisions.device)


def scan_flags(decisions: torch.Tensor, valid: torch.Tensor | None, window: int):
    S, T = decisions.shape
    ok = _valid_rows(valid, S, T)
    flags = flags_from_decisions(decisions, valid).cpu()
    n_valid = ok.sum(-1, keepdim=True)
    pos = ok.long().cumsum(-1) - 1
    keep = ok & ((n_valid - 1 - pos <= window) | ~flags)
    kept_before = keep.int().cumsum(-1) - keep.int()
    dev = decisions.device
    return keep.to(dev), kept_before.to(torch.int32).to(dev), keep.sum(-1).to(torch.int32).to(dev)


def _cu_seqlens(counts: torch.Tensor) -> torch.Tensor:
    cu = torch.zeros(counts.numel() + 1, dtype=torch.int32, device=counts.device)
    cu[1:] = counts.to(torch.int64).cumsum(0).to(torch.int32)
    return cu


def compact(x: torch.Tensor, keep: torch.Tensor):
    counts = keep.sum(-1).to(torch.int32)
    max_seqlen = int(counts.max()) if counts.numel() else 0
    return x[keep.bool()], _cu_seqlens(counts), max_seqlen


def _slot_rows(pages: torch.Tensor, block_table: torch.Tensor, s: int, n: int) -> torch.Tensor:
    page_size = pages.shape[1]
    slots = torch.arange(n)
    page_ids = block_table[s].long().cpu()[slots // page_size]
    return pages[page_ids.to(pages.device), (slots % page_size).to(pages.device)]


def gather_varlen(pages: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor):
    lens = seq_lens.cpu().tolist()
    parts = [_slot_rows(pages, block_table, s, n) for s, n in enumerate(lens)]
    packed = torch.cat(parts) if parts else pages.new_empty(0, pages.shape[-1])
    return packed, _cu_seqlens(seq_lens.to(torch.int32)), max(lens, default=0)


def paged_decode_attention(q, k_pages, v_pages, block_table, seq_lens, scale: float):
    out = torch.zeros_like(q)
    for s, n in enumerate(seq_lens.cpu().tolist()):
        if n == 0:
            continue
        k = _slot_rows(k_pages, block_table, s, n).float()
        v = _slot_rows(v_pages, block_table, s, n).float()
        p = torch.softmax(q[s].float() @ k.T * scale, dim=-1)
        out[s] = (p @ v).to(q.dtype)
    return out


def append(k_pages, v_pages, block_table, seq_lens, num_seen, ring_slots, ring_flags,
           free_pages, free_top, k, v, decisions, valid=None) -> None:
    S, T, _ = k.shape
    W1 = ring_slots.shape[1]
    page_size = k_pages.shape[1]
    max_pages = block_table.shape[1]
    ok = _valid_rows(valid, S, T)
    d = decisions.bool().cpu()

    def walk(s: int, pages: list[int] | None) -> int:
        """Replay the ring of sequence s. Dry run (pages None) counts the pages it needs;
        otherwise writes, taking new pages from ``pages`` in order."""
        n, length = int(num_seen[s]), int(seq_lens[s])
        flags = ring_flags[s].cpu().clone()
        slots = ring_slots[s].cpu().clone()
        new_pages = 0
        for t in range(T):
            if not ok[s, t]:
                continue
            if n > 0:
                flags[(n - 1) % W1] = d[s, t]
            col = n % W1  # also the column of token n - W1, which leaves the window now
            if n >= W1 and flags[col]:
                slot = int(slots[col])
            else:
                slot = length
                length += 1
                if slot % page_size == 0:
                    if slot // page_size >= max_pages:
                        raise RuntimeError(
                            f"dms.append: block_table has room for {max_pages} pages per "
                            f"sequence; sequence {s} needs more")
                    if pages is not None:
                        block_table[s, slot // page_size] = pages[new_pages]
                    new_pages += 1
            if pages is not None:
                page = int(block_table[s, slot // page_size])
                k_pages[page, slot % page_size] = k[s, t]
                v_pages[page, slot % page_size] = v[s, t]
            slots[col] = slot
            flags[col] = False
            n += 1
        if pages is not None:
            num_seen[s], seq_lens[s] = n, length
            ring_flags[s] = flags.to(ring_flags.device)
            ring_slots[s] = slots.to(ring_slots.device)
        return new_pages

    need = [walk(s, None) for s in range(S)]
    top = int(free_top[0])
    if sum(need) > top:
        raise RuntimeError(f"dms.append: page pool exhausted: need {sum(need)} pages, {top} free")
    stack = free_pages.cpu().tolist()
    taken = 0
    for s in range(S):
        # Sequence s pops its pages after those of sequences 0..s-1, from the top down.
        walk(s, [stack[top - 1 - taken - i] for i in range(need[s])])
        taken += need[s]
    free_top[0] = top - taken
