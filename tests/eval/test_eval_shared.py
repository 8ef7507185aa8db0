"""A prompt forward shared by vanilla and the baselines (dms.eval.shared) gives each method what
its own generate gives: the same tokens and the same cache statistics."""
from __future__ import annotations

from functools import partial

import pytest
import torch
from conftest import tiny_model_dir
from transformers import DynamicCache

from dms.baselines import PolicyCache
from dms.compat import cache_kwargs
from dms.eval.runner import load_base, load_tokenizer, run_group, run_task, task_samples
from dms.eval.shared import SharedPrefill, generate_shared


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = str(tiny_model_dir(tmp_path_factory.mktemp("tiny"))["base"])
    return load_base(path), load_tokenizer(path)


def _makers(model):
    makers = {"vanilla": lambda: DynamicCache(config=model.config)}
    for policy in ("streaming", "h2o", "tova", "quest"):
        makers[policy] = partial(PolicyCache, model, policy, 12, page_size=4, sinks=2)
    return makers


def test_shared_prefill_equals_separate_generate(base):
    model, tok = base
    samples = task_samples("niah_single", 48, 3, seed=11)
    enc = tok([s.prompt for s in samples], return_tensors="pt", padding=True)
    makers = _makers(model)
    shared = generate_shared(model, enc, [make() for make in makers.values()], 6, tok.eos_token_id, tok.pad_token_id)
    for make, (tokens, seconds) in zip(makers.values(), shared):
        with torch.no_grad():
            out = model.generate(**enc, **cache_kwargs(make()), max_new_tokens=6, do_sample=False,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        alone = out[:, enc.input_ids.shape[1]:]
        assert torch.equal(tokens[:, :alone.shape[1]], alone) and seconds > 0
        assert (tokens[:, alone.shape[1]:] == tok.pad_token_id).all()


def test_run_group_reports_what_run_task_reports(base):
    model, tok = base
    samples = task_samples("vt", 64, 5, seed=3)
    grouped = run_group(model, tok, samples, _makers(model), batch_size=2)
    for name, make in _makers(model).items():
        alone = run_task(model, tok, samples, make, batch_size=2)
        for key in ("accuracy", "scores", "compression", "kv_bytes", "kv_pool_bytes", "retained_per_head"):
            assert grouped[name][key] == pytest.approx(alone[key]), (name, key)


def test_shared_prefill_refuses_a_second_forward_and_non_caches(base):
    model, tok = base
    with pytest.raises(ValueError, match="at least one cache"):
        SharedPrefill([])
    with pytest.raises(TypeError, match="transformers Cache"):
        SharedPrefill([object()])
    cache = SharedPrefill([DynamicCache(config=model.config), PolicyCache(model, "h2o", 8)])
    ids = tok(["the value of apple is 3 ."], return_tensors="pt").input_ids
    with torch.no_grad():
        model(input_ids=ids, **cache_kwargs(cache))
        with pytest.raises(RuntimeError, match="one prompt forward"):
            model(input_ids=ids[:, :1], **cache_kwargs(cache))
