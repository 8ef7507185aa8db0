"""scripts/make_retrofit_data.py writes task samples that `dms retrofit` reads back as tokens."""
import importlib.util
import json
from pathlib import Path

import pytest

from transformers import AutoTokenizer

from dms.tasks import TASKS, normalize
from dms.tasks.tokenizer import save_tokenizer
from dms.train.data import read_documents

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "make_retrofit_data.py"


def _script():
    spec = importlib.util.spec_from_file_location("make_retrofit_data", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_samples_cover_every_task_and_tokenize_for_the_trainer(tmp_path):
    out = tmp_path / "retro.jsonl"
    n = 2 * len(TASKS)
    assert _script().main(["--out", str(out), "--samples", str(n), "--lengths", "128", "160"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    texts = [f"{r['prompt']} {r['completion']}" for r in records]
    assert len(texts) == n and len(set(texts)) == n
    assert all(r["prompt"].endswith("answer :") or r["prompt"].endswith(" is") or r["prompt"].endswith(" are")
               for r in records)

    save_tokenizer(tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    docs = read_documents([str(out)], tok)
    assert len(docs) == n
    assert normalize(tok.decode(docs[0], skip_special_tokens=True)) == normalize(texts[0])
    completion = tok(records[0]["completion"], add_special_tokens=False)["input_ids"]
    assert docs[0].distill_from == len(docs[0]) - len(completion)
    assert {len(d) for d in docs[: len(TASKS)]} != {len(d) for d in docs[len(TASKS):]}  # both lengths used


def test_cwe_uncommon_option_changes_only_the_cwe_samples(tmp_path):
    n = 2 * len(TASKS)
    files = {}
    for mode in ("even", "random"):
        files[mode] = tmp_path / f"{mode}.jsonl"
        assert _script().main(["--out", str(files[mode]), "--samples", str(n), "--lengths", "128",
                               "--cwe-uncommon", mode]) == 0
    even, rand = ([json.loads(line) for line in files[m].read_text().splitlines()] for m in ("even", "random"))
    tasks = sorted(TASKS)
    changed = {tasks[i % len(tasks)] for i, (a, b) in enumerate(zip(even, rand)) if a != b}
    assert changed == {"cwe"}


def test_weight_gives_a_task_more_turns_and_leaves_the_default_order_alone(tmp_path):
    tasks = sorted(TASKS)
    plain, weighted = tmp_path / "plain.jsonl", tmp_path / "weighted.jsonl"
    n = 2 * (len(tasks) + 2)
    assert _script().main(["--out", str(plain), "--samples", str(n), "--lengths", "128"]) == 0
    assert _script().main(["--out", str(weighted), "--samples", str(n), "--lengths", "128",
                           "--weight", "arith_trace=3"]) == 0
    rows = [json.loads(line) for line in weighted.read_text().splitlines()]
    is_arith = ["modulo" in r["prompt"] for r in rows]
    assert is_arith[:4] == [True, True, True, False]  # arith_trace sorts first: three turns in a row
    assert sum(is_arith) == 6 and len({r["prompt"] for r in rows}) == n
    plain_rows = [json.loads(line) for line in plain.read_text().splitlines()]
    assert rows[0] == plain_rows[0]  # sample 0: the same task at the same seed


def test_weight_rejects_unknown_tasks_and_bad_counts(tmp_path, capsys):
    for bad in ("nope=2", "cwe=0", "cwe=x", "cwe"):
        with pytest.raises(SystemExit):
            _script().main(["--out", str(tmp_path / "x.jsonl"), "--samples", "4", "--weight", bad])
        assert "--weight" in capsys.readouterr().err
