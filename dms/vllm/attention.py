"""DMS attention inside vLLM: the per-step plan shared by the layers, the attention layer
registered with vLLM (its KV cache spec, backend and metadata), and the computation on the
store through ``torch.ops.dms``.

Per layer and step: the step's prefill chunks, padded to one length, attend the live slots of
their rows (read before the step's append) plus their own tokens with DMS visibility
(docs/design.md §1), in SDPA calls over blocks of query tokens; then one
``dms.append`` call feeds their tokens to the store; then one ``dms.append`` call and one
``paged_decode_attention`` call serve every request that decodes one token.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vllm.config import VllmConfig
from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase
from vllm.v1.attention.backend import AttentionBackend, AttentionImpl, AttentionMetadataBuilder, CommonAttentionMetadata

from dms.attention.infer import attend_visible
from dms.attention.masks import last_query
from dms.vllm.kv import USAGE, DMSAttentionSpec, Usage, register_spec
from dms.vllm.store import LayerStore, PagePool

# Query tokens per SDPA call of a prefill chunk (see DMSAttention._prefill).
QUERY_BLOCK = 128


def store_page_size(block_size: int) -> int:
    """Tokens per store page: 16 (small pages keep the rounding of each (request, layer, head)
    row small), or the largest divisor of vLLM's block size below it."""
    return next(p for p in (16, 8, 4, 2, 1) if block_size % p == 0)


@dataclass
class DMSMetadata:
    keys: list[int]  # first block id of each request: its identity (dms.vllm.kv)
    query_start: list[int]  # [R + 1]
    num_computed: list[int]  # tokens of each request already in the store


class DMSMetadataBuilder(AttentionMetadataBuilder[DMSMetadata]):
    """What the DMS layers need of vLLM's per-step metadata (all on the host)."""

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):  # abstract in vLLM
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> DMSMetadata:
        m = common_attn_metadata
        R = m.num_reqs
        qsl = m.query_start_loc_cpu[: R + 1].tolist()
        seq_lens = m.seq_lens.cpu()[:R].tolist()
        keys = m.block_table_tensor[:R, 0].cpu().tolist()
        computed = [s - (b - a) for s, a, b in zip(seq_lens, qsl[:-1], qsl[1:])]
        return DMSMetadata(keys=keys, query_start=qsl, num_computed=computed)


class DMSImpl(AttentionImpl):
    """Unused: DMS layers compute in DMSAttention.forward (vLLM asks the backend for one)."""

    def __init__(self, *args, **kwargs):
        pass

    def forward(self, *args, **kwargs):
        raise NotImplementedError("DMS attention runs in dms.vllm.attention.DMSAttention.forward")


class DMSBackend(AttentionBackend):
    accept_output_buffer = False
    supported_dtypes = [torch.float16, torch.bfloat16, torch.float32]

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_impl_cls():
        return DMSImpl

    @staticmethod
    def get_builder_cls():
        return DMSMetadataBuilder

    @staticmethod
    def get_kv_cache_shape(num_blocks, block_size, num_kv_heads, head_size, cache_dtype_str="auto"):
        return (num_blocks, num_kv_heads, store_page_size(block_size), 2 * head_size)  # DMSAttentionSpec

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return []  # any


@dataclass
class StepPlan:
    """Where each request of the step sits in the store, and how its tokens are laid out."""

    slots: torch.Tensor  # int64 [R]
    decode: torch.Tensor  # int64 [Rd] batch indices of one-token requests
    decode_tokens: torch.Tensor  # int64 [Rd] their flat token index
    prefill: torch.Tensor  # int64 [P] batch indices of the others
    prefill_gather: torch.Tensor  # int64 [P, Tmax] flat token index of each chunk (clamped)
    prefill_valid: torch.Tensor  # bool [P, Tmax] False on the pads after a chunk
    prefill_start: torch.Tensor  # int64 [P] tokens of each chunk's request already in the store


