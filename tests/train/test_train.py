"""Retrofit training (dms.train) on tiny random models: loss terms, curriculum, which
parameters train, teacher exactness, resume, errors and the CLI."""
import argparse
import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from dms.cli.retrofit import add_arguments
from dms.models.tiny import tiny_model
from dms.train import TrainConfig, Trainer, retrofit
from dms.train.data import DataError, Document, SampleStream, one_per_row, pack, read_documents
from dms.train.loss import (calibrated_compression_loss, compression_loss, compression_ratio_at, evicted_fraction,
                            kl_student_teacher, mean_abs_logit, smoothed_fraction, target_fraction, window_fraction)


def _data(path, n_docs=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    with open(path, "w") as f:
        for _ in range(n_docs):
            n = int(torch.randint(10, 120, (1,), generator=g))
            f.write(json.dumps({"input_ids": torch.randint(3, 128, (n,), generator=g).tolist()}) + "\n")
    return str(path)


def _options(tmp_path, **kw):
    base = dict(data=[_data(tmp_path / "data.jsonl")], output_dir=str(tmp_path / "out"), steps=4, seq_len=32,
                window=4, target_cr=3.0, batch_size=2, lr=1e-2, progress=False)
    base.update(kw)
    return base


def _log(out_dir):
    with open(f"{out_dir}/train_log.jsonl") as f:
        return [json.loads(line) for line in f]


# -- loss terms and curriculum -------------------------------------------------------------

def test_curriculum_hand_computed():
    assert compression_ratio_at(0, 8.0, 100) == 1.0
    assert compression_ratio_at(50, 8.0, 100) == 4.5
    assert compression_ratio_at(100, 8.0, 100) == 8.0
    assert compression_ratio_at(250, 8.0, 100) == 8.0
    assert compression_ratio_at(0, 8.0, 0) == 8.0
    assert target_fraction(25, 5.0, 100) == pytest.approx(1 - 1 / 2.0)
    assert target_fraction(0, 5.0, 100) == 0.0


def test_lr_schedule_hand_computed(tmp_path):
    cfg = TrainConfig(**_options(tmp_path, steps=10, lr=1.0, warmup_steps=2, decay_steps=4))
    assert [cfg.lr_at(s) for s in range(10)] == [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.75, 0.5, 0.25]
    assert TrainConfig(**_options(tmp_path, steps=3, lr=2.0)).lr_at(2) == 2.0
    with pytest.raises(ValueError, match="decay_steps"):
        TrainConfig(**_options(tmp_path, steps=3, decay_steps=4))


def test_compression_terms_hand_computed():
    # Two layers, B=1, Hkv=2, T=4; index 0 and the pad at t=3 are excluded by the mask.
    d0 = torch.tensor([[[1.0, 1.0, 0.0, 1.0], [0.0, 1.0, 1.0, 1.0]]])
    d1 = torch.tensor([[[0.0, 0.0, 0.0, 1.0], [1.0, 1.0, 0.0, 0.0]]])
    valid = torch.tensor([[False, True, True, False]])
    frac = evicted_fraction([d0, d1], valid)
    # Counted entries: layer 0 -> 1,0,1,1 ; layer 1 -> 0,0,1,0: 4 of 8.
    assert frac.item() == 0.5
    assert compression_loss(frac, 0.75).item() == 0.25
    assert compression_loss(frac, 0.25).item() == 0.0


def test_per_row_fractions_hand_computed():
    d0 = torch.tensor([[[1.0, 1.0, 0.0]], [[0.0, 1.0, 1.0]]])  # B=2, Hkv=1, T=3
    d1 = torch.tensor([[[0.0, 0.0, 1.0]], [[1.0, 1.0, 1.0]]])
    valid = torch.tensor([[False, True, True], [False, False, True]])
    rows = evicted_fraction([d0, d1], valid, per_row=True)
    assert rows.tolist() == [0.5, 1.0]  # row 0: 1,0 and 0,1; row 1: 1 and 1
    assert evicted_fraction([d0, d1], valid).item() == pytest.approx(4 / 6)


def test_window_fraction_hand_computed():
    # T = 552, w = 16, CR 8: hold 69 = 17 (window + newest) + 52 of the 535 older tokens.
    lengths = torch.tensor([552, 168, 100])
    got = window_fraction(8.0, lengths, 16, 0.98)
    assert got[0].item() == pytest.approx(1 - 52 / 535)
    assert got[1].item() == pytest.approx(1 - 4 / 151)
    assert got[2].item() == pytest.approx(0.98)  # 100 / 8 < 17: out of reach, capped
    assert window_fraction(1.0, lengths, 16, 0.98).tolist() == [0.0, 0.0, 0.0]


def test_calibrated_term_is_two_sided_past_the_tolerance():
    lengths = torch.tensor([552, 552, 552])
    lo = window_fraction(8.0 * 0.9, lengths, 16, 0.98)[0].item()
    hi = window_fraction(8.0 * 1.1, lengths, 16, 0.98)[0].item()
    rows = torch.tensor([lo - 0.05, (lo + hi) / 2, hi + 0.02], requires_grad=True)
    loss = calibrated_compression_loss(rows, lengths, 8.0, 16, 0.1, 0.98)
    assert loss.item() == pytest.approx((0.05 + 0.02) / 3, abs=1e-6)
    (g,) = torch.autograd.grad(loss, rows)
    assert g.tolist() == pytest.approx([-1 / 3, 0.0, 1 / 3])  # up below, none inside, down above


def test_calibrated_compression_trains_and_is_validated(tmp_path):
    opts = _options(tmp_path, steps=6, target_cr=3.0, ramp_steps=0, calibrated_tolerance=0.05)
    retrofit(tiny_model("llama"), **opts)
    log = _log(opts["output_dir"])
    assert len(log) == 6 and log[0]["compression_loss"] > 0  # nothing evicted yet: pushed up
    with pytest.raises(ValueError, match="calibrated_tolerance"):
        TrainConfig(**_options(tmp_path, calibrated_tolerance=1.5))
    p = argparse.ArgumentParser()
    add_arguments(p)
    base = ["m", "--data", "d", "--output-dir", "o"]
    assert p.parse_args(base).calibrated_tolerance is None  # the paper's term by default
    assert p.parse_args(base + ["--calibrated-compression"]).calibrated_tolerance == 0.05
    assert p.parse_args(base + ["--calibrated-compression", "0.1"]).calibrated_tolerance == 0.1
    with pytest.raises(ValueError, match="calibrated_cap"):
        TrainConfig(**_options(tmp_path, calibrated_cap=0.0))


def test_smoothed_fraction_value_and_gradient():
    f = torch.tensor(0.5, requires_grad=True)
    est = smoothed_fraction(f, 0.8, 0.9)
    assert est.item() == pytest.approx(0.9 * 0.8 + 0.1 * 0.5)
    (g,) = torch.autograd.grad(est, f)
    assert g.item() == 1.0  # the batch's decisions get the full push
    assert smoothed_fraction(f, None, 0.9) is f and smoothed_fraction(f, 0.8, 0.0) is f


def test_compression_term_judges_the_running_fraction(tmp_path):
    opts = _options(tmp_path, steps=6, target_cr=8.0, ramp_steps=0, compression_ema=0.9)
    retrofit(tiny_model("llama"), **opts)
    running = None
    for r in _log(opts["output_dir"]):
        est = r["evicted_fraction"] if running is None else 0.9 * running + 0.1 * r["evicted_fraction"]
        assert r["compression_loss"] == pytest.approx(max(0.0, 1 - 1 / 8 - est), abs=1e-6)
        running = est


def test_bad_compression_ema_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="compression_ema"):
        TrainConfig(**_options(tmp_path, compression_ema=1.0))


