"""Stock vLLM serving dms/assets/base vs vLLM + the dms plugin serving dms/assets/dms-8x, with
the same KV memory budget and the same load: many concurrent requests with long prompts, all
submitted at once. Reports per side: peak running sequences, generated tokens/s, mean and p99
request latency, KV bytes held (peak and mean over steps).

Run in the vLLM environment (scripts/setup-vllm-env.sh), from outside the source tree:
    cd /tmp && OMP_NUM_THREADS=1 /path/to/vllm-venv/bin/python /path/to/dms/benchmarks/bench_vllm.py
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process, to read its state

ASSETS = Path(__file__).resolve().parents[1] / "dms" / "assets"


def prompts(tokenizer, n: int, length: int) -> list[list[int]]:
    import dms.tasks as tasks

    names = ["niah_single", "niah_multikey", "vt", "cwe"]
    return [tokenizer(tasks.generate(names[i % len(names)], length, i).prompt)["input_ids"] for i in range(n)]


def kv_held(core, model) -> int:
    """Bytes of K and V the engine holds now: the DMS store's pages in use, or vLLM's blocks in use."""
    stores = [a.store for a in getattr(model, "attn", [])]
    if stores and stores[0] is not None:
        return sum(s.bytes_held() for s in stores)
    mgr = core.scheduler.kv_cache_manager
    pool = mgr.block_pool
    used = pool.num_gpu_blocks - 1 - pool.get_num_free_blocks()
    cfg = core.scheduler.kv_cache_config
    per_block = sum(g.kv_cache_spec.page_size_bytes * len(g.layer_names) for g in cfg.kv_cache_groups)
    return used * per_block


def run(model_dir: Path, ids: list[list[int]], new_tokens: int, args) -> dict:
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(model_dir), dtype="float32", max_model_len=args.max_model_len, enforce_eager=True,
              kv_cache_memory_bytes=args.kv_bytes, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_caching=False, seed=0,
              **({"block_size": args.block_size} if args.block_size else {}))
    engine = llm.llm_engine
    core = engine.engine_core.engine_core
    model = core.model_executor.driver_worker.worker.model_runner.model
    sp = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    preempted, decode_only = [], []
    schedule = core.scheduler.schedule

    def counting_schedule(*args, **kwargs):
        out = schedule(*args, **kwargs)
        preempted.extend(out.preempted_req_ids or ())
        n = out.num_scheduled_tokens
        decode_only.append((len(n), bool(n) and all(t == 1 for t in n.values())))
        return out

    core.scheduler.schedule = counting_schedule
    t0 = time.perf_counter()
    for n, i in enumerate(ids):
        engine.add_request(str(n), {"prompt_token_ids": i}, sp)
    latency, running, held, step_s = {}, [], [], []
    while engine.has_unfinished_requests():
        a = time.perf_counter()
        outs = engine.step()
        step_s.append(time.perf_counter() - a)
        running.append(len(core.scheduler.running))
        held.append(kv_held(core, model))
        now = time.perf_counter() - t0
        for out in outs:
            if out.finished:
                latency[out.request_id] = now
    wall = time.perf_counter() - t0
    lat = sorted(latency.values())
    # Steps where every scheduled request decodes one token: their share of the time, and
    # their time per sequence (what a larger batch must make cheaper for tokens/s to follow).
    dec = [(t, n) for t, (n, only) in zip(step_s, decode_only) if only]
    result = dict(model=model_dir.name, requests=len(ids), wall_s=round(wall, 2),
                  generated_tokens_per_s=round(len(ids) * new_tokens / wall, 1),
                  peak_running=max(running), mean_running=round(sum(running) / len(running), 1),
                  latency_mean_s=round(sum(lat) / len(lat), 2), latency_p99_s=round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 2),
                  kv_bytes_peak=max(held), kv_bytes_mean=int(sum(held) / len(held)),
                  preemptions=len(preempted), kv_budget_bytes=args.kv_bytes,
                  decode_time_share=round(sum(t for t, _ in dec) / wall, 3),
                  decode_ms_per_step=round(1e3 * sum(t for t, _ in dec) / max(1, len(dec)), 2),
                  decode_ms_per_seq=round(1e3 * sum(t for t, _ in dec) / max(1, sum(n for _, n in dec)), 3))
    del llm, engine, core, model
    gc.collect()
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=900, help="prompt tokens (task prompts of dms.tasks)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--kv-bytes", type=int, default=16 << 20, help="the KV memory budget of both sides")
    p.add_argument("--max-num-seqs", type=int, default=128)
    p.add_argument("--max-num-batched-tokens", type=int, default=1024)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--block-size", type=int, help="KV block size of both sides (default: vLLM's, 128 on CPU)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    import torch
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    ids = prompts(AutoTokenizer.from_pretrained(str(ASSETS / "base")), args.requests, args.prompt_len)
    results = [run(ASSETS / "base", ids, args.new_tokens, args), run(ASSETS / "dms-8x", ids, args.new_tokens, args)]
    for r in results:
        print(json.dumps(r))
    base, dms8 = results
    print(f"dms-8x / base: peak running {dms8['peak_running'] / base['peak_running']:.2f}x, "
          f"generated tokens/s {dms8['generated_tokens_per_s'] / base['generated_tokens_per_s']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(args=vars(args), results=results), indent=1))


if __name__ == "__main__":
    main()
