"""scripts/build_shipped_models.sh runs the stages that made the shipped base: each training
command it issues, parsed by the real argument parser, equals the arguments logged by the run
that trained that stage (docs/shipped-models/ logs). Training itself is stubbed out (hours of CPU)."""
from __future__ import annotations

import gzip
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LOGS = ROOT / "docs" / "shipped-models"
SCRIPT = ROOT / "scripts" / "build_shipped_models.sh"
# Where a run was saved or how fast it went, not what it computed.
NOT_TRAINING = {"out", "init_from", "threads", "ckpt_minutes", "log_every", "eval_every", "eval_samples",
                "eval_lengths", "final_eval"}

# Each stub records its argv and creates the files the script checks for or copies.
STUB = r'''#!/usr/bin/env bash
printf '%s\n' "$(basename "$0") $*" >> "$STUB_LOG"
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[i]}" in
    --out) mkdir -p "${args[i+1]}/final" && touch "${args[i+1]}/ckpt.pt" && touch "${args[i+1]}/final/"{config.json,generation_config.json,model.safetensors,tokenizer.json,tokenizer_config.json} ;;
    --output-dir) mkdir -p "${args[i+1]}" && touch "${args[i+1]}/"{config.json,generation_config.json,model.safetensors} ;;
  esac
done
case "$1" in *widen_model.py) mkdir -p "$3" && touch "$3/config.json" ;; esac
'''


def _parser():
    spec = importlib.util.spec_from_file_location("train_base_model", ROOT / "scripts" / "train_base_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.parse_args


@pytest.fixture(scope="module")
def issued(tmp_path_factory):
    """The commands the build script issues, run against a copy of the repository layout (so the
    script's final copy into dms/assets touches the copy, never the real assets)."""
    tmp = tmp_path_factory.mktemp("build")
    (tmp / "scripts").mkdir()
    shutil.copy(SCRIPT, tmp / "scripts")
    (tmp / "dms" / "assets").mkdir(parents=True)
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    for name in ("python", "dms"):
        (bin_dir / name).write_text(STUB)
        (bin_dir / name).chmod(0o755)
    log = tmp / "calls.txt"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "STUB_LOG": str(log)}
    subprocess.run(["bash", str(tmp / "scripts" / SCRIPT.name), str(tmp / "run")], env=env, check=True,
                   capture_output=True, text=True)
    assert (tmp / "dms" / "assets" / "dms-8x" / "model.safetensors").is_file()
    return [shlex.split(line) for line in log.read_text().splitlines()]


def _training_runs(issued):
    parse = _parser()
    return {Path(vars(a)["out"]).name: vars(a) for a in
            (parse(c[2:]) for c in issued if c[0] == "python" and c[1].endswith("train_base_model.py"))}


def _logged_starts(path: Path) -> list[dict]:
    with gzip.open(path, "rt") as f:
        rows = [json.loads(line) for line in f]
    return [r for r in rows if r.get("event") == "start"]


def _same_training(issued_args: dict, logged_args: dict) -> dict:
    return {k: (issued_args.get(k), v) for k, v in logged_args.items()
            if k not in NOT_TRAINING and issued_args.get(k) != v}


def test_wide_stages_match_the_logged_runs(issued):
    runs = _training_runs(issued)
    stages = {r["stage"]: r["args"] for r in _logged_starts(LOGS / "v2_stages_train_log.jsonl.gz")}
    stages |= {f"2{k}": r["args"] for k, r in zip(
        "abc", _logged_starts(LOGS / "wide2_cwe_curriculum_train_log.jsonl.gz"))}
    names = {"a": "v2a", "b": "v2b", "c": "v2c", "d": "v2d", "e": "v2e", "f": "v2f",
             "2a": "wide2a", "2b": "wide2b", "2c": "wide2c"}
    # Stopped by hand where the next stage took their model/ folder (600 of a --stop-step 3000 run;
    # 1,000 of a run without one): the script stops them there with --stop-step.
    by_hand = {"2a": {"stop_step": (600, 3000)}, "2b": {"stop_step": (600, 3000)}, "c": {"stop_step": (1000, None)}}
    assert set(stages) == set(names)
    for stage, logged in stages.items():
        assert _same_training(runs[names[stage]], logged) == by_hand.get(stage, {}), stage


def test_first_wide_stage_matches_its_final_schedule(issued):
    # Stage 1 was resumed three times with a shorter --steps; its last start holds the schedule run.
    last = _logged_starts(LOGS / "wide1_train_log.jsonl.gz")[-1]["args"]
    assert _same_training(_training_runs(issued)["wide1"], last) == {}


def test_retrofits_are_two_phases_on_the_final_base(issued):
    retrofits = [c for c in issued if c[0] == "dms"]
    assert len(retrofits) == 4
    for cmd in retrofits:
        assert cmd[1] == "retrofit" and cmd[2].endswith("v2f/final")
    phase2 = [c for c in retrofits if "--resume-from" in c]
    assert len(phase2) == 2 and all(c[c.index("--compression-ema") + 1] == "0.9" for c in phase2)


def test_shipped_retrofits_carry_the_ratio_and_window_the_script_trains(issued):
    for cmd in (c for c in issued if c[0] == "dms"):
        ratio = int(cmd[cmd.index("--target-cr") + 1])
        config = json.loads((ROOT / "dms" / "assets" / f"dms-{ratio}x" / "config.json").read_text())
        assert config["dms_cr"] == ratio
        assert config["dms_window_size"] == int(cmd[cmd.index("--window") + 1])


def _retrofit_means(ratio: int, first: int, last: int) -> tuple[float, float]:
    with gzip.open(LOGS / f"dms-{ratio}x_retrofit_log.jsonl.gz", "rt") as f:
        by_step = {r["step"]: r for r in map(json.loads, f)}
    rows = [by_step[s] for s in range(first, last + 1)]
    return sum(r["kl"] for r in rows) / len(rows), sum(r["achieved_cr"] for r in rows) / len(rows)


def test_documented_retrofit_figures_are_the_shipped_logs():
    card = (ROOT / "dms" / "assets" / "README.md").read_text()
    for ratio in (4, 8):
        kl, cr = _retrofit_means(ratio, 1301, 1400)
        assert f"| dms-{ratio}x | {kl:.3f} / {cr:.2f}x |" in card
    guide = (ROOT / "docs" / "retrofit.md").read_text()
    for first, last in ((601, 700), (701, 800), (1001, 1100), (1301, 1400)):
        cells = " | ".join("{:.3f} / {:.2f}x".format(*_retrofit_means(r, first, last)) for r in (4, 8))
        assert any(line.startswith(f"| {first:,}-{last:,}") and line.endswith(f"| {cells} |")
                   for line in guide.splitlines()), (first, last, cells)
