"""``dms eval`` on tiny random models: table, JSON and PNG; the baselines' budget follows the
DMS model's retained tokens."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_WINDOWS, tiny_model_dir

import dms
from dms.cli import main
from dms.eval.runner import EVAL_SEED

# Windows of the tiny "DMS" models: they evict every token leaving the window, so on ~100-token
# prompts they keep w + 1 tokens per head, i.e. roughly 4x and 8x.


def test_eval_writes_table_json_and_png(tmp_path, capsys):
    paths = tiny_model_dir(tmp_path)
    out = tmp_path / "results"
    code = main(["eval", str(paths["base"]), "--dms", f"4={paths[4]}", "--dms", f"8={paths[8]}",
                 "--tasks", "niah_single", "vt", "--samples", "3", "--batch-size", "2", "--length", "96",
                 "--out", str(out), "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    for label in ("vanilla", "dms@4x", "dms@8x", "streaming@4x", "h2o@8x", "tova@8x", "quest@4x"):
        assert label in printed
    assert "quest keeps every token" in printed
    doc = json.loads((out / "results.json").read_text())
    rows = {(r["label"], r["task"]): r for r in doc["rows"]}
    assert len(rows) == 2 * (1 + 2 * 5)
    for task in ("niah_single", "vt"):
        assert rows[("vanilla", task)]["compression"] == 1.0
        for ratio, window in TINY_WINDOWS.items():
            d = rows[(f"dms@{ratio}x", task)]
            quest = rows[(f"quest@{ratio}x", task)]  # reads ~ the budget, keeps everything
            assert quest["kv_bytes"] == rows[("vanilla", task)]["kv_bytes"] and quest["compression"] > 1
            assert d["retained_per_head"] == window + 1  # the window alone stays
            for policy in ("streaming", "h2o", "tova"):
                b = rows[(f"{policy}@{ratio}x", task)]
                assert b["budget"] == window + 1 and b["retained_per_head"] == window + 1
                assert b["compression"] == pytest.approx(d["compression"])  # same seen, same retained
                assert b["kv_bytes"] == pytest.approx(d["kv_bytes"])
        assert rows[("dms@8x", task)]["compression"] > rows[("dms@4x", task)]["compression"] > 3
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in doc["rows"])
    for r in doc["rows"]:  # per-sample scores in seed order, and the 95% interval around their mean
        assert len(r["scores"]) == 3 and r["accuracy"] == pytest.approx(sum(r["scores"]) / 3)
        assert r["ci_low"] <= r["accuracy"] <= r["ci_high"] and r["ci_high"] - r["ci_low"] > 0.2
    assert all(s["ci_low"] <= s["accuracy"] <= s["ci_high"] for s in doc["summary"])
    assert doc["meta"]["seed"] == EVAL_SEED and "95% CI" in printed
    png = (out / "accuracy_vs_compression.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_eval_baselines_alone_use_prompt_over_ratio(tmp_path, capsys):
    paths = tiny_model_dir(tmp_path)
    out = tmp_path / "r"
    assert main(["eval", str(paths["base"]), "--methods", "streaming", "--ratios", "4", "--tasks", "cwe",
                 "--samples", "2", "--length", "60", "--out", str(out), "--no-progress"]) == 0
    (row,) = json.loads((out / "results.json").read_text())["rows"]
    assert row["budget"] == 16  # ceil(61 prompt tokens incl. BOS / 4)
    assert row["retained_per_head"] == 16


def test_eval_rejects_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["eval", str(tmp_path), "--dms", "four=x"])
    assert "RATIO=PATH" in capsys.readouterr().err
    paths = tiny_model_dir(tmp_path)
    assert main(["eval", str(paths["base"]), "--methods", "dms", "--tasks", "cwe", "--no-progress"]) == 2
    assert "needs at least one DMS model" in capsys.readouterr().err
