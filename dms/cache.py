"""The DMS KV cache: a transformers ``Cache`` over the paged store of docs/design.md §2.

``AttentionCache`` is the interface a DMS attention layer talks to: the layer projects q, k, v
and the eviction decisions, and the cache stores what it keeps and runs the attention
(``attend``). ``DMSCache`` implements it with one ``DMSLayer`` per decoder layer, each owning a
``dms.store.PagedStore`` of ``S = batch * n_kv_heads`` independent sequences, written only
through ``dms.append`` (a token leaving the window with its eviction flag set hands its slot to
the newest token). The eviction baselines (``dms.baselines.PolicyCache``) implement it too.

Page pool sizing avoids a device->host sync per step: the host keeps an upper bound on the
pages that may be in use (every appended token counted as if it took a new slot) and only
reads the true ``seq_lens`` back when that bound exceeds the pool; the pool then grows
geometrically, so copies are amortised.
"""
from __future__ import annotations

import abc
import math
import re
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from dms.attention.infer import prefill_attention
from dms.store import PagedStore

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


class AttentionCache(Cache, abc.ABC):
    """A cache that runs attention itself: the DMS attention layer hands it the projected,
    post-RoPE q, k, v of each forward. Implemented by ``DMSCache`` and
    ``dms.baselines.PolicyCache``; any other cache object is either a plain transformers
    ``Cache`` (mode "off" only) or refused."""

    @abc.abstractmethod
    def check_model(self, mode: str, window: int) -> None:
        """Raise (ValueError) unless this cache can serve a DMS model in ``mode`` whose
        ``dms_window_size`` is ``window``."""

    @abc.abstractmethod
    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               decisions: torch.Tensor | None, padding: torch.Tensor | None, scale: float) -> torch.Tensor:
        """q [B, Hq, T, D], k/v [B, H_kv, T, D] post-RoPE, decisions bool [B, H_kv, T] (1 = evict
        the previous token; None in mode "off"), padding bool [B, T] (True = real token) or None
        -> attention output [B, Hq, T, D] (zeros at pad queries)."""