def test_mean_abs_logit_hand_computed():
    l0 = torch.tensor([[[9.0, -2.0, 4.0, 7.0], [9.0, 6.0, -8.0, 7.0]]])
    l1 = torch.tensor([[[9.0, 0.0, 0.0, 7.0], [9.0, -1.0, 3.0, 7.0]]])
    valid = torch.tensor([[False, True, True, False]])
    # Counted entries: |-2|, 4, 6, |-8|, 0, 0, |-1|, 3 -> 24 / 8.
    assert mean_abs_logit([l0, l1], valid).item() == 3.0


def test_the_log_gauges_logit_saturation(tmp_path):
    """A fresh adapter sits at |logit| = alpha_offset; at alpha_scale 100 the same steps drive the
    logits far further from 0 than at alpha_scale 10 (the saturation the gauge is for)."""
    gauges = {}
    for scale in (10.0, 100.0):
        (tmp_path / str(scale)).mkdir()
        opts = _options(tmp_path / str(scale), variant="adapter", steps=30, lr=5e-3, alpha_scale=scale)
        retrofit(tiny_model("llama"), **opts)
        log = _log(opts["output_dir"])
        assert log[0]["mean_abs_logit"] == pytest.approx(5.0)
        gauges[scale] = log[-1]["mean_abs_logit"]
    assert gauges[100.0] > 3 * gauges[10.0], gauges


