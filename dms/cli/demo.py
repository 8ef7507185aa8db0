"""``dms demo``: the main job. Offline, on the models shipped in dms/assets (or --model-dir):
evaluates the plain base model, its DMS retrofits at 4x and 8x, and StreamingLLM / H2O / TOVA
at the same per-head token budgets (dms.eval.runner), prints the table with 95% confidence
intervals and writes results.json and accuracy_vs_compression.png. The samples have the held-out
seeds of ``dms eval`` (4 * 10**9 + i, which no training path draws; --seed changes the base).

Model folder layout (each a transformers save_pretrained folder):
    base/    the plain model + its tokenizer (scripts/train_base_model.py, its final/ folder)
    dms-4x/  the DMS retrofit for 4x (dms retrofit base --target-cr 4)
    dms-8x/  the DMS retrofit for 8x (dms retrofit base --target-cr 8)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

RATIOS = (4, 8)
WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


def default_model_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "assets"


def folders(model_dir: Path) -> dict:
    return {"base": model_dir / "base", **{r: model_dir / f"dms-{r}x" for r in RATIOS}}


def missing_files(model_dir: Path) -> list[str]:
    """Files the demo needs that are not in ``model_dir``."""
    missing = []
    for key, folder in folders(model_dir).items():
        needed = ["config.json"] + (["tokenizer.json", "tokenizer_config.json"] if key == "base" else [])
        missing += [str(folder / f) for f in needed if not (folder / f).is_file()]
        if not any((folder / w).is_file() for w in WEIGHTS):
            missing.append(str(folder / WEIGHTS[0]))
    return missing


def how_to_produce(model_dir: Path) -> str:
    f = folders(model_dir)
    return (
        "Produce them as shipped with bash scripts/build_shipped_models.sh RUN_DIR (hours on a CPU),\n"
        "or quick ones of your own:\n"
        "  1. base model: python scripts/train_base_model.py --out RUN --final-eval,\n"
        f"     then copy RUN/final/ to {f['base']}/\n"
        + "".join(f"  {i}. DMS {r}x: dms retrofit {f['base']} --data DATA.jsonl --target-cr {r} --output-dir {f[r]}\n"
                  for i, r in enumerate(RATIOS, start=2))
        + "     (DATA.jsonl: dms.tasks samples, from python scripts/make_retrofit_data.py --out DATA.jsonl)\n"
        "or point the demo at another folder with the same layout: dms demo --model-dir DIR")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from dms.cli.eval import add_common

    p.description, p.formatter_class = __doc__, argparse.RawDescriptionHelpFormatter
    p.add_argument("--model-dir", type=Path, default=None,
                   help=f"folder holding base/, dms-4x/, dms-8x/ (default: the shipped {default_model_dir()})")
    # 512 = the longest prompts the base was trained on; at 256 the always-kept window
    # is a large share of an 8x budget (BENCHMARKS.md has both lengths).
    add_common(p, samples=32, length=512, out="dms-demo")


def run(args) -> int:
    model_dir = args.model_dir or default_model_dir()
    missing = missing_files(model_dir)
    if missing:
        print(f"dms demo: the models in {model_dir} are not there; missing files:\n  " + "\n  ".join(missing)
              + "\n" + how_to_produce(model_dir), file=sys.stderr)
        return 2
    from dms.cli.eval import execute

    f = folders(model_dir)
    print(f"dms demo: models from {model_dir}; {len(args.tasks)} tasks x {args.samples} samples, prompts of "
          f"{args.length} tokens; methods {', '.join(args.methods)}", flush=True)
    wanted = {r: str(f[r]) for r in RATIOS} if "dms" in args.methods else {}
    ratios = [] if wanted else list(RATIOS)
    paths = execute(str(f["base"]), wanted, args, ratios, title=f"dms demo ({model_dir.name})")
    print(f"dms demo: table above; results in {paths['json']}, plot in {paths['png']}", flush=True)
    return 0
