"""Memory-true admission: a KV cache spec whose manager budgets the pages the DMS store holds.

vLLM's blocks belong to a request and are addressed by position, shared by every layer and
head, so per-head eviction cannot free them. The plugin keeps its own paged store
(dms.vllm.store) in the memory vLLM allocated for the layers and uses vLLM's block pool only
as the budget. One block of ``DMSAttentionSpec`` is the size of one store page
(``dms_page_size`` tokens) in each (layer, KV head) row, so vLLM sizes the pool in units the
store can fill one page per row at a time: vLLM's ``block_size`` (128 tokens on CPU) would
round every request up to 128 tokens per row.

``DMSManager`` gives a request enough blocks for the pages its store rows hold, plus, before a
step, room for the step's new tokens in the worst case (every new token retained: a row whose
last page is full needs ``ceil(T / page_size)`` more pages, another ``ceil((T - 1) /
page_size)``), never more than a dense request would hold. After each step the store reports
what it really holds on ``USAGE`` and the manager returns the excess blocks to the pool, so
the scheduler admits requests against the retained KV. The blocks are a count, not a
position map: the worker is only ever told a request's first block (its identity below).
Since the budgets never exceed the pool, the store's free list cannot run dry; when a budget
cannot be met, vLLM preempts and recomputes as it does for full attention.

Admission looks ahead (``fits_later``, in vLLM's full-sequence gate for a waiting request): a
request is admitted only if the pages of the running requests and its own, each growing at
the retention rate observed on decodes until its last token (prompt + ``max_tokens``), fit
the pool at every future step. vLLM alone admits on the pages of the moment; requests admitted
together then grow together, and vLLM preempts and recomputes many of them once the pool is
full. A request that stops early (EOS) was budgeted for more than it used.

``USAGE`` is a process-wide board keyed by the id of a request's first block (the only
request identity the worker's attention sees). It works because vLLM's single-worker
executor runs the scheduler and the model runner in one process (the engine core); the
plugin refuses tensor or pipeline parallelism for that reason (docs/vllm.md says what vLLM
would need for it).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from vllm.utils.math_utils import cdiv
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import FullAttentionSpec


@dataclass
class Usage:
    tokens: int = 0  # tokens the store has taken for the request
    pages: int = 0  # store pages held (all layers and KV heads)
    full_rows: int = 0  # rows whose last page is full (or that hold no page): the next token may pop one


@dataclass
class UsageBoard:
    """Shared by the scheduler-side manager and the worker-side store (one process)."""

    by_key: dict[int, Usage] = field(default_factory=dict)
    released: list[int] = field(default_factory=list)  # keys whose store rows the worker must free

    def reset(self) -> None:
        self.by_key.clear()
        self.released.clear()


USAGE = UsageBoard()


@dataclass(frozen=True, kw_only=True)
class DMSAttentionSpec(FullAttentionSpec):
    """One block = one ``dms_page_size``-token store page per KV head of a layer (module
    docstring); ``block_size`` stays vLLM's, the unit of positions in its block tables.
    ``dms_num_layers`` layers share the store's pool."""

    dms_page_size: int = 16
    dms_num_layers: int = 1

    def __post_init__(self):
        super().__post_init__()
        if self.dms_page_size < 1 or self.block_size % self.dms_page_size:
            raise ValueError(f"dms_page_size must divide block_size {self.block_size}, got {self.dms_page_size}")

    @classmethod
    def merge(cls, specs: list["DMSAttentionSpec"]) -> "DMSAttentionSpec":
        # FullAttentionSpec.merge rebuilds the spec from its own fields only (the DMS ones would
        # fall back to their defaults); every DMS layer has the same spec.
        if any(s != specs[0] for s in specs[1:]):
            raise ValueError(f"DMS layers of one model must share one KV cache spec, got {set(specs)}")
        return specs[0]

    def get_num_kernel_states(self, kernel_block_size: int) -> int:
        """Token slots per head in one block (vLLM sizes a block as heads x slots x K and V)."""
        return kernel_block_size * self.dms_page_size // self.block_size

    @property
    def prefix_cacheable(self) -> bool:
        return False  # evicted tokens are gone (prefix caching is refused at start-up)

    def max_memory_usage_bytes(self, vllm_config) -> int:
        """A request may retain every token: dense, one block per page of each row."""
        return cdiv(vllm_config.model_config.max_model_len, self.dms_page_size) * self.page_size_bytes

    @property
    def dms_pages_per_block(self) -> int:
        """Store pages one block of the budget stands for (one per layer and KV head)."""
        return self.num_kv_heads * self.dms_num_layers


