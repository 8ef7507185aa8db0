"""Accuracy and KV-cache size of KV-compression methods on the dms.tasks tasks.

Methods: "vanilla" (the plain model, full cache), "dms" (a DMS model retrofitted for a given
compression ratio, with its DMSCache), and the baselines "streaming", "h2o", "tova", "quest"
(dms.baselines, on the plain model's weights). Quest evicts nothing: its "compression" is
tokens seen / keys read by the last decode step, and its KV bytes are the whole cache.

Budget rule for the baselines at ratio r, per task: the mean number of tokens the DMS model
for r retained per (layer, batch row, KV head) at the end of generation on that task's
samples, rounded (so both hold about as many KV entries); without a DMS model for r (or when
"dms" is not among the methods), ``ceil(prompt tokens / r)``. StreamingLLM keeps
``min(4, budget - 1)`` sinks; H2O protects ``budget // 2`` recent tokens; Quest selects pages
of ``min(page_size, budget // 4)`` tokens, so that its budget spans at least 4 pages.

Samples: sample i (0-based) of every task has seed ``seed + i`` (``EvalConfig.seed``, default
``EVAL_SEED``); the generator draws from ``random.Random(f"{task}:{length}:{seed + i}")``, so
tasks and prompt lengths get different samples from the same seed numbers. The default seeds,
4 * 10**9 upward, are held out: no training path draws them (training streams draw below 2**31,
the retrofit data starts at 2 * 10**9, the base's periodic evaluation uses 10**9 + i; see
tests/eval/test_eval_seeds.py). Every method sees the same samples (prompts of the same length
per task, so a batch needs no padding) and decodes greedily for as many tokens as the longest
gold answer plus a margin, or until every row has produced EOS (DMS models through the fast
decode loop of dms.models.decode). Compression ratio = tokens seen / retained, as DMSCache.stats
defines it. Each row carries its per-sample scores and a 95% interval (dms.eval.stats).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from functools import partial

import torch

from dms.baselines import POLICIES, PolicyCache
from dms.cache import DMSCache
from dms.compat import cache_kwargs
from dms.eval.shared import generate_shared
from dms.eval.stats import wilson
from dms.models.decode import generate as fast_generate
from dms.tasks import TASKS, generate, min_length, score

METHODS = ("vanilla", "dms") + POLICIES
EVAL_SEED = 4 * 10 ** 9  # held out: above every seed a training path draws (module docstring)
_EXTRA_TOKENS = 4  # generated beyond the longest gold answer


@dataclass
class EvalConfig:
    tasks: list[str]
    length: int = 256  # prompt tokens (raised to a task's minimum where needed)
    samples: int = 8
    batch_size: int = 32
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    ratios: list[float] = field(default_factory=list)  # baselines' ratios with no DMS model
    page_size: int = 16
    seed: int = EVAL_SEED  # sample i of each task has seed seed + i

    def __post_init__(self):
        unknown = [t for t in self.tasks if t not in TASKS]
        if not self.tasks or unknown:
            raise ValueError(f"tasks must be a non-empty list of {sorted(TASKS)}; unknown: {unknown}")
        bad = [m for m in self.methods if m not in METHODS]
        if not self.methods or bad:
            raise ValueError(f"methods must be a non-empty list of {METHODS}; unknown: {bad}")
        for name in ("length", "samples", "batch_size", "page_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")
        if any(r < 1 for r in self.ratios):
            raise ValueError(f"ratios must be >= 1, got {self.ratios}")


@dataclass
class Row:
    method: str
    ratio: float | None  # target compression ratio (None for vanilla)
    task: str
    accuracy: float
    compression: float  # achieved: tokens seen / retained, each summed over layers, rows, KV heads
    kv_bytes: float  # bytes of the retained K/V entries, mean per sample
    kv_pool_bytes: float  # bytes the cache held (pool + index tensors), mean per sample
    retained_per_head: float  # mean retained tokens per (layer, row, KV head)
    budget: int | None  # baselines' token budget per KV head
    samples: int
    seconds: float
    scores: list[float] = field(default_factory=list)  # per sample, in seed order
    ci_low: float = field(init=False)  # 95% Wilson interval of accuracy (dms.eval.stats)
    ci_high: float = field(init=False)

    def __post_init__(self):
        self.ci_low, self.ci_high = wilson(self.accuracy, self.samples)

    @property
    def label(self) -> str:
        return self.method if self.ratio is None else f"{self.method}@{self.ratio:g}x"

    def to_dict(self) -> dict:
        return dict(asdict(self), label=self.label)


def task_samples(task: str, length: int, n: int, seed: int = EVAL_SEED):
    """Samples ``seed`` .. ``seed + n - 1`` of ``task`` at ``length`` (raised to its minimum)."""
    length = max(length, min_length(task))
    return [generate(task, length, seed + i) for i in range(n)]


def _cache_stats(cache, rows: int) -> dict:
    """Per-sample means of a finished batch's cache statistics."""
    if isinstance(cache, (PolicyCache, DMSCache)):  # the paged layout: DMSCache.stats
        st = cache.stats()
        entries = sum(r.numel() for r in st["retained_per_layer"])
        ratio = cache.read_ratio() if getattr(cache, "policy", None) == "quest" else st["compression_ratio"]
        return dict(compression=ratio, kv_bytes=st["retained_bytes"] / rows,
                    kv_pool_bytes=st["bytes"] / rows, retained_per_head=st["retained"] / entries)
    keys = [layer.keys for layer in cache.layers]  # a transformers DynamicCache: every token kept
    held = sum(2 * k.numel() * k.element_size() for k in keys) / rows
    return dict(compression=1.0, kv_bytes=held, kv_pool_bytes=held, retained_per_head=float(keys[0].shape[2]))


