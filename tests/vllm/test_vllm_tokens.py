"""Greedy tokens from vLLM + the plugin equal the transformers path (dms.from_pretrained +
DMSCache) on the shipped DMS checkpoints, under chunked prefill mixed with decodes, many
concurrent requests, preemption under a small pool, and aborts; pages go back to the pool."""
from __future__ import annotations

import pytest
import torch
from conftest import ASSETS, PROMPTS, make_llm, prompt_ids, reference_greedy, vllm_greedy

MODELS = ["dms-4x", "dms-8x"]


def _engine(llm):
    return llm.llm_engine.engine_core.engine_core


def _dms_model(llm):
    return _engine(llm).model_executor.driver_worker.worker.model_runner.model


def _assert_all_pages_back(llm):
    """Every request is done: once the pending releases are applied (at the next step, or here)
    the store holds nothing and every page is on the free list; every budget block is free."""
    model = _dms_model(llm)
    pool = _engine(llm).scheduler.kv_cache_manager.block_pool
    assert pool.get_num_free_blocks() == pool.num_gpu_blocks - 1  # all but the null block
    stores = [a.store for a in model.attn]
    with torch.inference_mode():  # the store tensors are inference tensors
        model.slots.release(stores)
    assert model.slots.by_key == {}
    assert all(int(s.seq_lens.sum()) == 0 and int(s.block_table.max()) == -1 for s in stores)
    pages = stores[0].pool
    assert int(pages.free_top[0]) == pages.k_pages.shape[0]
    assert sorted(pages.free_pages.tolist()) == list(range(pages.k_pages.shape[0]))


@pytest.fixture(scope="module", params=MODELS)
def served(request, tokenizer):
    model = ASSETS / request.param
    llm = make_llm(model)
    yield model, llm
    del llm


def test_mixed_chunked_prefill_and_decode(served, tokenizer):
    """Prompts of 60..300 tokens, 128-token steps: later prompts prefill in chunks while earlier
    requests decode in the same step."""
    model, llm = served
    ids = prompt_ids(tokenizer)
    assert vllm_greedy(llm, ids) == reference_greedy(model, ids)
    _assert_all_pages_back(llm)


def test_prefill_in_query_blocks(served, tokenizer, monkeypatch):
    """A chunk attends in blocks of query tokens, each over only the keys some query of it sees
    (dms.vllm.attention.QUERY_BLOCK, 128: a whole chunk in the test above); with 24-token
    blocks, full and partial, the tokens are still the reference's."""
    import dms.vllm.attention as attention

    monkeypatch.setattr(attention, "QUERY_BLOCK", 24)
    model, llm = served
    ids = prompt_ids(tokenizer)
    assert vllm_greedy(llm, ids) == reference_greedy(model, ids)
    _assert_all_pages_back(llm)


def test_many_concurrent_requests(served, tokenizer):
    model, llm = served
    specs = [(task, n + 7 * seed) for seed in range(3) for task, n in PROMPTS[:4]]
    ids = prompt_ids(tokenizer, specs)
    ids = ids + [i[: len(i) // 2] for i in ids]  # 24 requests, more than max_num_seqs=16 at once
    assert vllm_greedy(llm, ids, 12) == reference_greedy(model, ids, 12)
    _assert_all_pages_back(llm)


def test_aborts_free_pages_and_leave_others_intact(served, tokenizer):
    from vllm import SamplingParams

    model, llm = served
    ids = prompt_ids(tokenizer)
    engine = llm.llm_engine
    sp = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    for n, i in enumerate(ids):
        engine.add_request(str(n), {"prompt_token_ids": i}, sp)
    for _ in range(4):  # some prefill chunks and decodes happen
        engine.step()
    engine.abort_request(["1", "3"])
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = list(out.outputs[0].token_ids)
    keep = [0, 2, 4, 5]
    assert sorted(done) == [str(n) for n in keep]
    ref = reference_greedy(model, ids)
    assert [done[str(n)] for n in keep] == [ref[n] for n in keep]
    _assert_all_pages_back(llm)


@pytest.mark.parametrize("name", MODELS)
def test_preemption_when_the_pool_runs_dry(name, tokenizer):
    """Mid-run, all free blocks are taken away (as if other requests held them): the running
    requests cannot grow, vLLM preempts some and recomputes them once blocks are back; the
    tokens stay exact. (A small pool alone rarely forces it: a DMS request's blocks grow
    slowly, so the scheduler just admits fewer requests.) Blocks of 16 tokens, so a block is
    a few store pages and requests cross block boundaries often."""
    from vllm import SamplingParams

    model = ASSETS / name
    llm = make_llm(model, block_size=16)
    ids = prompt_ids(tokenizer)
    engine = llm.llm_engine
    core = _engine(llm)
    pool = core.scheduler.kv_cache_manager.block_pool
    preempted = []
    schedule = core.scheduler.schedule

    def counting_schedule(*args, **kwargs):
        out = schedule(*args, **kwargs)
        preempted.extend(out.preempted_req_ids or ())
        return out

    core.scheduler.schedule = counting_schedule
    sp = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    for n, i in enumerate(ids):
        engine.add_request(str(n), {"prompt_token_ids": i}, sp)
    done = {}

    def step():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = list(out.outputs[0].token_ids)

    for _ in range(6):
        step()
    taken = []
    for _ in range(20):  # until a request needs a block more than it has
        taken += pool.get_new_blocks(pool.get_num_free_blocks())
        step()
        if preempted:
            break
    pool.free_blocks(taken)
    while engine.has_unfinished_requests():
        step()
    core.scheduler.schedule = schedule
    assert preempted, "nothing was preempted: the test would prove nothing"
    assert [done[str(n)] for n in range(len(ids))] == reference_greedy(model, ids, 40)
    _assert_all_pages_back(llm)
