"""Widens a trained Llama/Qwen3 model (hidden size, query/KV heads, MLP neurons) without changing
what it computes, so a larger model can start from the small one's skills instead of from scratch.

Every new residual dimension, head and neuron reads the residual stream through small random
weights but writes into it through zeros, and the token embedding (tied with the output head)
is zero on the new dimensions: at the start the new parts add nothing, and training grows them
(like a zero-initialised residual branch). RMSNorm divides by the root mean square over all
dimensions, so the old norm weights are scaled by sqrt(old / new hidden) to keep the outputs.
Original query heads keep their KV head: head h of group size g moves to (h // g) * g' + h % g.

    python scripts/widen_model.py dms/assets/base runs/base-wide --hidden 256 --heads 8 --kv-heads 2 \\
        --intermediate 1024
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

INIT_STD = 0.02  # transformers' initializer_range for these configs


def _grow(old: torch.Tensor, shape: tuple[int, ...], gen: torch.Generator, rows_random: bool,
          cols_random: bool, row_map: torch.Tensor | None = None) -> torch.Tensor:
    """A [R, C] weight holding ``old`` at rows ``row_map`` (default: the first rows) and columns
    0..c-1; new rows / columns are random (std INIT_STD) if asked, else zero."""
    new = torch.zeros(shape, dtype=old.dtype)
    rows = torch.arange(old.shape[0]) if row_map is None else row_map
    fresh_rows = torch.ones(shape[0], dtype=torch.bool)
    fresh_rows[rows] = False
    if rows_random:
        new[fresh_rows] = torch.randn(int(fresh_rows.sum()), shape[1], generator=gen, dtype=old.dtype) * INIT_STD
    if cols_random:
        extra = (shape[0], shape[1] - old.shape[1])
        new[:, old.shape[1]:] = torch.randn(extra, generator=gen, dtype=old.dtype) * INIT_STD
    new[rows, :old.shape[1]] = old
    return new


def head_rows(heads: int, kv_heads: int, new_heads: int, new_kv_heads: int, head_dim: int) -> torch.Tensor:
    """Rows of the widened q_proj that hold the original query heads, in order."""
    g, g2 = heads // kv_heads, new_heads // new_kv_heads
    if g2 < g or new_kv_heads < kv_heads:
        raise ValueError(f"cannot widen {heads} query / {kv_heads} KV heads to {new_heads} / {new_kv_heads}: "
                         "each original query head must keep its KV head")
    slots = [(h // g) * g2 + h % g for h in range(heads)]
    return torch.cat([torch.arange(s * head_dim, (s + 1) * head_dim) for s in slots])


def widen_state(state: dict[str, torch.Tensor], cfg: dict, hidden: int, heads: int, kv_heads: int,
                intermediate: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """The widened state dict of a (tied-embedding) Llama or Qwen3 model with config ``cfg``."""
    h0, i0, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    if hidden < h0 or intermediate < i0:
        raise ValueError(f"widening only grows: hidden {h0} -> {hidden}, intermediate {i0} -> {intermediate}")
    q_rows = head_rows(cfg["num_attention_heads"], cfg["num_key_value_heads"], heads, kv_heads, hd)
    gen = torch.Generator().manual_seed(seed)
    scale = math.sqrt(h0 / hidden)
    out = {}
    for name, w in state.items():
        if name.endswith(("input_layernorm.weight", "post_attention_layernorm.weight", "model.norm.weight")):
            out[name] = torch.cat([w * scale, torch.full((hidden - h0,), scale, dtype=w.dtype)])
        elif name.endswith(("q_norm.weight", "k_norm.weight")):
            out[name] = w  # per head_dim, shared by all heads
        elif name.endswith("embed_tokens.weight"):
            out[name] = _grow(w, (w.shape[0], hidden), gen, rows_random=False, cols_random=False)
        elif name.endswith("q_proj.weight"):
            out[name] = _grow(w, (heads * hd, hidden), gen, rows_random=True, cols_random=True, row_map=q_rows)
        elif name.endswith(("k_proj.weight", "v_proj.weight")):
            out[name] = _grow(w, (kv_heads * hd, hidden), gen, rows_random=True, cols_random=True)
        elif name.endswith("o_proj.weight"):
            o = torch.zeros(hidden, heads * hd, dtype=w.dtype)
            o[:h0, q_rows] = w
            out[name] = o
        elif name.endswith(("gate_proj.weight", "up_proj.weight")):
            out[name] = _grow(w, (intermediate, hidden), gen, rows_random=True, cols_random=True)
        elif name.endswith("down_proj.weight"):
            out[name] = _grow(w, (hidden, intermediate), gen, rows_random=False, cols_random=False)
        elif name == "lm_head.weight":
            continue  # tied with the embedding
        else:
            raise ValueError(f"widen_state does not know how to widen {name}")
    return out


def widen(src: str | Path, dst: str | Path, hidden: int, heads: int, kv_heads: int, intermediate: int,
          seed: int = 0) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg = AutoConfig.from_pretrained(str(src))
    if cfg.model_type not in ("llama", "qwen3") or not cfg.tie_word_embeddings:
        raise ValueError(f"{src}: widen_model handles tied-embedding llama / qwen3 models, not {cfg.model_type}")
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    state = widen_state(model.state_dict(), cfg.to_dict(), hidden, heads, kv_heads, intermediate, seed)
    cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads = hidden, heads, kv_heads
    cfg.intermediate_size = intermediate
    wide = AutoModelForCausalLM.from_config(cfg)
    missing, unexpected = wide.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:  # lm_head is tied to the embedding
        raise ValueError(f"widened state does not fit the model: missing {missing}, unexpected {unexpected}")
    wide.save_pretrained(str(dst), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(src)).save_pretrained(str(dst))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="folder of the trained model (with its tokenizer)")
    p.add_argument("dst", help="folder for the widened model")
    p.add_argument("--hidden", type=int, required=True)
    p.add_argument("--heads", type=int, required=True)
    p.add_argument("--kv-heads", type=int, required=True)
    p.add_argument("--intermediate", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    widen(a.src, a.dst, a.hidden, a.heads, a.kv_heads, a.intermediate, a.seed)
    print(f"wrote {a.dst}")


if __name__ == "__main__":
    main()
