"""dms hyperscale: the difficulty knob leaves the default samples unchanged, the KV accounting
(peak memory, reads) on cases computed by hand, the Pareto frontier and budget comparison, and
a short end-to-end run of the command on tiny models."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import TINY_WINDOWS, tiny_model_dir
from dms.cli import main
from dms.eval.hyperscale import (HyperscaleConfig, Point, budget_gaps, frontier, level_samples, run_batch,
                                 run_point)
from dms.eval.runner import EVAL_SEED, load_base, load_tokenizer, task_samples
from dms.tasks import generate


@pytest.mark.parametrize("task, option, default", [("arith_trace", "terms", 4), ("vt", "hops", 3)])
def test_default_difficulty_draws_the_same_samples(task, option, default):
    """The knob is the generator's option: at its default, samples (training seeds and the held-out
    evaluation seeds) are those drawn without it, so shipped models' evaluations do not move."""
    for seed in (0, 17, 2 * 10 ** 9, EVAL_SEED, EVAL_SEED + 5):
        assert generate(task, 256, seed) == generate(task, 256, seed, **{option: default})
    config = HyperscaleConfig(task=task, levels=[default], samples=3)
    assert level_samples(config, default) == task_samples(task, 256, 3)


def test_more_terms_make_longer_traces():
    short = generate("arith_trace", 256, EVAL_SEED)
    long = generate("arith_trace", 256, EVAL_SEED, terms=8)
    assert long.target.count(" = ") == 7 and short.target.count(" = ") == 3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    tiny_model_dir(root)
    return root


def _token_bytes(model):
    cfg = model.config
    return cfg.num_hidden_layers * cfg.num_key_value_heads * 2 * cfg.head_dim * 4  # K and V, fp32


def test_vanilla_accounting_one_chain(tiny):
    tok = load_tokenizer(str(tiny / "base"))
    model = load_base(str(tiny / "base"))
    from transformers import DynamicCache

    config = HyperscaleConfig(levels=[4], chains=[1], samples=1, length=64)
    sample = level_samples(config, 4)[0]
    res = run_batch(model, tok, [sample], lambda: DynamicCache(config=model.config), 1, config, torch.Generator())
    prompt, steps, tb = len(tok(sample.prompt).input_ids), res["steps"], _token_bytes(model)
    assert steps >= 1
    assert res["peak"] == (prompt + steps) * tb
    assert res["reads"] == sum(prompt + k for k in range(1, steps + 1)) * tb


def test_vanilla_prompt_counted_once_dms_per_chain(tiny):
    import dms
    from transformers import DynamicCache

    from dms.cache import DMSCache

    tok = load_tokenizer(str(tiny / "base"))
    config = HyperscaleConfig(levels=[4], chains=[3], samples=1, length=64)
    sample = level_samples(config, 4)[0]
    prompt = len(tok(sample.prompt).input_ids)
    base = load_base(str(tiny / "base"))
    tb = _token_bytes(base)
    van = run_batch(base, tok, [sample], lambda: DynamicCache(config=base.config), 3, config,
                    torch.Generator().manual_seed(0))
    # The longest chain fed ``steps`` tokens, the others at most as many; the prompt counted once
    # (three copies would exceed the upper bound, the prompt being longer than the chains).
    assert van["steps"] < prompt
    assert (prompt + van["steps"]) * tb <= van["peak"] <= (prompt + 3 * van["steps"]) * tb
    model = dms.from_pretrained(str(tiny / "dms-8x"), dtype=torch.float32).eval()
    res = run_batch(model, tok, [sample], lambda: DMSCache(model), 3, config, torch.Generator().manual_seed(0))
    kept = TINY_WINDOWS[8] + 1  # the tiny 8x model evicts every token leaving its window
    assert res["peak"] == 3 * kept * _token_bytes(model)
    assert res["reads"] <= 3 * res["steps"] * kept * _token_bytes(model)
    assert res["reads"] >= res["steps"] * kept * _token_bytes(model)


