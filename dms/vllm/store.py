"""The plugin's DMS paged store: rows = (request slot, KV head) in each layer, pages from one
pool shared by the layers.

Tensor names and layout follow csrc/torch_bindings.cpp (docs/design.md §2); the store is
written only by ``torch.ops.dms.append`` and read by ``paged_decode_attention``. The pool is
laid out in the memory vLLM allocated for the layers' KV cache (dms.vllm.attention.build_stores),
so it is a hard cap: the scheduler-side manager (dms.vllm.kv) admits requests so that the
pages a step pops always fit, and a request's rows are emptied (pages back on the free list)
the step after it finishes, is preempted or aborted.
"""
from __future__ import annotations

import math

import torch

from dms._ops import ops


class PagePool:
    """K and V pages [P, page_size, D] and their free list, shared by the layers of a model: a
    layer that retains little leaves pages to one that retains much."""

    def __init__(self, k_pages: torch.Tensor, v_pages: torch.Tensor):
        P = k_pages.shape[0]
        self.k_pages, self.v_pages = k_pages, v_pages
        # The op pops from the top: low ids first, so a fresh pool fills from page 0.
        self.free_pages = torch.arange(P - 1, -1, -1, dtype=torch.int32, device=k_pages.device)
        self.free_top = torch.full((1,), P, dtype=torch.int32, device=k_pages.device)


class LayerStore:
    """Paged store of one layer: ``slots * n_kv_heads`` sequences (sequence of slot r, head h is
    r * H + h) whose pages come from a shared PagePool."""

    def __init__(self, pool: PagePool, slots: int, n_kv_heads: int, window: int, max_tokens: int):
        k_pages = pool.k_pages
        _, page_size, D = k_pages.shape
        dev = k_pages.device
        self.pool = pool
        self.k_pages, self.v_pages = k_pages, pool.v_pages
        self.page_size, self.n_kv_heads, self.window = page_size, n_kv_heads, window
        S = slots * n_kv_heads
        self.block_table = torch.full((S, math.ceil(max_tokens / page_size) + 1), -1, dtype=torch.int32, device=dev)
        self.seq_lens = torch.zeros(S, dtype=torch.int32, device=dev)
        self.num_seen = torch.zeros(S, dtype=torch.int32, device=dev)
        self.ring_slots = torch.zeros(S, window + 1, dtype=torch.int32, device=dev)
        self.ring_flags = torch.zeros(S, window + 1, dtype=torch.bool, device=dev)

    def rows(self, slots: torch.Tensor) -> torch.Tensor:
        """int64 [R * H] sequence rows of request slots [R], slot-major."""
        H = self.n_kv_heads
        return (slots[:, None] * H + torch.arange(H, device=slots.device)[None, :]).reshape(-1)

    def release(self, slots: torch.Tensor) -> None:
        """Push the pages of every row of ``slots`` back on the free list and empty the rows."""
        if slots.numel() == 0:
            return
        rows = self.rows(slots)
        used = math.ceil(int(self.seq_lens[rows].max()) / self.page_size) if rows.numel() else 0
        table = self.block_table[rows, :used]
        n_pages = (self.seq_lens[rows].long() + self.page_size - 1) // self.page_size
        live = torch.arange(used, device=table.device)[None, :] < n_pages[:, None]
        freed = table[live]
        pool = self.pool
        top = int(pool.free_top[0])
        pool.free_pages[top: top + freed.numel()] = freed
        pool.free_top.fill_(top + freed.numel())
        self.block_table[rows] = -1
        self.seq_lens[rows] = 0
        self.num_seen[rows] = 0
        self.ring_flags[rows] = False

    def append(self, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decisions: torch.Tensor,
               valid: torch.Tensor) -> None:
        """Feed k, v [R, T, D] (decisions, valid bool [R, T]) to sequence ``rows`` [R] in one op call.
        The op works on whole index tensors: it gets the rows' slices and they are written back."""
        meta = [t[rows] for t in (self.block_table, self.seq_lens, self.num_seen, self.ring_slots, self.ring_flags)]
        pool = self.pool
        ops.append(self.k_pages, self.v_pages, *meta, pool.free_pages, pool.free_top, k, v, decisions, valid)
        if int(pool.free_top[0]) < 0:  # the CUDA kernel cannot raise: it reports and writes nothing
            raise RuntimeError(f"DMS page pool exhausted (free_top={int(pool.free_top[0])}); the KV manager's "
                               "admission should have prevented this")
        for t, m in zip((self.block_table, self.seq_lens, self.num_seen, self.ring_slots, self.ring_flags), meta):
            t[rows] = m

    def decode(self, q: torch.Tensor, rows: torch.Tensor, scale: float) -> torch.Tensor:
        """q [R, G, D] for sequence ``rows`` [R] -> [R, G, D] over their live slots."""
        return ops.paged_decode_attention(q.contiguous(), self.k_pages, self.v_pages, self.block_table[rows],
                                          self.seq_lens[rows], scale)

    def live_view(self, rows: torch.Tensor):
        """Live slots of ``rows`` as padded dense tensors for a prefill chunk:
        (keys [R, L, D], values, last_query int64 [R, L], newest_slot int64 [R] or -1, num_seen int64 [R]).
        ``last_query`` = last token index whose query may see the slot (docs/design.md §1)."""
        lens = self.seq_lens[rows].long()
        R, L, ps = rows.numel(), int(lens.max()) if rows.numel() else 0, self.page_size
        slot = torch.arange(L, device=lens.device)
        live = slot[None, :] < lens[:, None]
        page = self.block_table[rows][:, slot // ps].long().clamp_min(0)
        # Slots past a row's length hold stale memory (maybe NaN, which no mask cancels): zero them.
        keys = self.k_pages[page, slot % ps].masked_fill_(~live[..., None], 0)
        values = self.v_pages[page, slot % ps].masked_fill_(~live[..., None], 0)
        last = torch.full((R, L), torch.iinfo(torch.int64).max, dtype=torch.int64, device=lens.device)
        last.masked_fill_(~live, -1)
        W1 = self.window + 1
        n = self.num_seen[rows].long()
        col = torch.arange(W1, device=lens.device)[None, :]
        idx = n[:, None] - W1 + (col - n[:, None]) % W1  # token index held by ring column c
        flagged = self.ring_flags[rows] & (idx >= 0)
        ring_slot = self.ring_slots[rows].long()
        r_idx = torch.arange(R, device=lens.device)[:, None].expand(R, W1)
        if L:
            last[r_idx[flagged], ring_slot[flagged]] = idx[flagged] + self.window
        newest = ring_slot[torch.arange(R, device=lens.device), (n - 1) % W1]
        newest = torch.where(n > 0, newest, torch.full_like(newest, -1))
        return keys, values, last, newest, n

    def pages_per_slot(self) -> torch.Tensor:
        """int64 [slots]: pages held by each request slot (summed over its KV heads)."""
        pages = (self.seq_lens.long() + self.page_size - 1) // self.page_size
        return pages.view(-1, self.n_kv_heads).sum(1)

    def bytes_held(self) -> int:
        """Bytes of K and V in the pages in use."""
        return int(self.pages_per_slot().sum()) * 2 * self.page_size * self.k_pages.shape[-1] * self.k_pages.element_size()
