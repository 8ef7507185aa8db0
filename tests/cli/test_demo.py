"""``dms demo``: a clear failure when the shipped models are missing, and an end-to-end run on
tiny random models saved to a temporary --model-dir."""
from __future__ import annotations

import json
import shutil

from conftest import tiny_model_dir

from dms.cli import main
from dms.eval.runner import EVAL_SEED


def test_missing_models_fail_with_the_files_and_how_to_make_them(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["demo", "--model-dir", str(tmp_path / "nothing"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    for name in ("base/config.json", "base/tokenizer.json", "base/model.safetensors", "dms-4x/config.json",
                 "dms-8x/model.safetensors"):
        assert str(tmp_path / "nothing" / name) in err
    assert "scripts/train_base_model.py" in err and "dms retrofit" in err and "--target-cr 8" in err
    assert not out.exists()  # no results without the models


def test_one_missing_model_is_named(tmp_path, capsys):
    tiny_model_dir(tmp_path)
    shutil.rmtree(tmp_path / "dms-8x")
    assert main(["demo", "--model-dir", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "dms-8x" / "config.json") in err
    assert str(tmp_path / "base") not in err.split("Produce them")[0]


def test_demo_end_to_end_on_tiny_models(tmp_path, capsys):
    tiny_model_dir(tmp_path)
    out = tmp_path / "out"
    assert main(["demo", "--model-dir", str(tmp_path), "--tasks", "niah_single", "cwe", "--samples", "2",
                 "--length", "64", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert str(out / "results.json") in printed and str(out / "accuracy_vs_compression.png") in printed
    doc = json.loads((out / "results.json").read_text())
    labels = {s["label"] for s in doc["summary"]}
    assert labels == {"vanilla"} | {f"{m}@{r}x" for m in ("dms", "streaming", "h2o", "tova", "quest")
                                     for r in (4, 8)}
    for s in doc["summary"]:
        assert s["label"] in printed
        if s["method"] not in ("vanilla", "quest"):  # evicting baselines keep what DMS retained
            dms_row = next(d for d in doc["summary"] if d["label"] == f"dms@{s['ratio']:g}x")
            assert abs(s["compression"] - dms_row["compression"]) < 1e-6
    assert (out / "accuracy_vs_compression.png").stat().st_size > 10_000
    assert doc["meta"]["seed"] == EVAL_SEED and "95% CI" in printed  # held-out samples, with intervals
    assert all(r["scores"] and r["ci_low"] <= r["accuracy"] <= r["ci_high"] for r in doc["rows"])