def sequences(q, k, v, decisions, padding):
    """[B, H, T, ...] -> one row per (batch row, KV head): q [S, G, T, D], k/v [S, T, D],
    decisions/valid bool [S, T] (valid None without padding, decisions zeros when None)."""
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    S = B * Hkv
    ds = (torch.zeros(S, T, dtype=torch.bool, device=q.device) if decisions is None
          else decisions.reshape(S, T))
    valid = None if padding is None else padding[:, None, :].expand(B, Hkv, T).reshape(S, T)
    return q.reshape(S, Hq // Hkv, T, D), k.reshape(S, T, D), v.reshape(S, T, D), ds, valid


@dataclass
class PrefillView:
    """Live slots of every sequence as padded dense tensors, for a prefill chunk on top of an
    existing cache. ``token_index[s, j]`` is the index (among the tokens seen) of the token in
    slot ``j`` while it is in the window's ring, -1 once it left it (kept for good);
    ``flagged`` marks ring tokens whose eviction flag is set. The newest token's flag is not
    known yet: ``newest_slot`` locates it (-1 for an empty sequence) so the caller sets it
    from the chunk's first valid decision."""

    keys: torch.Tensor  # [S, L, D]
    values: torch.Tensor  # [S, L, D]
    live: torch.Tensor  # bool [S, L]
    token_index: torch.Tensor  # int64 [S, L]
    flagged: torch.Tensor  # bool [S, L]
    newest_slot: torch.Tensor  # int64 [S]
    num_seen: torch.Tensor  # int64 [S]


class DMSLayer(CacheLayerMixin):
    """Paged DMS store of one decoder layer (``self.store``, a dms.store.PagedStore)."""

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
        self.dtype, self.device, self.num_seqs, self.head_dim = key_states.dtype, key_states.device, S, D
        self.store = PagedStore.empty(S, D, window=self.window, page_size=self.page_size,
                                      dtype=key_states.dtype, device=key_states.device)
        self._sync([0] * S)
        self.syncs = 0
        self._shares_pages = False  # some page is mapped by several sequences (a fork)
        self._must_unshare = False  # ... and may be written by the next append
        self.is_initialized = True

    def _sync(self, lens: list[int]) -> None:
        """Host-side bound: true lengths at the last sync + tokens appended since."""
        ps = self.page_size
        self._synced_lens = lens
        self._synced_pages = sum(math.ceil(n / ps) for n in lens)
        self._synced_longest = max(lens, default=0)
        self._tokens_since_sync = 0

    def _read_lens(self) -> None:
        self._sync(self.store.seq_lens.tolist())  # the one host sync
        if self._shares_pages:  # pages in use are fewer than the lengths say
            self._synced_pages = self.store.num_pages - int(self.store.free_top[0])
        self.syncs += 1

    def _bound(self, extra: int, exact: bool = False) -> tuple[int, int]:
        """(pages, pages of the longest sequence) that may be in use after ``extra`` more tokens."""
        ps, t = self.page_size, self._tokens_since_sync + extra
        longest = math.ceil((self._synced_longest + t) / ps)
        # ceil((n + t) / ps) <= ceil(n / ps) + ceil(t / ps): an O(1) bound that is usually enough;
        # the exact sum (O(S) on the host) only when it is not.
        loose = self._synced_pages + len(self._synced_lens) * math.ceil(t / ps)
        if not exact and loose <= self.store.num_pages:
            return loose, longest
        return self._synced_pages + sum(math.ceil((n + t) / ps) - math.ceil(n / ps) for n in self._synced_lens), longest

    def _reserve(self, new_tokens: int) -> None:
        total, longest = self._bound(new_tokens)
        if total <= self.store.num_pages and longest <= self.store.table_width:
            return
        self._read_lens()
        total, longest = self._bound(new_tokens, exact=True)
        room = math.ceil(_HEADROOM_TOKENS / self.page_size)
        if total + self.num_seqs * room > self.store.num_pages:
            self._grow_pool(total, total + self.num_seqs * room)
        if longest + room > self.store.table_width:
            self.store.grow_table(max(longest + room, math.ceil(self.store.table_width * _GROWTH)))

    def _grow_pool(self, needed: int, wanted: int) -> None:
        new = max(wanted, math.ceil(self.store.num_pages * _GROWTH))
        if self.max_pages is not None:
            if needed > self.max_pages:
                raise DMSCacheFullError(
                    f"DMSCache: a layer needs {needed} pages of {self.page_size} tokens but max_pages="
                    f"{self.max_pages}; raise max_pages or use a higher compression")
            new = min(new, self.max_pages)
        self.store.grow_pool(new)

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
            if self._must_unshare:
                self._unshare()
            T = keys.shape[1]
            if self.max_pages is not None and self._bound(T)[0] > self.max_pages:
                self._append_at_cap(keys, values, decisions, valid)
            elif T == 1:  # a decode step
                self._reserve(1)
                self.store.append(keys, values, decisions, valid)
                self._tokens_since_sync += 1
            else:
                # The worst case fits (or there is no cap): no piece can be refused.
                for a in range(0, T, _APPEND_PIECE):
                    b = min(a + _APPEND_PIECE, T)
                    self._reserve(b - a)
                    self.store.append(keys[:, a:b], values[:, a:b], decisions[:, a:b],
                                      None if valid is None else valid[:, a:b])
                    self._tokens_since_sync += b - a
        except Exception:
            if self.on_refused is not None:
                self.on_refused()
            raise
        self.columns += T

    def _append_at_cap(self, keys, values, decisions, valid) -> None:
        """The worst case (every token a new slot) would pass ``max_pages``; evictions may still
        make room. Grow up to the cap and hand the whole chunk to one op call, which takes all of
        it or nothing (fed in pieces, an early piece could be stored before a later one is
        refused)."""
        self._read_lens()
        total, longest = self._bound(keys.shape[1], exact=True)
        room = math.ceil(_HEADROOM_TOKENS / self.page_size)
        # Growth replaces tensors: a refused chunk restores them, so the layer is exactly as before.
        saved = self.store.snapshot()
        self._grow_pool(self._synced_pages, total + self.num_seqs * room)
        self.store.grow_table(min(longest + room, self.max_pages))
        try:
            self.store.append(keys, values, decisions, valid)
            top = int(self.store.free_top[0])
            if top == _CUDA_CORRUPT_STATE:
                self.store.restore(saved)
                raise RuntimeError(
                    "dms.append refused this layer's store as corrupt (an index tensor out of range) and "
                    "wrote nothing; its contents cannot be trusted: start a new DMSCache")
            if top < 0:  # CUDA cannot raise: it leaves the state, sets -(pages needed)
                raise RuntimeError(f"page pool exhausted: need {-top} pages")
        except RuntimeError as e:
            if "page pool exhausted" not in str(e) and "block_table has room" not in str(e):
                raise
            self.store.restore(saved)
            raise self._full_error(str(e)) from e
        self._tokens_since_sync += keys.shape[1]

    def _full_error(self, detail: str) -> DMSCacheFullError:
        """``detail``: the op's refusal, "... need N pages ..." = pages the chunk adds."""
        need = re.search(r"need (\d+) pages", detail)
        total = f"{self._synced_pages + int(need.group(1))} pages" if need else "more pages"
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

    # -- attention -----------------------------------------------------------------------
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decisions: torch.Tensor,
               valid: torch.Tensor | None, scale: float, prefill_chunk: int) -> torch.Tensor:
        """One forward: q [S, G, T, D], k/v [S, T, D], decisions/valid bool [S, T] -> [S, G, T, D].
        A decode step appends its token, then attends the paged store; a prefill chunk attends
        the cached slots and itself (``prefill_chunk`` queries at a time), then is appended."""
        if q.shape[2] == 1 and self.is_initialized:
            self.append(k, v, decisions, valid)  # refuses an unusable layer
            return self.store.decode_attention(q[:, :, 0], scale)[:, :, None]
        view = self.prefill_view() if self.is_initialized else None
        ok = valid if valid is not None else torch.ones_like(decisions)
        out = prefill_attention(q, k, v, decisions, ok, view, self.window, scale, prefill_chunk)
        self.append(k, v, decisions, valid)
        return out

    def decode_attention(self, q: torch.Tensor, scale: float) -> torch.Tensor:
        """q [S, G, D] attends every live slot of its sequence -> [S, G, D]."""
        if self.unusable:
            raise RuntimeError(self.unusable)
        return self.store.decode_attention(q, scale)

    def prefill_view(self) -> PrefillView:
        if self.unusable:
            raise RuntimeError(self.unusable)
        keys, values, live = self.store.dense()
        slot, index, flagged = self.store.ring_tokens()
        S, L = live.shape
        token_index = torch.full((S, L), -1, dtype=torch.int64, device=self.device)
        flag = torch.zeros(S, L, dtype=torch.bool, device=self.device)
        in_ring = index >= 0
        if L:
            rows = torch.arange(S, device=self.device)[:, None].expand_as(slot)
            token_index[rows[in_ring], slot[in_ring]] = index[in_ring]
            flag[rows[in_ring], slot[in_ring]] = flagged[in_ring]
        n = self.store.num_seen.long()
        newest = slot[torch.arange(S, device=self.device), (n - 1) % (self.window + 1)]
        newest = torch.where(n > 0, newest, torch.full_like(newest, -1))
        return PrefillView(keys, values, live, token_index, flag, newest, n)

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

    def take(self, seqs: torch.Tensor, share: bool = True) -> None:
        """Keep sequences ``seqs`` (in that order, repeats allowed): the forked sequences
        continue exactly as their sources would. ``share``: they share their pages copy-on-write
        (PagedStore.share; the next append first copies the shared pages it may write, after which
        no append can reach a shared page: PagedStore.writable); else each gets copies."""
        if self.unusable:
            raise RuntimeError(self.unusable)
        if not self.is_initialized:
            return
        self.store = self.store.share(seqs) if share else self.store.take(seqs)
        self.num_seqs = self.store.num_seqs
        self._shares_pages = self._must_unshare = share
        self._read_lens()

    def _unshare(self) -> None:
        entries = self.store.shared_writable()
        need = int(entries.sum()) - int(self.store.free_top[0])
        if need > 0:
            self._read_lens()
            self._grow_pool(self._synced_pages + int(entries.sum()), self.store.num_pages + need)
        self.store.unshare(entries)
        self._must_unshare = False
        self._read_lens()

    def stats(self) -> dict:
        if not self.is_initialized:
            return dict(seen=torch.zeros(0), retained=torch.zeros(0), bytes=0)
        st = self.store
        elem = st.k_pages.element_size()
        return dict(seen=st.num_seen.cpu(), retained=st.seq_lens.cpu(), bytes=st.nbytes(),
                    retained_bytes=2 * int(st.seq_lens.sum()) * self.head_dim * elem)


