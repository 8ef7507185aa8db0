"""scripts/train_base_model.py --arith-terms: arith_trace samples drawn over a range of terms,
evaluated per terms value; the default draws exactly the samples the option's absence drew."""
import importlib.util
import random
from collections import Counter
from pathlib import Path

import pytest
import torch

from dms.tasks import generate
from dms.tasks.tokenizer import build_tokenizer

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "train_base_model.py"
MIX = "niah_single=1,cwe=1,arith_trace=3"


def _tbm():
    spec = importlib.util.spec_from_file_location("train_base_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _args(tbm, *extra):
    return tbm.parse_args(["--out", "unused", "--mix", MIX, "--min-len", "96", "--start-len", "256",
                           "--max-len", "256", "--batch-tokens", "1024", *extra])


def _reference_batch(data, step):
    """The sample draw of a step written out as it was before --arith-terms existed."""
    args = data.args
    rng = random.Random(f"{args.seed}:{step}")
    length = rng.randint(args.min_len, max(args.min_len, data.longest(step)))
    names, weights = zip(*data.mix.items())
    samples = []
    for _ in range(max(1, args.batch_tokens // length)):
        task = rng.choices(names, weights)[0]
        samples.append(generate(task, max(length, data.min_lens[task]), rng.randrange(2 ** 31),
                                **data.options.get(task, {})))
    return data.encode(samples)


def test_default_draws_the_samples_of_before(tok):
    tbm = _tbm()
    for extra in ((), ("--arith-terms", "4")):
        data = tbm.Data(_args(tbm, *extra), tok)
        assert "arith_trace" not in data.options
        for step in range(6):
            got, want = data.batch(step), _reference_batch(data, step)
            assert all(torch.equal(a, b) for a, b in zip(got, want)), (extra, step)


def _terms_of(tok, ids, target):
    """terms of each arith_trace row: its scratchpad has one '=' per term after the first."""
    for row, t in zip(ids, target):
        text = tok.decode(row[t].tolist())
        if "result is" in text:
            yield text.count("=") + 1


def test_a_range_draws_every_terms_value_uniformly(tok):
    tbm = _tbm()
    data = tbm.Data(_args(tbm, "--arith-terms", "2-8"), tok)
    counts = Counter(n for step in range(60) for n in _terms_of(tok, *data.batch(step)[::2]))
    assert set(counts) == set(range(2, 9))
    assert min(counts.values()) > 0.5 * sum(counts.values()) / 7
    fixed = tbm.Data(_args(tbm, "--arith-terms", "6"), tok)
    assert {n for step in range(5) for n in _terms_of(tok, *fixed.batch(step)[::2])} == {6}


def test_periodic_eval_reports_each_terms_value(tok):
    tbm = _tbm()
    args = tbm.parse_args(["--out", "unused", "--mix", "niah_single=1,arith_trace=1", "--arith-terms", "2-4",
                           "--arch", "llama", "--layers", "1", "--hidden", "32", "--heads", "2", "--kv-heads", "1",
                           "--intermediate", "64", "--eval-samples", "2", "--eval-lengths", "96"])
    data = tbm.Data(args, tok)
    model = tbm.build_model(args, tok.get_vocab_size(), tok.get_vocab())
    names = {"niah_single", "arith_trace/2", "arith_trace/3", "arith_trace/4"}
    assert set(tbm.evaluate(model, data, args)) == {f"{n}@96{s}" for n in names for s in ("", ":tok")}
    assert set(tbm.generation_eval(model, data, args)) == {f"{n}@96" for n in names}
    assert tbm.eval_samples("arith_trace", 96, args, terms=3)[0] == generate("arith_trace", 96, tbm.EVAL_SEED, terms=3)
    default = tbm.Data(tbm.parse_args(["--out", "unused", "--mix", "arith_trace=1"]), tok)
    assert [name for name, _, _ in tbm.eval_sets(default, 96)] == ["arith_trace"]


@pytest.mark.parametrize("text", ["1-4", "6-3", "x", "2-", "3-y"])
def test_bad_terms_are_refused(tok, text):
    tbm = _tbm()
    with pytest.raises(SystemExit, match="--arith-terms"):
        tbm.Data(_args(tbm, "--arith-terms", text), tok)
