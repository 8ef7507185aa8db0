"""Inference-time hyper-scaling: accuracy of W sampled chains per prompt (majority vote,
dms.eval.vote) against the KV memory they hold and read, for the plain model and DMS models,
across the difficulty of a reasoning task.

Per configuration (method, difficulty level, chains W) each prompt is prefilled once and its
cache forked into W chains (DMSCache.fork; a transformers DynamicCache repeats its rows). W = 1
decodes greedily; W > 1 samples every method at the same temperature and top-p, from a
generator seeded with ``sampling_seed`` so that runs repeat.

Accounting, per prompt (a batch's figures divided by its prompts), the same rule for every
method: K and V bytes of the tokens a chain's cache holds, summed over layers and KV heads.
- Peak KV memory: the maximum over the run (prefill included) of the bytes held. A finished
  chain (it produced EOS) stops growing but stays counted.
- KV reads: the bytes attention reads, summed over decode steps (forwards after the first
  token) of unfinished chains: a DMS chain reads its retained slots (seq_lens after the
  step's append); a vanilla chain its prompt and generated tokens.
- Fairness (the best a user could run with the plain model): vanilla's prompt cache is shared
  by its chains and counted once, in memory and in reads (prefix sharing as in vLLM, with a
  shared-prefix attention kernel). DMS chains share the compressed prompt's pages
  copy-on-write (DMSCache.fork): the pages of tokens kept for good count once in memory, the
  window's pages are copied per chain at the first decode step; each DMS chain reads all of its
  live slots, shared ones included (no shared-prefix kernel for DMS).

Samples: sample i has seed ``seed + i`` (default ``EVAL_SEED``, held out: no training path
draws it, see dms.eval.runner), drawn with the difficulty option set (``DIFFICULTY``).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from dms.compat import cache_kwargs
from dms.eval.runner import EVAL_SEED
from dms.eval.stats import wilson
from dms.eval.vote import vote_score
from dms.tasks import generate, min_length, score

# Task -> the generator option that sets its difficulty (defaults: arith_trace 4, vt 3).
DIFFICULTY = {"arith_trace": "terms", "vt": "hops"}
CHAINS = (1, 2, 4, 8, 16)
FAIRNESS = ("W = 1 decodes greedily; W > 1 samples every method at the same temperature and top-p "
            "and scores the majority answer (ties: the answer seen first in chain order). Each prompt is "
            "prefilled once and forked into its chains. Vanilla's prompt cache is shared by its chains and "
            "counted once, in peak memory and in reads (prefix sharing); DMS chains share the compressed prompt's "
            "pages copy-on-write (counted once in memory) but each reads all its live slots. Bytes: K and V of "
            "the tokens held, per prompt; reads summed over decode steps.")
_EXTRA_TOKENS = 4  # generated beyond the longest gold answer


@dataclass
class HyperscaleConfig:
    task: str = "arith_trace"
    levels: list[int] = field(default_factory=lambda: [4])  # values of the task's DIFFICULTY option
    chains: list[int] = field(default_factory=lambda: list(CHAINS))
    length: int = 256  # prompt tokens (raised to the task's minimum where needed)
    samples: int = 16
    batch_size: int = 4  # prompts per batch, each with W chains
    temperature: float = 0.8
    top_p: float = 1.0
    page_size: int = 16
    seed: int = EVAL_SEED  # sample i has seed seed + i
    sampling_seed: int = 0

    def __post_init__(self):
        if self.task not in DIFFICULTY:
            raise ValueError(f"task must be one of {sorted(DIFFICULTY)} (a task with a difficulty option), "
                             f"got {self.task!r}")
        for name in ("levels", "chains"):
            values = getattr(self, name)
            if not values or any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in values):
                raise ValueError(f"{name} must be a non-empty list of ints >= 1, got {values!r}")
        for name in ("length", "samples", "batch_size", "page_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")

    @property
    def knob(self) -> str:
        return DIFFICULTY[self.task]


@dataclass
class Point:
    method: str
    level: int  # the difficulty option's value
    chains: int
    accuracy: float  # majority vote (W = 1: the greedy chain)
    chain_accuracy: float  # mean score of the individual chains
    peak_bytes: float  # per prompt, max over the run
    read_bytes: float  # per prompt, summed over decode steps
    seconds: float
    samples: int
    scores: list[float] = field(default_factory=list)  # per sample, in seed order
    ci_low: float = field(init=False)
    ci_high: float = field(init=False)

    def __post_init__(self):
        self.ci_low, self.ci_high = wilson(self.accuracy, self.samples)

    def to_dict(self) -> dict:
        return asdict(self)


def level_samples(config: HyperscaleConfig, level: int):
    options = {config.knob: level}
    length = max(config.length, min_length(config.task, **options))
    return [generate(config.task, length, config.seed + i, **options) for i in range(config.samples)]


def _pick(logits: torch.Tensor, greedy: bool, temperature: float, top_p: float, gen: torch.Generator):
    if greedy:
        return logits.argmax(-1)
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    if top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p  # keep the smallest prefix reaching top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0))
    return torch.multinomial(probs, 1, generator=gen)[:, 0]


class _Meter:
    """Bytes held and read per chain, from the DMS store's seq_lens or vanilla's token counts."""

    def __init__(self, model, cache, prompt_tokens: torch.Tensor):
        cfg = model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.token_bytes = 2 * head_dim * torch.finfo(model.dtype).bits // 8  # K and V of one (layer, head)
        self.heads = cfg.num_key_value_heads
        self.dms = hasattr(cache, "fork")
        self.prompt = prompt_tokens.double()  # vanilla: real prompt tokens per prompt
        self.cache = cache

    def held(self, generated: torch.Tensor) -> torch.Tensor:
        """Bytes held per chain [rows] (vanilla: generated tokens only, the prompt is counted
        apart; DMS: a slot in a page the chains share copy-on-write splits between them)."""
        if self.dms:
            slots = sum(layer.store.held_slots().view(-1, self.heads).sum(1) for layer in self.cache.layers)
            return slots * self.token_bytes
        return self.read(generated)

    def read(self, generated: torch.Tensor) -> torch.Tensor:
        """Bytes one decode step of each chain reads [rows] (vanilla: the prompt apart; DMS:
        every live slot of the chain, shared or not)."""
        if self.dms:
            lens = sum(layer.store.seq_lens.double().view(-1, self.heads).sum(1) for layer in self.cache.layers)
            return lens * self.token_bytes
        return generated.double() * len(self.cache.layers) * self.heads * self.token_bytes

    def shared(self) -> float:
        """Bytes of the prompts counted once (vanilla's shared prefix; DMS: none)."""
        if self.dms:
            return 0.0
        return float(self.prompt.sum()) * len(self.cache.layers) * self.heads * self.token_bytes


@torch.no_grad()
def run_batch(model, tokenizer, batch, make_cache, chains: int, config: HyperscaleConfig, gen) -> dict:
    """W chains for each prompt of ``batch`` from one prefill: texts per prompt [[W texts]], the
    batch's peak held and summed read bytes (all prompts together) and its decode steps."""
    enc = tokenizer([s.prompt for s in batch], return_tensors="pt", padding=True)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    gold = max(len(tokenizer(s.target, add_special_tokens=False).input_ids) for s in batch)
    cache = make_cache()
    positions = (mask.long().cumsum(-1) - 1).clamp_min(0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1,
                   **cache_kwargs(cache)).logits[:, -1]
    meter = _Meter(model, cache, mask.sum(-1))
    rows = len(batch) * chains
    peak = meter.shared() + float(meter.held(torch.zeros(len(batch))).sum())
    cache.batch_repeat_interleave(chains)
    logits, mask = logits.repeat_interleave(chains, 0), mask.repeat_interleave(chains, 0)
    done = torch.zeros(rows, dtype=torch.bool)
    generated = torch.zeros(rows)
    held = meter.held(generated)
    peak = max(peak, meter.shared() + float(held.sum()))
    reads, out = 0.0, []
    for _ in range(gold + _EXTRA_TOKENS):
        tok = _pick(logits, chains == 1, config.temperature, config.top_p, gen)
        tok = torch.where(done, torch.full_like(tok, tokenizer.pad_token_id), tok)
        out.append(tok)
        done |= tok == tokenizer.eos_token_id
        if bool(done.all()) or len(out) == gold + _EXTRA_TOKENS:
            break
        active = ~done
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        logits = model(input_ids=tok[:, None], attention_mask=mask, position_ids=mask.sum(-1, keepdim=True) - 1,
                       use_cache=True, **cache_kwargs(cache)).logits[:, -1]
        generated += active
        held = torch.where(active, meter.held(generated), held)  # a finished chain stops growing
        peak = max(peak, meter.shared() + float(held.sum()))
        reads += float(meter.read(generated)[active].sum())
        if not meter.dms:  # each prompt with an unfinished chain reads its shared prefix once
            live = active.view(len(batch), chains).any(1)
            reads += float(meter.prompt[live].sum()) * len(cache.layers) * meter.heads * meter.token_bytes
    texts = tokenizer.batch_decode(torch.stack(out, 1), skip_special_tokens=True)
    return dict(texts=[texts[b * chains:(b + 1) * chains] for b in range(len(batch))], peak=peak, reads=reads,
                steps=len(out) - 1)


def run_point(model, tokenizer, samples, make_cache, method: str, level: int, chains: int,
              config: HyperscaleConfig, progress=None) -> Point:
    gen = torch.Generator().manual_seed(config.sampling_seed)
    scores, chain_scores, peak, reads, seconds = [], [], 0.0, 0.0, 0.0
    for a in range(0, len(samples), config.batch_size):
        batch = samples[a:a + config.batch_size]
        t0 = time.perf_counter()
        res = run_batch(model, tokenizer, batch, make_cache, chains, config, gen)
        seconds += time.perf_counter() - t0
        for s, texts in zip(batch, res["texts"]):
            scores.append(vote_score(s, texts) if chains > 1 else score(s.task, texts[0], s))
            chain_scores.append(sum(score(s.task, t, s) for t in texts) / len(texts))
        peak = max(peak, res["peak"] / len(batch))
        reads += res["reads"]
        if progress is not None:
            progress.update(len(batch))
    n = len(samples)
    return Point(method, level, chains, accuracy=sum(scores) / n, chain_accuracy=sum(chain_scores) / n,
                 peak_bytes=peak, read_bytes=reads / n, seconds=seconds, samples=n, scores=scores)


def hyperscale(base: str, dms_models: dict[float, str], config: HyperscaleConfig, progress: bool = True) -> list[Point]:
    """Every (method, level, W) of ``config``: vanilla (the plain model in ``base``, whose tokenizer
    every method uses) and one DMS model per ratio in ``dms_models`` (ratio -> folder)."""
    from tqdm.auto import tqdm

    from dms.eval.runner import load_tokenizer, load_with_cache

    tokenizer = load_tokenizer(base)
    data = {level: level_samples(config, level) for level in config.levels}
    methods = [("vanilla", base)] + [(f"dms@{r:g}x", dms_models[r]) for r in sorted(dms_models)]
    total = len(methods) * len(config.levels) * len(config.chains) * config.samples
    bar = tqdm(total=total, desc="dms hyperscale", unit="prompt", disable=not progress)
    points = []
    for method, path in methods:
        model, make = load_with_cache(path, method != "vanilla", config.page_size)
        for level in config.levels:
            for chains in config.chains:
                bar.set_postfix_str(f"{method} {config.knob}={level} W={chains}")
                points.append(run_point(model, tokenizer, data[level], make, method, level, chains, config, bar))
        del model
    bar.close()
    return points


def frontier(points: list[Point], x: str) -> list[Point]:
    """The Pareto frontier of ``points`` in (``x`` lower, accuracy higher), by increasing x."""
    best, out = -1.0, []
    for p in sorted(points, key=lambda p: (getattr(p, x), -p.accuracy)):
        if p.accuracy > best:
            out.append(p)
            best = p.accuracy
    return out


def budget_gaps(points: list[Point], x: str) -> list[dict]:
    """At each budget (every vanilla point's ``x``, per level): the best accuracy of each method
    among its points that fit the budget (None when none fits)."""
    out = []
    for level in dict.fromkeys(p.level for p in points):
        here = [p for p in points if p.level == level]
        methods = list(dict.fromkeys(p.method for p in here))
        for budget in sorted({getattr(p, x) for p in here if p.method == "vanilla"}):
            best = {m: max((p.accuracy for p in here if p.method == m and getattr(p, x) <= budget), default=None)
                    for m in methods}
            out.append(dict(level=level, budget=budget, best=best))
    return out