def run_task(model, tokenizer, samples, make_cache, batch_size: int, progress=None) -> dict:
    """Greedy generation on ``samples`` with a fresh cache per batch: accuracy, per-sample
    scores (in the order of ``samples``) and cache stats."""
    return run_group(model, tokenizer, samples, {"run": make_cache}, batch_size, progress)["run"]


@torch.no_grad()
def run_group(model, tokenizer, samples, makers: dict, batch_size: int, progress=None) -> dict:
    """``run_task`` for several caches of one model (``makers``: name -> cache factory) that
    share each batch's prompt forward (dms.eval.shared); name -> result, with ``seconds``.
    Batches group samples of similar gold length, and each decodes only as far as its own
    longest gold answer plus the margin."""
    gold = [len(tokenizer(s.target, add_special_tokens=False).input_ids) for s in samples]
    order = sorted(range(len(samples)), key=lambda i: gold[i])
    scores = {name: [0.0] * len(samples) for name in makers}
    totals = {name: {} for name in makers}
    seconds = dict.fromkeys(makers, 0.0)
    for a in range(0, len(samples), batch_size):
        idx = order[a:a + batch_size]
        batch = [samples[i] for i in idx]
        enc = tokenizer([s.prompt for s in batch], return_tensors="pt", padding=True)
        caches = {name: make() for name, make in makers.items()}
        decode = _generate_fast if len(caches) == 1 and isinstance(*caches.values(), DMSCache) else generate_shared
        outs = decode(model, enc, list(caches.values()), max(gold[i] for i in idx) + _EXTRA_TOKENS,
                      tokenizer.eos_token_id, tokenizer.pad_token_id)
        for (name, cache), (new, secs) in zip(caches.items(), outs):
            for i, t, s in zip(idx, tokenizer.batch_decode(new, skip_special_tokens=True), batch):
                scores[name][i] = score(s.task, t, s)
            for key, value in _cache_stats(cache, len(batch)).items():
                totals[name][key] = totals[name].get(key, 0.0) + value * len(batch)
            seconds[name] += secs
        if progress is not None:
            progress.update(len(batch) * len(makers))
    n = len(samples)
    return {name: dict(accuracy=sum(scores[name]) / n, scores=scores[name], seconds=seconds[name],
                       **{k: v / n for k, v in totals[name].items()}) for name in makers}


def _generate_fast(model, enc, caches, max_new_tokens, eos_token_id, pad_token_id):
    """``generate_shared`` for one DMSCache of a DMS model: the prompt through the model, the
    answer through dms.models.decode (the same greedy tokens without transformers' per-step
    Python; it stops once every row has produced EOS)."""
    t0 = time.perf_counter()
    ids = enc["input_ids"]
    out = fast_generate(model, ids, enc["attention_mask"], *caches, max_new_tokens, eos_token_id=eos_token_id,
                        pad_token_id=pad_token_id)
    return [(out[:, ids.shape[1]:], time.perf_counter() - t0)]


