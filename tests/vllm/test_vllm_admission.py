"""Memory-true admission (dms.vllm.kv): the budget counts store pages one page per row at a
time, a request that does not fit waits, and the pages the store holds never exceed what the
scheduler reserved for them."""
from __future__ import annotations

import pytest
import torch
from conftest import ASSETS, make_llm, prompt_ids

ROWS, PAGE = 8, 16  # 4 layers x 2 KV heads; 16-token pages


@pytest.fixture()
def manager():
    from vllm.v1.core.block_pool import BlockPool

    from dms.vllm.kv import USAGE, DMSAttentionSpec, DMSManager

    USAGE.reset()
    spec = DMSAttentionSpec(block_size=128, num_kv_heads=2, head_size=32, dtype=torch.float32, dms_page_size=PAGE,
                            dms_num_layers=4)
    pool = BlockPool(num_gpu_blocks=41, enable_caching=False, hash_block_size=128)  # 40 + the null block
    yield DMSManager(spec, block_pool=pool, enable_caching=False, kv_cache_group_id=0, scheduler_block_size=128)
    USAGE.reset()


def test_a_block_is_one_page_per_row():
    from dms.vllm.kv import DMSAttentionSpec

    spec = DMSAttentionSpec(block_size=128, num_kv_heads=2, head_size=32, dtype=torch.float32, dms_page_size=PAGE,
                            dms_num_layers=4)
    assert spec.dms_pages_per_block == ROWS
    assert spec.page_size_bytes == 2 * PAGE * 2 * 32 * 4  # per layer: 2 heads x 16 tokens x K and V x fp32
    with pytest.raises(ValueError, match="dms_page_size"):
        DMSAttentionSpec(block_size=128, num_kv_heads=2, head_size=32, dtype=torch.float32, dms_page_size=48)


def test_reservations_follow_the_store_and_never_exceed_the_pool(manager):
    from dms.vllm.kv import Usage

    pool = manager.block_pool
    # A new 200-token prompt reserves its worst case: every token retained, 13 pages per row.
    assert manager.get_num_blocks_to_allocate("a", 200, []) == 13
    assert [b.block_id for b in manager.allocate_new_blocks("a", 200, 200)] == [manager.req_to_blocks["a"][0].block_id]
    assert manager.num_blocks("a") == 13 and pool.get_num_free_blocks() == 40 - 13
    key = manager.req_to_blocks["a"][0].block_id
    # The store reports 31 pages after the prompt, 3 rows with a full last page: the request
    # keeps 4 blocks (32 pages), and one decode token may add 3 pages -> 5 blocks.
    manager.board.by_key[key] = Usage(tokens=200, pages=31, full_rows=3)
    manager.remove_skipped_blocks("a", 200)
    assert manager.num_blocks("a") == 4
    assert manager.get_num_blocks_to_allocate("a", 201, []) == 1
    # No full row: the next token lands in a page the request already has.
    manager.board.by_key[key] = Usage(tokens=200, pages=31, full_rows=0)
    assert manager.get_num_blocks_to_allocate("a", 201, []) == 0
    # Requests that fit are given their blocks; the reserved total never exceeds the pool.
    for rid in "bc":
        assert manager.get_num_blocks_to_allocate(rid, 200, []) <= pool.get_num_free_blocks()
        manager.allocate_new_blocks(rid, 200, 200)
    assert sum(manager.num_blocks(r) for r in "abc") == 4 + 2 * 13 == 40 - pool.get_num_free_blocks()
    # A fourth prompt needs 13 blocks, 10 are free: it waits (vLLM's allocate_slots returns None).
    assert manager.get_num_blocks_to_allocate("d", 200, []) > pool.get_num_free_blocks()
    # Finishing returns every block, the first one included, and tells the worker to free the rows.
    for rid in "abc":
        pool.free_blocks(manager.pop_blocks_for_free(rid))
    assert pool.get_num_free_blocks() == 40
    assert key in manager.board.released and manager.board.by_key == {}


def test_store_never_holds_more_than_reserved(tokenizer):
    """A load larger than the pool (16 requests of ~200 + 160 tokens in 2 MiB, dense room for
    1,024 tokens): at every step each running request's store pages fit the blocks reserved for
    it and the reservations fit the pool; the running requests' contexts together exceed what
    the pool holds dense; every page comes back."""
    from vllm import SamplingParams

    from test_vllm_tokens import _assert_all_pages_back, _dms_model, _engine

    llm = make_llm(ASSETS / "dms-8x", kv_cache_memory_bytes=2 << 20, max_model_len=512)
    engine, core = llm.llm_engine, _engine(llm)
    model, sched = _dms_model(llm), core.scheduler
    manager = sched.kv_cache_manager.coordinator.single_type_managers[0]
    ids = prompt_ids(tokenizer, [("niah_single", 200), ("vt", 180), ("cwe", 190), ("niah_multikey", 210)] * 4)
    sp = SamplingParams(max_tokens=160, temperature=0.0, ignore_eos=True)
    for n, i in enumerate(ids):
        engine.add_request(str(n), {"prompt_token_ids": i}, sp)
    dense_tokens = (2 << 20) // (4 * 2 * 2 * 32 * 4)  # layers x KV heads x K and V x head_dim x fp32
    peak, finished = 0, 0
    while engine.has_unfinished_requests():
        finished += sum(out.finished for out in engine.step())
        peak = max(peak, sum(r.num_computed_tokens for r in sched.running))
        held = torch.stack([a.store.pages_per_slot() for a in model.attn]).sum(0)
        for req in sched.running:
            key = manager.req_to_blocks[req.request_id][0].block_id
            slot = model.slots.by_key.get(key)
            if slot is not None:
                assert int(held[slot]) <= manager.num_blocks(req.request_id) * manager.pages_per_block
        assert sum(manager.num_blocks(r.request_id) for r in sched.running) <= manager.block_pool.num_gpu_blocks - 1
    assert finished == len(ids)
    assert peak > 2 * dense_tokens, (peak, dense_tokens)
    _assert_all_pages_back(llm)


def test_admission_waits_for_the_projected_footprint(manager):
    """A waiting request whose prompt fits now but whose growth, with the running requests',
    would overflow the pool before they finish waits; one that ends sooner is admitted."""
    from types import SimpleNamespace

    from dms.vllm.kv import Usage

    def request(max_tokens):
        return SimpleNamespace(num_prompt_tokens=200, max_tokens=max_tokens, num_tokens=200)

    manager.requests = {"a": request(1000), "b": request(1000), "c": request(1000), "d": request(100)}
    manager.decode_pages, manager.decode_tokens = 10, 100  # 0.1 page per decoded token
    for rid in "ab":
        manager.allocate_new_blocks(rid, 200, 200)
        manager.board.by_key[manager.req_to_blocks[rid][0].block_id] = Usage(tokens=200, pages=31, full_rows=0)
        manager.remove_skipped_blocks(rid, 200)
    free = manager.block_pool.get_num_free_blocks()
    assert free == 40 - 2 * 4 and manager.get_num_blocks_to_allocate("c", 200, []) == 13 <= free
    # At the step a and b end: 3 x (31 pages + a block of rounding + 100 grown) = 417 > 320 pages.
    assert not manager.fits_later("c")
    assert manager.get_num_blocks_to_allocate("c", 200, [], apply_admission_cap=True) > free
    # d ends 900 tokens sooner: the peak is a's and b's end, 2 x 139 pages, and d's own.
    assert manager.fits_later("d")
    assert manager.get_num_blocks_to_allocate("d", 200, [], apply_admission_cap=True) == 13