def test_sampling_repeats_with_its_seed(tiny):
    from transformers import DynamicCache

    tok = load_tokenizer(str(tiny / "base"))
    model = load_base(str(tiny / "base"))
    config = HyperscaleConfig(levels=[4], chains=[2], samples=2, length=64, batch_size=2)
    samples = level_samples(config, 4)
    run = lambda: run_point(model, tok, samples, lambda: DynamicCache(config=model.config), "vanilla", 4, 2, config)
    a, b = run(), run()
    assert (a.scores, a.peak_bytes, a.read_bytes) == (b.scores, b.peak_bytes, b.read_bytes)


def _pt(method, chains, peak, reads, acc, level=4):
    return Point(method, level, chains, accuracy=acc, chain_accuracy=acc, peak_bytes=peak, read_bytes=reads,
                 seconds=0.0, samples=10)


def test_frontier_and_budgets():
    pts = [_pt("vanilla", 1, 100, 10, 0.5), _pt("vanilla", 4, 300, 30, 0.6), _pt("vanilla", 2, 200, 40, 0.4),
           _pt("dms", 1, 20, 2, 0.3), _pt("dms", 8, 160, 16, 0.7), _pt("dms", 16, 320, 32, 0.7)]
    assert [p.chains for p in frontier([p for p in pts if p.method == "vanilla"], "peak_bytes")] == [1, 4]
    assert [p.chains for p in frontier([p for p in pts if p.method == "dms"], "peak_bytes")] == [1, 8]
    gaps = budget_gaps(pts, "peak_bytes")
    assert [g["budget"] for g in gaps] == [100, 200, 300]
    assert [g["best"] for g in gaps] == [{"vanilla": 0.5, "dms": 0.3}, {"vanilla": 0.5, "dms": 0.7},
                                        {"vanilla": 0.6, "dms": 0.7}]
    assert budget_gaps([_pt("dms", 1, 5, 5, 1.0), _pt("vanilla", 1, 1, 1, 0.0)], "read_bytes")[0]["best"] == \
        {"dms": None, "vanilla": 0.0}


@pytest.mark.parametrize("kwargs, match", [(dict(task="cwe"), "task"), (dict(levels=[]), "levels"),
                                           (dict(chains=[0]), "chains"), (dict(temperature=0), "temperature"),
                                           (dict(top_p=1.5), "top_p"), (dict(seed=-1), "seed")])
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HyperscaleConfig(**kwargs)


def test_hyperscale_command_on_tiny_models(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["hyperscale", str(tiny / "base"), "--dms", f"8={tiny / 'dms-8x'}", "--levels", "3", "4",
                 "--chains", "1", "2", "--samples", "2", "--length", "64", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    doc = json.loads((out / "hyperscale.json").read_text())
    got = {(p["method"], p["level"], p["chains"]) for p in doc["points"]}
    assert got == {(m, lv, w) for m in ("vanilla", "dms@8x") for lv in (3, 4) for w in (1, 2)}
    for p in doc["points"]:
        assert p["peak_bytes"] > 0 and p["read_bytes"] > 0 and len(p["scores"]) == 2
        assert p["ci_low"] <= p["accuracy"] <= p["ci_high"]
        assert f"{p['method']:<7}" in printed
    assert doc["meta"]["seed"] == EVAL_SEED and "counted once" in doc["meta"]["fairness"]
    assert doc["meta"]["task"] == "vt"  # the default: the task whose accuracy falls gradually with its knob
    assert "fairness:" in printed and "counted once" in printed
    assert (out / "hyperscale.png").stat().st_size > 10_000


def test_plot_of_a_zero_accuracy_point(tmp_path):
    """wilson(0, 24) puts the lower bound a rounding error above 0: the error bar is still drawn."""
    from dms.eval.hyperscale_report import plot

    pts = [Point("vanilla", 4, 1, accuracy=0.0, chain_accuracy=0.0, peak_bytes=10, read_bytes=20, seconds=0.0,
                 samples=24), _pt("dms", 1, 5, 5, 1.0)]
    assert plot(pts, tmp_path / "p.png", "terms").stat().st_size > 10_000