@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_kl_matches_direct_formula(chunk):
    g = torch.Generator().manual_seed(0)
    hs = torch.randn(2, 5, 8, generator=g, requires_grad=True)
    ht = torch.randn(2, 5, 8, generator=g)
    head_s, head_t = torch.nn.Linear(8, 11, bias=False), torch.nn.Linear(8, 11, bias=False)
    valid = torch.tensor([[True] * 5, [False, False, True, True, True]])
    kl = kl_student_teacher(hs, ht, head_s, head_t, valid, chunk)
    ls, lt = F.log_softmax(head_s(hs), -1), F.log_softmax(head_t(ht), -1)
    per_pos = (ls.exp() * (ls - lt)).sum(-1)  # KL(student || teacher)
    expected = per_pos[valid].mean()
    torch.testing.assert_close(kl, expected)
    (g1,) = torch.autograd.grad(kl, hs)
    (g2,) = torch.autograd.grad(expected, hs)
    torch.testing.assert_close(g1, g2)


def test_pack_left_pads_the_tail():
    ids, real, distilled = pack([[5, 6, 7], [8, 9]], seq_len=4, eos_id=2, pad_id=0)
    assert ids.tolist() == [[5, 6, 7, 2], [0, 8, 9, 2]]
    assert real.tolist() == [[True] * 4, [False, True, True, True]]
    assert distilled[real].all()


def test_one_per_row_left_pads_each_document_and_refuses_long_ones():
    ids, real, distilled = one_per_row([[5, 6, 7], [8, 9, 2]], seq_len=5, eos_id=2, pad_id=0)
    assert ids.tolist() == [[0, 5, 6, 7, 2], [0, 0, 8, 9, 2]]
    assert real.tolist() == [[False, True, True, True, True], [False, False, True, True, True]]
    assert distilled.tolist() == real.tolist()
    # prompt [8, 9], completion [7]: distilled are the positions predicting 7 and the EOS
    ids, _, distilled = one_per_row([Document([8, 9, 7], distill_from=2)], seq_len=5, eos_id=2, pad_id=0)
    assert ids.tolist() == [[0, 8, 9, 7, 2]]
    assert distilled.tolist() == [[False, False, True, True, True]]
    with pytest.raises(DataError, match="document 1 has 6 tokens"):
        one_per_row([[5], [4, 4, 4, 4, 4]], seq_len=5, eos_id=2, pad_id=0)


def test_unpacked_training_runs_on_left_padded_rows(tmp_path):
    retrofit(tiny_model("llama"), **_options(tmp_path, variant="adapter", pack=False, seq_len=128, steps=2))
    log = _log(tmp_path / "out")
    assert len(log) == 2 and all(math.isfinite(r["kl"]) for r in log)


def test_a_batch_drops_the_columns_no_row_uses():
    docs = [[5, 6, 7], [8, 9], [4]]  # 4, 3 and 2 tokens with EOS
    stream = SampleStream(*one_per_row(docs, seq_len=8, eos_id=2, pad_id=0), seed=0)
    for first in range(6):
        ids, real, distilled = stream.batch(range(first, first + 2))
        assert ids.shape[1] == int(real.sum(1).max())
        assert torch.equal(real, ids != 0) and torch.equal(distilled, real)
    ids, _, _ = stream.batch(range(3))
    assert sorted(ids.tolist()) == [[0, 0, 4, 2], [0, 8, 9, 2], [5, 6, 7, 2]]


def test_unpacked_training_does_not_depend_on_seq_len(tmp_path):
    # documents are <= 120 tokens: seq_len 128 and 256 give the same batches once padding is dropped
    a = retrofit(tiny_model("llama"), **_options(tmp_path, output_dir=str(tmp_path / "a"), pack=False, seq_len=128))
    b = retrofit(tiny_model("llama"), **_options(tmp_path, output_dir=str(tmp_path / "b"), pack=False, seq_len=256))
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)


