"""Where one DMS decode step spends its time: the share of the step inside the attention ops
(dms::append, dms::paged_decode_attention) and the projection matmuls (every Linear of the
model, the LM head included), against everything else (Python, small tensor ops, host
syncs). Same model and cache as ``dms bench``, decoded by each engine in turn: the model's
transformers forward and dms.models.decode (the fast path on the weights).

    OMP_NUM_THREADS=1 python benchmarks/profile_decode.py --context 4096 --steps 64

The kernels are timed where they run, inside the step (torch.profiler's self time of those
ops, so cache misses caused by the rest of the step count as kernel time, as they would in
production); "other" is the wall time of the profiled steps minus the kernels, which also
charges the profiler's own per-op cost to "other" (an upper bound). The unprofiled step minus
the same kernel times is printed next to it (a lower bound: the profiler also slows the
kernels a little). ``--table`` prints the profiler's largest self times.

``--perf`` measures the same shares without instrumenting anything: Linux ``perf`` samples
where the CPU is (cpu-clock) during unprofiled steps of the chosen engine, and each sample
counts for the attention ops when it lands in the dms library, for the projections when it
lands in a BLAS routine (MKL, oneDNN, OpenBLAS: GEMM / GEMV symbols), and for "other"
anywhere else (the Python interpreter, torch's dispatcher, small ops, malloc). Sampling also
charges to "other" the cache misses the small ops take after the kernels streamed the weights
and the KV through the caches, which is where much of their time goes at 4K:

    OMP_NUM_THREADS=1 python benchmarks/profile_decode.py --engine fast --perf --steps 1000
"""
from __future__ import annotations

import argparse
import copy
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import torch

KERNELS = {"attention": ("dms::append", "dms::paged_decode_attention"),
           "projections": ("aten::mm", "aten::addmm", "aten::bmm")}


def _decode(model, cache, tok, n: int, engine: str):
    """``n`` greedy steps of batch 1 from token ``tok`` [1, 1]."""
    from dms.compat import cache_kwargs
    from dms.models.decode import decoder

    with torch.no_grad():
        if engine == "fast":
            fast, pos, tok = decoder(model), torch.tensor([cache.get_seq_length()]), tok[:, 0]
            for _ in range(n):
                tok = fast.step(cache, tok, pos).argmax(-1)
                pos = pos + 1
            return tok[:, None]
        for _ in range(n):
            tok = model(input_ids=tok, **cache_kwargs(cache), use_cache=True).logits[:, -1:].argmax(-1)
    return tok


def profile(model, cache, tok, args, engine: str) -> dict:
    """One unprofiled and one profiled run of ``args.steps`` steps: times per step (ms)."""
    t0 = time.perf_counter()
    tok = _decode(model, cache, tok, args.steps, engine)
    plain = (time.perf_counter() - t0) / args.steps * 1e3
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        tok = _decode(model, cache, tok, args.steps, engine)
        step = (time.perf_counter() - t0) / args.steps * 1e3
    self_ms = {}
    for e in prof.key_averages():
        self_ms[e.key] = self_ms.get(e.key, 0.0) + e.self_cpu_time_total / 1e3 / args.steps
    parts = {name: sum(self_ms.get(k, 0.0) for k in keys) for name, keys in KERNELS.items()}
    return dict(plain=plain, step=step, tok=tok, prof=prof, **parts)


