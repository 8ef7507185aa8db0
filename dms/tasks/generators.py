"""Generators of the long-context tasks, in the spirit of RULER (Hsieh et al. 2024), plus a
reasoning-trace task whose answer is worked out step by step.

Texts are lowercase words separated by single spaces; numbers are written whole ("472") and
split into single-digit tokens by the tokenizer, so the token count of a word is known here
without loading the tokenizer (``count_tokens``). Every generator takes the prompt length in
tokens and a seed, is deterministic, and returns a ``Sample`` whose prompt has exactly
``length`` tokens (not counting BOS) and ends with ``answer :``.

The answers depend on a few needle tokens placed anywhere in the prompt while most of the
prompt is filler that could be dropped: the setting where KV-cache eviction can matter.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from dms.tasks.vocab import FILLER_ADJS, FILLER_NOUNS, FILLER_PLACES, FILLER_VERBS, KEYS


@dataclass(frozen=True)
class Sample:
    task: str
    length: int
    seed: int
    prompt: str            # exactly `length` tokens, ends with "answer :"
    target: str            # the gold completion (the trainer appends EOS)
    answers: tuple[str, ...]  # reference answers that scoring looks for in a generation


class LengthTooSmall(ValueError):
    """The requested prompt length cannot hold the task's fixed parts; ``minimum`` can."""

    def __init__(self, task: str, length: int, minimum: int):
        super().__init__(f"length={length} is too small for {task}: its needles, header and question "
                         f"need at least {minimum} tokens")
        self.minimum = minimum


def count_tokens(text: str) -> int:
    """Tokens of ``text`` under the project tokenizer: one per word, one per digit."""
    return sum(len(w) if w.isdigit() else 1 for w in text.split())


def _words_tokens(words: list[str]) -> int:
    return sum(len(w) if w.isdigit() else 1 for w in words)


def _number(rng: random.Random, digits: int) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10 ** digits))


def _filler_sentence(rng: random.Random, size: int) -> list[str]:
    """A filler sentence of exactly ``size`` tokens (1 to 9)."""
    n, a, v, p = FILLER_NOUNS, FILLER_ADJS, FILLER_VERBS, FILLER_PLACES
    c = rng.choice
    shapes = {
        1: lambda: ["."],
        2: lambda: [c(n), "."],
        3: lambda: ["the", c(n), "."],
        4: lambda: ["the", c(a), c(n), "."],
        5: lambda: ["the", c(n), "is", c(a), "."],
        6: lambda: ["the", c(n), c(v), "the", c(n), "."],
        7: lambda: ["the", c(a), c(n), c(v), "the", c(n), "."],
        8: lambda: ["a", c(n), c(v), c(p), "the", c(a), c(n), "."],
        9: lambda: ["a", c(n), c(v), "a", c(n), c(p), "the", c(n), "."],
    }
    return shapes[size]()


def _filler(rng: random.Random, budget: int) -> list[list[str]]:
    """Filler sentences of exactly ``budget`` tokens in total."""
    sentences: list[list[str]] = []
    left = budget
    while left > 0:
        size = left if left <= 9 else rng.choice((5, 7, 9))
        if 0 < left - size < 5:  # never leave a remainder only a fragment could fill
            size = left - 5 if left - 5 >= 5 else left
        sentences.append(_filler_sentence(rng, size))
        left -= size
    return sentences


def _haystack(task: str, rng: random.Random, length: int, header: list[str], needles: list[list[str]],
              question: list[str], ordered: bool = False) -> tuple[str, list[int]]:
    """Places ``needles`` between filler sentences at random depths, pads with filler to exactly
    ``length`` tokens, and returns the prompt plus the order in which the needles appear.
    With ``ordered`` the needles keep their given order."""
    fixed = _words_tokens(header) + sum(_words_tokens(n) for n in needles) + _words_tokens(question)
    if length < fixed:
        raise LengthTooSmall(task, length, fixed)
    sentences = _filler(rng, length - fixed)
    slots = sorted(rng.randint(0, len(sentences)) for _ in needles)
    order = list(range(len(needles)))
    if not ordered:
        rng.shuffle(order)
    at: dict[int, list[int]] = {}
    for slot, i in zip(slots, order):
        at.setdefault(slot, []).append(i)
    words = list(header)
    for pos in range(len(sentences) + 1):
        for i in at.get(pos, []):
            words += needles[i]
        if pos < len(sentences):
            words += sentences[pos]
    words += question
    return " ".join(words), order


