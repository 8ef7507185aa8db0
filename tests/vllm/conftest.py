"""Shared pieces of the vLLM plugin's tests (run in the vLLM environment: scripts/test-vllm.sh).

Engines run in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), fp32, eager, with a fixed KV
memory budget so that the pool size, and hence preemption, is the same on every machine.
"""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

ASSETS = Path(os.environ.get("DMS_ASSETS") or Path(__file__).resolve().parents[2] / "dms" / "assets")
# (task, prompt tokens): different lengths, so chunks and decodes mix in one step.
PROMPTS = [("niah_single", 300), ("vt", 90), ("cwe", 200), ("niah_multikey", 250), ("arith_trace", 60),
           ("niah_multivalue", 160)]
NEW_TOKENS = 24


def prompt_ids(tokenizer, specs=PROMPTS, seed: int = 0) -> list[list[int]]:
    import dms.tasks as tasks

    return [tokenizer(tasks.generate(task, n, seed).prompt)["input_ids"] for task, n in specs]


def make_llm(model: Path, **overrides):
    from vllm import LLM

    args = dict(model=str(model), dtype="float32", max_model_len=1024, max_num_seqs=16,
                max_num_batched_tokens=128, enforce_eager=True, kv_cache_memory_bytes=32 << 20, seed=0)
    args.update(overrides)
    return LLM(**args)


def vllm_greedy(llm, ids: list[list[int]], new_tokens: int = NEW_TOKENS) -> list[list[int]]:
    from vllm import SamplingParams

    sp = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": i} for i in ids], sp, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


_REFERENCE: dict = {}


def reference_greedy(model: Path, ids: list[list[int]], new_tokens: int = NEW_TOKENS) -> list[list[int]]:
    """The transformers path: dms.from_pretrained + DMSCache, greedy, one prompt at a time."""
    import dms
    from dms.compat import cache_kwargs

    key = (str(model), tuple(map(tuple, ids)), new_tokens)
    if key not in _REFERENCE:
        m = dms.from_pretrained(str(model), dtype=torch.float32)
        m.generation_config.eos_token_id = None  # like vLLM's ignore_eos: argmax continues past EOS
        out = []
        for i in ids:
            x = torch.tensor([i])
            gen = m.generate(x, attention_mask=torch.ones_like(x), **cache_kwargs(dms.DMSCache(m)),
                             max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
            out.append(gen[0, len(i):].tolist())
        _REFERENCE[key] = out
    return _REFERENCE[key]


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(ASSETS / "dms-8x"))
