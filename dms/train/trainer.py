"""DMS retrofit training loop (docs/design.md §1): distil a model into its own DMS version.

One process, or many under ``torchrun`` (gloo on CPU, NCCL on GPU), sharded with FSDP2 (the
default under torchrun; dms.train.fsdp) or replicated with DDP (``sharding="ddp"``). The teacher
is the same model with eviction off ("off" mode) when the base is frozen; a full fine-tune keeps
a frozen copy of the original model as teacher (sharded too under FSDP). In the borrowed-neuron variant the borrowed
q_proj rows start at zero (no eviction at step 0, like the zero-initialised adapter); with a
frozen base only those rows train (gradient masking) and the teacher runs with their original
values swapped in, so it stays exactly the plain model.

Loss per micro-batch: KL(student || teacher) averaged over real positions other than EOS (after
an EOS comes an unrelated packed document; of a prompt + completion document, only the positions
that predict the completion), + compression_weight * max(0, target - evicted
fraction), the fraction over every layer, KV head and decision that has a target token (with
compression_ema > 0, the term sees a running mean of past steps' fractions: loss.smoothed_fraction).
With calibrated_tolerance set (opt-in), the term is instead two-sided per sequence and counts the
window: loss.calibrated_compression_loss.

Eviction noise comes from torch's global RNG, seeded with ``seed + rank``: activation
checkpointing restores that RNG (not a private generator) when it recomputes a layer, so the
recomputed noise matches. Under FSDP the generator is instead seeded per micro-batch from
(seed, index of its first sample), so the trajectory does not depend on the number of processes.
Checkpoints (dms.train.checkpoint, written atomically) hold the model in the published format plus
``training_state.pt`` (optimizer, step, samples consumed, original neuron rows) and one
``rng_rank{r}.pt`` per process, or under FSDP the sharded state in DCP format, so a resumed run
continues exactly like an uninterrupted one (under FSDP, on any number of processes).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import glob
import json
import os
import shutil
import sys
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from dms.attention.training import decision_mask
from dms.train.checkpoint import (atomic_dir, export_consolidated, latest_checkpoint, load_sharded, model_shape,
                                  publish_files, save_sharded)
from dms.train.config import SUPPORTED_ARCHS, TrainConfig
from dms.train.fsdp import launched_by_torchrun, local_rows, resolve_sharding, shard_student, shard_teacher
from dms.train.data import SampleStream, one_per_row, pack, read_documents
from dms.train.loss import (calibrated_compression_loss, compression_loss, compression_ratio_at, evicted_fraction,
                            kl_student_teacher, mean_abs_logit, smoothed_fraction)

STATE_FILE = "training_state.pt"
LOG_FILE = "train_log.jsonl"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_base_model(model, dtype: str = "float32"):
    """(model, tokenizer or None) from a folder path, or an already built transformers model."""
    if isinstance(model, nn.Module):
        tokenizer = None
    else:
        if not os.path.isdir(str(model)):
            raise FileNotFoundError(f"model must be a model folder or a transformers model; {model!r} is not a folder")
        import transformers

        config = transformers.AutoConfig.from_pretrained(model)
        _check_arch(config)
        model_path = model
        model = transformers.AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype))
        # transformers builds an empty tokenizer for a folder without tokenizer files: look first.
        has_tokenizer = any(os.path.isfile(os.path.join(model_path, f)) for f in TOKENIZER_FILES)
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_path) if has_tokenizer else None
    _check_arch(model.config)
    return model, tokenizer


def _check_arch(config) -> None:
    arch = getattr(config, "model_type", None)
    if arch not in SUPPORTED_ARCHS:
        raise ValueError(f"unsupported architecture {arch!r}: DMS retrofit supports {', '.join(SUPPORTED_ARCHS)}")


class NeuronRows:
    """The borrowed q_proj rows of a frozen base: their original values (for the teacher)
    and the gradient mask that keeps every other row frozen."""

    def __init__(self, model, original_q: dict[int, tuple[torch.Tensor, torch.Tensor | None]], rows: dict):
        self.params: list[tuple[nn.Parameter, torch.Tensor, torch.Tensor]] = []  # (param, rows, original)
        for layer, idx in rows.items():
            q_proj = model.model.layers[layer].self_attn.q_proj
            weight, bias = original_q[layer]
            self.params.append((q_proj.weight, idx, weight[idx].clone()))
            if q_proj.bias is not None:
                self.params.append((q_proj.bias, idx, bias[idx].clone()))

    def _local(self):
        """(tensor, row indices in it, original rows) per parameter; under FSDP the process's
        own shard and the borrowed rows that fall in it."""
        for p, idx, orig in self.params:
            tensor, local_idx, mine = local_rows(p.detach(), idx)
            yield tensor, local_idx.to(tensor.device), orig[mine].to(tensor.device, tensor.dtype)

    @contextlib.contextmanager
    def original(self):
        """Swap the original rows in (no autograd trace) for the teacher's forward."""
        with torch.no_grad():
            local = list(self._local())
            trained = [t[idx].clone() for t, idx, _ in local]
            for t, idx, orig in local:
                t[idx] = orig
        try:
            yield
        finally:
            with torch.no_grad():
                for (t, idx, _), kept in zip(local, trained):
                    t[idx] = kept

    def mask_grads(self) -> None:
        for p, idx, _ in self.params:
            if p.grad is not None:
                grad, local_idx, _ = local_rows(p.grad, idx)
                keep = torch.zeros(grad.shape[0], dtype=torch.bool, device=grad.device)
                keep[local_idx.to(grad.device)] = True
                grad[~keep] = 0

    def state(self) -> list[torch.Tensor]:
        return [orig.cpu() for _, _, orig in self.params]

    def load_state(self, originals: list[torch.Tensor]) -> None:
        if len(originals) != len(self.params):
            raise ValueError(f"checkpoint holds {len(originals)} original neuron row sets, the model has {len(self.params)}")
        self.params = [(p, idx, o) for (p, idx, _), o in zip(self.params, originals)]


