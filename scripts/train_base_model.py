"""Trains the project's small base model from scratch on CPU on a mixture of the dms.tasks.

Resumable: every --ckpt-minutes the model, optimizer, step and RNG states go to OUT/ckpt.pt
(written atomically); rerunning the same command continues from it. The data of a step is a
pure function of (--seed, step), so a resumed run sees exactly the batches it would have seen.

Outputs in OUT: log.jsonl (train and eval records), progress.txt (latest progress line),
model/ (latest evaluated model: save_pretrained safetensors + tokenizer), final/ at the end.

Periodic evaluation is teacher-forced exact match: the fraction of samples whose every target
token is the argmax, which is exactly when greedy decoding reproduces the target. Tasks trained
with --shuffle-answers have no single gold order, so they are scored on greedy generation with
dms.tasks.score instead, as --final-eval scores every task.

    python scripts/train_base_model.py --out /work/runs/base
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import time
from pathlib import Path

import torch

from dms.tasks import AUXILIARY, CWE_UNCOMMON, TASKS, Sample, generate, min_length, score
from dms.tasks.tokenizer import BOS, EOS, PAD, build_tokenizer, save_tokenizer

DEFAULT_MIX = "niah_single=1,niah_multikey=1,niah_multivalue=1,niah_multiquery=1,vt=1,cwe=1,arith_trace=1"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="run folder (checkpoint, logs, saved models)")
    p.add_argument("--arch", choices=("qwen3", "llama"), default="qwen3")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=512)
    p.add_argument("--head-dim", type=int, default=None, help="per-head width (default: hidden / heads)")
    p.add_argument("--init-from", default=None,
                   help="start from this saved model's weights (e.g. scripts/widen_model.py's output) instead of "
                        "a random init; the architecture flags must describe it")
    p.add_argument("--mix", default=DEFAULT_MIX, help="task=weight,... (tasks of dms.tasks.TASKS)")
    p.add_argument("--copy-warmup-steps", type=int, default=0,
                   help="train on copy_list alone for the first N steps: it grows the induction heads fast")
    p.add_argument("--shuffle-answers", default="",
                   help="comma-separated tasks whose answers are trained in a random order (see shuffled)")
    p.add_argument("--cwe-uncommon", choices=CWE_UNCOMMON, default="even",
                   help="training draw of cwe's uncommon words (dms.tasks.cwe); 'random' reproduces "
                        "the shipped base's early phases")
    p.add_argument("--cwe-ratio", type=int, default=8,
                   help="how many times as often a common cwe word occurs as an uncommon one in training data "
                        "(evaluation keeps the task's 8); a larger ratio is an easier start")
    p.add_argument("--arith-terms", default="4",
                   help="terms of arith_trace's training samples: N, or LO-HI drawn uniformly per sample (a range "
                        "of difficulty; the periodic eval then reports arith_trace/N@length per terms value)")
    p.add_argument("--min-len", type=int, default=64, help="shortest prompt length sampled (tokens)")
    p.add_argument("--task-min-len", default="",
                   help="task=tokens,...: a task's samples are at least this long (raised from the batch length)")
    p.add_argument("--start-len", type=int, default=128, help="longest prompt length at step 0")
    p.add_argument("--max-len", type=int, default=512, help="longest prompt length after the curriculum")
    p.add_argument("--curriculum-steps", type=int, default=20000, help="steps over which the longest length grows")
    p.add_argument("--batch-tokens", type=int, default=4096, help="prompt tokens per batch (rows = this / length)")
    p.add_argument("--prompt-weight", type=float, default=0.1, help="loss weight of prompt tokens (target tokens: 1)")
    p.add_argument("--task-prompt-weight", default="",
                   help="task=weight,...: a prompt-token loss weight for these tasks instead of --prompt-weight "
                        "(a cwe list is predictable from the word counts so far: weighting it trains counting)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--steps", type=int, default=100000)
    p.add_argument("--stop-step", type=int, default=None,
                   help="end this invocation at this step (checkpointed) without changing the lr schedule")
    p.add_argument("--decay-frac", type=float, default=0.1, help="final fraction of steps with linear lr decay to 0")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ckpt-minutes", type=float, default=5.0)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--eval-samples", type=int, default=32, help="samples per task and length at each eval")
    p.add_argument("--eval-lengths", default="128,256,512")
    p.add_argument("--final-eval", action="store_true", help="after training, greedy-generate and score")
    return p.parse_args(argv)


def parse_task_values(text: str, flag: str, default: float | None) -> dict[str, float]:
    """"task=value,..." -> {task: value}; a bare task name takes ``default`` (None: refused)."""
    out = {}
    for part in filter(None, text.split(",")):
        name, _, v = part.partition("=")
        if name not in TASKS and name not in AUXILIARY:
            raise SystemExit(f"{flag}: unknown task {name!r}; expected names from {sorted(TASKS) + sorted(AUXILIARY)}")
        if not v and default is None:
            raise SystemExit(f"{flag}: {name} needs a value ({name}=N)")
        out[name] = float(v or default)
    return out


def parse_mix(text: str) -> dict[str, float]:
    mix = parse_task_values(text, "--mix", 1.0)
    if not mix:
        raise SystemExit("--mix: no task given")
    return mix


def parse_terms(text: str) -> tuple[int, int]:
    """"N" or "LO-HI" -> (lo, hi), for --arith-terms."""
    lo, dash, hi = text.partition("-")
    try:
        lo, hi = int(lo), int(hi if dash else lo)
    except ValueError:
        raise SystemExit(f"--arith-terms: expected N or LO-HI (integers), got {text!r}") from None
    if not 2 <= lo <= hi:
        raise SystemExit(f"--arith-terms: need 2 <= LO <= HI, got {text!r}")
    return lo, hi


def shuffled(sample: Sample, rng: random.Random) -> Sample:
    """The sample with its answers in a random order. For a set-valued answer the score ignores
    order, and a fixed order the model cannot compute (cwe lists the common words by first
    appearance) only trains it to guess which one comes first instead of which ones are common."""
    if sample.target != " , ".join(sample.answers):
        raise ValueError(f"{sample.task}: the target is not the list of answers; cannot shuffle it")
    return dataclasses.replace(sample, target=" , ".join(rng.sample(sample.answers, len(sample.answers))))


def build_model(args, vocab_size: int, ids: dict[str, int]):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    cls_cfg, cls_model = (Qwen3Config, Qwen3ForCausalLM) if args.arch == "qwen3" else (LlamaConfig, LlamaForCausalLM)
    cfg = cls_cfg(vocab_size=vocab_size, hidden_size=args.hidden, intermediate_size=args.intermediate,
                  num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                  head_dim=args.head_dim or args.hidden // args.heads, max_position_embeddings=2 * args.max_len + 256,
                  rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=ids[BOS], eos_token_id=ids[EOS],
                  pad_token_id=ids[PAD])
    return cls_model(cfg)


class Data:
    """Batches as a pure function of (seed, step)."""

    def __init__(self, args, tok):
        self.args, self.tok = args, tok
        self.mix = parse_mix(args.mix)
        self.shuffle = {t for t in args.shuffle_answers.split(",") if t}
        if not self.shuffle <= set(TASKS):
            raise ValueError(f"--shuffle-answers: unknown tasks {sorted(self.shuffle - set(TASKS))}")
        self.options = {"cwe": {"uncommon": args.cwe_uncommon, "ratio": args.cwe_ratio}}
        self.terms = parse_terms(args.arith_terms)
        if self.terms != (4, 4):  # 4 is arith_trace's default: left implicit, today's samples stay as they were
            self.options["arith_trace"] = {"terms": self.terms[1]}  # the most terms need the longest prompt
        self.min_lens = {t: min_length(t, **self.options.get(t, {})) for t in {*self.mix, "copy_list"}}
        for t, n in parse_task_values(args.task_min_len, "--task-min-len", None).items():
            self.min_lens[t] = max(self.min_lens.get(t, 0), int(n))
        self.prompt_weights = parse_task_values(args.task_prompt_weight, "--task-prompt-weight", None)
        self.bos, self.eos, self.pad = (tok.token_to_id(x) for x in (BOS, EOS, PAD))

    def longest(self, step: int) -> int:
        a = self.args
        frac = min(1.0, step / max(1, a.curriculum_steps))
        return int(a.start_len + frac * (a.max_len - a.start_len))

    def encode(self, samples):
        """ids [B, T]; loss weights [B, T] and target mask [B, T] (the completion and EOS)."""
        prompts = self.tok.encode_batch([s.prompt for s in samples], add_special_tokens=False)
        targets = self.tok.encode_batch([s.target for s in samples], add_special_tokens=False)
        rows = [([self.bos] + p.ids, t.ids + [self.eos]) for p, t in zip(prompts, targets)]
        width = max(len(p) + len(t) for p, t in rows)
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        weights = torch.zeros(len(rows), width)
        target = torch.zeros(len(rows), width, dtype=torch.bool)
        for i, (sample, (p, t)) in enumerate(zip(samples, rows)):
            ids[i, :len(p) + len(t)] = torch.tensor(p + t)
            weights[i, 1:len(p)] = self.prompt_weights.get(sample.task, self.args.prompt_weight)
            weights[i, len(p):len(p) + len(t)] = 1.0
            target[i, len(p):len(p) + len(t)] = True
        return ids, weights, target

    def batch(self, step: int):
        rng = random.Random(f"{self.args.seed}:{step}")
        length = rng.randint(self.args.min_len, max(self.args.min_len, self.longest(step)))
        rows = max(1, self.args.batch_tokens // length)
        mix = {"copy_list": 1.0} if step < self.args.copy_warmup_steps else self.mix
        names, weights = zip(*mix.items())
        samples = []
        for _ in range(rows):
            task = rng.choices(names, weights)[0]
            options = self.options.get(task, {})
            if task == "arith_trace" and self.terms[0] < self.terms[1]:  # a fixed count draws nothing
                options = {"terms": rng.randint(*self.terms)}
            sample = generate(task, max(length, self.min_lens[task]), rng.randrange(2 ** 31), **options)
            samples.append(shuffled(sample, rng) if task in self.shuffle else sample)
        return self.encode(samples)


def weighted_loss(model, ids, weights, target):
    """Weighted mean cross-entropy, and the mean over target tokens alone (for the log)."""
    logits = model(input_ids=ids).logits[:, :-1].float()
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    w, t = weights[:, 1:], target[:, 1:]
    return (ce * w).sum() / w.sum(), ce[t].mean().item()


def lr_at(args, step: int) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    decay_start = int(args.steps * (1 - args.decay_frac))
    if step >= decay_start:
        return args.lr * max(0.0, (args.steps - step) / max(1, args.steps - decay_start))
    return args.lr


EVAL_SEED = 10 ** 9  # evaluation samples use seeds the training stream practically never draws


@torch.no_grad()
def greedy_score(model, data: Data, samples: list[Sample]) -> float:
    """Mean dms.tasks.score of greedy generations; the prompts have equal lengths (no padding)."""
    prompts = data.tok.encode_batch([s.prompt for s in samples], add_special_tokens=False)
    ids = torch.tensor([[data.bos] + p.ids for p in prompts])
    new = max(len(t.ids) for t in data.tok.encode_batch([s.target for s in samples], add_special_tokens=False)) + 4
    gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                         eos_token_id=data.eos, pad_token_id=data.pad)
    rows = [r[:r.index(data.eos)] if data.eos in r else r for r in gen[:, ids.shape[1]:].tolist()]
    texts = data.tok.decode_batch(rows)  # the raw tokenizer keeps <eos> / <pad> in text: cut them first
    return round(sum(score(s.task, t, s) for t, s in zip(texts, samples)) / len(samples), 3)


def eval_samples(task: str, length: int, args, **options) -> list[Sample]:
    return [generate(task, length, EVAL_SEED + i, **options) for i in range(args.eval_samples)]


def eval_sets(data: Data, length: int):
    """(name, task, options) of each evaluated sample set at this length: a task of the mix with
    the task's own options (cwe's training ratio is not evaluated), and with --arith-terms other
    than 4, arith_trace once per terms value as arith_trace/N."""
    for task in data.mix:
        if task == "arith_trace" and data.terms != (4, 4):
            for n in range(data.terms[0], data.terms[1] + 1):
                if length >= min_length(task, terms=n):
                    yield f"{task}/{n}", task, {"terms": n}
        elif length >= data.min_lens[task]:
            yield task, task, {}


@torch.no_grad()
def evaluate(model, data: Data, args) -> dict[str, float]:
    """Teacher-forced exact match per task@length (== greedy decoding reproduces the target),
    and per-token accuracy on the target (task@length:tok), which moves before exact match.
    Tasks in --shuffle-answers get the greedy generation score alone."""
    model.eval()
    out = {}
    for length in (int(x) for x in args.eval_lengths.split(",")):
        for name, task, options in eval_sets(data, length):
            samples = eval_samples(task, length, args, **options)
            if task in data.shuffle:
                out[f"{name}@{length}"] = greedy_score(model, data, samples)
                continue
            ids, _, target = data.encode(samples)
            pred = model(input_ids=ids).logits[:, :-1].argmax(-1)
            hit, t = pred == ids[:, 1:], target[:, 1:]
            out[f"{name}@{length}"] = round((hit | ~t).all(dim=1).float().mean().item(), 3)
            out[f"{name}@{length}:tok"] = round(hit[t].float().mean().item(), 3)
    model.train()
    return out


@torch.no_grad()
def generation_eval(model, data: Data, args) -> dict[str, float]:
    """Greedy generation scored with dms.tasks.score, per task@length."""
    model.eval()
    out = {f"{name}@{length}": greedy_score(model, data, eval_samples(task, length, args, **options))
           for length in (int(x) for x in args.eval_lengths.split(","))
           for name, task, options in eval_sets(data, length)}
    model.train()
    return out


def save_model(model, folder: Path) -> None:
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(str(tmp), safe_serialization=True)
    save_tokenizer(tmp)
    if folder.exists():
        for f in folder.iterdir():
            f.unlink()
        folder.rmdir()
    tmp.rename(folder)


def save_ckpt(path: Path, model, opt, step: int, args) -> None:
    state = {"model": model.state_dict(), "opt": opt.state_dict(), "step": step, "args": vars(args),
             "torch_rng": torch.get_rng_state(), "py_rng": random.getstate()}
    torch.save(state, str(path) + ".tmp")
    os.replace(str(path) + ".tmp", path)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    data = Data(args, tok)
    model = build_model(args, tok.get_vocab_size(), tok.get_vocab())
    if args.init_from:
        from transformers import AutoModelForCausalLM

        model.load_state_dict(AutoModelForCausalLM.from_pretrained(args.init_from, dtype=torch.float32).state_dict())
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    step = 0
    ckpt = out / "ckpt.pt"
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step = state["step"]
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["py_rng"])
        print(f"resumed from {ckpt} at step {step}", flush=True)
    n_params = sum(p.numel() for p in model.parameters())
    log = open(out / "log.jsonl", "a")
    log.write(json.dumps({"event": "start", "step": step, "params": n_params, "args": vars(args)}) + "\n")
    model.train()
    t_last_ckpt = t_log = time.time()
    tokens = 0
    stop = min(args.steps, args.stop_step or args.steps)
    while step < stop:
        lr = lr_at(args, step)
        for g in opt.param_groups:
            g["lr"] = lr
        ids, weights, target = data.batch(step)
        loss, target_loss = weighted_loss(model, ids, weights, target)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        tokens += ids.numel()
        if step % args.log_every == 0:
            dt = time.time() - t_log
            rec = {"step": step, "loss": round(loss.item(), 4), "target_loss": round(target_loss, 4),
                   "lr": lr, "gnorm": round(gnorm, 3), "longest": data.longest(step), "tok_s": round(tokens / dt),
                   "time": round(time.time())}
            log.write(json.dumps(rec) + "\n")
            log.flush()
            line = (f"step {step}/{args.steps} loss {rec['loss']:.3f} target {rec['target_loss']:.3f} "
                    f"lr {lr:.2e} len<={rec['longest']} {rec['tok_s']} tok/s")
            print(line, flush=True)
            (out / "progress.txt").write_text(line + "\n")
            t_log, tokens = time.time(), 0
        if step % args.eval_every == 0 or step == args.steps:
            acc = evaluate(model, data, args)
            log.write(json.dumps({"step": step, "eval": acc, "time": round(time.time())}) + "\n")
            log.flush()
            print(f"eval step {step}: " + " ".join(f"{k} {v:.2f}" for k, v in acc.items() if ":" not in k)
                  + " | token acc " + " ".join(f"{v:.2f}" for k, v in acc.items() if ":" in k), flush=True)
            save_model(model, out / "model")
            t_log = time.time()
        if time.time() - t_last_ckpt > 60 * args.ckpt_minutes or step == stop:
            save_ckpt(ckpt, model, opt, step, args)
            t_last_ckpt = time.time()
    if step < args.steps:
        log.close()
        return
    save_model(model, out / "final")
    if args.final_eval:
        acc = generation_eval(model, data, args)
        log.write(json.dumps({"step": step, "generation_eval": acc}) + "\n")
        print("generation eval: " + json.dumps(acc), flush=True)
    log.close()


if __name__ == "__main__":
    main()
