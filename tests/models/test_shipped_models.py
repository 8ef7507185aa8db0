"""The models shipped in dms/assets: complete, loadable offline in the formats users load, and
the trained weights (the base model answers held-out needle questions; the retrofits evict)."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import DynamicCache

import dms
from dms.cli.demo import default_model_dir, folders, missing_files
from dms.eval.runner import load_base, load_tokenizer, run_task, task_samples
from dms.config import DMSConfigError

ASSETS = default_model_dir()


def test_every_file_the_demo_needs_is_shipped():
    assert missing_files(ASSETS) == []
    assert (ASSETS / "README.md").is_file()  # the model card


def test_base_is_a_plain_model_that_answers_needle_questions():
    config = json.loads((folders(ASSETS)["base"] / "config.json").read_text())
    assert not any(k.startswith("dms_") for k in config)
    with pytest.raises(DMSConfigError, match="not a DMS checkpoint"):
        dms.from_pretrained(str(folders(ASSETS)["base"]))
    model, tok = load_base(str(folders(ASSETS)["base"])), load_tokenizer(str(folders(ASSETS)["base"]))
    result = run_task(model, tok, task_samples("niah_single", 128, 8), lambda: DynamicCache(config=model.config),
                      batch_size=8)
    assert result["accuracy"] >= 7 / 8


@pytest.mark.parametrize("ratio", [4, 8])
def test_retrofits_load_in_the_published_format_and_evict(ratio):
    from dms.cache import DMSCache

    folder = str(folders(ASSETS)[ratio])
    model = dms.from_pretrained(folder, dtype=torch.float32).eval()
    assert model.config.dms_cr == float(ratio) and model.config.dms_separate_alpha
    tok = load_tokenizer(str(folders(ASSETS)["base"]))
    result = run_task(model, tok, task_samples("niah_single", 256, 4), lambda: DMSCache(model), batch_size=4)
    assert result["compression"] > 1.5