_NIAH_HEADER = "some special magic numbers are hidden in the text . memorize them .".split()


def _needle(key: str, value: str) -> list[str]:
    return ["the", "special", "magic", "number", "for", key, "is", value, "."]


def _niah(task: str, length: int, seed: int, n_keys: int, n_values: int, n_queries: int,
          digits: int) -> Sample:
    """Needle in a haystack: ``n_keys`` keys (the extra ones are distractors), ``n_values``
    numbers for each queried key, ``n_queries`` keys asked for."""
    rng = random.Random(f"{task}:{length}:{seed}")
    keys = rng.sample(KEYS, n_keys)
    values = {k: [_number(rng, digits) for _ in range(n_values if i < n_queries else 1)]
              for i, k in enumerate(keys)}
    needles = [_needle(k, v) for k in keys for v in values[k]]
    queried = keys[:n_queries]
    # The answer restates the needle's words before the number (as RULER's answer prefix does),
    # so the number follows the same "for <key> is" words as in its needle.
    if n_values > 1:
        question = ["question", ":", "what", "are", "all", "the", "special", "magic", "numbers", "for",
                    queried[0], "?", "answer", ":", "the", "special", "magic", "numbers", "for", queried[0], "are"]
    elif n_queries > 1:
        question = ["question", ":", "what", "are", "the", "special", "magic", "numbers", "for"]
        question += " , ".join(queried).split() + ["?", "answer", ":"]
    else:
        question = ["question", ":", "what", "is", "the", "special", "magic", "number", "for",
                    queried[0], "?", "answer", ":", "the", "special", "magic", "number", "for", queried[0], "is"]
    prompt, order = _haystack(task, rng, length, _NIAH_HEADER, needles, question)
    if n_values > 1:  # values of one key are answered in the order they appear in the text
        answers = tuple(needles[i][7] for i in order if needles[i][5] == queried[0])
        target = " , ".join(answers)
    elif n_queries > 1:  # each number is scored together with its key
        answers = tuple(f"{k} is {values[k][0]}" for k in queried)
        target = " ; ".join(f"for {a}" for a in answers)
    else:
        answers = (values[queried[0]][0],)
        target = answers[0]
    return Sample(task, length, seed, prompt, target, answers)


def niah_single(length: int, seed: int, digits: int = 3) -> Sample:
    return _niah("niah_single", length, seed, 1, 1, 1, digits)


def niah_multikey(length: int, seed: int, distractors: int = 3, digits: int = 3) -> Sample:
    return _niah("niah_multikey", length, seed, 1 + distractors, 1, 1, digits)


def niah_multivalue(length: int, seed: int, values: int = 3, distractors: int = 1, digits: int = 3) -> Sample:
    return _niah("niah_multivalue", length, seed, 1 + distractors, values, 1, digits)


def niah_multiquery(length: int, seed: int, queries: int = 3, distractors: int = 1, digits: int = 3) -> Sample:
    return _niah("niah_multiquery", length, seed, queries + distractors, 1, queries, digits)


