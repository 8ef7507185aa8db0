"""The paged KV store of docs/design.md §2 as one named type.

``PagedStore`` holds the nine tensors of ``S`` independent sequences in the order of the op
schemas (csrc/torch_bindings.cpp), which stay plain tensors so that other engines can call
the ops without this class. Everything that changes the tensors is a method here: the ops
(``append``), pool and table growth, and the row moves and page releases the eviction
baselines need. Readers (attention, statistics) may read the fields.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import sys

import torch

from dms._ops import ops

try:  # CUDA decode backend; its absence (always on a CPU-only machine) is normal
    from flash_attn import flash_attn_with_kvcache
except ImportError:
    flash_attn_with_kvcache = None

# Tensor fields in schema order (the first nine arguments of dms.append).
FIELDS = ("k_pages", "v_pages", "block_table", "seq_lens", "num_seen", "ring_slots", "ring_flags",
          "free_pages", "free_top")

# flash_attn's paged kernel requires pages of a multiple of this many tokens.
_FLASH_PAGE_MULTIPLE = 256


@dataclasses.dataclass
class PagedStore:
    """k_pages, v_pages [P, page_size, D]; block_table int32 [S, max_pages] (-1 = unmapped);
    seq_lens, num_seen int32 [S]; ring_slots int32 / ring_flags bool [S, window + 1];
    free_pages int32 [P] (a stack, entries below ``free_top[0]`` are free page ids)."""

    k_pages: torch.Tensor
    v_pages: torch.Tensor
    block_table: torch.Tensor
    seq_lens: torch.Tensor
    num_seen: torch.Tensor
    ring_slots: torch.Tensor
    ring_flags: torch.Tensor
    free_pages: torch.Tensor
    free_top: torch.Tensor

    @classmethod
    def empty(cls, num_seqs: int, head_dim: int, *, window: int, page_size: int, pages: int = 0,
              table_width: int = 0, dtype: torch.dtype = torch.float32, device=None,
              generator: torch.Generator | None = None) -> "PagedStore":
        """A store holding no token, with a pool of ``pages`` pages (all free) and room for
        ``table_width`` pages per sequence. ``generator`` shuffles the free list (tests use it
        so that page order matters); otherwise pages are popped in increasing id order."""
        for name, value, low in (("num_seqs", num_seqs, 0), ("head_dim", head_dim, 1), ("window", window, 0),
                                 ("page_size", page_size, 1), ("pages", pages, 0), ("table_width", table_width, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        i32 = dict(dtype=torch.int32, device=device)
        if generator is None:
            free = torch.arange(pages - 1, -1, -1, **i32)
        else:
            free = torch.randperm(pages, generator=generator).to(**i32)
        return cls(
            k_pages=pool_tensor((pages, page_size, head_dim), dtype, device).zero_(),
            v_pages=pool_tensor((pages, page_size, head_dim), dtype, device).zero_(),
            block_table=torch.full((num_seqs, table_width), -1, **i32),
            seq_lens=torch.zeros(num_seqs, **i32), num_seen=torch.zeros(num_seqs, **i32),
            ring_slots=torch.zeros(num_seqs, window + 1, **i32),
            ring_flags=torch.zeros(num_seqs, window + 1, dtype=torch.bool, device=device),
            free_pages=free, free_top=torch.tensor([pages], **i32))

    # -- shape -------------------------------------------------------------------------------
    @property
    def num_seqs(self) -> int:
        return self.block_table.shape[0]

    @property
    def page_size(self) -> int:
        return self.k_pages.shape[1]

    @property
    def head_dim(self) -> int:
        return self.k_pages.shape[2]

    @property
    def window(self) -> int:
        return self.ring_slots.shape[1] - 1

    @property
    def num_pages(self) -> int:
        return self.k_pages.shape[0]

    @property
    def table_width(self) -> int:
        return self.block_table.shape[1]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The nine tensors in schema order."""
        return tuple(getattr(self, f) for f in FIELDS)

    def clone(self) -> "PagedStore":
        return PagedStore(*(t.clone() for t in self.tensors()))

    def equal(self, other: "PagedStore") -> bool:
        return all(torch.equal(a, b) for a, b in zip(self.tensors(), other.tensors()))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    # -- the ops -------------------------------------------------------------------------------
    def append(self, k: torch.Tensor, v: torch.Tensor, decisions: torch.Tensor,
               valid: torch.Tensor | None = None, *, op=None) -> None:
        """``dms.append`` (or ``op`` with the same schema, e.g. dms.reference.append): k, v
        [S, T, D], decisions/valid bool [S, T]. All or nothing: a refused chunk writes nothing."""
        (op or ops.append)(self.k_pages, self.v_pages, self.block_table, self.seq_lens, self.num_seen,
                           self.ring_slots, self.ring_flags, self.free_pages, self.free_top, k.contiguous(),
                           v.contiguous(), decisions.contiguous(), None if valid is None else valid.contiguous())

    def decode_attention(self, q: torch.Tensor, scale: float) -> torch.Tensor:
        """q [S, G, D] attends every live slot of its sequence -> [S, G, D]. On CUDA with
        flash_attn installed (fp16/bf16, pages a multiple of 256 tokens) FlashAttention reads the
        pages through block_table; that branch cannot run on a CPU-only machine and is untested.
        Otherwise dms.paged_decode_attention (CPU and CUDA kernels)."""
        if (flash_attn_with_kvcache is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
                and self.page_size % _FLASH_PAGE_MULTIPLE == 0):
            out = flash_attn_with_kvcache(q[:, None], self.k_pages[:, :, None], self.v_pages[:, :, None],
                                          cache_seqlens=self.seq_lens, block_table=self.block_table,
                                          softmax_scale=scale, causal=False)
            return out[:, 0]
        return ops.paged_decode_attention(q.contiguous(), self.k_pages, self.v_pages, self.block_table,
                                          self.seq_lens, float(scale))

    def gather(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """Live slots packed by ``dms.gather_varlen``: (keys [N, D], values [N, D], cu_seqlens
        int32 [S + 1], max_seqlen)."""
        keys, cu, max_len = ops.gather_varlen(self.k_pages, self.block_table, self.seq_lens)
        values, _, _ = ops.gather_varlen(self.v_pages, self.block_table, self.seq_lens)
        return keys, values, cu, max_len

    def dense(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Live slots as padded (keys [S, L, D], values [S, L, D], live bool [S, L]), L the
        longest sequence; slots past a sequence's length are zeros (never stale memory, which may
        hold NaN that a mask cannot cancel in q.k or p.v). One host sync (L)."""
        keys, values, cu, L = self.gather()
        lens = self.seq_lens.long()
        j = torch.arange(L, device=keys.device)
        live = j[None, :] < lens[:, None]
        idx = (cu[:-1].long()[:, None] + j[None, :]).clamp_max(max(keys.shape[0] - 1, 0))
        return keys[idx].masked_fill_(~live[..., None], 0), values[idx].masked_fill_(~live[..., None], 0), live

    def ring_tokens(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The window's ring: (slot int64 [S, W1], token index int64 [S, W1] (-1 = no token yet),
        flagged bool [S, W1]). Ring column c holds token n - W1 + ((c - n) mod W1)."""
        W1 = self.window + 1
        n = self.num_seen.long()[:, None]
        col = torch.arange(W1, device=n.device)[None, :]
        index = n - W1 + (col - n) % W1
        index = index.masked_fill(index < 0, -1)
        return self.ring_slots.long(), index, self.ring_flags & (index >= 0)

    def take(self, seqs: torch.Tensor) -> "PagedStore":
        """A new store whose sequence ``i`` is a copy of sequence ``seqs[i]`` of this one (a
        sequence may be taken several times: forking). Every copy gets its own pages, so later
        appends to one never reach another; the ring, lengths and slot order are copied, so each
        copy attends and evicts exactly like its source. The pool holds just the copied pages,
        none free (the owner grows it as it appends)."""
        seqs = self._check_seqs(seqs)
        table = self.block_table[seqs]
        mapped = table >= 0
        old_ids = table[mapped].long()  # row-major: each copy's pages in its table order
        new_table = torch.full_like(table, -1)
        new_table[mapped] = torch.arange(old_ids.numel(), dtype=torch.int32, device=table.device)
        return PagedStore(
            k_pages=self.k_pages[old_ids], v_pages=self.v_pages[old_ids], block_table=new_table,
            seq_lens=self.seq_lens[seqs], num_seen=self.num_seen[seqs], ring_slots=self.ring_slots[seqs],
            ring_flags=self.ring_flags[seqs], free_pages=torch.zeros_like(old_ids, dtype=torch.int32),
            free_top=torch.zeros_like(self.free_top))

    def share(self, seqs: torch.Tensor) -> "PagedStore":
        """``take`` without copying: the new sequences reference their sources' pages, a page
        referenced by several sequences is shared (copy-on-write: call ``unshare`` before the
        next append). Pages no new sequence references go back on the free list."""
        seqs = self._check_seqs(seqs)
        table = self.block_table[seqs]
        used = torch.zeros(self.num_pages, dtype=torch.bool, device=table.device)
        used[table[table >= 0].long()] = True
        free = (~used).nonzero()[:, 0].flip(0).to(torch.int32)  # popped from the top: increasing ids
        free_pages = torch.zeros_like(self.free_pages)
        free_pages[: free.numel()] = free
        return PagedStore(
            k_pages=self.k_pages, v_pages=self.v_pages, block_table=table, seq_lens=self.seq_lens[seqs],
            num_seen=self.num_seen[seqs], ring_slots=self.ring_slots[seqs], ring_flags=self.ring_flags[seqs],
            free_pages=free_pages, free_top=self.free_top.new_tensor([free.numel()]))

    def references(self) -> torch.Tensor:
        """int64 [P]: how many block-table entries map each page."""
        return torch.bincount(self.block_table[self.block_table >= 0].long(), minlength=self.num_pages)

    def writable(self) -> torch.Tensor:
        """bool [S, table_width]: the pages the next appends (any number of tokens) may write.
        A new token takes slot ``seq_lens`` (a fresh page when that starts one) or the slot of a
        flagged token leaving the window, i.e. a slot of a token now in the ring; tokens of the
        chunk itself only land in such slots or new ones. So: the pages holding the ring's
        slots and the last page when partly filled. Every other page never changes again."""
        ps = self.page_size
        slot, index, _ = self.ring_tokens()
        mask = torch.zeros_like(self.block_table, dtype=torch.bool)
        rows = torch.arange(self.num_seqs, device=slot.device)
        in_ring = index >= 0
        mask[rows[:, None].expand_as(slot)[in_ring], (slot // ps)[in_ring]] = True
        lens = self.seq_lens.long()
        mid = lens % ps != 0
        mask[rows[mid], (lens // ps)[mid]] = True
        return mask & (self.block_table >= 0)

    def shared_writable(self) -> torch.Tensor:
        """bool [S, table_width]: writable entries whose page is shared (what ``unshare`` copies)."""
        refs = self.references()
        return self.writable() & (refs[self.block_table.clamp_min(0).long()] > 1)

    def unshare(self, entries: torch.Tensor) -> None:
        """Give each block-table entry of ``entries`` (bool [S, table_width], mapped) a private
        copy of its page, popped from the free list (the caller makes room: one free page per
        entry); pages no entry maps any more go back on the free list. One host sync."""
        n = int(entries.sum())
        top = int(self.free_top[0])
        if n > top:
            raise RuntimeError(f"unshare needs {n} free pages, the pool has {top}")
        if not n:
            return
        old = self.block_table[entries].long()
        new = self.free_pages[top - n: top].flip(0)  # the order the op pops them in
        self.k_pages[new.long()] = self.k_pages[old]
        self.v_pages[new.long()] = self.v_pages[old]
        self.block_table[entries] = new
        orphans = old.unique()
        orphans = orphans[self.references()[orphans] == 0].to(torch.int32)
        top -= n
        self.free_pages[top: top + orphans.numel()] = orphans
        self.free_top.fill_(top + orphans.numel())

    def held_slots(self) -> torch.Tensor:
        """float64 [S]: live slots of each sequence, a slot in a page shared by k sequences
        counting 1/k (the sum is the slots the pool really holds)."""
        ps = self.page_size
        cols = torch.arange(self.table_width, device=self.block_table.device)[None, :]
        live = (self.seq_lens.long()[:, None] - cols * ps).clamp(0, ps).double()
        mapped = self.block_table >= 0
        refs = self.references()[self.block_table.clamp_min(0).long()].clamp_min(1)
        return (live * mapped / refs).sum(1)

    def _check_seqs(self, seqs) -> torch.Tensor:
        if not isinstance(seqs, torch.Tensor) or seqs.dim() != 1 or seqs.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"seqs must be a 1D integer tensor, got {seqs!r}")
        seqs = seqs.to(device=self.block_table.device, dtype=torch.long)
        if seqs.numel() and (int(seqs.min()) < 0 or int(seqs.max()) >= self.num_seqs):
            raise ValueError(f"seqs must lie in [0, {self.num_seqs}), got {seqs.tolist()}")
        return seqs

    # -- growth --------------------------------------------------------------------------------
    def grow_table(self, width: int) -> None:
        """Room for ``width`` pages per sequence (never shrinks)."""
        if width > self.table_width:
            pad = self.block_table.new_full((self.num_seqs, width - self.table_width), -1)
            self.block_table = torch.cat([self.block_table, pad], dim=1)

    def grow_pool(self, pages: int) -> None:
        """A pool of ``pages`` pages (never shrinks). New pages are uninitialised: only live slots
        are ever read as they are. Reads ``free_top`` (one host sync)."""
        old = self.num_pages
        if pages <= old:
            return
        self.k_pages = _regrow(self.k_pages, pages)
        self.v_pages = _regrow(self.v_pages, pages)
        top = int(self.free_top[0])
        fresh = torch.arange(old, pages, dtype=torch.int32, device=self.free_pages.device)
        # New ids go below the existing free ones (the op pops from the top); the list keeps
        # length P, entries from free_top on are unused.
        unused = self.free_pages.new_zeros(old - top)
        self.free_pages = torch.cat([fresh, self.free_pages[:top], unused])
        self.free_top.fill_(top + pages - old)

    def snapshot(self) -> "PagedStore":
        """What ``restore`` needs to undo growth (which replaces tensors, and ``free_top`` in
        place) when the op then refuses the chunk, writing nothing."""
        return dataclasses.replace(self, free_top=self.free_top.clone())

    def restore(self, saved: "PagedStore") -> None:
        for f in FIELDS:
            if f != "free_top":
                setattr(self, f, getattr(saved, f))
        self.free_top.copy_(saved.free_top)

    # -- rewriting (eviction baselines) --------------------------------------------------------
    def slot_rows(self, seqs: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Row of (sequence, slot) in the pools flattened to [P * page_size, D]."""
        ps = self.page_size
        return self.block_table[seqs, slots // ps].long() * ps + slots % ps

    def move_slots(self, seqs: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy the keys and values of slot ``src`` to slot ``dst`` of sequence ``seqs`` (1D
        tensors of the same length; both slots must be mapped)."""
        flat_k = self.k_pages.view(-1, self.head_dim)
        flat_v = self.v_pages.view(-1, self.head_dim)
        src_row, dst_row = self.slot_rows(seqs, src), self.slot_rows(seqs, dst)
        flat_k[dst_row] = flat_k[src_row]
        flat_v[dst_row] = flat_v[src_row]

    def truncate(self, lens: torch.Tensor) -> None:
        """Keep slots ``0 .. lens[s]-1`` of each sequence; pages past them go back on the free list
        (append pops a fresh page whenever a new slot starts one, so a page left mapped there
        would leak). Only for a store whose ring cannot name a dropped slot (window 0, decisions
        0: the eviction baselines). One host sync (free_top)."""
        if lens.shape != self.seq_lens.shape:
            raise ValueError(f"lens must be [S] = [{self.num_seqs}], got {tuple(lens.shape)}")
        ps = self.page_size
        cols = torch.arange(self.table_width, device=self.block_table.device)[None, :]
        freed = (cols >= (lens.long()[:, None] + ps - 1) // ps) & (self.block_table >= 0)
        ids = self.block_table[freed]
        top = int(self.free_top[0])
        self.free_pages[top: top + ids.numel()] = ids
        self.free_top += ids.numel()
        self.block_table[freed] = -1
        self.seq_lens.copy_(lens.to(torch.int32))


# Transparent huge pages (Linux): the decode kernel reads the pool one page of 2-8 KiB at a
# time in table order, i.e. scattered, so with 4 KiB pages nearly every read of a store page
# walks the page table; 2 MiB pages remove those walks (BENCHMARKS.md, "Huge pages for the pool").
_HUGE_PAGE = 2 << 20
_MADV_DONTNEED, _MADV_HUGEPAGE = 4, 14


def _libc_madvise():
    if not sys.platform.startswith("linux"):
        return None
    madvise = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True).madvise
    madvise.argtypes, madvise.restype = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int), ctypes.c_int
    return madvise


_madvise = _libc_madvise()


def pool_tensor(shape: tuple, dtype: torch.dtype, device) -> torch.Tensor:
    """An uninitialised tensor for a page pool. On Linux and the CPU, the 2 MiB-aligned part of
    its memory is advised to transparent huge pages (MADV_HUGEPAGE: effective when
    /sys/kernel/mm/transparent_hugepage/enabled is ``always`` or ``madvise``, a no-op under
    ``never``) and then dropped (MADV_DONTNEED), so that the first write faults in 2 MiB pages
    even where the allocator handed out memory it had already used. Tensors under 2 MiB, other
    devices and other systems: plain ``torch.empty``."""
    t = torch.empty(shape, dtype=dtype, device=device)
    # Plain tensors only: a FakeTensor (tracing, torch.compile) has no memory and data_ptr() 0.
    if _madvise is not None and t.device.type == "cpu" and type(t) is torch.Tensor:
        start = t.data_ptr()
        lo = -(-start // _HUGE_PAGE) * _HUGE_PAGE
        hi = (start + t.nbytes) // _HUGE_PAGE * _HUGE_PAGE
        if hi > lo and _madvise(lo, hi - lo, _MADV_HUGEPAGE) == 0:  # refused: 4 KiB pages stay
            _madvise(lo, hi - lo, _MADV_DONTNEED)
    return t


def _regrow(pages: torch.Tensor, n: int) -> torch.Tensor:
    grown = pool_tensor((n, *pages.shape[1:]), pages.dtype, pages.device)
    grown[: pages.shape[0]] = pages
    return grown
