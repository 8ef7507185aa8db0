"""The memory model (dms.train.memory, ``dms retrofit --plan``): hand-computed terms, and the
command on a folder that holds only config.json (no weights to load)."""
import json

import pytest

from dms.models.tiny import tiny_config
from dms.train import TrainConfig
from dms.train.memory import Shape, plan


def _cfg(tmp_path, **kw):
    (tmp_path / "d.jsonl").write_text('{"input_ids": [1, 2, 3]}\n')
    return TrainConfig(data=[str(tmp_path / "d.jsonl")], output_dir=str(tmp_path / "o"), **kw)


def test_parameter_count_matches_the_model():
    from dms.models.tiny import tiny_model

    for arch in ("llama", "qwen2", "qwen3"):
        model = tiny_model(arch)
        assert Shape.from_config(model.config).params(adapter=False) == sum(p.numel() for p in model.parameters())


def test_terms_hand_computed(tmp_path):
    config = tiny_config("llama")  # 64 hidden, 2 layers, 4 x 16 query, 2 x 16 kv, 128 inter, vocab 128
    layer = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128 + 2 * 64
    params = 2 * layer + 2 * 128 * 64 + 64
    full = plan(config, _cfg(tmp_path, train_mode="full", sharding="fsdp"), world=4)
    assert full["weights"] == params * 4 / 4 and full["teacher"] == params * 4 / 4
    assert full["grads"] == params * 4 / 4 and full["optimizer"] == 2 * params * 4 / 4
    # Adapter-only, borrowed neurons: every q_proj trains whole (rows masked), no teacher copy.
    frozen = plan(config, _cfg(tmp_path, sharding="ddp"), world=4)
    assert frozen["weights"] == params * 4 and frozen["teacher"] == 0
    assert frozen["optimizer"] == 2 * 2 * 64 * 64 * 4 and frozen["grads"] == 2 * (2 * 64 * 64 * 4)  # DDP buckets
    assert frozen["gathered"] == 0
    # Activation checkpointing keeps one hidden state per layer instead of everything.
    long = dict(seq_len=4096, train_mode="full", sharding="none")
    assert (plan(config, _cfg(tmp_path, activation_checkpointing=True, **long), dense_teacher=False)["activations"]
            < plan(config, _cfg(tmp_path, **long), dense_teacher=False)["activations"])


def test_plan_command_reads_only_the_config(tmp_path, capsys):
    from dms.cli import main

    folder = tmp_path / "qwen3-8b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(dict(
        model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False)))
    (tmp_path / "d.jsonl").write_text('{"input_ids": [1, 2, 3]}\n')
    code = main(["retrofit", str(folder), "--data", str(tmp_path / "d.jsonl"), "--output-dir", str(tmp_path / "o"),
                 "--plan", "--world-size", "8", "--device", "cuda", "--seq-len", "32768", "--train-mode", "full",
                 "--activation-checkpointing"])
    out = capsys.readouterr().out
    assert code == 0 and "8 processes (fsdp, cuda)" in out
    weights = float(next(line for line in out.splitlines() if "weights" in line).split()[1])
    assert weights == pytest.approx(8.19e9 * 4 / 8 / 2**30, rel=0.01)  # Qwen3-8B: 8.19 B parameters, fp32, / 8
    assert not (tmp_path / "o").exists()