class SlotTable:
    """Request key -> store slot, shared by the layers of one model."""

    def __init__(self, slots: int):
        self.capacity = slots
        self.by_key: dict[int, int] = {}
        self.free = list(range(slots - 1, -1, -1))

    def release(self, stores: list[LayerStore], keys=()) -> None:
        """Empty the rows of requests that finished, were preempted or aborted since the last
        step (the manager's notices), and of ``keys``; their pages go back to the pool."""
        released, USAGE.released[:] = list(USAGE.released), []
        gone = [self.by_key.pop(k) for k in [*released, *keys] if k in self.by_key]
        if gone:
            t = torch.tensor(gone, dtype=torch.long, device=stores[0].k_pages.device)
            for s in stores:
                s.release(t)
            self.free.extend(gone)

    def plan(self, meta: DMSMetadata, stores: list[LayerStore], device) -> StepPlan:
        # A request starting at token 0 is new or recomputed after preemption: fresh rows.
        self.release(stores, [k for k, done in zip(meta.keys, meta.num_computed) if done == 0])
        slots = []
        for key, done in zip(meta.keys, meta.num_computed):
            if key not in self.by_key:
                if done != 0:
                    raise RuntimeError(
                        f"DMS store has no rows for a request that resumes at token {done}: its first "
                        "tokens were computed elsewhere (prefix caching, KV transfer), which DMS cannot use")
                if not self.free:
                    raise RuntimeError(f"more running requests than the DMS store's {self.capacity} slots "
                                       "(max_num_seqs)")
                self.by_key[key] = self.free.pop()
            slots.append(self.by_key[key])
        qs = meta.query_start
        lens = [b - a for a, b in zip(qs[:-1], qs[1:])]
        dec = [i for i, n in enumerate(lens) if n == 1]
        pre = [i for i, n in enumerate(lens) if n != 1]
        T = max((lens[i] for i in pre), default=0)
        start = torch.tensor([qs[i] for i in pre], dtype=torch.long)
        t = torch.arange(T, dtype=torch.long)
        valid = t[None, :] < torch.tensor([lens[i] for i in pre], dtype=torch.long)[:, None]
        gather = torch.where(valid, start[:, None] + t[None, :], torch.zeros_like(valid, dtype=torch.long))

        def as_tensor(x: list[int]) -> torch.Tensor:
            return torch.tensor(x, dtype=torch.long, device=device)

        return StepPlan(as_tensor(slots), as_tensor(dec), as_tensor([qs[i] for i in dec]), as_tensor(pre),
                        gather.to(device), valid.to(device), as_tensor([meta.num_computed[i] for i in pre]))

    def report(self, plan: StepPlan, meta: DMSMetadata, stores: list[LayerStore]) -> None:
        """Tell the scheduler-side manager what the store holds for each request now."""
        held = torch.stack([s.usage_per_slot() for s in stores]).sum(0)
        pages, full = held[:, plan.slots].tolist()
        qs = meta.query_start
        for i, key in enumerate(meta.keys):
            USAGE.by_key[key] = Usage(tokens=meta.num_computed[i] + qs[i + 1] - qs[i], pages=pages[i],
                                      full_rows=full[i])


def build_stores(layers: list["DMSAttention"], slots: int, max_tokens: int, page_size: int) -> None:
    """Lay the memory vLLM bound to the layers out as one PagePool and give each layer its
    LayerStore. Only the bytes matter: with a layer-compact layout (vLLM's default here) the
    layers' regions are adjacent and together form one dense buffer."""
    regions = []
    for layer in layers:
        kv = layer.kv_cache
        dense = kv.permute(sorted(range(kv.dim()), key=lambda d: -kv.stride(d)))
        if not dense.is_contiguous():
            raise RuntimeError("the DMS plugin needs each layer's KV cache in one dense piece; got a view "
                               f"{tuple(kv.shape)} with strides {kv.stride()} (set VLLM_KV_CACHE_LAYOUT to a "
                               "layer-compact layout such as LBHNC)")
        regions.append((kv.data_ptr(), kv.numel() * kv.element_size()))
    regions.sort()
    start, total = regions[0][0], sum(n for _, n in regions)
    if any(a + n != b for (a, n), (b, _) in zip(regions, regions[1:])):
        raise RuntimeError("the DMS plugin needs the layers' KV caches side by side in one allocation (a "
                           "layer-compact VLLM_KV_CACHE_LAYOUT such as LBHNC)")
    kv = layers[0].kv_cache
    storage = kv.untyped_storage()
    flat = torch.empty(0, dtype=torch.int8, device=kv.device).set_(storage, start - storage.data_ptr(), (total,))
    D = layers[0].head_size
    pages = flat.view(layers[0].dtype).view(2, -1, page_size, D)
    pool = PagePool(pages[0], pages[1])
    for layer in layers:
        layer.store = LayerStore(pool, slots, layer.num_kv_heads, layer.window, max_tokens)


