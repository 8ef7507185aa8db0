"""A KV cache that evicts with a fixed policy (StreamingLLM, H2O, TOVA) at a token budget per
KV head, on the paged store of the DMS cache (docs/design.md §2).

``PolicyLayer`` subclasses ``dms.cache.DMSLayer``: tokens are written by the same
``torch.ops.dms.append`` (decisions all 0, so nothing is evicted by the op) through the same
page allocator. After each forward the policy picks the slots to keep, and the kept tokens
that sit past the new length move into the freed slots (``PagedStore.move_slots``), so slots
``0 .. seq_lens-1`` stay the live ones as the ops require; pages past the new length go back
to the free list (``PagedStore.truncate``).

Protocol of one forward (prefill chunk or decode step): the new tokens are appended, their
queries attend every retained token plus the chunk itself (causally), then the cache is cut
back to ``budget``. So the budget bounds the tokens kept *between* forwards; a decode step
attends ``budget + 1`` tokens, and a prefill chunk of ``T`` tokens attends up to
``budget + T`` (feed the prompt in pieces with generate's ``prefill_chunk_size`` to evict
during the prompt too).

Quest keeps every token; ``budget`` bounds what each decode step reads instead (whole pages
of ``page_size`` slots: ``budget // page_size`` pages plus the newest one). Prefill attends
everything, as in Quest.

The model runs with the vanilla attention math: a DMS model in mode "off" hands attention to
``PolicyCache.attend`` (the ``dms.cache.AttentionCache`` interface). A prefill chunk that needs
no probability matrix (StreamingLLM, Quest; TOVA, which scores with the newest query's row
only) attends through ``scaled_dot_product_attention``; H2O sums every query's probabilities,
so its prefill stays explicit, in blocks of queries that skip the keys causally hidden from
them. Decode steps (one query over about ``budget`` slots) are explicit too; Quest's keeps the
per-page key bounds up to date one page at a time (only each row's newest page changes) and
reads the chosen pages alone.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache

from dms.baselines.policies import POLICIES, h2o_keep, page_bounds, quest_pages, streaming_keep, tova_keep
from dms.cache import AttentionCache, DMSCache, DMSLayer, sequences

# Elements of one [S, G, queries, keys] score block (queries are processed in pieces below it).
_SCORE_BUDGET = 1 << 24


class PolicyLayer(DMSLayer):
    """One decoder layer's paged store plus per-slot token positions and policy scores."""

    def __init__(self, policy: str, budget: int, page_size: int = 16, sinks: int = 4, recent: int | None = None):
        super().__init__(window=0, page_size=page_size)  # window 0 + decisions 0: the op never reuses a slot
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
            raise ValueError(f"budget must be an int >= 1 (tokens kept per KV head), got {budget!r}")
        if policy == "streaming" and not 0 <= sinks < budget:
            raise ValueError(f"streaming: sinks must be in [0, budget); got sinks={sinks}, budget={budget}")
        self.policy, self.budget, self.sinks = policy, budget, sinks
        self.recent = budget // 2 if recent is None else recent  # H2O's default: half recent, half heavy

    def lazy_initialization(self, key_states, value_states) -> None:
        super().lazy_initialization(key_states, value_states)
        S = self.num_seqs
        self.positions = torch.zeros(S, 0, dtype=torch.int64, device=self.device)
        self.scores = torch.zeros(S, 0, dtype=torch.float32, device=self.device)
        self.read = torch.zeros(S, dtype=torch.int64, device=self.device)  # keys the last query of s read
        if self.policy == "quest":  # per page: min and max of each key channel (policies.page_bounds)
            self.kmin = torch.full((S, 0, self.head_dim), float("inf"), device=self.device)
            self.kmax = torch.full((S, 0, self.head_dim), float("-inf"), device=self.device)

    # -- one forward ---------------------------------------------------------------------------
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None,
               scale: float, output: bool = True) -> torch.Tensor | None:
        """q [S, G, T, D]; k, v [S, T, D] post-RoPE; valid bool [S, T] or None -> out [S, G, T, D]
        (zeros for pad queries); with ``output=False`` None: the tokens are stored and scored,
        the attention output is not computed."""
        S, G, T, D = q.shape
        ok = torch.ones(S, T, dtype=torch.bool, device=q.device) if valid is None else valid
        if not self.is_initialized:
            self.lazy_initialization(k, v)
        old_len, old_seen = self.store.seq_lens.long(), self.store.num_seen.long()
        self.append(k, v, torch.zeros(S, T, dtype=torch.bool, device=q.device), valid)
        rank = ok.long().cumsum(1) - 1  # index of each valid token among the chunk's valid tokens
        qpos = torch.where(ok, old_seen[:, None] + rank, -1)
        self._record_new(old_len[:, None] + rank, qpos, ok)
        if self.policy == "streaming" and T == 1 and bool(ok.all()):
            out = self.decode_attention(q[:, :, 0], scale)[:, :, None] if output else None  # no weights needed
            self.read = self.store.seq_lens.long()
        elif self.policy == "quest" and T == 1:
            out = self._quest_decode(q[:, :, 0], scale, output)
        else:
            out = self._dense_attend(q, qpos, ok, scale, int(old_len.max()) if T > 1 else None, output)
        self._evict()
        return out

    def _record_new(self, slots: torch.Tensor, qpos: torch.Tensor, ok: torch.Tensor) -> None:
        width = int(self.store.seq_lens.max())
        if width > self.positions.shape[1]:
            grow = max(width, math.ceil(self.positions.shape[1] * 1.25)) - self.positions.shape[1]
            self.positions = torch.cat([self.positions, self.positions.new_zeros(self.num_seqs, grow)], 1)
            self.scores = torch.cat([self.scores, self.scores.new_zeros(self.num_seqs, grow)], 1)
        rows = torch.arange(self.num_seqs, device=ok.device)[:, None].expand_as(ok)
        self.positions[rows[ok], slots[ok]] = qpos[ok]
        self.scores[rows[ok], slots[ok]] = 0.0

    def _dense_attend(self, q, qpos, ok, scale, before, output=True):
        """Attention over the live slots, keeping the probabilities H2O and TOVA score with.
        ``before``: most slots a row held before this forward (None for a decode step);
        ``output`` False: scores only, returns None."""
        S, G, T, D = q.shape
        keys, values, live = self.store.dense()
        if self.policy == "quest":
            self.kmin, self.kmax = page_bounds(keys, live, self.page_size)
        self.read = live.sum(1)
        pos = self.positions[:, :keys.shape[1]]
        had = ok.any(1)[:, None]
        if T > 1 and self.policy != "h2o":
            # A prefill that needs no probability matrix: fused attention (TOVA reads one row of it).
            out = _fused(q, keys, values, live, pos, qpos, ok, scale, before) if output else None
            if self.policy == "tova":
                self._set_tova(_newest_query_probs(q, keys, live, pos, qpos, ok, scale), had)
            return out
        out, received, current = _explicit(q, keys, values if output else None, live, pos, qpos, ok, scale,
                                           self.policy, before)
        if self.policy == "h2o":
            self.scores[:, :keys.shape[1]] += received
        elif self.policy == "tova":
            self._set_tova(current, had)
        return out

    def _quest_decode(self, q: torch.Tensor, scale: float, output: bool) -> torch.Tensor | None:
        """A Quest decode step, q [S, G, D]: the page bounds change only on each row's newest
        page, and the query reads the chosen pages alone -> [S, G, 1, D] (None without output)."""
        S, ps = self.num_seqs, self.page_size
        lens = self.store.seq_lens.long()
        P = -(-int(lens.max()) // ps)
        rows = torch.arange(S, device=self.device)
        self._newest_page_bounds(lens, rows, P)
        chosen = quest_pages(q, self.kmin[:, :P], self.kmax[:, :P], lens, ps, self.budget)  # [S, P]
        K = int(chosen.sum(1).max())
        page = torch.where(chosen, torch.arange(P, device=self.device), P).sort(1).values[:, :K]
        used = page < P
        page = page.clamp_max(P - 1)
        slot = page[..., None] * ps + torch.arange(ps, device=self.device)  # [S, K, ps]
        live = (used[..., None] & (slot < lens[:, None, None])).view(S, K * ps)
        self.read = live.sum(1)
        if not output:
            return None
        phys = self.store.block_table[rows[:, None], page].long().clamp_min(0)
        dead = ~live[..., None]  # unused slots may hold stale memory (NaN): zero them, not just mask
        keys = self.store.k_pages[phys].view(S, K * ps, -1).float().masked_fill_(dead, 0.0)
        values = self.store.v_pages[phys].view(S, K * ps, -1).float().masked_fill_(dead, 0.0)
        s = torch.einsum("sgd,sld->sgl", q.float(), keys) * scale
        p = torch.softmax(s.masked_fill_(~live[:, None], float("-inf")), dim=-1)
        return torch.einsum("sgl,sld->sgd", p, values).to(q.dtype)[:, :, None]

    def _newest_page_bounds(self, lens: torch.Tensor, rows: torch.Tensor, pages: int) -> None:
        """Recompute the bounds of the page holding each row's newest slot (the one a decode step
        wrote), after growing the bound tensors to ``pages`` pages."""
        if pages > self.kmin.shape[1]:
            grow = max(pages, math.ceil(self.kmin.shape[1] * 1.25)) - self.kmin.shape[1]
            self.kmin = torch.cat([self.kmin, self.kmin.new_full((self.num_seqs, grow, self.head_dim), float("inf"))], 1)
            self.kmax = torch.cat([self.kmax, self.kmax.new_full((self.num_seqs, grow, self.head_dim), float("-inf"))], 1)
        ps = self.page_size
        newest = (lens - 1).clamp_min(0) // ps
        keys = self.store.k_pages[self.store.block_table[rows, newest].long().clamp_min(0)].float()  # [S, ps, D]
        dead = ~(newest[:, None] * ps + torch.arange(ps, device=self.device) < lens[:, None])[..., None]
        self.kmin[rows, newest] = keys.masked_fill(dead, float("inf")).amin(1)
        self.kmax[rows, newest] = keys.masked_fill(dead, float("-inf")).amax(1)

    def _set_tova(self, current: torch.Tensor, had: torch.Tensor) -> None:
        L = current.shape[1]
        self.scores[:, :L] = torch.where(had, current, self.scores[:, :L])

    # -- eviction --------------------------------------------------------------------------------
    def _keep(self, live: torch.Tensor) -> torch.Tensor:
        L = live.shape[1]
        pos, scores = self.positions[:, :L], self.scores[:, :L]
        if self.policy == "streaming":
            return streaming_keep(pos, live, self.budget, self.sinks)
        if self.policy == "h2o":
            return h2o_keep(pos, scores, live, self.budget, self.recent)
        return tova_keep(scores, live, self.budget)

    def _evict(self) -> None:
        lens = self.store.seq_lens.long()
        L = int(lens.max())
        if L <= self.budget or self.policy == "quest":
            return
        slot = torch.arange(L, device=self.device)[None, :]
        live = slot < lens[:, None]
        keep = self._keep(live)
        n = keep.sum(1)
        # Kept slots at index >= n move into the dropped slots below n, pairwise in slot order.
        big = torch.iinfo(torch.int64).max
        holes = torch.where(~keep & (slot < n[:, None]), slot, big).sort(1).values
        movers = torch.where(keep & (slot >= n[:, None]), slot, big).sort(1).values
        pair = movers != big
        rows = torch.arange(self.num_seqs, device=self.device)[:, None].expand_as(pair)[pair]
        src, dst = movers[pair], holes[pair]
        self.store.move_slots(rows, src, dst)
        self.positions[rows, dst] = self.positions[rows, src]
        self.scores[rows, dst] = self.scores[rows, src]
        self.store.truncate(n)


def _fused(q, keys, values, live, pos, qpos, ok, scale, before):
    """Prefill output by scaled_dot_product_attention: with no pad and an empty cache before,
    slot j holds the chunk's token j and the mask is plain causal."""
    S, G, T, D = q.shape
    k, v = (x.float()[:, None].expand(S, G, -1, D) for x in (keys, values))
    if before == 0 and keys.shape[1] == T and bool(ok.all()):
        out = F.scaled_dot_product_attention(q.float(), k, v, is_causal=True, scale=scale)
    else:
        allowed = live[:, None, :] & (pos[:, None, :] <= qpos[:, :, None])  # [S, T, L]
        out = F.scaled_dot_product_attention(q.float(), k, v, attn_mask=allowed[:, None], scale=scale)
    return out.masked_fill(~ok[:, None, :, None], 0.0).to(q.dtype)  # pad queries: zeros


def _newest_query_probs(q, keys, live, pos, qpos, ok, scale):
    """TOVA's score: attention of each row's newest valid query, mean over the group [S, L]
    (zeros for a row without one)."""
    S = q.shape[0]
    rows = torch.arange(S, device=q.device)
    last = torch.where(ok, torch.arange(q.shape[2], device=q.device)[None, :], -1).argmax(1)
    s = torch.einsum("sgd,sld->sgl", q[rows, :, last].float(), keys.float()) * scale
    allowed = live & (pos <= qpos[rows, last][:, None])
    p = torch.softmax(s.masked_fill(~allowed[:, None], float("-inf")), dim=-1).nan_to_num(0.0)
    return p.mean(1)


def _explicit(q, keys, values, live, pos, qpos, ok, scale, policy, before):
    """Attention with the probability matrix, a block of queries at a time: out [S, G, T, D],
    H2O's received attention [S, L] (summed over the group and the queries; None for the other
    policies) and TOVA's newest-query attention [S, L] (group mean; None for the others).
    ``before``: most slots a row held before this forward (None: no key is skipped);
    ``values`` None: no output (None)."""
    S, G, T, D = q.shape
    L = keys.shape[1]
    out = None if values is None else torch.empty(S, G, T, D, dtype=q.dtype, device=q.device)
    received = torch.zeros(S, L, dtype=torch.float32, device=q.device) if policy == "h2o" else None
    current = torch.zeros(S, L, dtype=torch.float32, device=q.device) if policy == "tova" else None
    last = torch.where(ok, torch.arange(T, device=q.device)[None, :], -1).argmax(1)  # newest valid query
    pads = not bool(ok.all())
    kt = keys.float().transpose(1, 2)
    step = max(1, _SCORE_BUDGET // max(1, S * G * L))
    for a in range(0, T, step):
        b = min(a + step, T)
        t = b - a
        # The chunk's tokens fill the slots after the old ones in chunk order, so queries before
        # b see no slot at or past before + b: the block skips those keys (half a causal prefill).
        n = L if before is None else min(L, before + b)
        allowed = live[:, None, :n] & (pos[:, None, :n] <= qpos[:, a:b, None])  # [S, t, n]
        s = torch.bmm(q[:, :, a:b].float().reshape(S, G * t, D), kt[:, :, :n]).mul_(scale).view(S, G, t, n)
        s.masked_fill_(~allowed[:, None], float("-inf"))
        p = torch.softmax(s, dim=-1)
        if pads:
            p = p.nan_to_num_(0.0)  # pad queries see nothing: zero rows
        if out is not None:
            out[:, :, a:b] = torch.bmm(p.view(S, G * t, n), values[:, :n].float()).view(S, G, t, D).to(q.dtype)
        if received is not None:
            received[:, :n] += p.sum(dim=(1, 2))
        if current is not None:
            hit = (last >= a) & (last < b)
            cur = p[torch.arange(S, device=q.device), :, (last - a).clamp(0, t - 1)].mean(1)
            current[:, :n] = torch.where(hit[:, None], cur, current[:, :n])
    return out, received, current


class PolicyCache(AttentionCache):
    """KV cache evicting with ``policy`` ("streaming", "h2o" or "tova") down to ``budget`` tokens
    per (batch row, KV head) after every forward, or ("quest") keeping everything and reading
    about ``budget`` tokens per decode step. Use it with a DMS model in mode "off" (the plain
    model's attention): ``generate(..., past_key_values=PolicyCache(model, "h2o", 64))``.
    ``sinks``: StreamingLLM's attention sinks; ``recent``: H2O's protected recent tokens
    (default budget // 2)."""

    def __init__(self, model=None, policy: str = "streaming", budget: int = 256, *, num_layers: int | None = None,
                 page_size: int = 16, sinks: int = 4, recent: int | None = None):
        if model is not None and num_layers is None:
            num_layers = model.config.num_hidden_layers
        if num_layers is None:
            raise ValueError("PolicyCache needs a model or num_layers=")
        super().__init__(layers=[PolicyLayer(policy, budget, page_size, sinks, recent) for _ in range(num_layers)])
        self.policy, self.budget = policy, budget

    def check_model(self, mode: str, window: int) -> None:
        if mode == "train":
            raise ValueError("DMS train mode runs without a KV cache: call the model with use_cache=False")
        if mode != "off":
            raise ValueError("an eviction-policy cache runs the plain model's attention: call "
                             "dms.models.set_mode(model, 'off') first")

    def attend(self, layer_idx, q, k, v, decisions, padding, scale):
        """The policy decides what to keep: ``decisions`` must be None (mode "off")."""
        if decisions is not None:
            raise ValueError("an eviction-policy cache takes no DMS decisions (mode 'off')")
        B, Hq, T, D = q.shape
        qs, ks, vs, _, valid = sequences(q, k, v, None, padding)
        return self.layers[layer_idx].attend(qs, ks, vs, valid, scale).reshape(B, Hq, T, D)

    def absorb(self, layer_idx, q, k, v, decisions, padding, scale) -> None:
        """``attend`` without the attention output: the tokens are stored, scored and evicted
        the same way (dms.eval.shared, when another cache supplies the forward's output)."""
        if decisions is not None:
            raise ValueError("an eviction-policy cache takes no DMS decisions (mode 'off')")
        qs, ks, vs, _, valid = sequences(q, k, v, None, padding)
        self.layers[layer_idx].attend(qs, ks, vs, valid, scale, output=False)

    def read_ratio(self) -> float:
        """Tokens seen / keys the last query read, each summed over layer, batch row and KV head (for
        Quest, which keeps every token, the measure of its budget)."""
        layers = [layer for layer in self.layers if layer.is_initialized]
        if not layers:
            return 1.0
        seen = torch.stack([layer.store.num_seen.double() for layer in layers])
        read = torch.stack([layer.read.double() for layer in layers])
        ok = read > 0
        return float(seen[ok].sum() / read[ok].sum()) if ok.any() else 1.0

    # Same statistics as the DMS cache (tokens seen / retained per layer, batch row and KV head).
    stats = DMSCache.stats
    compression_ratio = DMSCache.compression_ratio
    nbytes = DMSCache.nbytes
