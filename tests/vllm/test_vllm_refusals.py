"""What the plugin cannot combine with a DMS checkpoint is refused at start-up, naming the
option; plain checkpoints keep vLLM's stock path; beam search works (vLLM runs it as ordinary
requests, which the store serves like any other)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ASSETS, make_llm, prompt_ids, reference_greedy


@pytest.mark.parametrize("option, overrides", [
    ("enable_prefix_caching", dict(enable_prefix_caching=True)),
    ("speculative_config", dict(speculative_config={"method": "ngram", "num_speculative_tokens": 2,
                                                     "prompt_lookup_max": 3, "prompt_lookup_min": 2})),
    ("enable_lora", dict(enable_lora=True, max_lora_rank=8)),
], ids=["prefix-caching", "speculative-decoding", "lora"])
def test_refused_at_startup(option, overrides):
    """In a child process: a failed engine start leaves vLLM's process-wide state unusable for
    the engines of the tests after it."""
    script = (f"from conftest import make_llm, ASSETS\n"
              f"make_llm(ASSETS / 'dms-8x', **{overrides!r})\n")
    run = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parent, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode != 0, "the engine started"
    assert "ValueError: DMS checkpoints cannot use" in run.stderr and option in run.stderr, run.stderr[-3000:]


def test_plain_checkpoint_keeps_the_stock_model():
    llm = make_llm(ASSETS / "base", kv_cache_memory_bytes=16 << 20)
    model = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner.model
    assert type(model).__module__.startswith("vllm.") or type(model).__mro__[1].__module__.startswith("vllm.")
    assert not hasattr(model, "slots")
    assert llm.llm_engine.vllm_config.cache_config.enable_prefix_caching  # vLLM's default, untouched


def test_beam_search_width_one_is_greedy(tokenizer):
    from vllm.sampling_params import BeamSearchParams

    model = ASSETS / "dms-8x"
    ids = prompt_ids(tokenizer)[1:2]
    llm = make_llm(model)
    outs = llm.beam_search([{"prompt_token_ids": i} for i in ids],
                           BeamSearchParams(beam_width=1, max_tokens=6, ignore_eos=True))
    got = [o.sequences[0].tokens[len(i):] for o, i in zip(outs, ids)]
    assert got == reference_greedy(model, ids, 6)