class DMSManager(FullAttentionManager):
    """Budgets the pages the DMS store holds (module docstring). ``req_to_blocks``, which vLLM
    hands to the worker, holds only a request's first block; the rest of its budget is in
    ``held``."""

    def __init__(self, kv_cache_spec: DMSAttentionSpec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self.pages_per_block = kv_cache_spec.dms_pages_per_block
        self.rows = kv_cache_spec.num_kv_heads * kv_cache_spec.dms_num_layers  # store rows per request
        self.page_size = kv_cache_spec.dms_page_size
        self.board = USAGE
        self.held: dict[str, list] = {}
        self.requests: dict | None = None  # the scheduler's requests by id (attach_requests)
        self.last: dict[str, tuple[int, int]] = {}  # (tokens, pages) of each request at its last report
        self.decode_pages, self.decode_tokens = 0, 0  # growth over one-token steps: the retention rate

    def _empty(self) -> Usage:
        """A request before its first report: no token, no page, every row's next token pops a page."""
        return Usage(full_rows=self.rows)

    def _usage(self, request_id: str) -> Usage:
        blocks = self.req_to_blocks.get(request_id)
        if not blocks:
            return self._empty()
        return self.board.by_key.get(blocks[0].block_id, self._empty())

    def num_blocks(self, request_id: str) -> int:
        """Blocks of the budget the request holds."""
        return len(self.req_to_blocks.get(request_id, ())) + len(self.held.get(request_id, ()))

    def worst_pages(self, use: Usage, num_tokens: int) -> int:
        """Pages the request's rows may hold once they have taken ``num_tokens`` tokens."""
        T = max(0, num_tokens - use.tokens)
        if T == 0:
            return use.pages
        P = self.page_size
        grow = use.full_rows * cdiv(T, P) + (self.rows - use.full_rows) * cdiv(T - 1, P)
        return min(use.pages + grow, self.rows * cdiv(num_tokens, P))

    def _target(self, request_id: str, num_tokens: int) -> int:
        """Blocks the request needs for ``num_tokens`` tokens (at least one: its identity)."""
        return max(1, cdiv(self.worst_pages(self._usage(request_id), num_tokens), self.pages_per_block))

    def get_num_blocks_to_allocate(self, request_id: str, num_tokens: int, new_computed_blocks, *args,
                                   apply_admission_cap: bool = False, **kwargs) -> int:
        if apply_admission_cap and not self.req_to_blocks.get(request_id) and not self.fits_later(request_id):
            return self.block_pool.get_num_free_blocks() + 1  # vLLM's gate: the request waits
        return max(0, self._target(request_id, num_tokens) - self.num_blocks(request_id))

    def fits_later(self, request_id: str) -> bool:
        """Whether the running requests and this waiting one, each growing at the observed
        retention rate (pages per decoded token) until its last token (prompt + max_tokens),
        fit the pool at every future step, with a block of rounding each. The total only falls
        when a request finishes, so it peaks just before one of them does."""
        new = self.requests.get(request_id) if self.requests is not None else None
        running = [(rid, self._usage(rid)) for rid, blocks in self.req_to_blocks.items() if blocks]
        if new is None or not running:
            return True
        dense = self.rows / self.page_size  # pages per token when every token is retained
        # Until enough decodes were seen, every token counts as retained.
        rate = self.decode_pages / self.decode_tokens if self.decode_tokens >= 4 * self.rows else dense
        held = [(u.pages, u.tokens) for _, u in running if u.tokens]
        per_token = sum(p for p, _ in held) / sum(t for _, t in held) if held else dense
        items = [(self._remaining(rid, u.tokens), u.pages) for rid, u in running]
        items.append((self._remaining(request_id, new.num_tokens), per_token * new.num_tokens))
        items.sort(key=lambda x: -x[0])
        capacity = (self.block_pool.num_gpu_blocks - 1) * self.pages_per_block
        pages = 0.0
        for count, (left, now) in enumerate(items, 1):  # total at the step the count-th longest ends
            pages += now + self.pages_per_block
            if pages + count * rate * left > capacity:
                return False
        return True

    def _remaining(self, request_id: str, tokens: int) -> int:
        r = self.requests.get(request_id)
        return 0 if r is None else max(0, r.num_prompt_tokens + (r.max_tokens or 0) - tokens)

    def allocate_new_blocks(self, request_id: str, num_tokens: int, num_tokens_main_model: int):
        """Only a request's first block is reported (the worker reads no other block id)."""
        need = self._target(request_id, num_tokens) - self.num_blocks(request_id)
        if need <= 0:
            return []
        fresh = self.block_pool.get_new_blocks(need)
        if self.req_to_blocks.get(request_id):
            self.held[request_id].extend(fresh)
            return []
        self.req_to_blocks[request_id] = fresh[:1]
        self.held[request_id] = fresh[1:]
        self.board.by_key[fresh[0].block_id] = self._empty()
        return fresh[:1]

    def remove_skipped_blocks(self, request_id: str, processed_computed_tokens: int,
                              num_prompt_tokens: int | None = None) -> None:
        """Return the blocks the store does not use (the first one is the request's key)."""
        use = self._usage(request_id)
        last = self.last.get(request_id)
        if last is not None and use.tokens == last[0] + 1:
            self.decode_pages += use.pages - last[1]
            self.decode_tokens += 1
        self.last[request_id] = (use.tokens, use.pages)
        held = self.held.get(request_id)
        if not held:
            return
        keep = max(0, cdiv(use.pages, self.pages_per_block) - 1)
        if len(held) > keep:
            freed = held[keep:]
            del held[keep:]
            self.block_pool.free_blocks(freed)

    def pop_blocks_for_free(self, request_id: str):
        self.last.pop(request_id, None)
        blocks = super().pop_blocks_for_free(request_id) + self.held.pop(request_id, [])
        if blocks:
            key = blocks[0].block_id
            self.board.by_key.pop(key, None)
            self.board.released.append(key)
        return blocks


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
    attach_requests()
    _REGISTERED = True


def attach_requests() -> None:
    """Give each DMSManager the requests of the scheduler that built it (vLLM passes a manager
    request ids only; admission needs their lengths): wraps ``Scheduler.__init__`` once."""
    from vllm.v1.core.sched.scheduler import Scheduler

    init = Scheduler.__init__
    if getattr(init, "dms_attaches_requests", False):
        return

    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        for manager in self.kv_cache_manager.coordinator.single_type_managers:
            if isinstance(manager, DMSManager):
                manager.requests = self.requests

    __init__.dms_attaches_requests = True
    Scheduler.__init__ = __init__