class _Student(nn.Module):
    """The differentiable part of a step, one module so DDP can wrap it (and the FSDP root)."""

    def __init__(self, model, kl_chunk_tokens: int):
        super().__init__()
        self.model = model
        self.kl_chunk_tokens = kl_chunk_tokens

    def hidden(self, ids, attention_mask, position_ids):
        return self.model.model(input_ids=ids, attention_mask=attention_mask, position_ids=position_ids,
                                use_cache=False).last_hidden_state

    def forward(self, ids, attention_mask, position_ids, real, kl_mask, teacher_h, teacher_head=None):
        """``teacher_head`` None: the student's own output head (a frozen base)."""
        from dms.models import last_decisions, last_logits

        h = self.hidden(ids, attention_mask, position_ids)
        head = self.model.lm_head
        kl = kl_student_teacher(h, teacher_h, head, head if teacher_head is None else teacher_head, kl_mask,
                                self.kl_chunk_tokens)
        valid = decision_mask(real, *real.shape)
        decisions = last_decisions(self.model)
        fraction = evicted_fraction(decisions, valid)
        row_fraction = evicted_fraction(decisions, valid, per_row=True)
        return kl, fraction, row_fraction, mean_abs_logit(last_logits(self.model), valid)


def _init_distributed(device: str | None, sharding: str = "auto"):
    """(rank, world, device, owns_process_group). torchrun sets WORLD_SIZE/RANK/LOCAL_RANK."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns = False
    if (world > 1 or (sharding == "fsdp" and launched_by_torchrun())) and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        owns = True
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), device, owns
    return 0, 1, device, owns


class Trainer:
    def __init__(self, model, cfg: TrainConfig, rank: int = 0, world: int = 1, device="cpu"):
        import dms
        from dms.models import borrowed_neuron_rows, dms_parameters, set_mode, set_noise_generator

        self.cfg, self.rank, self.world, self.device = cfg, rank, world, torch.device(device)
        self.sharding = resolve_sharding(cfg.sharding, world)
        self.grad_accum = cfg.grad_accum_for(world)
        base, self.tokenizer = load_base_model(model, cfg.dtype)
        max_pos = getattr(base.config, "max_position_embeddings", None)
        if max_pos is not None and cfg.seq_len > max_pos:
            raise ValueError(f"seq_len {cfg.seq_len} is longer than the model supports (max_position_embeddings = {max_pos})")
        eos = base.config.eos_token_id
        eos = eos[0] if isinstance(eos, (list, tuple)) else eos
        self.eos = eos
        pad = base.config.pad_token_id if base.config.pad_token_id is not None else (eos or 0)
        blocks = (pack if cfg.pack else one_per_row)(read_documents(cfg.data, self.tokenizer), cfg.seq_len, eos, pad)
        self.stream = SampleStream(*blocks, cfg.seed)

        frozen_base = cfg.train_mode == "adapter-only"
        self.teacher = None if frozen_base else copy.deepcopy(base).eval().requires_grad_(False).to(self.device)
        neuron_frozen = frozen_base and cfg.variant == "neuron"
        original_q = ({i: (layer.self_attn.q_proj.weight.detach().clone(),
                           None if layer.self_attn.q_proj.bias is None else layer.self_attn.q_proj.bias.detach().clone())
                       for i, layer in enumerate(base.model.layers)} if neuron_frozen else {})
        applied = dms.apply(base, **cfg.dms_kwargs())
        self.model = (base if applied is None else applied).to(self.device)
        self.model.config.use_cache = False
        self._set_mode = set_mode
        set_noise_generator(self.model, None)

        rows = borrowed_neuron_rows(self.model)
        _zero_rows(self.model, rows)
        _set_trainable(self.model, frozen_base, rows)
        if cfg.activation_checkpointing:
            _checkpoint_layers(self.model)
        self.model.train()
        set_mode(self.model, "train")
        self.student = _Student(self.model, cfg.kl_chunk_tokens)
        self.gather_teacher_head = None
        if self.sharding == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh(self.device.type, (world,))
            shard_student(self.student, mesh, self.device)
            if self.teacher is not None:
                self.gather_teacher_head = shard_teacher(self.teacher, mesh, self.device)
        elif self.sharding == "ddp":
            ids_ = [self.device.index] if self.device.type == "cuda" else None
            self.student = nn.parallel.DistributedDataParallel(self.student, device_ids=ids_)
        # After sharding: the neuron rows and the optimizer hold the (sharded) parameters.
        self.neuron = NeuronRows(self.model, original_q, rows) if neuron_frozen else None
        del original_q
        self.optimizer = torch.optim.AdamW(self._groups(dms_parameters(self.model), frozen_base), lr=cfg.lr)
        self.step, self.samples = 0, 0
        self.running_fraction: float | None = None  # mean over ranks and micro-batches, so equal on every rank
        torch.manual_seed(cfg.seed + rank)
        resume = cfg.resume_from
        if resume == "latest":
            resume = latest_checkpoint(cfg.output_dir)
            if resume is None and rank == 0:
                print(f"dms retrofit: no checkpoint in {cfg.output_dir!r} yet, starting at step 0", file=sys.stderr)
        if resume:
            self._resume(resume)

    def _groups(self, dms_params, frozen_base: bool) -> list[dict]:
        cfg = self.cfg
        if not frozen_base:
            return [{"params": [p for p in self.model.parameters()], "weight_decay": cfg.weight_decay}]
        adapters = [p for _, p in dms_params]
        groups = [{"params": adapters, "weight_decay": cfg.weight_decay}] if adapters else []
        if self.neuron is not None:
            # AdamW's decay would shrink every row of q_proj, not only the borrowed ones.
            rows = list({id(p): p for p, _, _ in self.neuron.params}.values())
            groups.append({"params": rows, "weight_decay": 0.0})
        return groups

    # -- one step -----------------------------------------------------------------------
    def teacher_hidden(self, ids, attention_mask, position_ids):
        with torch.no_grad():
            if self.teacher is not None:
                return self.teacher.model(input_ids=ids, attention_mask=attention_mask, position_ids=position_ids,
                                          use_cache=False).last_hidden_state
            self._set_mode(self.model, "off")
            core = self.student.module if isinstance(self.student, nn.parallel.DistributedDataParallel) else self.student
            try:
                with self.neuron.original() if self.neuron is not None else contextlib.nullcontext():
                    return core.hidden(ids, attention_mask, position_ids)
            finally:
                self._set_mode(self.model, "train")

    def train_step(self) -> dict:
        cfg, t0 = self.cfg, time.perf_counter()
        cr = compression_ratio_at(self.step, cfg.target_cr, cfg.ramp)
        target_frac = 1.0 - 1.0 / cr
        lr = cfg.lr_at(self.step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        if self.gather_teacher_head is not None:
            teacher_head = self.gather_teacher_head()
        else:
            teacher_head = None if self.teacher is None else self.teacher.lm_head
        sums = torch.zeros(5, dtype=torch.float64)  # kl, compression term, evicted fraction, mean |logit|, tokens
        accum = self.grad_accum
        per_step = cfg.batch_size * accum * self.world
        for m in range(accum):
            first = self.samples + (m * self.world + self.rank) * cfg.batch_size
            if self.sharding == "fsdp":
                # The noise follows the sample, not the process: any world size, same trajectory.
                torch.manual_seed(noise_seed(cfg.seed, first))
            ids, real, distilled = (t.to(self.device) for t in self.stream.batch(range(first, first + cfg.batch_size)))
            padded = not bool(real.all())
            attention_mask = real.long() if padded else None
            position_ids = (real.long().cumsum(-1) - 1).clamp(min=0)
            teacher_h = self.teacher_hidden(ids, attention_mask, position_ids)
            # What follows an EOS is the start of an unrelated packed document: not distilled.
            kl_mask = real & distilled if self.eos is None else real & distilled & (ids != self.eos)
            sync = m == accum - 1 or self.sharding != "ddp"
            with contextlib.nullcontext() if sync else self.student.no_sync():
                kl, fraction, row_fraction, abs_logit = self.student(ids, attention_mask, position_ids, real, kl_mask,
                                                                     teacher_h, teacher_head)
                if cfg.calibrated_tolerance is None:
                    comp = compression_loss(smoothed_fraction(fraction, self.running_fraction, cfg.compression_ema),
                                            target_frac)
                else:
                    comp = calibrated_compression_loss(row_fraction, real.sum(-1), cr, cfg.window,
                                                       cfg.calibrated_tolerance, cfg.calibrated_cap)
                ((kl + cfg.compression_weight * comp) / accum).backward()
            sums += torch.tensor([kl.item(), comp.item(), fraction.item(), abs_logit.item(), float(real.sum())],
                                 dtype=torch.float64)
        if self.neuron is not None:
            self.neuron.mask_grads()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]], cfg.grad_clip)
        self.optimizer.step()
        self.step += 1
        self.samples += per_step
        if self.world > 1:
            dist.all_reduce(sums)
        n = accum * self.world
        kl, comp, frac, abs_logit = (sums[:4] / n).tolist()
        beta = cfg.compression_ema
        self.running_fraction = frac if self.running_fraction is None else beta * self.running_fraction + (1 - beta) * frac
        seconds = time.perf_counter() - t0
        return {"step": self.step, "loss": kl + cfg.compression_weight * comp, "kl": kl, "compression_loss": comp,
                "evicted_fraction": frac, "achieved_cr": 1.0 / max(1.0 - frac, 1e-9), "mean_abs_logit": abs_logit,
                "target_cr": cr, "lr": lr, "tokens": int(sums[4]), "tokens_per_s": sums[4].item() / seconds,
                "seconds": seconds}

    # -- checkpoints ---------------------------------------------------------------------
    def _training_state(self, fmt: str) -> dict:
        state = {"format": fmt, "step": self.step, "samples": self.samples, "world_size": self.world,
                 "samples_per_step": self.cfg.batch_size * self.grad_accum * self.world,
                 "running_fraction": self.running_fraction, "config": self.cfg.to_dict(),
                 "model": model_shape(self.model.config),
                 "neuron_rows": None if self.neuron is None else self.neuron.state()}
        if fmt == "published":
            state["optimizer"] = self.optimizer.state_dict()
        return state

    def _write(self, directory: str) -> None:
        """Into an empty directory: the sharded state (FSDP), or the published format +
        training state + RNG per rank."""
        if self.sharding == "fsdp":
            save_sharded(directory, self.student, self.optimizer)
            if self.rank == 0:
                torch.save(self._training_state("dcp"), os.path.join(directory, STATE_FILE))
            return
        if self.rank == 0:
            self.model.save_pretrained(directory)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(directory)
            torch.save(self._training_state("published"), os.path.join(directory, STATE_FILE))
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        torch.save(rng, os.path.join(directory, f"rng_rank{self.rank}.pt"))

    def save(self, directory: str) -> None:
        """A resumable checkpoint, complete or absent (written aside, then renamed)."""
        with atomic_dir(directory, self.rank, self.world) as tmp:
            self._write(tmp)

    def save_final(self) -> None:
        """The trained model in the published format into output_dir (one consolidated copy
        under FSDP), its files moved in once all are written."""
        tmp = os.path.join(self.cfg.output_dir, ".tmp-final")
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        if self.world > 1:
            dist.barrier()
        if self.sharding == "fsdp":
            export_consolidated(tmp, self.student, self.model, self.tokenizer, self.rank)
        else:
            self._write(tmp)
        if self.world > 1:
            dist.barrier()
        if self.rank == 0:
            publish_files(tmp, self.cfg.output_dir)
        if self.world > 1:
            dist.barrier()

    def _resume(self, directory: str) -> None:
        path = os.path.join(directory, STATE_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"resume_from {directory!r} has no {STATE_FILE} (not a checkpoint of this trainer; "
                                    "an FSDP run's output folder holds only the model: use its checkpoint-<step>)")
        state = torch.load(path, map_location="cpu", weights_only=True)
        fmt = state.get("format", "published")
        sharded = self.sharding == "fsdp"
        if (fmt == "dcp") != sharded:
            raise ValueError(f"resume_from {directory!r} was written {'with' if fmt == 'dcp' else 'without'} "
                             f"FSDP sharding; resume it {'with --fsdp under torchrun' if fmt == 'dcp' else 'without --fsdp'}")
        if "model" in state and state["model"] != model_shape(self.model.config):
            diff = {k: (v, model_shape(self.model.config)[k]) for k, v in state["model"].items()
                    if v != model_shape(self.model.config)[k]}
            raise ValueError(f"resume_from {directory!r} belongs to a different model: (checkpoint, this model) {diff}")
        if not sharded and state["world_size"] != self.world:
            raise ValueError(f"resume_from {directory!r} was written by {state['world_size']} processes, "
                             f"this run has {self.world}: an identical continuation needs the same number "
                             "(FSDP checkpoints resume on any number)")
        per_step = self.cfg.batch_size * self.grad_accum * self.world
        if sharded and state["samples_per_step"] != per_step:
            raise ValueError(f"resume_from {directory!r} took {state['samples_per_step']} sequences per step, this run "
                             f"takes {per_step}: pass --global-batch-size {state['samples_per_step']}")
        for key in ("train_mode", "variant", "window", "seed"):
            if state["config"][key] != getattr(self.cfg, key):
                raise ValueError(f"resume_from {directory!r} was trained with {key}={state['config'][key]!r}, "
                                 f"this run has {key}={getattr(self.cfg, key)!r}")
        if sharded:
            load_sharded(directory, self.student, self.optimizer)
        else:
            self._load_published(directory, state)
        if self.neuron is not None:
            self.neuron.load_state(state["neuron_rows"])
        self.step, self.samples = state["step"], state["samples"]
        self.running_fraction = state.get("running_fraction")  # absent in checkpoints of older versions

    def _load_published(self, directory: str, state: dict) -> None:
        from safetensors.torch import load_file

        weights = {}
        for f in sorted(glob.glob(os.path.join(directory, "*.safetensors"))):
            weights.update(load_file(f, device=str(self.device)))
        missing, unexpected = self.model.load_state_dict(weights, strict=False)
        loaded = {p.data_ptr() for n, p in self.model.state_dict().items() if n in weights}
        untied = [n for n in missing if self.model.state_dict()[n].data_ptr() not in loaded]
        if unexpected or untied:
            raise ValueError(f"checkpoint {directory!r} does not match the model: missing {untied}, unexpected {unexpected}")
        self.optimizer.load_state_dict(state["optimizer"])
        rng_path = os.path.join(directory, f"rng_rank{self.rank}.pt")
        if not os.path.isfile(rng_path):
            raise FileNotFoundError(f"resume_from {directory!r} lacks rng_rank{self.rank}.pt (incomplete checkpoint)")
        rng = torch.load(rng_path, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)

    # -- loop ----------------------------------------------------------------------------
    def train(self):
        from tqdm.auto import tqdm

        cfg = self.cfg
        log_path = os.path.join(cfg.output_dir, LOG_FILE)
        if self.rank == 0:
            os.makedirs(cfg.output_dir, exist_ok=True)
            _truncate_log(log_path, self.step)
        bar = tqdm(total=cfg.steps, initial=self.step, disable=self.rank != 0 or not cfg.progress,
                   desc="dms retrofit", unit="step", dynamic_ncols=True)
        while self.step < cfg.steps:
            record = self.train_step()
            if self.rank == 0:
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", kl=f"{record['kl']:.4f}",
                                cr=f"{record['achieved_cr']:.2f}/{record['target_cr']:.2f}",
                                logit=f"{record['mean_abs_logit']:.1f}")
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    with open(log_path, "a") as f:
                        f.write(json.dumps(record) + "\n")
            # The final model under FSDP is not resumable: its last step gets a checkpoint too.
            last = self.step == cfg.steps and self.sharding != "fsdp"
            if cfg.save_every and (self.step % cfg.save_every == 0 or self.step == cfg.steps) and not last:
                self.save(os.path.join(cfg.output_dir, f"checkpoint-{self.step:06d}"))
        bar.close()
        if self.sharding == "ddp":
            self._check_ranks_agree()
        self.save_final()
        self.model.eval()
        self._set_mode(self.model, "infer")
        return self.model

    def _check_ranks_agree(self) -> None:
        """DDP keeps replicas identical; verify it before the (rank 0) save."""
        if self.world == 1:
            return
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        digest = torch.stack([torch.stack([p.detach().double().sum(), p.detach().double().square().sum()])
                              for p in params]).flatten().cpu()
        gathered = [torch.empty_like(digest) for _ in range(self.world)]
        dist.all_gather(gathered, digest)
        if not all(torch.equal(g, gathered[0]) for g in gathered):
            raise RuntimeError("trained parameters differ between ranks after training")


def _checkpoint_layers(model) -> None:
    """Recompute each decoder layer in backward. Not transformers' gradient checkpointing: it
    recomputes ``forward`` without the layer's forward pre-hooks, and the adapter variant's
    hook hands the attention its residual input. Non-reentrant: the decisions leave each layer as
    a side output and need its graph. Inside FSDP's hooks, which unshard the layer first."""
    from dms.models.patch import _keep_residual

    for layer in model.model.layers:
        adapter = hasattr(layer.self_attn, "dms_proj_alpha")

        def run(*args, _forward=layer.forward, _layer=layer, _adapter=adapter, **kwargs):
            if _adapter:
                _keep_residual(_layer, args, kwargs)
            return _forward(*args, **kwargs)

        layer.forward = functools.partial(checkpoint, run, use_reentrant=False)


