"""``dms retrofit``: train a plain Llama/Qwen2/Qwen3/Mistral model folder into a DMS model.

Many processes: ``torchrun --nproc_per_node N scripts/retrofit_torchrun.py <same arguments>``
(FSDP2 sharding by default, see dms.train.fsdp; ``--plan`` prints the memory per process).
"""
from __future__ import annotations

import argparse

from dms.train.config import DTYPES, SHARDINGS, TRAIN_MODES, VARIANTS, TrainConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = TrainConfig.__dataclass_fields__
    p.add_argument("model", help="model folder (config.json, weights, tokenizer if the data holds 'text')")
    p.add_argument("--data", nargs="+", required=True, help="JSONL files, one object per line with 'text' or 'input_ids'")
    p.add_argument("--output-dir", required=True, help="where the DMS model, checkpoints and train_log.jsonl go")
    p.add_argument("--target-cr", type=float, default=d["target_cr"].default, help="target KV compression ratio (>= 1)")
    p.add_argument("--window", type=int, default=d["window"].default, help="delayed-eviction window w")
    p.add_argument("--steps", type=int, default=d["steps"].default, help="optimizer steps")
    p.add_argument("--ramp-steps", type=int, default=None,
                   help="steps over which the compression ratio grows linearly from 1 to the target (default: --steps)")
    p.add_argument("--batch-size", type=int, default=d["batch_size"].default, help="sequences per process and micro-batch")
    p.add_argument("--grad-accum", type=int, default=d["grad_accum"].default, help="micro-batches per optimizer step")
    p.add_argument("--global-batch-size", type=int, default=None,
                   help="sequences per optimizer step over all processes (sets --grad-accum; must be a multiple "
                        "of --batch-size x processes); keeps a run the same when the number of processes changes")
    p.add_argument("--seq-len", type=int, default=d["seq_len"].default, help="tokens per training sequence")
    p.add_argument("--no-pack", dest="pack", action="store_false",
                   help="one document per sequence, left-padded to --seq-len, instead of packing documents "
                        "back to back (for short self-contained samples such as dms.tasks prompts)")
    p.add_argument("--lr", type=float, default=d["lr"].default, help="peak learning rate (AdamW)")
    p.add_argument("--warmup-steps", type=int, default=d["warmup_steps"].default, help="linear learning-rate warm-up")
    p.add_argument("--decay-steps", type=int, default=d["decay_steps"].default,
                   help="final steps over which the learning rate falls linearly to 0 (0 = constant)")
    p.add_argument("--weight-decay", type=float, default=d["weight_decay"].default)
    p.add_argument("--grad-clip", type=float, default=d["grad_clip"].default, help="max gradient norm (0 = off)")
    p.add_argument("--train-mode", choices=TRAIN_MODES, default=d["train_mode"].default,
                   help="adapter-only: base frozen, only the decision parameters train; full: fine-tune everything")
    p.add_argument("--variant", choices=VARIANTS, default=d["variant"].default,
                   help="neuron: borrow a q_proj row per KV head (published format); adapter: a separate Linear")
    p.add_argument("--tau", type=float, default=d["tau"].default, help="Gumbel-sigmoid temperature")
    p.add_argument("--alpha-scale", type=float, default=d["alpha_scale"].default)
    p.add_argument("--alpha-offset", type=float, default=d["alpha_offset"].default)
    p.add_argument("--compression-weight", type=float, default=d["compression_weight"].default,
                   help="weight of the max(0, target - evicted) term")
    p.add_argument("--compression-ema", type=float, default=d["compression_ema"].default,
                   help="0 (the paper): the compression term sees each micro-batch's evicted fraction; beta in (0, 1): "
                        "a running mean over steps (beta * past + (1 - beta) * this batch), which stops small "
                        "micro-batches from ratcheting the CR past the target")
    p.add_argument("--calibrated-compression", dest="calibrated_tolerance", type=float, nargs="?", const=0.05,
                   default=d["calibrated_tolerance"].default, metavar="TOLERANCE",
                   help="opt-in, not the paper: replace the one-sided term by a two-sided one per sequence that "
                        "holds each sequence within TOLERANCE (default 0.05) of the target ratio at its own "
                        "length, counting the window (docs/retrofit.md); --compression-ema is then unused")
    p.add_argument("--calibrated-cap", type=float, default=d["calibrated_cap"].default,
                   help="with --calibrated-compression: the most of a sequence's older-than-window tokens it is "
                        "asked to evict (short sequences cannot reach a high ratio)")
    p.add_argument("--kl-chunk-tokens", type=int, default=d["kl_chunk_tokens"].default,
                   help="positions whose vocabulary logits are alive at once")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute layer activations in backward")
    p.add_argument("--dtype", choices=DTYPES, default=d["dtype"].default)
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if CUDA is available, else cpu")
    p.add_argument("--sharding", choices=SHARDINGS, default=d["sharding"].default,
                   help="how processes share the model: fsdp (FSDP2: weights, gradients and optimizer state "
                        "sharded; needs torchrun), ddp (every process holds a full copy), none (one process); "
                        "auto: fsdp under torchrun with more than one process, else none")
    p.add_argument("--fsdp", dest="sharding", action="store_const", const="fsdp", help="same as --sharding fsdp")
    p.add_argument("--plan", action="store_true",
                   help="print the per-process memory this run needs (from config.json only, no weights loaded) "
                        "and exit; with --world-size for a run not started yet")
    p.add_argument("--world-size", type=int, default=None,
                   help="processes to plan for with --plan (default: WORLD_SIZE, or 1)")
    p.add_argument("--seed", type=int, default=d["seed"].default)
    p.add_argument("--save-every", type=int, default=d["save_every"].default,
                   help="write checkpoint-<step> every N steps (0 = only the final model)")
    p.add_argument("--log-every", type=int, default=d["log_every"].default, help="write a log record every N steps")
    p.add_argument("--resume-from", default=None,
                   help="a checkpoint-<step> folder of an earlier run, or 'latest': the newest complete one in "
                        "--output-dir (none yet: start at step 0), for jobs that are requeued")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from dms.train import retrofit

    options = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}
    options["progress"] = not args.no_progress
    cfg = TrainConfig(**options)
    if args.plan:
        from dms.train.memory import plan_for_folder

        print(plan_for_folder(args.model, cfg, args.world_size))
        return 0
    if args.world_size is not None:
        raise ValueError("--world-size only goes with --plan (torchrun sets the number of processes)")
    retrofit(args.model, cfg)
    return 0
