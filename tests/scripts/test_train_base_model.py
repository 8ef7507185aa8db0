"""scripts/train_base_model.py: a run stopped at a checkpoint and resumed continues exactly as an
uninterrupted run (same batches, same optimizer state), and its model folders load offline."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from dms.tasks import generate, normalize
from dms.tasks.vocab import KEYS

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "train_base_model.py"
TINY = ["--arch", "llama", "--layers", "1", "--hidden", "32", "--heads", "2", "--kv-heads", "1",
        "--intermediate", "64", "--min-len", "80", "--start-len", "96", "--max-len", "96",
        "--curriculum-steps", "4", "--batch-tokens", "192", "--warmup", "2", "--steps", "8",
        "--log-every", "1", "--eval-every", "1000", "--threads", "1"]


def _run(out: Path, *extra: str) -> None:
    subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *TINY, *extra], check=True,
                   capture_output=True, text=True)


def _losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_stop_and_resume_equals_an_uninterrupted_run(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _run(straight)
    _run(resumed, "--stop-step", "4")
    assert max(_losses(resumed)) == 4
    _run(resumed)
    assert _losses(resumed) == _losses(straight) and len(_losses(straight)) == 8
    a = load_file(straight / "final" / "model.safetensors")
    b = load_file(resumed / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    tok = AutoTokenizer.from_pretrained(straight / "final")
    prompt = generate("niah_single", 80, 0).prompt
    assert tok.unk_token_id not in tok(prompt)["input_ids"]
    assert normalize(tok.decode(tok(prompt)["input_ids"], skip_special_tokens=True)) == normalize(prompt)


def _script_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_base_model", SCRIPT)
    tbm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tbm)
    return tbm


def test_shuffled_answers_keep_the_set_and_vary_the_order():
    import random

    import pytest

    tbm = _script_module()
    sample = generate("cwe", 128, 7)
    orders = {tbm.shuffled(sample, random.Random(i)).target for i in range(20)}
    assert len(orders) > 1
    assert all(sorted(o.split(" , ")) == sorted(sample.answers) for o in orders)
    with pytest.raises(ValueError, match="not the list of answers"):
        tbm.shuffled(generate("arith_trace", 128, 7), random.Random(0))
    with pytest.raises(ValueError, match="unknown tasks"):
        tbm.Data(tbm.parse_args(["--out", "unused", "--shuffle-answers", "cwe,nope"]), None)


def test_copy_warmup_batches_are_copy_lists_then_the_mix():
    tbm = _script_module()
    from dms.tasks.tokenizer import build_tokenizer

    args = tbm.parse_args(["--out", "unused", "--mix", "niah_single=1,kv_recall=1", "--copy-warmup-steps", "3",
                           "--min-len", "40", "--start-len", "60", "--batch-tokens", "600"])
    tok = build_tokenizer()
    data = tbm.Data(args, tok)
    repeat = tok.encode("repeat the list :", add_special_tokens=False).ids

    def copy_rows(step):
        ids, _, target = data.batch(step)
        rows = [r[:int(t.nonzero()[0])].tolist() for r, t in zip(ids, target)]
        return [r[-len(repeat):] == repeat for r in rows]

    assert all(copy_rows(0)) and all(copy_rows(2))
    assert not any(copy_rows(3)) and not any(copy_rows(4))


def test_cwe_uncommon_option_reaches_the_batches():
    tbm = _script_module()
    from dms.tasks.tokenizer import build_tokenizer

    tok = build_tokenizer()
    common = ["--out", "unused", "--mix", "cwe=1", "--min-len", "128", "--start-len", "128", "--batch-tokens", "512"]
    batches = {mode: tbm.Data(tbm.parse_args(common + ["--cwe-uncommon", mode]), tok).batch(5)[0]
               for mode in ("even", "random")}
    spread = {}
    for mode, ids in batches.items():
        text = tok.decode(ids[0].tolist())
        words = text.split("list :")[1].split("question")[0].split()
        counts = sorted(words.count(w) for w in set(words))
        spread[mode] = counts[-4] - counts[0]  # among the uncommon words (all but the top 3)
    assert spread["even"] <= 1 < spread["random"]


def test_shuffled_tasks_are_evaluated_by_greedy_generation(tmp_path):
    """A task trained in random answer order has no gold order to teacher-force against: the
    periodic eval scores it as --final-eval does, and keeps teacher forcing for the others."""
    out = tmp_path / "run"
    _run(out, "--mix", "cwe=1,niah_single=1", "--shuffle-answers", "cwe", "--eval-every", "8",
         "--eval-lengths", "96", "--eval-samples", "2", "--final-eval")
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    periodic = next(r["eval"] for r in rows if "eval" in r)
    final = next(r["generation_eval"] for r in rows if "generation_eval" in r)
    assert "cwe@96:tok" not in periodic and "niah_single@96:tok" in periodic
    assert periodic["cwe@96"] == final["cwe@96"] and 0.0 <= final["cwe@96"] <= 1.0


def _rows(tok, ids, target):
    """(task, end of its prompt) for each row of a cwe / niah_single batch."""
    for row, t in zip(ids, target):
        end = int(t.nonzero()[0])
        yield ("cwe" if tok.decode(row[1:end].tolist()).startswith("list :") else "niah_single"), end


def test_task_min_len_raises_that_task_only():
    tbm = _script_module()
    from dms.tasks.tokenizer import build_tokenizer

    tok = build_tokenizer()
    args = tbm.parse_args(["--out", "unused", "--mix", "cwe=1,niah_single=1", "--task-min-len", "cwe=96",
                           "--min-len", "48", "--start-len", "48", "--max-len", "48", "--batch-tokens", "960"])
    ids, _, target = tbm.Data(args, tok).batch(0)
    lengths = {}
    for task, end in _rows(tok, ids, target):
        lengths.setdefault(task, set()).add(end - 1)  # prompt tokens after <bos>
    assert lengths["cwe"] == {96} and lengths["niah_single"] == {48}
    with pytest.raises(SystemExit, match="--task-min-len: unknown task"):
        tbm.Data(tbm.parse_args(["--out", "unused", "--task-min-len", "nope=3"]), tok)
    with pytest.raises(SystemExit, match="--task-min-len: cwe needs a value"):
        tbm.Data(tbm.parse_args(["--out", "unused", "--task-min-len", "cwe"]), tok)
    with pytest.raises(SystemExit, match="--mix: no task"):
        tbm.Data(tbm.parse_args(["--out", "unused", "--mix", ""]), tok)


def test_task_prompt_weight_reweights_that_tasks_prompt_only():
    tbm = _script_module()
    from dms.tasks.tokenizer import build_tokenizer

    tok = build_tokenizer()
    args = tbm.parse_args(["--out", "unused", "--mix", "cwe=1,niah_single=1", "--task-prompt-weight", "cwe=1",
                           "--prompt-weight", "0.1", "--min-len", "96", "--start-len", "96", "--batch-tokens", "1920"])
    ids, weights, target = tbm.Data(args, tok).batch(0)
    seen = set()
    for (task, end), w, t in zip(_rows(tok, ids, target), weights, target):
        seen.add(task)
        expected = torch.full((end - 1,), 1.0 if task == "cwe" else 0.1)
        assert w[0] == 0 and torch.equal(w[1:end], expected)
        assert set(w[t].tolist()) == {1.0}
    assert seen == {"cwe", "niah_single"}
    with pytest.raises(SystemExit, match="--task-prompt-weight: cwe needs a value"):
        tbm.Data(tbm.parse_args(["--out", "unused", "--task-prompt-weight", "cwe"]), tok)


def test_head_dim_defaults_to_hidden_over_heads_and_can_be_set():
    tbm = _script_module()
    from dms.tasks.tokenizer import build_tokenizer

    tok = build_tokenizer()
    base = ["--out", "unused", "--arch", "llama", "--hidden", "64", "--heads", "4", "--kv-heads", "2"]
    for extra, head_dim in (([], 16), (["--head-dim", "32"], 32)):
        model = tbm.build_model(tbm.parse_args(base + extra), tok.get_vocab_size(), tok.get_vocab())
        assert model.config.head_dim == head_dim
        assert model.model.layers[0].self_attn.q_proj.weight.shape == (4 * head_dim, 64)


def test_cwe_ratio_reaches_the_training_batches_only():
    tbm = _script_module()
    from dms.tasks.tokenizer import build_tokenizer

    tok = build_tokenizer()
    argv = ["--out", "unused", "--mix", "cwe=1", "--min-len", "512", "--start-len", "512", "--batch-tokens", "512"]
    for ratio in (8, 30):
        data = tbm.Data(tbm.parse_args(argv + ["--cwe-ratio", str(ratio)]), tok)
        ids, _, target = data.batch(0)
        words = tok.decode(ids[0, :int(target[0].nonzero()[0])].tolist()).split("list :")[1].split("question")[0].split()
        counts = sorted((words.count(w) for w in set(words)), reverse=True)
        uncommon = sum(counts[3:]) / (len(KEYS) - 3)  # every key word occurs
        assert counts[0] == counts[2] and abs(counts[2] / uncommon / ratio - 1) < 0.1
    assert tbm.eval_samples("cwe", 512, data.args)[0] == generate("cwe", 512, tbm.EVAL_SEED)