# -- which parameters train, teacher exactness ---------------------------------------------

def test_adapter_only_leaves_base_bit_identical(tmp_path):
    model = tiny_model("qwen2")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trained = retrofit(model, **_options(tmp_path, variant="adapter"))
    changed_adapter = False
    for n, p in trained.named_parameters():
        if ".dms_proj_alpha" in n:
            changed_adapter |= bool(p.detach().abs().sum() > 0)
        else:
            assert torch.equal(p, before[n]), n
    assert changed_adapter
    import dms

    loaded = dms.from_pretrained(str(tmp_path / "out"))  # the published format round trip
    reloaded = dict(loaded.named_parameters())
    for n, p in trained.named_parameters():
        assert torch.equal(reloaded[n], p), n


def test_neuron_variant_trains_only_borrowed_rows_and_teacher_stays_exact(tmp_path):
    from dms.models import borrowed_neuron_rows

    model = tiny_model("qwen3")
    plain = copy.deepcopy(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = Trainer(model, TrainConfig(**_options(tmp_path, variant="neuron")))
    rows = borrowed_neuron_rows(trainer.model)
    for layer, idx in rows.items():  # borrowed neurons start at 0: logit = -offset, keep all
        assert not trainer.model.model.layers[layer].self_attn.q_proj.weight[idx].any()
    trainer.train()
    assert _log(trainer.cfg.output_dir)[0]["evicted_fraction"] < 0.05
    for n, p in trainer.model.named_parameters():
        if n.endswith("self_attn.q_proj.weight"):
            layer = int(n.split(".")[2])
            other = torch.ones(p.shape[0], dtype=torch.bool)
            other[rows[layer]] = False
            assert torch.equal(p[other], before[n][other]), n
            assert not torch.equal(p[rows[layer]], before[n][rows[layer]]), n
        else:
            assert torch.equal(p, before[n]), n
    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(16).expand(2, 16)
    with torch.no_grad():
        expected = plain.model(input_ids=ids, position_ids=pos).last_hidden_state
    # The plain model's eager attention against the teacher's fused one: fp32 rounding apart.
    torch.testing.assert_close(trainer.teacher_hidden(ids, None, pos), expected, rtol=1e-5, atol=1e-5)


def test_full_finetune_trains_base_against_frozen_copy(tmp_path):
    model = tiny_model("mistral")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = Trainer(model, TrainConfig(**_options(tmp_path, train_mode="full", lr=1e-3)))
    trainer.train()
    p = dict(trainer.model.named_parameters())["model.layers.0.mlp.up_proj.weight"]
    assert not torch.equal(p, before["model.layers.0.mlp.up_proj.weight"])
    for n, t in trainer.teacher.named_parameters():
        assert torch.equal(t, before[n]) and not t.requires_grad


# -- behaviour over a run --------------------------------------------------------------------

def test_compression_follows_curriculum_with_bounded_kl(tmp_path):
    """A few hundred steps of the adapter variant: the achieved compression tracks CR(step)
    (25-step averages within 10%) and the distillation loss stays small."""
    opts = _options(tmp_path, variant="adapter", steps=250, seq_len=64, window=4, target_cr=4.0, lr=1e-3)
    retrofit(tiny_model("llama"), **opts)
    log = _log(opts["output_dir"])
    assert len(log) == 250
    for i in range(50, 250, 25):
        window = log[i:i + 25]
        target = sum(r["target_cr"] for r in window) / 25
        achieved = sum(r["achieved_cr"] for r in window) / 25
        assert abs(achieved / target - 1) < 0.10, (i, target, achieved)
    assert max(r["kl"] for r in log) < 0.05
    assert log[-1]["target_cr"] == pytest.approx(1 + 3.0 * 249 / 250)


@pytest.mark.parametrize("variant", ["neuron", "adapter"])
def test_resume_equals_uninterrupted_run(tmp_path, variant):
    full = _options(tmp_path, variant=variant, steps=6, save_every=3, output_dir=str(tmp_path / "full"),
                    compression_ema=0.9)  # the running fraction is training state too
    tied = variant == "adapter"  # save_pretrained drops the tied lm_head: resume must cope
    a = retrofit(tiny_model("llama", tie_word_embeddings=tied), **full)
    resumed = dict(full, output_dir=str(tmp_path / "resumed"), resume_from=str(tmp_path / "full" / "checkpoint-000003"))
    b = retrofit(tiny_model("llama", tie_word_embeddings=tied), **resumed)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    assert [r["loss"] for r in _log(full["output_dir"])[3:]] == [r["loss"] for r in _log(resumed["output_dir"])]


def test_activation_checkpointing_gives_the_same_training(tmp_path):
    a = retrofit(tiny_model("qwen3"), **_options(tmp_path, output_dir=str(tmp_path / "a"), steps=2))
    b = retrofit(tiny_model("qwen3"), **_options(tmp_path, output_dir=str(tmp_path / "b"), steps=2,
                                                 activation_checkpointing=True))
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)


