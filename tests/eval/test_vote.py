"""Self-consistency scoring (dms.eval.vote) on hand-made chains, ties included."""
from __future__ import annotations

import pytest

from dms.eval.vote import final_answer, majority, vote_score
from dms.tasks import generate


def test_final_answer_arith_trace_is_the_first_result():
    text = "k is 3 ; m is 4 ; 3 + 4 = 7 ; result is 7 ; result is 2"
    assert final_answer("arith_trace", text) == "result is 7"
    assert final_answer("arith_trace", "RESULT  is 1 2") == "result is 12"  # normalised: digits joined
    assert final_answer("arith_trace", "k is 3 ; 3 + 4 =") is None
    assert final_answer("arith_trace", "the result is") is None


def test_final_answer_other_tasks_is_the_normalised_text():
    assert final_answer("vt", "  Alpha  Beta ") == "alpha beta"
    assert final_answer("vt", "   ") is None
    with pytest.raises(TypeError, match="text"):
        final_answer("vt", None)


def test_majority_counts_votes_and_ignores_abstentions():
    assert majority(["a", "b", "b", None, "a", "b"]) == ("b", 3)
    assert majority([None, None]) == (None, 0)
    assert majority([]) == (None, 0)
    assert majority(["x"]) == ("x", 1)


def test_majority_ties_go_to_the_earliest_first_occurrence():
    assert majority(["b", "a", "a", "b"]) == ("b", 2)
    assert majority(["a", "b", "b", "a"]) == ("a", 2)
    assert majority([None, "c", "d", "e"]) == ("c", 1)
    assert majority(["d", None, "c", "c", "d"]) == ("d", 2)


def test_vote_score_on_an_arith_trace_sample():
    sample = generate("arith_trace", 128, 4 * 10 ** 9)
    gold = sample.answers[0]
    wrong = "result is " + str((int(gold.split()[-1]) + 1) % 10)
    assert vote_score(sample, [wrong, gold, gold]) == 1.0
    assert vote_score(sample, [wrong, wrong, gold]) == 0.0
    assert vote_score(sample, [gold, wrong]) == 1.0  # tie: the first chain's answer
    assert vote_score(sample, [wrong, gold]) == 0.0
    assert vote_score(sample, ["no answer", "k is"]) == 0.0
    assert vote_score(sample, [sample.target]) == 1.0  # the gold trace itself
    with pytest.raises(ValueError, match="texts"):
        vote_score(sample, [])