class DMSAttention(nn.Module, AttentionLayerBase):
    """One DMS attention layer as vLLM sees it (KV cache spec, backend); holds no weights."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str, num_kv_heads: int, head_size: int, window: int,
                 scale: float, num_layers: int):
        super().__init__()
        self.layer_name = prefix
        self.num_kv_heads, self.head_size, self.window, self.scale = num_kv_heads, head_size, window, scale
        self.num_layers = num_layers
        self.dtype = vllm_config.model_config.dtype
        self.store: LayerStore | None = None  # set by the model once vLLM has bound the memory
        ctx = vllm_config.compilation_config.static_forward_context
        if prefix in ctx:
            raise ValueError(f"Duplicate layer name: {prefix}")
        ctx[prefix] = self

    def get_attn_backend(self) -> type[AttentionBackend]:
        return DMSBackend

    def get_kv_cache_spec(self, vllm_config: VllmConfig) -> DMSAttentionSpec:
        register_spec()
        block_size = vllm_config.cache_config.block_size
        return DMSAttentionSpec(block_size=block_size, num_kv_heads=self.num_kv_heads, head_size=self.head_size,
                                dtype=self.dtype, dms_page_size=store_page_size(block_size),
                                dms_num_layers=self.num_layers)

    def bind_kv_cache(self, kv_cache: torch.Tensor) -> None:
        self.kv_cache = kv_cache  # the model lays the layers' memory out as one shared pool

    # -- computation -------------------------------------------------------------------------
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decisions: torch.Tensor,
                plan: StepPlan | None) -> torch.Tensor:
        """q [N, Hq, D], k/v [N, H, D] post-RoPE, decisions bool [N, H] -> [N, Hq, D]."""
        N, Hq, D = q.shape
        H = self.num_kv_heads
        G = Hq // H
        if plan is None or self.store is None:  # a profiling / warm-up run: no requests
            return torch.zeros_like(q)
        store = self.store
        out = torch.zeros_like(q)
        if plan.prefill.numel():  # the chunks read the store before their append
            g, ok = plan.prefill_gather, plan.prefill_valid
            rows = store.rows(plan.slots[plan.prefill])
            o = self._prefill(store, rows, q[g], k[g], v[g], decisions[g] & ok[..., None], ok, plan.prefill_start)
            out[g[ok]] = o[ok]
            self._append(store, rows, k, v, decisions, g, ok)
        if plan.decode.numel():
            rows = store.rows(plan.slots[plan.decode])
            t = plan.decode_tokens[:, None]
            self._append(store, rows, k, v, decisions, t, torch.ones_like(t, dtype=torch.bool))
            qd = q[plan.decode_tokens].reshape(-1, G, D)  # [Rd*H, G, D]
            out[plan.decode_tokens] = store.decode(qd, rows, self.scale).reshape(-1, Hq, D)
        return out

    def _append(self, store: LayerStore, rows, k, v, decisions, g, ok) -> None:
        """One ``dms.append`` call for the requests whose tokens ``g`` [R, T] (flat token index,
        ``ok`` False on pads) go to store ``rows`` [R*H]."""
        H, D, T = self.num_kv_heads, self.head_size, g.shape[1]
        kp = k[g].transpose(1, 2).reshape(-1, T, D)  # [R*H, T, D]
        vp = v[g].transpose(1, 2).reshape(-1, T, D)
        dp = decisions[g].transpose(1, 2).reshape(-1, T)
        valid = ok[:, None, :].expand(-1, H, -1).reshape(-1, T)
        store.append(rows, kp.contiguous(), vp.contiguous(), dp.contiguous(), valid.contiguous())

    def _prefill(self, store: LayerStore, rows, q, k, v, decisions, ok, n0) -> torch.Tensor:
        """The step's prefill chunks, together: P requests' chunks padded to T tokens
        (q [P, T, Hq, D], k/v [P, T, H, D], decisions [P, T, H] False on pads, ok bool [P, T]),
        chunk p holding token indices n0[p] .. over its rows' live slots and itself.
        Pads come after each chunk's tokens, so no real query sees them (causal). One SDPA call
        per QUERY_BLOCK query tokens of all chunks at once (dms.attention.infer.attend_visible)."""
        P, T, Hq, D = q.shape
        H = self.num_kv_heads
        keys, values, last, newest, _ = store.live_view(rows)  # [P*H, L, D], last [P*H, L]
        dec = decisions.permute(0, 2, 1).reshape(P * H, T)
        idx = (n0[:, None] + torch.arange(T, device=q.device)).repeat_interleave(H, dim=0)  # [P*H, T]
        # Flag of token t = decision of token t + 1; a chunk's last token is not flagged yet.
        flag = torch.cat([dec[:, 1:], torch.zeros_like(dec[:, :1])], dim=1)
        last_new = last_query(idx, flag, self.window).masked_fill(~ok.repeat_interleave(H, dim=0), -1)
        if keys.shape[1]:
            # The newest stored token of a row is flagged by its chunk's first decision.
            h = torch.nonzero(dec[:, 0] & (newest >= 0)).flatten()
            last[h, newest[h]] = last_query(idx[h, 0] - 1, torch.ones_like(h, dtype=torch.bool), self.window)
        ks = torch.cat([keys, k.permute(0, 2, 1, 3).reshape(P * H, T, D)], dim=1)  # [P*H, L+T, D]
        vs = torch.cat([values, v.permute(0, 2, 1, 3).reshape(P * H, T, D)], dim=1)
        lq = torch.cat([last, last_new], dim=1)  # [P*H, L+T]
        kidx = torch.cat([torch.full_like(last, -1), idx], dim=1)
        G = Hq // H
        qs = q.reshape(P, T, H, G, D).permute(0, 2, 3, 1, 4).reshape(P * H, G, T, D)
        o = attend_visible(qs, ks, vs, kidx, lq, idx, self.scale, QUERY_BLOCK)
        return o.reshape(P, H, G, T, D).permute(0, 3, 1, 2, 4).reshape(P, T, Hq, D)