class DMSCache(AttentionCache):
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

    def check_model(self, mode: str, window: int) -> None:
        if mode not in ("infer", "off"):
            raise ValueError("DMS train mode runs without a KV cache: call the model with use_cache=False")
        if self.window != window:
            raise ValueError(f"this DMSCache was built for window {self.window}, the model uses "
                             f"dms_window_size={window}; create it with DMSCache(model)")

    def attend(self, layer_idx, q, k, v, decisions, padding, scale):
        B, Hq, T, D = q.shape
        self.kv_heads = k.shape[1]
        qs, ks, vs, ds, valid = sequences(q, k, v, decisions, padding)
        out = self.layers[layer_idx].attend(qs, ks, vs, ds, valid, scale, self.prefill_chunk)
        return out.reshape(B, Hq, T, D)

    # -- forking (sampling several chains from one prefill) ------------------------------------
    def fork(self, chains: int, share: bool = True) -> "DMSCache":
        """Each batch row becomes ``chains`` consecutive rows (row b -> rows b*chains ..
        b*chains + chains - 1), each continuing b's cache on its own, as
        ``input_ids.repeat_interleave(chains, 0)`` lays out the prompts. In place; returns self.

        ``share``: the chains share the prompt's pages copy-on-write. A write lands either in
        slot ``seq_lens`` or in the slot of a flagged token leaving the window, so only the
        pages holding the window's slots and the last partial page can be written: the next
        append copies those per chain, the rest (pages of tokens kept for good) stays shared for
        the cache's life. ``share=False`` copies every page per chain."""
        if not _is_int(chains) or chains < 1:
            raise ValueError(f"chains must be an int >= 1, got {chains!r}")
        rows = torch.arange(self._batch_size(), device=self._device()).repeat_interleave(chains)
        return self.select(rows, share)

    def select(self, indices, share: bool = True) -> "DMSCache":
        """Keep batch rows ``indices`` (a 1D integer tensor or list, in that order; a row may
        appear several times, each then continues on its own; ``share`` as in ``fork``). In
        place; returns self."""
        B = self._batch_size()
        idx = torch.as_tensor(indices, device=self._device())
        if idx.dim() != 1 or idx.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"indices must be a 1D sequence of ints (batch rows), got {indices!r}")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= B):
            raise ValueError(f"indices must be batch rows in [0, {B}), got {idx.tolist()}")
        if B:
            H = self.kv_heads
            seqs = (idx.long()[:, None] * H + torch.arange(H, device=idx.device)).reshape(-1)
            for layer in self.layers:
                layer.take(seqs, share)
        return self

    def batch_repeat_interleave(self, repeats: int) -> None:
        """transformers' name for ``fork``."""
        self.fork(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """transformers' name for ``select``."""
        self.select(indices)

    def _batch_size(self) -> int:
        """Batch rows held (0 before the first forward)."""
        first = self.layers[0]
        if not first.is_initialized:
            return 0
        for layer in self.layers:
            if layer.unusable:
                raise RuntimeError(layer.unusable)
        return first.num_seqs // self.kv_heads

    def _device(self):
        first = self.layers[0]
        return first.device if first.is_initialized else None

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
