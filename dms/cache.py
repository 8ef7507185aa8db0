"""The DMS KV cache: a transformers ``Cache`` over the paged store of DESIGN.md §2.

One ``DMSLayer`` per decoder layer holds the paged store of ``S = batch * n_kv_heads``
independent sequences and is written only through ``torch.ops.dms.append`` (a token leaving
the window with its eviction flag set hands its slot to the newest token). Attention code
(``dms.attention``) reads it with ``paged_decode_attention`` or ``prefill_view``.

Page pool sizing avoids a device->host sync per step: the host keeps an upper bound on the
pages that may be in use (every appended token counted as if it took a new slot) and only
reads the true ``seq_lens`` back when that bound exceeds the pool; the pool then grows
geometrically, so copies are amortised.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from dms._ops import ops

# Growth factor of the page pool and the block table when the bound says they may overflow
# (small: the pool is what DMS saves; geometric, so copies stay amortised).
_GROWTH = 1.0625
# After a sync the pool keeps room for this many more tokens per sequence, so that the next
# sync is at least this many decode steps away even when nothing new is retained.
_HEADROOM_TOKENS = 32
# A long append (prefill) is fed in pieces of this many tokens: the bound then asks for room
# for one piece per sequence, not for the whole prompt, so peak memory follows the retained
# set. Feeding token by token is what the op does anyway, so the result is identical.
_APPEND_PIECE = 64


# free_top after a CUDA append that found the store corrupt (csrc/torch_bindings.cpp).
_CUDA_CORRUPT_STATE = -(2**31)


class DMSCacheFullError(RuntimeError):
    """The page pool would exceed the user-set ``max_pages`` cap."""


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass
class PrefillView:
    """Live slots of every sequence as padded dense tensors, for a prefill chunk on top of
    an existing cache. ``last_query[s, j]`` is the last valid-token index allowed to see slot
    ``j`` (``k + window`` once flagged, ``int64 max`` otherwise; -1 past ``seq_lens``).
    The newest token's flag is not known yet: ``newest_slot``/``newest_index`` locate it so the
    caller sets it from the chunk's first valid decision."""

    keys: torch.Tensor  # [S, L, D]
    values: torch.Tensor  # [S, L, D]
    last_query: torch.Tensor  # int64 [S, L]
    newest_slot: torch.Tensor  # int64 [S], -1 for an empty sequence
    num_seen: torch.Tensor  # int64 [S]


