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
from dms.attention.masks import NEVER, last_query
from dms.store import PagedStore


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
        sub = self.view(rows)
        sub.append(k, v, decisions, valid)
        top = int(sub.free_top[0])
        if top < 0:  # the CUDA kernel cannot raise: it reports and writes nothing
            raise RuntimeError(f"DMS page pool exhausted (free_top={top}); the KV manager's "
                               "admission should have prevented this")
        self.block_table[rows], self.seq_lens[rows], self.num_seen[rows] = sub.block_table, sub.seq_lens, sub.num_seen
        self.ring_slots[rows], self.ring_flags[rows] = sub.ring_slots, sub.ring_flags

    def decode(self, q: torch.Tensor, rows: torch.Tensor, scale: float) -> torch.Tensor:
        """q [R, G, D] for sequence ``rows`` [R] -> [R, G, D] over their live slots."""
        return ops.paged_decode_attention(q.contiguous(), self.k_pages, self.v_pages, self.block_table[rows],
                                          self.seq_lens[rows], scale)

    def view(self, rows: torch.Tensor) -> PagedStore:
        """The sequences ``rows`` as a PagedStore (index tensors copied, pages and free list
        shared), so the plugin reads and writes its store through the project's one store type."""
        pool = self.pool
        return PagedStore(self.k_pages, self.v_pages, self.block_table[rows], self.seq_lens[rows],
                          self.num_seen[rows], self.ring_slots[rows], self.ring_flags[rows], pool.free_pages,
                          pool.free_top)

    def live_view(self, rows: torch.Tensor):
        """Live slots of ``rows`` as padded dense tensors for a prefill chunk:
        (keys [R, L, D], values, last_query int64 [R, L], newest_slot int64 [R] or -1, num_seen int64 [R]).
        ``last_query`` = last token index whose query may see the slot (docs/design.md §1)."""
        store = self.view(rows)
        keys, values, live = store.dense()
        R, L = live.shape
        last = torch.full((R, L), NEVER, dtype=torch.int64, device=live.device).masked_fill_(~live, -1)
        slot, index, flagged = store.ring_tokens()
        r_idx = torch.arange(R, device=live.device)[:, None].expand_as(slot)
        if L:
            last[r_idx[flagged], slot[flagged]] = last_query(index, flagged, self.window)[flagged]
        n = store.num_seen.long()
        newest = slot[torch.arange(R, device=live.device), (n - 1) % (self.window + 1)]
        newest = torch.where(n > 0, newest, torch.full_like(newest, -1))
        return keys, values, last, newest, n

    def pages_per_slot(self) -> torch.Tensor:
        """int64 [slots]: pages held by each request slot (summed over its KV heads)."""
        pages = (self.seq_lens.long() + self.page_size - 1) // self.page_size
        return pages.view(-1, self.n_kv_heads).sum(1)

    def usage_per_slot(self) -> torch.Tensor:
        """int64 [2, slots]: per request slot (summed over its KV heads), the pages held, and the
        rows whose last page is full (or that hold none), where a retained new token pops a page."""
        full = (self.seq_lens % self.page_size == 0).view(-1, self.n_kv_heads).sum(1)
        return torch.stack([self.pages_per_slot(), full])

    def bytes_held(self) -> int:
        """Bytes of K and V in the pages in use."""
        return int(self.pages_per_slot().sum()) * 2 * self.page_size * self.k_pages.shape[-1] * self.k_pages.element_size()
