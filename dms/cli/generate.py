"""``dms generate``: stream a completion from a DMS checkpoint, then report the KV cache."""
from __future__ import annotations

import argparse
import sys

DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="DMS checkpoint: local folder or hub id (config.json with dms_* keys)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-file", help="file holding the prompt ('-' = stdin)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ignore-eos", action="store_true",
                   help="go on past the end-of-sequence token up to --max-new-tokens (vLLM's ignore_eos: for load "
                        "and memory tests; what a model writes past its end is rarely meaningful)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--dtype", choices=DTYPES, default="auto")
    p.add_argument("--device", default="cpu")
    p.add_argument("--page-size", type=int, default=16, help="tokens per KV page")
    p.add_argument("--prefill-chunk", type=int, default=512,
                   help="prompt tokens per forward: each piece attends the already compressed cache")


def _prompt(args) -> str:
    if args.prompt is not None:
        return args.prompt
    if args.prompt_file == "-":
        return sys.stdin.read()
    with open(args.prompt_file, encoding="utf-8") as f:
        return f.read()


def run(args) -> int:
    import torch
    from transformers import AutoTokenizer, TextStreamer

    import dms
    from dms.compat import cache_kwargs

    for name in ("max_new_tokens", "page_size", "prefill_chunk"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    model = dms.from_pretrained(args.model, dtype=dtype).to(args.device)
    text = _prompt(args)
    if args.chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    inputs = tokenizer(text, return_tensors="pt").to(args.device)
    cache = dms.DMSCache(model, page_size=args.page_size)
    streamer = TextStreamer(tokenizer, skip_prompt=True)
    sampling = dict(do_sample=True, temperature=args.temperature, top_p=args.top_p) if args.sample else \
        dict(do_sample=False)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if args.ignore_eos:
        sampling["eos_token_id"] = None
    out = model.generate(**inputs, **cache_kwargs(cache), max_new_tokens=args.max_new_tokens, streamer=streamer,
                         pad_token_id=pad, prefill_chunk_size=args.prefill_chunk, **sampling)
    print(file=sys.stderr)
    prompt_len = inputs["input_ids"].shape[1]
    print(f"[dms] {prompt_len} prompt tokens, {out.shape[1] - prompt_len} new", file=sys.stderr)
    print(report(cache), file=sys.stderr)
    return 0


def report(cache) -> str:
    stats = cache.stats()
    layer = next(layer for layer in cache.layers if layer.is_initialized)
    dense = 2 * stats["seen"] * layer.head_dim * layer.dtype.itemsize
    mib = 1 / 2**20
    return (f"[dms] compression ratio {stats['compression_ratio']:.2f}x "
            f"(tokens seen / retained, mean over layers and KV heads); "
            f"KV memory held {stats['bytes'] * mib:.2f} MiB (retained entries {stats['retained_bytes'] * mib:.2f} MiB) "
            f"vs {dense * mib:.2f} MiB uncompressed")
