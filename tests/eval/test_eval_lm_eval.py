"""The lm-evaluation-harness adapter on a tiny DMS model: log-likelihoods equal the DMS model's
own (cache-free) forward, generate_until decodes greedily through a DMSCache.

lm-eval is an optional dependency of the package but part of requirements-test.txt, so these
tests always run in CI; a missing install fails them rather than skipping them."""
from __future__ import annotations

import sys

import pytest
import torch
from conftest import tiny_model_dir

import dms
from dms.compat import cache_kwargs


def test_missing_lm_eval_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    monkeypatch.delitem(sys.modules, "dms.eval.lm_eval", raising=False)
    with pytest.raises(ImportError, match="pip install lm-eval"):
        import dms.eval.lm_eval  # noqa: F401


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    from dms.eval.lm_eval import DMSLM

    path = tiny_model_dir(tmp_path_factory.mktemp("lm"))[8]
    return DMSLM(pretrained=str(path), batch_size=2, device="cpu", max_length=256, dtype="float32")


def _instance(kind, args, idx=0):
    from lm_eval.api.instance import Instance

    return Instance(request_type=kind, doc={}, arguments=args, idx=idx)


def test_loglikelihood_equals_the_dms_forward(lm):
    from dms.tasks import generate

    sample = generate("niah_single", 60, 0)
    reqs = [_instance("loglikelihood", (sample.prompt, " " + sample.target)),
            _instance("loglikelihood", (sample.prompt, " 1 2 3"), 1)]
    results = lm.loglikelihood(reqs)
    assert len(results) == 2
    for req, (logprob, greedy) in zip(reqs, results):
        # lm-eval's split: the continuation is what encoding context + continuation adds
        ctx = lm.tok_encode(req.arguments[0])
        cont = lm.tok_encode(req.arguments[0] + req.arguments[1])[len(ctx):]
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():  # cache-free DMS forward: dense visibility mask
            logits = lm.model(input_ids=ids, use_cache=False).logits.log_softmax(-1)[0]
        pos = torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1)
        expected = logits[pos, torch.tensor(cont)].sum().item()
        assert logprob == pytest.approx(expected, abs=1e-4)
        assert greedy == bool((logits[pos].argmax(-1) == torch.tensor(cont)).all())


def test_generate_until_decodes_with_a_dms_cache(lm):
    from dms.tasks import generate

    prompt = generate("vt", 80, 3).prompt
    (text,) = lm.generate_until([_instance("generate_until", (prompt, {"until": ["?"], "max_gen_toks": 6,
                                                                         "do_sample": False}))])
    ctx = torch.tensor([lm.tok_encode(prompt)])
    with torch.no_grad():
        ref = lm.model.generate(ctx, **cache_kwargs(dms.DMSCache(lm.model)), max_new_tokens=6, do_sample=False,
                                pad_token_id=lm.tokenizer.pad_token_id)
    expected = lm.tokenizer.decode(ref[0, ctx.shape[1]:]).split("?")[0]
    assert text == expected
    assert lm.compression and lm.compression[-1] > 4  # window 12, everything older evicted


def test_simple_evaluate_on_a_local_task(lm, tmp_path, monkeypatch):
    """lm-eval's own evaluator on a local generate_until task, with the "dms" model instance."""
    import json

    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from dms.tasks import generate

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    data = tmp_path / "data.jsonl"
    with open(data, "w") as f:
        for i in range(3):
            s = generate("niah_single", 60, i)
            f.write(json.dumps(dict(prompt=s.prompt, target=s.target)) + "\n")
    (tmp_path / "task.yaml").write_text(
        "task: dms_tiny_niah\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: generate_until\n"
        'doc_to_text: "{{prompt}}"\ndoc_to_target: "{{target}}"\n'
        'generation_kwargs:\n  until: ["?"]\n  max_gen_toks: 4\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n")
    before = len(lm.compression)
    res = simple_evaluate(model=lm, tasks=["dms_tiny_niah"],
                          task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False))
    assert 0.0 <= res["results"]["dms_tiny_niah"]["exact_match,none"] <= 1.0
    assert len(lm.compression) - before == 2  # one DMS-cached generate call per batch of 2 documents