def _report(r: dict, args, engine: str, cache) -> None:
    kernels = r["attention"] + r["projections"]
    other = max(0.0, r["step"] - kernels)
    print(f"{engine:>12}: context {args.context}, CR {cache.compression_ratio():.2f}, threads {args.threads}: step "
          f"{r['plain']:.3f} ms (profiled {r['step']:.3f} ms = attention {r['attention']:.3f} + projections "
          f"{r['projections']:.3f} + other {other:.3f}: {100 * other / r['step']:.0f}% of the step outside the "
          f"kernels; "
          f"unprofiled step minus kernels: {100 * max(0.0, r['plain'] - kernels) / r['plain']:.0f}%)", flush=True)
    if args.table:
        print(r["prof"].key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


# BLAS routines the projections run in (MKL, oneDNN, OpenBLAS, BLIS).
_BLAS = re.compile(r"mkl_blas|gemm|gemv|dnnl|openblas|bli_", re.IGNORECASE)


def _sampled(args, engine: str) -> None:
    """Run this script's ``--perf-child`` under ``perf record``, sampling only while it decodes,
    and print the shares of the samples."""
    import dms

    if shutil.which("perf") is None:
        raise SystemExit("--perf needs Linux perf on PATH (Debian: apt-get install linux-perf)")
    library = os.path.basename(dms.library_path())
    with tempfile.TemporaryDirectory() as tmp:
        ctl, ack, data = (os.path.join(tmp, n) for n in ("ctl", "ack", "perf.data"))
        os.mkfifo(ctl)
        os.mkfifo(ack)
        # The same options (the last --engine wins), in a child that decodes instead of sampling.
        options = [a for a in sys.argv[1:] if a != "--perf"]
        child = [sys.executable, __file__, *options, "--engine", engine, "--perf-child", ctl, ack]
        subprocess.run(["perf", "record", "-q", "-D", "-1", "--control", f"fifo:{ctl},{ack}", "-F", "2000",
                        "-e", "cpu-clock", "-o", data, "--", *child], check=True)
        report = subprocess.run(["perf", "report", "-i", data, "--sort", "dso,sym", "--stdio"], check=True,
                                capture_output=True, text=True).stdout
    shares = dict(attention=0.0, projections=0.0, other=0.0)
    for line in report.splitlines():
        fields = line.split()
        if len(fields) < 4 or not fields[0].endswith("%"):
            continue
        part = ("attention" if fields[1] == library else
                "projections" if _BLAS.search(" ".join(fields[3:])) else "other")
        shares[part] += float(fields[0][:-1])
    total = sum(shares.values())
    print(f"{engine:>12}: perf samples of {args.steps} unprofiled steps: attention "
          f"{100 * shares['attention'] / total:.1f}%, projections {100 * shares['projections'] / total:.1f}%, "
          f"other {100 * shares['other'] / total:.1f}% of the step outside the kernels", flush=True)


def _perf_child(args, model, cache) -> None:
    """Decode ``args.steps`` steps with perf's sampling switched on around them only."""
    ctl, ack = args.perf_child

    def command(c: str) -> None:
        with open(ctl, "w") as f:
            f.write(c + "\n")
        with open(ack) as f:
            f.read(5)  # perf acknowledges with "ack\n\0"

    tok = _decode(model, cache, torch.tensor([[5]]), 8, args.engine)
    command("enable")
    t0 = time.perf_counter()
    _decode(model, cache, tok, args.steps, args.engine)
    step = (time.perf_counter() - t0) / args.steps * 1e3
    command("disable")
    print(f"{args.engine:>12}: context {args.context}, CR {cache.compression_ratio():.2f}, threads "
          f"{args.threads}: step {step:.3f} ms", flush=True)


def main() -> None:
    from dms.cli.bench import _caches, _models

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--table", action="store_true")
    p.add_argument("--engine", choices=("transformers", "fast", "both"), default="both")
    p.add_argument("--repeats", type=int, default=3,
                   help="rounds (engines alternate within each); the round with the fastest profiled step is kept, "
                        "the least disturbed by other load on a shared machine")
    p.add_argument("--perf", action="store_true", help="shares from Linux perf's samples of unprofiled steps")
    p.add_argument("--perf-child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    engines = ("transformers", "fast") if args.engine == "both" else (args.engine,)
    if args.perf:
        for engine in engines:
            _sampled(args, engine)
        return
    torch.set_num_threads(args.threads)
    dense, model = _models(args.window)
    cache = _caches(dense, model, args.context, args.window, 8.0, 2 * args.steps + 8, seed=args.context)["dms"]
    if args.perf_child:
        _perf_child(args, model, cache)
        return
    caches = {engine: copy.deepcopy(cache) for engine in engines}
    toks = {engine: _decode(model, caches[engine], torch.tensor([[5]]), 8, engine) for engine in engines}
    best = {}
    for _ in range(args.repeats):
        for engine in engines:
            r = profile(model, caches[engine], toks[engine], args, engine)
            toks[engine] = r["tok"]
            if engine not in best or r["step"] < best[engine]["step"]:
                best[engine] = r
    for engine in engines:
        _report(best[engine], args, engine, caches[engine])

if __name__ == "__main__":
    main()
