"""Memory-true admission: a KV cache spec whose manager budgets the pages the DMS store holds.

vLLM's blocks belong to a request and are addressed by position, shared by every layer and
head, so per-head eviction cannot free them. The plugin keeps its own paged store
(dms.vllm.store) in the memory vLLM allocated for the layers and uses vLLM's block pool only
as the budget: one block of ``DMSAttentionSpec`` costs what one full-attention block costs
(``block_size`` tokens x KV heads x layers, K and V) and stands for the same bytes of store
pages (``dms_page_size`` tokens each) in the pool all layers share.

``DMSManager`` gives a request enough real blocks for the pages its store rows hold, plus,
before a step, room for the step's new tokens in the worst case (every new token retained in
every row: ``ceil(T / dms_page_size)`` more pages per row), never more than a dense request
would hold. After each step the store reports what it really holds on ``USAGE`` and the
manager returns the excess blocks to the pool (replaced by the null block, as the
sliding-window manager does), so the scheduler admits requests against the retained KV.
Since the budgets never exceed the pool, the store's free list cannot run dry; when a budget
cannot be met, vLLM preempts and recomputes as it does for full attention.

``USAGE`` is a process-wide board keyed by the id of a request's first block (the only
block never returned early, and the only request identity the worker's attention sees).
It works because vLLM's single-worker executor runs the scheduler and the model runner in
one process (the engine core); the plugin refuses tensor or pipeline parallelism for that
reason (docs/vllm.md says what vLLM would need for it).
"""
from __future__ import annotations

from dataclasses import dataclass
from vllm.utils.math_utils import cdiv
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import FullAttentionSpec


@dataclass
class Usage:
    tokens: int = 0  # tokens the store has taken for the request
    pages: int = 0  # store pages held (all layers and KV heads)


class UsageBoard:
    """Shared by the scheduler-side manager and the worker-side store (one process)."""

    def __init__(self) -> None:
        self.by_key: dict[int, Usage] = {}
        self.released: list[int] = []  # keys whose store rows the worker must free

    def reset(self) -> None:
        self.by_key.clear()
        self.released.clear()


USAGE = UsageBoard()


@dataclass(frozen=True, kw_only=True)
class DMSAttentionSpec(FullAttentionSpec):
    """Full-attention sizing (a request may keep every token in the worst case); the manager
    differs. ``dms_page_size`` tokens per store page (a divisor of block_size: small pages keep
    the rounding of each (request, layer, head) row small); ``dms_num_layers`` layers share
    the store's pool."""

    dms_page_size: int = 16
    dms_num_layers: int = 1

    @classmethod
    def merge(cls, specs: list["DMSAttentionSpec"]) -> "DMSAttentionSpec":
        # FullAttentionSpec.merge rebuilds the spec from its own fields only (the DMS ones would
        # fall back to their defaults); every DMS layer has the same spec.
        if any(s != specs[0] for s in specs[1:]):
            raise ValueError(f"DMS layers of one model must share one KV cache spec, got {set(specs)}")
        return specs[0]

    @property
    def dms_pages_per_block(self) -> int:
        """Store pages one block of the budget stands for (every layer, every KV head)."""
        return self.num_kv_heads * (self.block_size // self.dms_page_size) * self.dms_num_layers


class DMSManager(FullAttentionManager):
    """Budgets the pages the DMS store holds (module docstring)."""

    def __init__(self, kv_cache_spec: DMSAttentionSpec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self.pages_per_block = kv_cache_spec.dms_pages_per_block
        self.rows = kv_cache_spec.num_kv_heads * kv_cache_spec.dms_num_layers  # store rows per request
        self.page_size = kv_cache_spec.dms_page_size
        self.board = USAGE

    def _usage(self, request_id: str) -> Usage:
        blocks = self.req_to_blocks.get(request_id)
        if not blocks:
            return Usage()
        return self.board.by_key.get(blocks[0].block_id, Usage())

    def _target(self, request_id: str, num_tokens: int) -> int:
        """Real blocks the request needs for ``num_tokens`` tokens: what its store rows hold
        now plus the worst case of the tokens not yet taken, capped by the dense count."""
        use = self._usage(request_id)
        # T more tokens add at most ceil(T / page_size) pages to each row.
        worst = use.pages + self.rows * cdiv(max(0, num_tokens - use.tokens), self.page_size)
        return min(cdiv(num_tokens, self.block_size), max(1, cdiv(worst, self.pages_per_block)))

    def _real(self, request_id: str) -> int:
        return sum(not b.is_null for b in self.req_to_blocks.get(request_id, ()))

    def get_num_blocks_to_allocate(self, request_id: str, num_tokens: int, new_computed_blocks, *args,
                                   **kwargs) -> int:
        return max(0, self._target(request_id, num_tokens) - self._real(request_id))

    def allocate_new_blocks(self, request_id: str, num_tokens: int, num_tokens_main_model: int):
        """Fill null positions first (the worker never reads a block id but the first), then
        append; only appended blocks are reported, so the worker's row length stays the
        request's position count."""
        blocks = self.req_to_blocks[request_id]
        first = not blocks
        need = self._target(request_id, num_tokens) - self._real(request_id)
        if need <= 0:
            return []
        fresh = self.block_pool.get_new_blocks(need)
        for i, b in enumerate(blocks):
            if fresh and b.is_null:
                blocks[i] = fresh.pop()
        appended = fresh[: max(0, cdiv(num_tokens, self.block_size) - len(blocks))]
        blocks.extend(appended)
        if len(appended) < len(fresh):  # cannot happen: target <= positions
            self.block_pool.free_blocks(fresh[len(appended):])
        if first:
            self.board.by_key[blocks[0].block_id] = Usage()
        return appended

    def remove_skipped_blocks(self, request_id: str, processed_computed_tokens: int,
                              num_prompt_tokens: int | None = None) -> None:
        """Return the blocks the store does not use (the first one is the request's key)."""
        blocks = self.req_to_blocks.get(request_id)
        if not blocks:
            return
        keep = max(1, cdiv(self._usage(request_id).pages, self.pages_per_block))
        excess = self._real(request_id) - keep
        freed = []
        for i in range(len(blocks) - 1, 0, -1):
            if excess <= 0:
                break
            if not blocks[i].is_null:
                freed.append(blocks[i])
                blocks[i] = self._null_block
                excess -= 1
        if freed:
            self.block_pool.free_blocks(freed)

    def pop_blocks_for_free(self, request_id: str):
        blocks = super().pop_blocks_for_free(request_id)
        if blocks:
            key = blocks[0].block_id
            self.board.by_key.pop(key, None)
            self.board.released.append(key)
        return [b for b in blocks if not b.is_null]


_REGISTERED = False


def register_spec() -> None:
    """Register the spec with its manager once vLLM has registered its own (registering
    first would make vLLM skip its built-in registrations)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(DMSAttentionSpec, DMSManager, uniform_type_base_spec=FullAttentionSpec)
    _REGISTERED = True