class DMSLayer(CacheLayerMixin):
    """Paged DMS store of one decoder layer (tensor names follow csrc/torch_bindings.cpp)."""

    is_sliding = False
    is_croppable = False
    is_compileable = False
    supports_early_init = False

    def __init__(self, window: int, page_size: int = 16, max_pages: int | None = None):
        super().__init__()
        if not _is_int(window) or window < 0:
            raise ValueError(f"window must be an int >= 0, got {window!r}")
        if not _is_int(page_size) or page_size < 1:
            raise ValueError(f"page_size must be an int >= 1, got {page_size!r}")
        if max_pages is not None and (not _is_int(max_pages) or max_pages < 1):
            raise ValueError(f"max_pages must be None or an int >= 1, got {max_pages!r}")
        self.window = window
        self.page_size = page_size
        self.max_pages = max_pages
        self.columns = 0  # positions fed so far, pads included (what generate calls seq length)
        # Set (to the reason) when this layer no longer matches the other layers of its cache.
        self.unusable: str | None = None
        self.on_refused = None  # called by a refused append; DMSCache uses it to check the layers

    # -- allocation --------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """``key_states`` [S, T, D] of the first append fixes S, D, dtype and device."""
        S, _, D = key_states.shape
        dev, dt = key_states.device, key_states.dtype
        self.dtype, self.device, self.num_seqs, self.head_dim = dt, dev, S, D
        self.k_pages = torch.empty(0, self.page_size, D, dtype=dt, device=dev)
        self.v_pages = torch.empty(0, self.page_size, D, dtype=dt, device=dev)
        self.block_table = torch.full((S, 0), -1, dtype=torch.int32, device=dev)
        self.seq_lens = torch.zeros(S, dtype=torch.int32, device=dev)
        self.num_seen = torch.zeros(S, dtype=torch.int32, device=dev)
        self.ring_slots = torch.zeros(S, self.window + 1, dtype=torch.int32, device=dev)
        self.ring_flags = torch.zeros(S, self.window + 1, dtype=torch.bool, device=dev)
        self.free_pages = torch.empty(0, dtype=torch.int32, device=dev)
        self.free_top = torch.zeros(1, dtype=torch.int32, device=dev)
        # Host-side bound: true lengths at the last sync + tokens appended since.
        self._synced_lens = [0] * S
        self._tokens_since_sync = 0
        self.syncs = 0
        self.is_initialized = True

    def _bound(self, extra: int) -> tuple[int, int]:
        """(pages, pages of the longest sequence) that may be in use after ``extra`` more tokens."""
        ps, t = self.page_size, self._tokens_since_sync + extra
        per_seq = [math.ceil((n + t) / ps) for n in self._synced_lens]
        return sum(per_seq), max(per_seq, default=0)

    def _reserve(self, new_tokens: int) -> None:
        total, longest = self._bound(new_tokens)
        if total <= self.k_pages.shape[0] and longest <= self.block_table.shape[1]:
            return
        self._synced_lens = self.seq_lens.tolist()  # the one host sync, only when the bound says so
        self.syncs += 1
        self._tokens_since_sync = 0
        total, longest = self._bound(new_tokens)
        room = math.ceil(_HEADROOM_TOKENS / self.page_size)
        if total + self.num_seqs * room > self.k_pages.shape[0]:
            self._grow_pool(total, total + self.num_seqs * room)
        if longest + room > self.block_table.shape[1]:
            self._grow_table(max(longest + room, math.ceil(self.block_table.shape[1] * _GROWTH)))

    def _grow_table(self, cols: int) -> None:
        if cols > self.block_table.shape[1]:
            pad = self.block_table.new_full((self.num_seqs, cols - self.block_table.shape[1]), -1)
            self.block_table = torch.cat([self.block_table, pad], dim=1)

    def _grow_pool(self, needed: int, wanted: int) -> None:
        old = self.k_pages.shape[0]
        new = max(wanted, math.ceil(old * _GROWTH))
        if new <= old:
            return
        if self.max_pages is not None:
            if needed > self.max_pages:
                raise DMSCacheFullError(
                    f"DMSCache: a layer needs {needed} pages of {self.page_size} tokens but max_pages="
                    f"{self.max_pages}; raise max_pages or use a higher compression")
            new = min(new, self.max_pages)
        self.k_pages = self._regrow(self.k_pages, new)
        self.v_pages = self._regrow(self.v_pages, new)
        top = int(self.free_top[0])
        fresh = torch.arange(old, new, dtype=torch.int32, device=self.device)
        # New ids go below the existing free ones (the op pops from the top); the list keeps
        # length P, entries from free_top on are unused.
        unused = self.free_pages.new_zeros(new - (new - old) - top)
        self.free_pages = torch.cat([fresh, self.free_pages[:top], unused])
        self.free_top.fill_(top + new - old)

    @staticmethod
    def _regrow(pages: torch.Tensor, n: int) -> torch.Tensor:
        grown = pages.new_empty((n, *pages.shape[1:]))  # only live slots are ever read as they are
        grown[: pages.shape[0]] = pages
        return grown

    # -- writing -------------------------------------------------------------------------
    def append(self, keys: torch.Tensor, values: torch.Tensor, decisions: torch.Tensor,
               valid: torch.Tensor | None) -> None:
        """keys/values [S, T, D] post-RoPE, decisions bool [S, T] (1 = evict the previous token),
        valid bool [S, T] or None (pads are never stored).

        All or nothing: if it raises (bad input, ``max_pages`` reached) the layer is unchanged."""
        if self.unusable:
            raise RuntimeError(self.unusable)
        try:
            self._check_chunk(keys, values, decisions, valid)
            if not self.is_initialized:
                self.lazy_initialization(keys, values)
            T = keys.shape[1]
            if self.max_pages is not None and self._bound(T)[0] > self.max_pages:
                self._append_at_cap(keys, values, decisions, valid)
            else:
                # The worst case fits (or there is no cap): no piece can be refused.
                for a in range(0, T, _APPEND_PIECE):
                    b = min(a + _APPEND_PIECE, T)
                    self._reserve(b - a)
                    self._op_append(keys[:, a:b], values[:, a:b], decisions[:, a:b],
                                    None if valid is None else valid[:, a:b])
                    self._tokens_since_sync += b - a
        except Exception:
            if self.on_refused is not None:
                self.on_refused()
            raise
        self.columns += T

    def _op_append(self, keys, values, decisions, valid) -> None:
        ops.append(self.k_pages, self.v_pages, self.block_table, self.seq_lens, self.num_seen,
                   self.ring_slots, self.ring_flags, self.free_pages, self.free_top,
                   keys.contiguous(), values.contiguous(), decisions.contiguous(),
                   None if valid is None else valid.contiguous())

    def _append_at_cap(self, keys, values, decisions, valid) -> None:
        """The worst case (every token a new slot) would pass ``max_pages``; evictions may still
        make room. Grow up to the cap and hand the whole chunk to one op call, which takes all of
        it or nothing (fed in pieces, an early piece could be stored before a later one is
        refused)."""
        self._synced_lens = self.seq_lens.tolist()
        self.syncs += 1
        self._tokens_since_sync = 0
        total, longest = self._bound(keys.shape[1])
        room = math.ceil(_HEADROOM_TOKENS / self.page_size)
        in_use = sum(math.ceil(n / self.page_size) for n in self._synced_lens)
        # Growth replaces these tensors (free_top in place): a refused chunk restores them, so the
        # layer is exactly as before.
        saved = (self.k_pages, self.v_pages, self.block_table, self.free_pages, self.free_top.clone())
        self._grow_pool(in_use, total + self.num_seqs * room)
        self._grow_table(min(longest + room, self.max_pages))
        try:
            self._op_append(keys, values, decisions, valid)
            top = int(self.free_top[0])
            if top == _CUDA_CORRUPT_STATE:
                self.k_pages, self.v_pages, self.block_table, self.free_pages = saved[:4]
                self.free_top.copy_(saved[4])
                raise RuntimeError(
                    "dms.append refused this layer's store as corrupt (an index tensor out of range) and "
                    "wrote nothing; its contents cannot be trusted: start a new DMSCache")
            if top < 0:  # CUDA cannot raise: it leaves the state, sets -(pages needed)
                raise RuntimeError(f"page pool exhausted: need {-top} pages")
        except RuntimeError as e:
            if "page pool exhausted" not in str(e) and "block_table has room" not in str(e):
                raise
            self.k_pages, self.v_pages, self.block_table, self.free_pages = saved[:4]
            self.free_top.copy_(saved[4])
            raise self._full_error(str(e)) from e
        self._tokens_since_sync += keys.shape[1]

    def _full_error(self, detail: str) -> DMSCacheFullError:
        """``detail``: the op's refusal, "... need N pages ..." = pages the chunk adds."""
        need = re.search(r"need (\d+) pages", detail)
        in_use = sum(math.ceil(n / self.page_size) for n in self._synced_lens)
        total = f"{in_use + int(need.group(1))} pages" if need else "more pages"
        return DMSCacheFullError(
            f"DMSCache: a layer needs {total} of {self.page_size} tokens but max_pages={self.max_pages} "
            f"({detail}); nothing was stored: raise max_pages or use a higher compression")

    def _check_chunk(self, keys, values, decisions, valid) -> None:
        """Shapes, dtypes and devices of a chunk, checked before anything is written (no host sync)."""
        if not isinstance(keys, torch.Tensor) or keys.dim() != 3:
            raise ValueError(f"keys must be a tensor [S, T, D], got {_describe(keys)}")
        if not keys.is_floating_point():
            raise ValueError(f"keys must be a floating-point tensor, got {keys.dtype}")
        S, T, D = keys.shape
        if T < 1:
            raise ValueError(f"keys must hold at least one token (T >= 1), got shape {tuple(keys.shape)}")
        if not isinstance(values, torch.Tensor) or values.shape != keys.shape or values.dtype != keys.dtype \
                or values.device != keys.device:
            raise ValueError(f"values must be {keys.dtype} {tuple(keys.shape)} on {keys.device} like keys, got "
                             f"{_describe(values)}")
        for name, t in (("decisions", decisions), ("valid", valid)):
            if name == "valid" and t is None:
                continue
            if not isinstance(t, torch.Tensor) or t.dtype != torch.bool or t.shape != (S, T) or t.device != keys.device:
                raise ValueError(f"{name} must be bool [S, T] = {(S, T)} on {keys.device}, got {_describe(t)}")
        if self.is_initialized:
            if S != self.num_seqs:
                raise ValueError(f"DMSCache holds {self.num_seqs} sequences (batch * kv heads); got {S}")
            if (D, keys.dtype, keys.device) != (self.head_dim, self.dtype, self.device):
                raise ValueError(f"keys must be {self.dtype} with head_dim {self.head_dim} on {self.device} like "
                                 f"the cache, got {keys.dtype} with head_dim {D} on {keys.device}")

    def update(self, key_states, value_states, *args, **kwargs):
        raise NotImplementedError(
            "DMSLayer is written with append(keys, values, decisions, valid): eviction needs the "
            "decisions, which the plain Cache.update(key, value) call does not carry; use a DMS model "
            "(dms.apply / dms.from_pretrained) with this cache")

    # -- reading -------------------------------------------------------------------------
    def decode_attention(self, q: torch.Tensor, scale: float) -> torch.Tensor:
        """q [S, G, D] attends every live slot of its sequence -> [S, G, D]."""
        if self.unusable:
            raise RuntimeError(self.unusable)
        return ops.paged_decode_attention(q.contiguous(), self.k_pages, self.v_pages, self.block_table,
                                          self.seq_lens, float(scale))

    def prefill_view(self) -> PrefillView:
        if self.unusable:
            raise RuntimeError(self.unusable)
        S = self.num_seqs
        lens = self.seq_lens.long()
        L = int(lens.max()) if S else 0
        ps = self.page_size
        slot = torch.arange(L, device=self.device)
        live = slot[None, :] < lens[:, None]
        page = self.block_table[:, slot // ps].long().clamp_min(0) if L else self.block_table[:, :0].long()
        # Slots past a sequence's length hold stale or uninitialised memory (possibly NaN, which
        # a mask cannot cancel in q.k or p.v): zero them.
        keys = self.k_pages[page, slot % ps].masked_fill_(~live[..., None], 0)  # [S, L, D]
        values = self.v_pages[page, slot % ps].masked_fill_(~live[..., None], 0)
        big = torch.iinfo(torch.int64).max
        last = torch.full((S, L), big, dtype=torch.int64, device=self.device)
        last.masked_fill_(~live, -1)
        # Ring column c holds the token with index n - W1 + ((c - n) mod W1).
        W1 = self.window + 1
        n = self.num_seen.long()[:, None]
        col = torch.arange(W1, device=self.device)[None, :]
        idx = n - W1 + (col - n) % W1
        in_ring = idx >= 0
        flagged = self.ring_flags & in_ring
        rows = torch.arange(S, device=self.device)[:, None].expand(S, W1)
        ring_slot = self.ring_slots.long()
        if L:
            last[rows[flagged], ring_slot[flagged]] = idx[flagged] + self.window
        newest_col = (n.squeeze(1) - 1) % W1
        newest = ring_slot[torch.arange(S, device=self.device), newest_col]
        newest = torch.where(n.squeeze(1) > 0, newest, torch.full_like(newest, -1))
        return PrefillView(keys, values, last, newest, n.squeeze(1))

    # -- bookkeeping -----------------------------------------------------------------------
    def get_seq_length(self) -> int:
        return self.columns

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.columns + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.is_initialized = False
        self.columns = 0
        self.unusable = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("DMSCache does not support beam search (pages are per sequence, not per beam)")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("DMSCache cannot be cropped (evicted tokens are gone), so assisted decoding "
                                  "is not supported")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("DMSCache cannot repeat batch rows of a filled cache (contrastive search)")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("DMSCache cannot select batch rows of a filled cache")

    def stats(self) -> dict:
        if not self.is_initialized:
            return dict(seen=torch.zeros(0), retained=torch.zeros(0), bytes=0)
        elem = self.k_pages.element_size()
        pool = 2 * self.k_pages.numel() * elem
        meta = sum(t.numel() * t.element_size() for t in (
            self.block_table, self.seq_lens, self.num_seen, self.ring_slots, self.ring_flags,
            self.free_pages, self.free_top))
        return dict(seen=self.num_seen.cpu(), retained=self.seq_lens.cpu(), bytes=pool + meta,
                    retained_bytes=2 * int(self.seq_lens.sum()) * self.head_dim * elem)


class DMSCache(Cache):
    """KV cache of a DMS model: pass it to ``generate`` as ``cache=`` (transformers >= 5.24) or
    ``past_key_values=`` (DMS models made by ``dms.apply``/``dms.from_pretrained`` use one by
    default in infer mode).

    ``page_size`` tokens per page; ``max_pages`` caps the pool of each layer (None = grow as
    needed); ``prefill_chunk`` bounds the queries attended at once during prefill."""

    def __init__(self, model=None, *, window: int | None = None, num_layers: int | None = None,
                 page_size: int = 16, max_pages: int | None = None, prefill_chunk: int = 512):
        if model is not None:
            config = model.config
            if window is None and getattr(config, "dms_window_size", None) is None:
                raise ValueError(f"{type(model).__name__} is not a DMS model (no dms_window_size in its config); "
                                 "use dms.apply or dms.from_pretrained first")
            window = config.dms_window_size if window is None else window
            num_layers = config.num_hidden_layers if num_layers is None else num_layers
        if window is None or num_layers is None:
            raise ValueError("DMSCache needs a DMS model, or both window= and num_layers=")
        if not _is_int(num_layers) or num_layers < 1:
            raise ValueError(f"num_layers must be an int >= 1, got {num_layers!r}")
        if not _is_int(prefill_chunk) or prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be an int >= 1, got {prefill_chunk!r}")
        super().__init__(layers=[DMSLayer(window, page_size, max_pages) for _ in range(num_layers)])
        for layer in self.layers:
            layer.on_refused = self._check_layers_agree
        self.window = window
        self.prefill_chunk = prefill_chunk

    def _check_layers_agree(self) -> None:
        """After a refused append: a model forward feeds the layers one after the other, so if a
        later layer refused a chunk that earlier layers stored, the layers no longer hold the same
        tokens and every further use must fail (the refusing layer itself is unchanged)."""
        columns = [layer.columns for layer in self.layers]
        if len(set(columns)) > 1:
            reason = (f"this DMSCache is unusable: an append was refused after some layers had stored the "
                      f"chunk (positions per layer: {columns}); start a new DMSCache")
            for layer in self.layers:
                layer.unusable = reason

    def stats(self) -> dict:
        """Compression ratio (tokens seen / tokens retained, each summed over layer, batch row and
        KV head: the ratio the memory sees; a mean of per-head ratios would let a few heads that
        keep almost nothing overstate it),
        retained tokens per layer [B*H_kv], and bytes held (pool + index tensors)."""
        per = [layer.stats() for layer in self.layers if layer.is_initialized]
        if not per:
            return dict(compression_ratio=1.0, retained_per_layer=[], seen=0, retained=0,
                        bytes=0, retained_bytes=0)
        seen = torch.stack([p["seen"] for p in per]).double()
        kept = torch.stack([p["retained"] for p in per]).double()
        ok = kept > 0
        ratio = float(seen[ok].sum() / kept[ok].sum()) if ok.any() else 1.0
        return dict(
            compression_ratio=ratio,
            retained_per_layer=[p["retained"] for p in per],
            seen=int(seen.sum()), retained=int(kept.sum()),
            bytes=sum(p["bytes"] for p in per),
            retained_bytes=sum(p["retained_bytes"] for p in per),
        )

    def compression_ratio(self) -> float:
        return self.stats()["compression_ratio"]

    def nbytes(self) -> int:
        return self.stats()["bytes"]


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} {tuple(x.shape)} on {x.device}"
    return type(x).__name__