def vt(length: int, seed: int, hops: int = 3, chains: int = 2, digits: int = 3) -> Sample:
    """Variable tracking: ``var a = 472 .`` then ``var b = a .`` ... ``hops`` times; the other
    chains are distractors. Asks for every variable equal to the first chain's number."""
    rng = random.Random(f"vt:{length}:{seed}")
    names = rng.sample(KEYS, chains * (hops + 1))
    numbers = rng.sample(range(10 ** (digits - 1), 10 ** digits), chains)
    chain_needles = []
    for c in range(chains):
        vs = names[c * (hops + 1):(c + 1) * (hops + 1)]
        chain_needles.append([["var", vs[0], "=", str(numbers[c]), "."]]
                             + [["var", vs[i], "=", vs[i - 1], "."] for i in range(1, hops + 1)])
    # Interleave the chains at random while each chain keeps its own order.
    needles, pending = [], [list(ch) for ch in chain_needles]
    while any(pending):
        c = rng.choice([i for i, p in enumerate(pending) if p])
        needles.append(pending[c].pop(0))
    header = "find the variables equal to a value .".split()
    question = ["question", ":", "which", "variables", "are", "equal", "to", str(numbers[0]), "?", "answer", ":"]
    prompt, _ = _haystack("vt", rng, length, header, needles, question, ordered=True)
    answers = tuple(names[:hops + 1])
    return Sample("vt", length, seed, prompt, " , ".join(answers), answers)


CWE_UNCOMMON = ("even", "random")  # ways cwe draws its uncommon words; see cwe


