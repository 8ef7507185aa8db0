"""dms.tasks: deterministic generation, exact lengths, answers grounded in the prompt,
exact scoring, and the tokenizer round trip."""
import re

import pytest

from dms.tasks import TASKS, LengthTooSmall, count_tokens, generate, min_length, normalize, score

LENGTHS = (128, 300)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_deterministic_per_seed(task):
    assert generate(task, 200, 7) == generate(task, 200, 7)
    assert generate(task, 200, 7).prompt != generate(task, 200, 8).prompt


@pytest.mark.parametrize("task", sorted(TASKS))
@pytest.mark.parametrize("length", LENGTHS)
def test_prompt_has_exact_length(task, length):
    for seed in range(5):
        s = generate(task, length, seed)
        assert count_tokens(s.prompt) == length
        assert s.prompt.endswith("answer :") or s.prompt.endswith(" is") or s.prompt.endswith(" are")


@pytest.mark.parametrize("task", sorted(TASKS))
def test_min_length_is_tight(task):
    m = min_length(task)
    assert count_tokens(generate(task, m, 0).prompt) == m
    with pytest.raises(LengthTooSmall, match="too small"):
        generate(task, m - 1, 0)


def _numbers_after(prompt, pattern):
    return re.findall(pattern, prompt)


def test_niah_answers_are_the_queried_needles():
    for task in ("niah_single", "niah_multikey"):
        s = generate(task, 256, 3)
        key = s.prompt.split()[-2]
        assert _numbers_after(s.prompt, rf"number for {key} is (\d+) \.") == list(s.answers)
    s = generate("niah_multivalue", 256, 3)
    key = s.prompt.split()[-2]
    assert _numbers_after(s.prompt, rf"number for {key} is (\d+) \.") == list(s.answers)
    s = generate("niah_multiquery", 256, 3)
    for a in s.answers:
        key, _, value = a.split()
        assert f"number for {key} is {value} ." in s.prompt


def test_distractor_needles_present():
    s = generate("niah_multikey", 256, 1, distractors=5)
    assert s.prompt.count("special magic number for") == 6 + 2  # needles, question, answer prefix


def test_vt_chain_resolves_to_the_asked_value():
    s = generate("vt", 256, 2, hops=4)
    value = s.prompt.split()[-4]
    assert f"var {s.answers[0]} = {value} ." in s.prompt
    for prev, cur in zip(s.answers, s.answers[1:]):
        assert f"var {cur} = {prev} ." in s.prompt
    assert len(s.answers) == 5


def test_cwe_answers_are_the_most_frequent():
    s = generate("cwe", 300, 4)
    words = s.prompt.split(":")[1].split()[:-1]  # the list, without the trailing "question"
    counts = {w: words.count(w) for w in set(words)}
    top = sorted(counts, key=counts.get, reverse=True)[:3]
    assert set(top) == set(s.answers)
    assert min(counts[a] for a in s.answers) > max(c for w, c in counts.items() if w not in s.answers)


def test_arith_trace_steps_are_consistent():
    s = generate("arith_trace", 200, 5, terms=5)
    values = dict(re.findall(r"value of (\w+) is (\d) \.", s.prompt))
    expr = s.prompt.split("compute ")[1].split(" modulo")[0].split()
    total = int(values[expr[0]])
    for op, key in zip(expr[1::2], expr[2::2]):
        total = (total + int(values[key])) % 10 if op == "+" else (total - int(values[key])) % 10
    assert s.answers == (f"result is {total}",)
    assert s.target.endswith(f"result is {total}")


def test_score_full_partial_none():
    s = generate("niah_multivalue", 200, 0)
    a, b, c = s.answers
    assert score("niah_multivalue", f"{a} , {b} , {c}", s) == 1.0
    assert score("niah_multivalue", f"{a} , 000 , {c}", s) == pytest.approx(2 / 3)
    assert score("niah_multivalue", "nothing here", s) == 0.0
    # digits decoded one token at a time still count; a number inside a longer one does not
    assert score("niah_multivalue", " ".join(a) + " , " + " ".join(b), s) == pytest.approx(2 / 3)
    assert score("niah_multivalue", f"{a}9", s) == 0.0
    with pytest.raises(ValueError, match="does not match"):
        score("vt", a, s)


def test_unknown_task_rejected():
    with pytest.raises(KeyError, match="unknown task"):
        generate("nope", 100, 0)


def test_normalize_joins_digit_tokens():
    assert normalize("Result  is 4 7 2 , 1 3") == "result is 472 , 13"


def test_tokenizer_round_trip(tmp_path):
    pytest.importorskip("tokenizers")
    from transformers import AutoTokenizer

    from dms.tasks.tokenizer import save_tokenizer

    save_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<bos>", "<eos>", "<pad>")
    for task in sorted(TASKS):
        s = generate(task, 150, 1)
        ids = tok(s.prompt + " " + s.target).input_ids
        assert ids[0] == tok.bos_token_id and tok.unk_token_id not in ids
        assert len(tok(s.prompt).input_ids) == 151
        assert normalize(tok.decode(ids, skip_special_tokens=True)) == normalize(s.prompt + " " + s.target)


def test_copy_list_is_auxiliary_training_data():
    from dms.tasks import AUXILIARY

    assert "copy_list" in AUXILIARY and "copy_list" not in TASKS
    for length in (8, 40, 300):
        s = generate("copy_list", length, 0)
        keys = [w for w in s.target.split() if not w.isdigit()]
        assert count_tokens(s.prompt) == length
        assert len(set(keys)) == len(keys) >= 1
        assert f"list : {s.target} ." in s.prompt and s.prompt.endswith(". repeat the list :")
        assert score("copy_list", s.target, s) == 1.0
    assert generate("copy_list", 8, 0).prompt == f"list : {generate('copy_list', 8, 0).target} . repeat the list :"


def test_kv_recall_is_auxiliary_training_data_with_one_answer_per_query():
    from dms.tasks import AUXILIARY

    assert "kv_recall" in AUXILIARY and "kv_recall" not in TASKS
    for length in (min_length("kv_recall"), 64, 300):
        s = generate("kv_recall", length, 5)
        assert count_tokens(s.prompt) == length and s.prompt.endswith("? answer :")
        asked = s.prompt.split("question :")[1].split("?")[0].split(" , ")
        assert [a.split()[0] for a in s.answers] == [k.strip() for k in asked]
        for a in s.answers:  # each answer is a pair stated in the text
            assert f"{a} ." in s.prompt
        assert score("kv_recall", s.target, s) == 1.0
    with pytest.raises(LengthTooSmall):
        generate("kv_recall", min_length("kv_recall") - 1, 0)


@pytest.mark.parametrize("length", range(17, 90))
def test_kv_recall_fills_every_length_exactly(length):
    for seed in range(20):
        assert count_tokens(generate("kv_recall", length, seed).prompt) == length