# -- errors ------------------------------------------------------------------------------------

def test_clear_errors(tmp_path):
    model = tiny_model("llama", max_position_embeddings=64)
    with pytest.raises(DataError, match="does not exist"):
        retrofit(model, **_options(tmp_path, data=[str(tmp_path / "missing.jsonl")]))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="empty"):
        retrofit(model, **_options(tmp_path, data=[str(tmp_path / "empty.jsonl")]))
    (tmp_path / "text.jsonl").write_text(json.dumps({"text": "hello"}) + "\n")
    with pytest.raises(DataError, match="no tokenizer"):
        retrofit(model, **_options(tmp_path, data=[str(tmp_path / "text.jsonl")]))
    folder = tmp_path / "no_tokenizer"
    model.save_pretrained(folder)
    with pytest.raises(DataError, match="no tokenizer"):
        retrofit(str(folder), **_options(tmp_path, data=[str(tmp_path / "text.jsonl")]))
    with pytest.raises(ValueError, match="seq_len 128 is longer than the model supports"):
        retrofit(model, **_options(tmp_path, seq_len=128))
    with pytest.raises(ValueError, match="target_cr"):
        TrainConfig(**_options(tmp_path, target_cr=0.5))
    with pytest.raises(ValueError, match="window"):
        TrainConfig(**_options(tmp_path, window=0))
    import transformers

    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    with pytest.raises(ValueError, match="unsupported architecture 'gpt2'"):
        retrofit(gpt2, **_options(tmp_path))


# -- command line, text data, published format ---------------------------------------------------

def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "the a cat dog sat on mat ran far and then slept".split()
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def test_cli_on_text_data_writes_a_loadable_dms_model(tmp_path):
    import dms
    from dms.cli import main

    folder = tmp_path / "plain"
    tiny_model("qwen2").save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    lines = ["the cat sat on the mat", "a dog ran far and then slept", "the dog sat"] * 10
    (tmp_path / "text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    out = tmp_path / "dms"
    assert main(["retrofit", str(folder), "--data", str(tmp_path / "text.jsonl"), "--output-dir", str(out),
                 "--steps", "2", "--seq-len", "16", "--window", "2", "--target-cr", "2", "--no-progress"]) == 0
    assert (out / "tokenizer.json").is_file() and len(_log(out)) == 2
    loaded = dms.from_pretrained(str(out))
    assert loaded.config.dms_window_size == 2 and loaded.config.dms_cr == 2.0


def test_prompt_completion_records_distil_only_the_completion(tmp_path):
    tok = _tokenizer()
    path = tmp_path / "pc.jsonl"
    path.write_text(json.dumps({"prompt": "the cat sat", "completion": "on the mat"}) + "\n")
    (doc,) = read_documents([str(path)], tok)
    prompt = tok("the cat sat")["input_ids"]
    assert list(doc) == prompt + tok("on the mat", add_special_tokens=False)["input_ids"]
    assert doc.distilled() == [t + 1 >= len(prompt) for t in range(len(doc))]
    for bad, match in [({"prompt": "the cat"}, "expected a JSON object"), ({"prompt": "a", "completion": 3}, "strings"),
                       ({"prompt": "a", "completion": ""}, "no tokens")]:
        path.write_text(json.dumps(bad) + "\n")
        with pytest.raises(DataError, match=match):
            read_documents([str(path)], tok)
