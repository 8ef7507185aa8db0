"""Both variants and the other architectures: tiny random checkpoints saved by dms (Qwen3 with
the borrowed neuron, Qwen2 with an adapter, Mistral with one logit per layer), served through
the plugin with no flag, give the greedy tokens of dms.from_pretrained + DMSCache."""
from __future__ import annotations

import pytest
import torch
from conftest import make_llm, reference_greedy, vllm_greedy

CASES = {
    "qwen3-neuron": ("qwen3", dict(dms_separate_alpha=False)),
    "qwen2-adapter": ("qwen2", dict(dms_separate_alpha=True)),
    "mistral-layer-neuron": ("mistral", dict(dms_separate_alpha=False, dms_alpha_per="layer")),
}


def _checkpoint(tmp_path, arch: str, options: dict):
    import dms
    from dms.models import dms_parameters
    from dms.models.tiny import tiny_model

    model = dms.apply(tiny_model(arch, seed=1), dms_window_size=4, dms_alpha_scale=20.0,
                      dms_initial_alpha_offset=0.0, **options)
    with torch.no_grad():  # a trained adapter evicts; a fresh (zero) one never does
        gen = torch.Generator().manual_seed(2)
        for _, p in dms_parameters(model):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    model.save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize("case", CASES)
def test_tiny_checkpoints(case, tmp_path):
    arch, options = CASES[case]
    path = _checkpoint(tmp_path, arch, options)
    gen = torch.Generator().manual_seed(3)
    ids = [torch.randint(3, 128, (n,), generator=gen).tolist() for n in (70, 200, 9, 130)]
    llm = make_llm(path, skip_tokenizer_init=True, max_num_batched_tokens=64, kv_cache_memory_bytes=8 << 20)
    got = vllm_greedy(llm, ids, 12)
    ref = reference_greedy(path, ids, 12)
    assert got == ref
    # The checkpoint really evicts, so the equality covers eviction, not just dense attention.
    import dms
    from dms.compat import cache_kwargs

    m = dms.from_pretrained(str(path), dtype=torch.float32)
    cache = dms.DMSCache(m)
    with torch.no_grad():
        m(torch.tensor([ids[1]]), **cache_kwargs(cache))
    assert cache.compression_ratio() > 1.5
