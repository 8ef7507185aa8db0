"""A tiny Qwen3 checkpoint laid out as NVIDIA's reference implementation saves one (adapter under
self_attn.dms_proj_alpha_norm / dms_proj_alpha, no bias, bf16, config.json without
architectures), the same weights under dms's earlier names, and the reference checkpoint with
dms_disable_eviction: served through the plugin with no flag, each gives the greedy tokens of
dms.from_pretrained + DMSCache."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import make_llm, reference_greedy, vllm_greedy
from safetensors.torch import load_file, save_file

KEYS = dict(dms_window_size=4, dms_paged_attention_block_size=2, dms_alpha_scale=20.0, dms_initial_alpha_offset=0.0)


def _earlier_layout(src, dst, one_output: bool):
    """dst: src's checkpoint under dms's earlier names, which always came with a bias (non-zero
    here, so that the plugin must read it), and had one output per layer for alpha_per "layer"."""
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    names = {".dms_proj_alpha_norm.": ".dms_adapter.norm.", ".dms_proj_alpha.": ".dms_adapter.proj."}
    gen = torch.Generator().manual_seed(4)
    old = {}
    for name, t in load_file(src / "model.safetensors").items():
        for new, earlier in names.items():
            name = name.replace(new, earlier)
        if name.endswith(".dms_adapter.proj.weight"):
            t = t[:1] if one_output else t
            old[name[:-len("weight")] + "bias"] = (0.1 * torch.randn(t.shape[0], generator=gen)).to(t.dtype)
        old[name] = t
    save_file(old, dst / "model.safetensors", metadata={"format": "pt"})


def _no_eviction(src, dst):
    dst.mkdir()
    (dst / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    config = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, "dms_disable_eviction": True}))


@pytest.mark.parametrize("layout", ["reference", "earlier", "earlier-per-layer", "disable-eviction"])
def test_reference_layout_served_like_from_pretrained(layout, tmp_path):
    import dms
    from dms.compat import cache_kwargs
    from dms.models.tiny import save_reference_checkpoint

    path = tmp_path / "reference"
    save_reference_checkpoint(path, seed=1, dms_alpha_per="layer" if layout == "earlier-per-layer" else "head",
                              **KEYS)
    assert "architectures" not in json.loads((path / "config.json").read_text())
    if layout.startswith("earlier"):
        _earlier_layout(path, tmp_path / layout, one_output=layout == "earlier-per-layer")
        path = tmp_path / layout
    elif layout == "disable-eviction":
        _no_eviction(path, tmp_path / layout)
        path = tmp_path / layout
    gen = torch.Generator().manual_seed(3)
    ids = [torch.randint(3, 128, (n,), generator=gen).tolist() for n in (70, 200, 9, 130)]
    llm = make_llm(path, skip_tokenizer_init=True, max_num_batched_tokens=64, kv_cache_memory_bytes=8 << 20)
    assert vllm_greedy(llm, ids, 12) == reference_greedy(path, ids, 12)
    m = dms.from_pretrained(str(path), dtype=torch.float32)
    cache = dms.DMSCache(m)
    with torch.no_grad():
        m(torch.tensor([ids[1]]), **cache_kwargs(cache))
    # Evictions really happen (so the equality covers them), except when switched off.
    assert (cache.compression_ratio() == 1.0) if layout == "disable-eviction" else cache.compression_ratio() > 1.5
