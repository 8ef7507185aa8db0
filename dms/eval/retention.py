"""Which tokens each (layer, KV head) of a DMS model kept, for one sample: the first thing to
look at when a compressed model fails.

The model generates greedily with a ``DMSCache`` that records the eviction decisions it is
handed. A decision at token t flags token t - 1; a flagged token stays visible for ``window``
more tokens (docs/design.md §1), so at the end of generation token k is kept unless it is
flagged and ``k + window < N - 1`` (N = tokens fed: the prompt and every generated token
but the last, which is never fed back).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from dms.cache import DMSCache
from dms.tasks import Sample, score
from dms.tasks.vocab import KEYS

# Prompt words labelled on the map: needle keys and arithmetic operators (the words answers hinge on).
_MARKED = set(KEYS) | {"+", "-"}


class RecordingCache(DMSCache):
    """A DMSCache that keeps the decisions of every forward: ``decisions[layer]`` [B, H_kv, T]."""

    def __init__(self, model, **kwargs):
        super().__init__(model, **kwargs)
        self.decisions: dict[int, list[torch.Tensor]] = {}

    def attend(self, layer_idx, q, k, v, decisions, padding, scale):
        if decisions is None:
            raise ValueError("the retention map needs the model in mode 'infer' (it records DMS decisions)")
        if padding is not None and not bool(padding.all()):
            raise ValueError("the retention map is drawn for one unpadded sample")
        self.decisions.setdefault(layer_idx, []).append(decisions.detach().cpu())
        return super().attend(layer_idx, q, k, v, decisions, padding, scale)


@dataclass
class RetentionMap:
    sample: Sample
    tokens: list[str]  # the tokens fed, BOS first
    prompt_tokens: int
    kept: torch.Tensor  # bool [layers, H_kv, N]
    generation: str
    score: float
    cache: DMSCache


def kept_at_end(decisions: torch.Tensor, window: int) -> torch.Tensor:
    """decisions bool [..., N] (of tokens 0 .. N-1) -> kept bool [..., N] after token N-1."""
    N = decisions.shape[-1]
    flagged = torch.zeros_like(decisions)
    flagged[..., :-1] = decisions[..., 1:]
    idx = torch.arange(N)
    return ~flagged | (idx + window >= N - 1)


@torch.no_grad()
def retention_map(model, tokenizer, sample: Sample, extra_tokens: int = 4) -> RetentionMap:
    """Greedy generation on ``sample`` (as far as its gold answer plus ``extra_tokens``) and the
    tokens each (layer, KV head) kept at its end."""
    from dms.compat import cache_kwargs

    window = getattr(model.config, "dms_window_size", None)
    if window is None:
        raise ValueError(f"{type(model).__name__} is not a DMS model (no dms_window_size): nothing is evicted")
    enc = tokenizer([sample.prompt], return_tensors="pt")
    new = len(tokenizer(sample.target, add_special_tokens=False).input_ids) + extra_tokens
    cache = RecordingCache(model)
    out = model.generate(**enc, **cache_kwargs(cache), max_new_tokens=new, do_sample=False,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    P = enc.input_ids.shape[1]
    decisions = torch.stack([torch.cat(cache.decisions[i], dim=-1)[0] for i in sorted(cache.decisions)])
    N = decisions.shape[-1]
    generation = tokenizer.decode(out[0, P:], skip_special_tokens=True)
    return RetentionMap(sample, tokenizer.convert_ids_to_tokens(out[0, :N].tolist()), P,
                        kept_at_end(decisions.bool(), window), generation, score(sample.task, generation, sample),
                        cache)


def describe(m: RetentionMap) -> str:
    """Per (layer, KV head): tokens kept of those fed; per marked prompt word: heads that kept it."""
    layers, heads, N = m.kept.shape
    lines = [f"{m.sample.task} seed {m.sample.seed}: score {m.score:.2f}, generated: {m.generation}",
             f"kept at the end of generation, of {N} tokens fed ({m.prompt_tokens} prompt):"]
    lines += [f"  layer {layer} head {h}: {int(m.kept[layer, h].sum())}" for layer in range(layers) for h in range(heads)]
    marked = [(i, t) for i, t in enumerate(m.tokens[:m.prompt_tokens]) if t in _MARKED]
    lines.append("marked prompt words (position word: heads that kept it, of %d):" % (layers * heads))
    lines += [f"  {i:4d} {t}: {int(m.kept[:, :, i].sum())}" for i, t in marked]
    return "\n".join(lines)


def plot_retention(m: RetentionMap, path: str | Path, title: str = "") -> Path:
    """Heat map: one row per (layer, KV head), one column per token fed; dark = kept at the end.
    Needle keys and operators of the prompt are labelled; a line marks the end of the prompt."""
    from dms.eval.report import pyplot

    plt = pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    layers, heads, N = m.kept.shape
    fig, ax = plt.subplots(figsize=(min(24.0, 4 + N / 30), 1.6 + 0.35 * layers * heads))
    ax.imshow(m.kept.reshape(layers * heads, N).float().numpy(), aspect="auto", cmap="Blues", vmin=-0.15,
              vmax=1.0, interpolation="nearest")
    ax.axvline(m.prompt_tokens - 0.5, color="red", lw=1)
    ax.set_yticks(range(layers * heads), [f"L{layer} H{h}" for layer in range(layers) for h in range(heads)],
                  fontsize=7)
    marked = [(i, t) for i, t in enumerate(m.tokens[:m.prompt_tokens]) if t in _MARKED]
    ax.set_xticks([i for i, _ in marked], [f"{t} {i}" for i, t in marked], rotation=90, fontsize=6)
    ax.set_xlabel("token position (labels: needle keys and operators of the prompt; red: end of prompt)", fontsize=8)
    ax.set_title((title + "\n" if title else "") + f"{m.sample.task} seed {m.sample.seed}, score {m.score:.2f}: "
                 f"{m.generation[:100]}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
