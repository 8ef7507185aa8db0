"""scripts/widen_model.py: the widened model computes what the small one did, its new parts can
learn, and train_base_model.py --init-from starts from it."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dms.models.tiny import tiny_model

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def _module(name):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


wm = _module("widen_model")


def _widened(arch, hidden, heads, kv_heads, intermediate):
    small = tiny_model(arch, tie_word_embeddings=True)
    with torch.no_grad():  # larger weights than the 0.02 init, so the logits are far from zero
        for p in small.parameters():
            p.mul_(10.0 if p.dim() == 2 else 1.0)
    cfg = small.config.to_dict()
    state = wm.widen_state(small.state_dict(), cfg, hidden, heads, kv_heads, intermediate)
    wide = tiny_model(arch, tie_word_embeddings=True, hidden_size=hidden, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, intermediate_size=intermediate)
    missing, unexpected = wide.load_state_dict(state, strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected
    return small, wide


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("heads,kv_heads", [(8, 2), (8, 4), (4, 2)])
def test_widened_model_computes_the_same_logits(arch, heads, kv_heads):
    small, wide = _widened(arch, 96, heads, kv_heads, 256)
    ids = torch.randint(3, 128, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = small(input_ids=ids).logits, wide(input_ids=ids).logits
    assert a.abs().max() > 1.0
    # not bit-exact: RMSNorm's eps now meets a mean over more (zero) dimensions, and sums reorder
    torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-3)


def test_new_parts_receive_gradients():
    _, wide = _widened("llama", 96, 8, 2, 256)
    ids = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    wide.train()
    wide(input_ids=ids, labels=ids).loss.backward()
    layer = wide.model.layers[0]
    assert layer.self_attn.o_proj.weight.grad[64:].abs().sum() > 0  # rows of the new residual dims
    assert layer.mlp.down_proj.weight.grad[:, 128:].abs().sum() > 0  # columns of the new neurons
    assert wide.model.embed_tokens.weight.grad[:, 64:].abs().sum() > 0


def test_widening_refuses_to_shrink_or_regroup_heads():
    small = tiny_model("llama", tie_word_embeddings=True)
    cfg = small.config.to_dict()
    with pytest.raises(ValueError, match="only grows"):
        wm.widen_state(small.state_dict(), cfg, 32, 4, 2, 128)
    with pytest.raises(ValueError, match="keep its KV head"):
        wm.widen_state(small.state_dict(), cfg, 96, 8, 8, 256)  # group 2 -> 1


def test_train_base_model_starts_from_a_widened_model(tmp_path):
    tiny = ["--arch", "llama", "--layers", "1", "--kv-heads", "1", "--mix", "niah_single=1",
            "--min-len", "80", "--start-len", "96", "--max-len", "96", "--curriculum-steps", "1",
            "--batch-tokens", "192", "--warmup", "1", "--log-every", "1", "--eval-every", "1000", "--threads", "1"]
    train = [sys.executable, str(SCRIPTS / "train_base_model.py")]
    subprocess.run(train + ["--out", str(tmp_path / "small"), "--hidden", "32", "--heads", "2", "--intermediate", "64",
                            "--steps", "2", *tiny], check=True, capture_output=True)
    subprocess.run([sys.executable, str(SCRIPTS / "widen_model.py"), str(tmp_path / "small" / "final"),
                    str(tmp_path / "wide"), "--hidden", "64", "--heads", "4", "--kv-heads", "1",
                    "--intermediate", "128"], check=True, capture_output=True)
    # lr 0: the one training step leaves the weights as loaded
    subprocess.run(train + ["--out", str(tmp_path / "run"), "--init-from", str(tmp_path / "wide"),
                            "--hidden", "64", "--heads", "4", "--intermediate", "128", "--steps", "1", "--lr", "0",
                            *tiny], check=True, capture_output=True)
    a = load_file(tmp_path / "wide" / "model.safetensors")
    b = load_file(tmp_path / "run" / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