def noise_seed(seed: int, sample: int) -> int:
    """Seed of the eviction noise of the micro-batch that starts at stream position ``sample``."""
    return (seed * 1_000_003 + sample + 0x5DEECE66D) % (1 << 63)


def _set_trainable(model, frozen_base: bool, rows: dict) -> None:
    """requires_grad: everything (full fine-tune), or only the adapters / borrowed q_proj rows'
    parameters (whose other rows get their gradient masked)."""
    from dms.models import dms_parameters

    model.requires_grad_(not frozen_base)
    if not frozen_base:
        return
    trainable = [p for _, p in dms_parameters(model)]
    for layer in rows:
        q_proj = model.model.layers[layer].self_attn.q_proj
        trainable += [q_proj.weight] + ([q_proj.bias] if q_proj.bias is not None else [])
    if not trainable:
        raise ValueError("train_mode 'adapter-only' left nothing to train "
                         "(dms.models reported no DMS parameters nor borrowed rows)")
    for p in trainable:
        p.requires_grad_(True)


def _zero_rows(model, rows: dict) -> None:
    """Start the borrowed neurons at 0, i.e. logit = -alpha_offset: like the zero-initialised
    adapter, the student begins evicting (almost) nothing, next to its teacher. Without this a
    pretrained query dimension of O(1) times alpha_scale = 100 would evict about half of the
    tokens from step 0, and the one-sided compression loss never pushes that back down."""
    with torch.no_grad():
        for layer, idx in rows.items():
            q_proj = model.model.layers[layer].self_attn.q_proj
            q_proj.weight[idx.to(q_proj.weight.device)] = 0
            if q_proj.bias is not None:
                q_proj.bias[idx.to(q_proj.bias.device)] = 0


def _truncate_log(path: str, step: int) -> None:
    """On resume, drop records past the checkpoint (an interrupted run may have logged them)."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        keep = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(path, "w") as f:
        f.writelines(keep)


def retrofit(model, config: TrainConfig | None = None, **options):
    """Train ``model`` (a model folder or a transformers Llama/Qwen2/Qwen3/Mistral model) into
    a DMS model; options are ``TrainConfig`` fields. A model object is converted in place. Returns
    the trained model (eval and "infer" mode) and writes it, with checkpoints and
    ``train_log.jsonl``, to ``output_dir``. Under torchrun every process calls this; under FSDP
    the returned model is still sharded (its forward is collective): load ``output_dir`` with
    ``dms.from_pretrained`` for a plain copy."""
    if config is not None and options:
        raise TypeError("give either config or keyword options, not both")
    cfg = config or TrainConfig(**options)
    rank, world, device, owns = _init_distributed(cfg.device, cfg.sharding)
    try:
        return Trainer(model, cfg, rank, world, device).train()
    finally:
        if owns:
            dist.destroy_process_group()
