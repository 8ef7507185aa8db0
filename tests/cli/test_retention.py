"""``dms retention`` on a tiny DMS model: the map of kept tokens matches what the cache holds."""
from __future__ import annotations

import pytest
import torch
from conftest import TINY_WINDOWS, tiny_model_dir

import dms
from dms.cli import main
from dms.eval.retention import kept_at_end, retention_map
from dms.eval.runner import load_tokenizer, task_samples


def test_kept_at_end_hand_case():
    # tokens 0..5: decision at t flags t - 1, so tokens 0 and 3 are flagged (decisions at 1 and 4);
    # a flagged k stays while k + window >= 5 (the last token): with window 2 token 3 does, 0 does not
    d = torch.tensor([False, True, False, False, True, False])
    assert kept_at_end(d, 2).tolist() == [False, True, True, True, True, True]
    assert kept_at_end(d, 1).tolist() == [False, True, True, False, True, True]

def test_map_matches_the_cache_and_the_window(tmp_path):
    paths = tiny_model_dir(tmp_path)
    model = dms.from_pretrained(str(paths[8]), dtype=torch.float32).eval()
    (sample,) = task_samples("arith_trace", 80, 1)
    m = retention_map(model, load_tokenizer(str(paths[8])), sample)
    layers, heads, N = m.kept.shape
    assert (layers, heads) == (model.config.num_hidden_layers, model.config.num_key_value_heads)
    assert N > m.prompt_tokens == len(m.tokens) - (N - m.prompt_tokens)
    retained = torch.stack(m.cache.stats()["retained_per_layer"]).view(layers, heads)
    assert torch.equal(m.kept.sum(-1), retained.long())
    assert (m.kept.sum(-1) == TINY_WINDOWS[8] + 1).all()  # this model evicts everything leaving the window
    assert m.kept[..., -TINY_WINDOWS[8] - 1:].all()


def test_command_writes_the_png_and_summary(tmp_path, capsys):
    paths = tiny_model_dir(tmp_path)
    out = tmp_path / "map.png"
    assert main(["retention", str(paths[4]), "--task", "vt", "--length", "96", "--index", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "layer 0 head 0:" in printed and f"wrote {out}" in printed and "marked prompt words" in printed
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5_000


def test_a_plain_model_is_refused(tmp_path, capsys):
    paths = tiny_model_dir(tmp_path)
    assert main(["retention", str(paths["base"]), "--task", "vt"]) == 2
    assert "not a DMS checkpoint" in capsys.readouterr().err
