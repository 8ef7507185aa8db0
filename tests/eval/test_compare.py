"""``dms compare`` and dms.eval.compare: the paired interval against a hand-computed case, the
refusals of results not scored on the same prompts, and the command end to end."""
from __future__ import annotations

import json
import math

import pytest

from dms.cli import main
from dms.eval.compare import compare, load
from dms.eval.stats import Z95

SEED, LENGTH = 3500000000, 256


def write_results(folder, scores: dict[str, list[float]], label: str = "dms@8x", seed: int = SEED,
                  length: int = LENGTH, extra_labels: tuple[str, ...] = ()):
    """A results.json like dms eval's: one row per (label, task) with its per-sample scores."""
    rows = []
    for lab in (label, *extra_labels):
        method, _, ratio = lab.partition("@")
        for task, s in scores.items():
            rows.append(dict(method=method, ratio=float(ratio[:-1]) if ratio else None, task=task,
                             accuracy=sum(s) / len(s), samples=len(s), scores=s, label=lab))
    meta = dict(base="base", tasks=list(scores), samples=max(len(s) for s in scores.values()),
                length=length, seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(dict(meta=meta, rows=rows, summary=[])))
    return folder / "results.json"


A = {"vt": [1, 0, 1, 1], "cwe": [0.5, 0.5, 1, 0]}
B = {"vt": [1, 1, 1, 0], "cwe": [1, 1, 1, 0.5]}


def test_paired_interval_matches_hand_computed_values(tmp_path):
    c = compare(load(write_results(tmp_path / "a", A)), load(write_results(tmp_path / "b", B)))
    vt, cwe = c.tasks
    # vt: d = 0, 1, 0, -1: mean 0, sd^2 = 2/3, variance of the mean 1/6
    assert (vt.a, vt.b, vt.diff, vt.better, vt.worse) == (0.75, 0.75, 0.0, 1, 1)
    assert (vt.low, vt.high) == pytest.approx((-Z95 * math.sqrt(1 / 6), Z95 * math.sqrt(1 / 6)))
    # cwe: d = 0.5, 0.5, 0, 0.5: mean 0.375, sd^2 = 1/16, variance of the mean 1/64
    assert (cwe.diff, cwe.better, cwe.worse) == (0.375, 3, 0)
    assert (cwe.low, cwe.high) == pytest.approx((0.375 - Z95 / 8, 0.375 + Z95 / 8))
    # mean: (0 + 0.375) / 2, half width z * sqrt(1/6 + 1/64) / 2
    half = Z95 * math.sqrt(1 / 6 + 1 / 64) / 2
    assert (c.mean.diff, c.mean.better, c.mean.worse) == (0.1875, 4, 1)
    assert (c.mean.low, c.mean.high) == pytest.approx((0.1875 - half, 0.1875 + half))
    assert c.verdict == "no difference resolved at 95%"


def test_equal_differences_give_a_point(tmp_path):
    same = compare(load(write_results(tmp_path / "a", A)), load(write_results(tmp_path / "b", A)))
    for d in same.tasks + [same.mean]:
        assert (d.diff, d.low, d.high, d.better, d.worse) == (0.0, 0.0, 0.0, 0, 0)
    assert same.verdict == "no difference resolved at 95%"
    low = {"vt": [0, 0.5, 0.25, 0.75], "cwe": [0.5, 0, 0.25, 0.25]}
    up = {t: [x + 0.25 for x in s] for t, s in low.items()}  # every sample 0.25 higher (exact in binary)
    c = compare(load(write_results(tmp_path / "low", low)), load(write_results(tmp_path / "up", up)))
    assert (c.mean.diff, c.mean.low, c.mean.high) == (0.25, 0.25, 0.25)
    assert c.verdict == "B is better than A at 95%"
    c = compare(load(write_results(tmp_path / "up", up)), load(write_results(tmp_path / "low", low)))
    assert c.verdict == "B is worse than A at 95%"


@pytest.mark.parametrize("b_kwargs, match", [
    (dict(seed=SEED + 1), r"different prompts \(seed 3500000000 in A, 3500000001 in B\)"),
    (dict(length=512), r"different prompts \(length 256 in A, 512 in B\)"),
    (dict(scores={"vt": A["vt"][:3], "cwe": A["cwe"]}), "vt has 4 samples in A and 3 in B"),
    (dict(scores={"vt": A["vt"]}), "only one of the results scores cwe: a paired comparison needs the same tasks"),
])
def test_results_of_other_prompts_are_refused(tmp_path, b_kwargs, match):
    a = load(write_results(tmp_path / "a", A))
    b = load(write_results(tmp_path / "b", **{"scores": A, **b_kwargs}))
    with pytest.raises(ValueError, match=match):
        compare(a, b)


def test_labels_must_be_chosen_when_ambiguous(tmp_path):
    a = load(write_results(tmp_path / "a", A, extra_labels=("vanilla",)))
    b = load(write_results(tmp_path / "b", B, extra_labels=("vanilla",)))
    only_dms = load(write_results(tmp_path / "dms", B))
    assert compare(a, only_dms).label_a == "dms@8x"  # the one label both hold
    with pytest.raises(ValueError, match=r"2 labels are in both results: choose with --label.*"
                                         r"\(A has dms@8x, vanilla; B has dms@8x, vanilla\)"):
        compare(a, b)
    assert compare(a, b, "vanilla").label_b == "vanilla"
    c = compare(a, b, label_a="vanilla", label_b="dms@8x")
    assert (c.label_a, c.label_b, c.tasks[1].a, c.tasks[1].b) == ("vanilla", "dms@8x", 0.5, 0.875)
    with pytest.raises(ValueError, match=r"B has no rows labelled 'dms@4x' \(it has dms@8x, vanilla\)"):
        compare(a, b, label_a="dms@8x", label_b="dms@4x")
    other = load(write_results(tmp_path / "c", B, label="dms@4x"))
    with pytest.raises(ValueError, match="no label is in both results"):
        compare(a, other)


def test_command_prints_the_table_and_writes_json(tmp_path, capsys):
    a = write_results(tmp_path / "a", A)
    write_results(tmp_path / "b", B)  # B given as its folder
    out = tmp_path / "cmp" / "diff.json"
    assert main(["compare", str(a), str(tmp_path / "b"), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| task | A: dms@8x | B: dms@8x | B - A [95% CI] | B better / worse |" in printed
    assert "| cwe | 0.500 | 0.875 | +0.375 [+0.130, +0.620] | 3 / 0 |" in printed
    assert "| mean | 0.625 | 0.812 | +0.188 [-0.231, +0.606] | 4 / 1 |" in printed
    assert "\nno difference resolved at 95% (mean B - A: +0.188 [-0.231, +0.606])\nwrote " in printed
    doc = json.loads(out.read_text())
    assert doc["mean"]["diff"] == 0.1875 and [t["task"] for t in doc["tasks"]] == ["vt", "cwe"]
    assert (doc["b"], doc["verdict"]) == (str(tmp_path / "b"), "no difference resolved at 95%")


def test_command_errors_are_one_line(tmp_path, capsys):
    a = write_results(tmp_path / "a", A)
    missing = tmp_path / "nowhere" / "results.json"
    assert main(["compare", str(a), str(missing)]) == 2
    assert capsys.readouterr().err == f"dms compare: error: no such results file: {missing}\n"
    b = write_results(tmp_path / "b", A, length=512)
    assert main(["compare", str(a), str(b)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "different prompts (length 256 in A, 512 in B)" in err
