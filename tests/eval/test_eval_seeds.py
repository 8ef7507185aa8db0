"""The default evaluation seeds of ``dms eval`` / ``dms demo`` are disjoint from every seed a
training path draws. The training ranges come from the training code itself: its parsers and
defaults, the commands scripts/build_shipped_models.sh issues (run with stubbed training), and
recorded calls of dms.tasks.generate, not from copies of its constants."""
from __future__ import annotations

import argparse
import ast
import importlib.util
import os
import random
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from dms.eval.runner import EVAL_SEED, EvalConfig

ROOT = Path(__file__).resolve().parents[2]
# Samples per task the default seeds must cover (far more than any evaluation runs).
HELD_OUT = range(EVAL_SEED, EVAL_SEED + 10 ** 6)
FILES = "{config.json,generation_config.json,model.safetensors,tokenizer.json,tokenizer_config.json}"
STUB = f"""#!/usr/bin/env bash
printf '%s\\n' "$(basename "$0") $*" >> "$STUB_LOG"
args=("$@")
for ((i = 0; i < ${{#args[@]}}; i++)); do
  case "${{args[i]}}" in
    --out) mkdir -p "${{args[i+1]}}/final" && touch "${{args[i+1]}}/ckpt.pt" "${{args[i+1]}}/final/"{FILES} ;;
    --output-dir) mkdir -p "${{args[i+1]}}" && touch "${{args[i+1]}}/"{FILES} ;;
  esac
done
case "$1" in *widen_model.py) mkdir -p "$3" && touch "$3/config.json" ;; esac
"""


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def build_commands(tmp_path_factory) -> list[list[str]]:
    """Every command scripts/build_shipped_models.sh issues, with python and dms stubbed."""
    tmp = tmp_path_factory.mktemp("build")
    (tmp / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "build_shipped_models.sh", tmp / "scripts")
    (tmp / "dms" / "assets").mkdir(parents=True)
    (tmp / "bin").mkdir()
    for name in ("python", "dms"):
        (tmp / "bin" / name).write_text(STUB)
        (tmp / "bin" / name).chmod(0o755)
    log = tmp / "calls.txt"
    env = {**os.environ, "PATH": f"{tmp / 'bin'}:{os.environ['PATH']}", "STUB_LOG": str(log)}
    subprocess.run(["bash", str(tmp / "scripts" / "build_shipped_models.sh"), str(tmp / "run")], env=env,
                   check=True, capture_output=True)
    return [shlex.split(line) for line in log.read_text().splitlines()]


def _runs_of(commands, script: str) -> list[list[str]]:
    return [c[2:] for c in commands if c[0] == "python" and c[1].endswith(script)]


def _disjoint(ranges: set[range], what: str) -> None:
    for r in ranges:
        assert r.stop <= HELD_OUT.start or r.start >= HELD_OUT.stop, f"{what} draws seeds {r}, which overlap {HELD_OUT}"


class _Recording(random.Random):
    """random.Random that remembers what each randrange call returned and its range."""

    calls: dict[int, range] = {}

    def randrange(self, start, stop=None, step=1):
        value = super().randrange(start, stop, step)
        self.calls[value] = range(0, start) if stop is None else range(start, stop)
        return value


def _train_base_seed_ranges(tbm, argv: list[str], monkeypatch) -> set[range]:
    """Ranges of the task seeds one train_base_model run draws: its data stream (each seed matched
    to the randrange call that drew it) and its periodic evaluation (consecutive seeds)."""
    seeds: list[int] = []
    real = tbm.generate
    monkeypatch.setattr(tbm, "generate", lambda task, length, seed, **kw: seeds.append(seed) or real(task, length, seed, **kw))
    monkeypatch.setattr(tbm, "random", argparse.Namespace(Random=_Recording))
    _Recording.calls = {}
    args = tbm.parse_args(argv)
    data = tbm.Data(args, tbm.build_tokenizer())
    for step in sorted({0, 1, args.copy_warmup_steps, args.curriculum_steps}):
        data.batch(step)
    assert seeds and all(s in _Recording.calls for s in seeds), "a training seed did not come from rng.randrange"
    ranges = {_Recording.calls[s] for s in seeds}
    seeds.clear()
    tbm.eval_samples("niah_single", 128, args)
    assert seeds == list(range(seeds[0], seeds[0] + args.eval_samples))
    return ranges | {range(seeds[0], seeds[0] + args.eval_samples)}


def test_base_model_training_never_draws_the_evaluation_seeds(build_commands, tmp_path, monkeypatch):
    tbm = _script("train_base_model")
    runs = _runs_of(build_commands, "train_base_model.py") + [["--out", str(tmp_path)]]  # + the defaults
    assert len(runs) > 10
    for argv in runs:
        ranges = _train_base_seed_ranges(tbm, argv, monkeypatch)
        assert ranges and all(len(r) > 0 for r in ranges)
        _disjoint(ranges, f"train_base_model.py {' '.join(argv)}")


def test_retrofit_data_never_uses_the_evaluation_seeds(build_commands, tmp_path, monkeypatch):
    mrd = _script("make_retrofit_data")
    seeds: list[int] = []
    fake = argparse.Namespace(prompt="p", target="t")
    monkeypatch.setattr(mrd, "generate", lambda task, length, seed, **kw: seeds.append(seed) or fake)
    runs = _runs_of(build_commands, "make_retrofit_data.py") + [[]]  # + the defaults
    assert len(runs) == 2
    for argv in runs:
        seeds.clear()
        out = ["--out", str(tmp_path / "data.jsonl")]
        argv = argv[:argv.index("--out")] + out + argv[argv.index("--out") + 2:] if "--out" in argv else argv + out
        assert mrd.main(argv) == 0
        assert len(seeds) >= 4000
        _disjoint({range(min(seeds), max(seeds) + 1)}, f"make_retrofit_data.py {' '.join(argv)}")


def test_retrofit_training_draws_no_task_seeds():
    """dms retrofit reads its data from files: nothing under dms/train nor its CLI uses dms.tasks."""
    files = sorted((ROOT / "dms" / "train").glob("*.py")) + [ROOT / "dms" / "cli" / "retrofit.py"]
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n == "dms.tasks" or n.startswith("dms.tasks.") for n in names), f"{path} imports dms.tasks"


def test_eval_and_demo_default_to_the_held_out_seeds():
    from dms.cli import demo, eval as eval_cli

    assert EvalConfig(tasks=["vt"]).seed == EVAL_SEED
    for module, argv in ((eval_cli, ["base"]), (demo, [])):
        p = argparse.ArgumentParser()
        module.add_arguments(p)
        assert p.parse_args(argv).seed == EVAL_SEED


def test_seed_sets_the_samples_and_is_checked():
    from dms.eval.runner import task_samples
    from dms.tasks import generate

    samples = task_samples("vt", 96, 3, seed=7)
    assert [s.seed for s in samples] == [7, 8, 9]
    assert samples[1] == generate("vt", 96, 8)
    assert task_samples("vt", 96, 2)[0].seed == EVAL_SEED
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="seed must be an int >= 0"):
            EvalConfig(tasks=["vt"], seed=bad)
