"""Measures the REFERENCE figures that tests/models/test_shipped_models.py holds a shipped model to:
mean accuracy and compression over the seven tasks on 32 held-out samples per task at 512 prompt
tokens, each sample generated on its own, with the per-task standard deviations across samples.
It also prints what the test itself computes (the first 8 samples of each task as one batch).

    python scripts/measure_shipped_reference.py 8      # or 4, or base
"""
from __future__ import annotations

import argparse
import statistics

import torch

from dms.cli.demo import default_model_dir, folders
from dms.eval.runner import load_tokenizer, load_with_cache, run_task, task_samples
from dms.tasks import TASKS

LENGTH, N_REF, N_CI = 512, 32, 8


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", choices=["base", "4", "8"])
    args = ap.parse_args()
    torch.set_num_threads(1)
    assets = folders(default_model_dir())
    name = "base" if args.model == "base" else int(args.model)
    tokenizer = load_tokenizer(str(assets["base"]))
    model, make_cache = load_with_cache(str(assets[name]), name != "base")
    acc, acc_sd, cr, cr_sd, batch_acc, batch_cr = [], [], [], [], [], []
    for task in TASKS:
        samples = task_samples(task, LENGTH, N_REF)
        rows = [run_task(model, tokenizer, [s], make_cache, batch_size=1) for s in samples]
        a = [r["accuracy"] for r in rows]
        c = [r["compression"] for r in rows]
        acc.append(statistics.fmean(a))
        acc_sd.append(statistics.pstdev(a))
        cr.append(statistics.fmean(c))
        cr_sd.append(statistics.pstdev(c))
        batch = run_task(model, tokenizer, samples[:N_CI], make_cache, batch_size=N_CI)
        batch_acc.append(batch["accuracy"])
        batch_cr.append(batch["compression"])
        print(f"{task}: accuracy {acc[-1]:.3f} (sd {acc_sd[-1]:.3f}), CR {cr[-1]:.3f} (sd {cr_sd[-1]:.2f})", flush=True)
    n = len(TASKS)
    print(f"REFERENCE[{name!r}] = ({sum(acc) / n:.4f}, {tuple(round(s, 3) for s in acc_sd)}, "
          f"{sum(cr) / n:.3f}, {tuple(round(s, 2) for s in cr_sd)})")
    print(f"the test's 8 samples as one batch: accuracy {sum(batch_acc) / n:.3f}, CR {sum(batch_cr) / n:.3f}")


if __name__ == "__main__":
    main()