def cwe(length: int, seed: int, common: int = 3, ratio: int = 8, uncommon: str = "even") -> Sample:
    """Common word extraction: a list of words where ``common`` words each occur about
    ``ratio`` times as often as each of the others; asks for the common ones (in order of first
    appearance). As in RULER, every uncommon word occurs the same number of times (give or
    take one), so the answer is never decided by a rare word drawn unusually often.
    ``uncommon="random"`` draws the uncommon words independently instead (up to one short of a
    common word's count), the generator before this rule; the shipped base model's early training
    phases used it, so scripts/build_shipped_models.sh needs it to reproduce that model."""
    rng = random.Random(f"cwe:{length}:{seed}")
    header = ["list", ":"]
    question = ["question", ":", "what", "are", "the", "most", "common", "words", "in", "the", "list",
                "?", "answer", ":"]
    words = rng.sample(KEYS, len(KEYS))
    top, rest = words[:common], words[common:]
    fixed = len(header) + len(question)
    # each common word must occur at least twice: n * ratio // (common * ratio + len(rest)) >= 2
    minimum = fixed + -(-2 * (common * ratio + len(rest)) // ratio)
    if length < minimum:
        raise LengthTooSmall("cwe", length, minimum)
    n = length - fixed
    per_common = n * ratio // (common * ratio + len(rest))
    rare_total = n - common * per_common
    if uncommon == "even":
        if -(-rare_total // len(rest)) >= per_common:
            raise ValueError(f"cwe: ratio {ratio} leaves uncommon words as frequent as common ones")
        rare = [rest[i % len(rest)] for i in range(rare_total)]  # rest is shuffled: the +1s fall at random
    elif uncommon == "random":
        while True:  # re-draw until no uncommon word reaches a common word's count
            rare = [rng.choice(rest) for _ in range(rare_total)]
            if max((rare.count(w) for w in set(rare)), default=0) < per_common:
                break
    else:
        raise ValueError(f"cwe: uncommon must be one of {CWE_UNCOMMON}, not {uncommon!r}")
    items = [w for w in top for _ in range(per_common)] + rare
    rng.shuffle(items)
    answers = tuple(sorted(top, key=items.index))
    prompt = " ".join(header + items + question)
    return Sample("cwe", length, seed, prompt, " , ".join(answers), answers)


def arith_trace(length: int, seed: int, terms: int = 4) -> Sample:
    """Multi-step arithmetic with a scratchpad. Needles set single-digit values of ``terms``
    keys; the question asks for a +/- expression over the keys modulo 10, and the gold answer
    looks each key up and updates a running total one step at a time."""
    if terms < 2:
        raise ValueError(f"terms must be >= 2, got {terms}")
    rng = random.Random(f"arith_trace:{length}:{seed}")
    keys = rng.sample(KEYS, terms)
    vals = [rng.randrange(10) for _ in keys]
    ops = [rng.choice("+-") for _ in range(terms - 1)]
    needles = [["the", "value", "of", k, "is", str(v), "."] for k, v in zip(keys, vals)]
    expr = [keys[0]]
    for op, k in zip(ops, keys[1:]):
        expr += [op, k]
    header = "some values are hidden in the text .".split()
    question = ["question", ":", "compute"] + expr + ["modulo", "10", "?", "answer", ":"]
    prompt, _ = _haystack("arith_trace", rng, length, header, needles, question)
    total = vals[0]
    steps = [f"{keys[0]} is {vals[0]}"]
    for op, k, v in zip(ops, keys[1:], vals[1:]):
        new = (total + v) % 10 if op == "+" else (total - v) % 10
        steps += [f"{k} is {v}", f"{total} {op} {v} = {new}"]
        total = new
    steps.append(f"result is {total}")
    answers = (f"result is {total}",)
    return Sample("arith_trace", length, seed, prompt, " ; ".join(steps), answers)


def copy_list(length: int, seed: int, min_items: int = 8, max_items: int = 40) -> Sample:
    """Repeat a list of distinct key words, some followed by a number, that sits at a random
    depth in filler text. Not a benchmark task: it is training data that makes every answer token
    an in-context copy, the induction circuit every retrieval task builds on. A key occurs once,
    so the token after it is an unambiguous one-token copy; a digit is not unique, so copying
    past it needs the longer match that reading a multi-digit needle value needs too (a model
    trained on key-only lists copied keys perfectly and still never retrieved a digit)."""
    rng = random.Random(f"copy_list:{length}:{seed}")
    opener, closer, question = ["list", ":"], ["."], ["repeat", "the", "list", ":"]
    room = length - len(opener) - len(closer) - len(question)
    if room < 1:
        raise LengthTooSmall("copy_list", length, length - room + 1)
    budget = min(room, rng.randint(min_items, max_items))  # tokens of the list
    items, used = [], 0
    for key in rng.sample(KEYS, len(KEYS)):
        if used == budget:
            break
        items.append(key)
        used += 1
        digits = min(rng.choice((0, 0, 1, 2, 3)), budget - used)
        if digits:
            items.append(_number(rng, digits))
            used += digits
    sentences = _filler(rng, room - used)
    cut = rng.randint(0, len(sentences))
    before = [w for s in sentences[:cut] for w in s]
    after = [w for s in sentences[cut:] for w in s]
    target = " ".join(items)
    return Sample("copy_list", length, seed, " ".join(before + opener + items + closer + after + question), target, (target,))


def kv_recall(length: int, seed: int, min_pairs: int = 4, max_pairs: int = 12, queries: int = 4,
              digits: int = 3) -> Sample:
    """Dense multi-query associative recall: ``KEY is NUMBER .`` pairs spread through filler,
    then several keys to look up. Not a benchmark task: training data that supervises the
    "key -> multi-digit value" lookup every needle task needs, with many lookups per sample."""
    rng = random.Random(f"kv_recall:{length}:{seed}")
    question_cost = 3 + 2 * queries  # "question : k1 , ... kq ? answer :"
    fits = (length - question_cost) // (3 + digits)
    if fits < 1:
        raise LengthTooSmall("kv_recall", length, question_cost + 3 + digits)
    n = min(fits, rng.randint(min_pairs, max_pairs))
    while n > 1 and n * (3 + digits) + 2 * min(queries, n) + 4 > length:  # the question's exact size
        n -= 1
    keys = rng.sample(KEYS, n)
    values = [_number(rng, digits) for _ in keys]
    asked = rng.sample(range(n), min(queries, n))
    needles = [[k, "is", v, "."] for k, v in zip(keys, values)]
    question = ["question", ":"] + " , ".join(keys[i] for i in asked).split() + ["?", "answer", ":"]
    prompt, _ = _haystack("kv_recall", rng, length, [], needles, question)
    answers = tuple(f"{keys[i]} is {values[i]}" for i in asked)
    return Sample("kv_recall", length, seed, prompt, " ; ".join(answers), answers)