def load_base(path: str):
    """The plain model as a DMS model in mode "off": vanilla attention, and PolicyCache works."""
    from transformers import AutoModelForCausalLM

    import dms
    from dms.models import set_mode

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    dms.apply(model, dms_window_size=1)
    set_mode(model, "off")
    return model


def load_with_cache(path: str, dms_checkpoint: bool, page_size: int = 16):
    """(model, factory of fresh caches): a DMS checkpoint with ``DMSCache``, a plain model
    (``load_base``) with transformers' ``DynamicCache``; fp32, in eval mode."""
    if not dms_checkpoint:
        from transformers import DynamicCache

        model = load_base(path)
        return model, lambda: DynamicCache(config=model.config)
    import dms

    model = dms.from_pretrained(path, dtype=torch.float32).eval()
    return model, lambda: DMSCache(model, page_size=page_size)


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"  # generation continues the prompts' right ends
    if tok.pad_token_id is None or tok.eos_token_id is None:
        raise ValueError(f"the tokenizer in {path} needs a pad and an eos token")
    return tok


def _budget(dms_row: Row | None, prompt_tokens: int, ratio: float) -> int:
    if dms_row is not None:
        return max(2, round(dms_row.retained_per_head))
    return max(2, math.ceil(prompt_tokens / ratio))


def evaluate(base: str, dms_models: dict[float, str], config: EvalConfig, progress: bool = True) -> list[Row]:
    """Runs every method of ``config`` on every task; ``dms_models`` maps a compression ratio to
    the folder of the DMS model retrofitted for it. Returns one Row per (method, ratio, task)."""
    from transformers import DynamicCache

    import dms
    from tqdm.auto import tqdm

    if "dms" in config.methods and not dms_models:
        raise ValueError("method 'dms' needs at least one DMS model (ratio -> folder)")
    ratios = sorted(set(dms_models) | set(config.ratios))
    baselines = [m for m in config.methods if m in POLICIES]
    if baselines and not ratios:
        raise ValueError(f"baselines {baselines} need compression ratios: give DMS models or ratios")
    tokenizer = load_tokenizer(base)
    model = load_base(base)
    data = {t: task_samples(t, config.length, config.samples, config.seed) for t in config.tasks}
    prompt_tokens = {t: len(tokenizer(data[t][0].prompt).input_ids) for t in config.tasks}
    runs = ("vanilla" in config.methods) + sum(("dms" in config.methods and r in dms_models) + len(baselines)
                                               for r in ratios)
    bar = tqdm(total=runs * len(config.tasks) * config.samples, desc="dms eval", unit="sample", disable=not progress)
    found: dict[tuple, Row] = {}

    def record(method, ratio, task, res: dict, budget=None) -> None:
        found[method, ratio, task] = Row(method, ratio, task, samples=len(data[task]), budget=budget, **res)

    if "dms" in config.methods:  # first: the baselines' budgets follow what DMS retained
        for ratio in [r for r in ratios if r in dms_models]:
            dms_model = dms.from_pretrained(dms_models[ratio], dtype=torch.float32)
            for task in config.tasks:
                bar.set_postfix_str(f"dms@{ratio:g}x {task}")
                record("dms", ratio, task, run_task(dms_model, tokenizer, data[task],
                                                    lambda: DMSCache(dms_model, page_size=config.page_size),
                                                    config.batch_size, bar))
            del dms_model
    for task in config.tasks:  # the plain model's methods share each prompt forward
        makers, budgets = {}, {}
        if "vanilla" in config.methods:
            makers["vanilla", None] = lambda: DynamicCache(config=model.config)
        for ratio in ratios:
            b = _budget(found.get(("dms", ratio, task)), prompt_tokens[task], ratio)
            for policy in baselines:
                ps = max(1, min(config.page_size, b // 4)) if policy == "quest" else config.page_size
                makers[policy, ratio] = partial(PolicyCache, model, policy, b, page_size=ps, sinks=min(4, b - 1))
                budgets[policy, ratio] = b
        if makers:
            bar.set_postfix_str(f"vanilla and baselines {task}")
            for key, res in run_group(model, tokenizer, data[task], makers, config.batch_size, bar).items():
                record(*key, task, res, budget=budgets.get(key))
    methods = [("vanilla", None)] + [(m, r) for r in ratios for m in ("dms",) + POLICIES]
    rows = [found[m, r, t] for m, r in methods for t in config.tasks if (m, r, t) in found]
    bar.close()
    return rows
