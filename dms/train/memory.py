"""Memory model of a retrofit: bytes per process from the model config alone (``dms retrofit
--plan``), and the measurement that checks it (``python -m dms.train.memory``; docs/memory.md).

Terms, per process, for world size W (S = W under FSDP, else 1):
  weights     student parameters / S, in the loaded dtype
  grads       the gradients alive at the peak: every trainable one / S (DDP: a second copy in its
              buckets) from the second micro-batch of a step on; with one micro-batch per step
              only the output head's (they are set to None between steps, and a layer's are born
              in backward as its activations die)
  optimizer   AdamW's two moments of the trainable parameters / S (same dtype as the parameters)
  teacher     full fine-tune only: the frozen copy / S (adapter-only: the student's own weights)
  gathered    FSDP only: full weights of the root (embeddings, head) and of two layers (the one
              running and the one prefetched), their gradients before the reduce-scatter, and the
              teacher's head gathered for the KL
  activations the larger of the student phase (what autograd keeps for backward, per micro-batch
              of batch_size x seq_len tokens, plus the larger of the attention's and the KL's
              working sets) and the teacher phase (one layer's forward without autograd)
The activation count per token and layer comes from counting, once per storage, the tensors
autograd saves in one decoder layer (``saved_per_token``, counted with
torch.autograd.graph.saved_tensors_hooks on tiny Llama and Qwen3 models, 2026-12-01; see
docs/memory.md); with activation checkpointing a layer keeps only its input, and one layer at a
time is recomputed. Not modelled: the runtime's code and buffers, and the allocator's slack.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
CPU_ATTENTION_CHUNK = 1 << 24  # dms.attention.training.DEFAULT_CHUNK_ELEMENTS
GiB = 1 << 30


@dataclass
class Shape:
    arch: str
    vocab: int
    hidden: int
    inter: int
    layers: int
    q_heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    qkv_bias: bool
    qk_norm: bool

    @classmethod
    def from_config(cls, c) -> "Shape":
        get = c.get if isinstance(c, dict) else lambda k, d=None: getattr(c, k, d)
        heads = get("num_attention_heads")
        head_dim = get("head_dim") or get("hidden_size") // heads
        arch = get("model_type")
        return cls(arch=arch, vocab=get("vocab_size"), hidden=get("hidden_size"), inter=get("intermediate_size"),
                   layers=get("num_hidden_layers"), q_heads=heads, kv_heads=get("num_key_value_heads") or heads,
                   head_dim=head_dim, tied=bool(get("tie_word_embeddings", False)),
                   qkv_bias=arch == "qwen2" or bool(get("attention_bias", False)), qk_norm=arch == "qwen3")

    @property
    def q(self) -> int:
        return self.q_heads * self.head_dim

    @property
    def kv(self) -> int:
        return self.kv_heads * self.head_dim

    def layer_params(self, adapter: bool) -> int:
        H = self.hidden
        attn = H * self.q + 2 * H * self.kv + self.q * H
        if self.qkv_bias:
            attn += self.q + 2 * self.kv
        if self.qk_norm:
            attn += 2 * self.head_dim
        extra = (H + H * self.kv_heads + self.kv_heads) if adapter else 0
        return attn + 3 * H * self.inter + 2 * H + extra

    def root_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    def params(self, adapter: bool) -> int:
        return self.layers * self.layer_params(adapter) + self.root_params()

    def saved_per_token(self, adapter: bool, frozen: bool) -> float:
        """Elements autograd keeps per token for one DMS decoder layer in train mode, each
        storage once (counted). ``frozen``: adapter-only, whose frozen linear layers keep no
        input for a weight gradient."""
        H, q, kv = self.hidden, self.q, self.kv
        if frozen:
            per = 4.5 * H + 3.4 * self.inter + 1.25 * q + 2.4 * kv + (1.0 * (q + kv) if self.qk_norm else 0.0)
        else:
            per = 7.5 * H + 4.4 * self.inter + 2.25 * q + 2.4 * kv + (2.0 * (q + kv) if self.qk_norm else 0.0)
        return per + (H if frozen else 2.0 * H) * adapter - 380.0


def plan(config, cfg, world: int = 1, device: str = "cpu", eager_teacher: bool = False) -> dict[str, float]:
    """Bytes per process, by term, for a retrofit with options ``cfg`` (a TrainConfig) on
    ``world`` processes; ``device`` "cuda" plans FSDP's bfloat16 compute and FlexAttention.
    ``eager_teacher``: a full fine-tune's teacher (the loaded transformers model) uses eager
    attention, [B, H, T, T] scores (the tiny test models); by default it is fused (sdpa), like
    the adapter-only teacher (DMS mode "off", dms.attention.training.causal_attention)."""
    s = Shape.from_config(config)
    sharding = planned_sharding(cfg.sharding, world)
    shards = world if sharding == "fsdp" else 1
    pb = DTYPE_BYTES[cfg.dtype]
    ab = 2 if (sharding == "fsdp" and device == "cuda") else pb  # activation / gathered dtype
    adapter = cfg.variant == "adapter"
    full = cfg.train_mode == "full"
    student = s.params(adapter)
    base = s.params(False)
    if full:
        trainable = student
    else:  # the adapters, or every q_proj whole (its other rows' gradients are masked)
        trainable = s.layers * ((s.hidden + s.hidden * s.kv_heads + s.kv_heads) if adapter
                                else s.hidden * s.q + (s.q if s.qkv_bias else 0))
    # Gradients are set to None before each step, so with one micro-batch per step a layer's
    # gradients are born in backward as its activations die: at the peak (backward's start) only
    # the output head's exists (under FSDP it is unsharded, counted in "gathered"). From the
    # second micro-batch on, every gradient coexists with the activations.
    head = s.vocab * s.hidden if full else 0
    if cfg.grad_accum_for(world) > 1:
        grads = trainable * pb / shards * (2 if sharding == "ddp" else 1)
    else:
        grads = 0.0 if sharding == "fsdp" else head * pb * (2 if sharding == "ddp" else 1)
    out = {"weights": student * pb / shards, "grads": grads,
           "optimizer": 2 * trainable * pb / shards, "teacher": base * pb / shards if full else 0.0}
    gathered = 0.0
    if sharding == "fsdp":  # one process too: FSDP all-gathers into separate full buffers
        layer = s.layer_params(adapter)
        gathered = (s.root_params() + 2 * layer) * ab
        gathered += (layer + (s.root_params() if full else 0)) * ab if full else 0
        gathered += s.vocab * s.hidden * ab if full else 0  # the teacher's head
    out["gathered"] = gathered
    tokens = cfg.batch_size * cfg.seq_len
    per_layer = s.saved_per_token(adapter, not full) * tokens * ab
    rows = cfg.batch_size * s.q_heads * cfg.seq_len * cfg.seq_len
    if device != "cuda" and rows <= CPU_ATTENTION_CHUNK:
        # One chunk is not recomputed in backward: the layer keeps its probabilities and bias.
        per_layer += (rows + cfg.batch_size * s.kv_heads * cfg.seq_len ** 2) * 4
    if cfg.activation_checkpointing:
        layers = s.layers * tokens * s.hidden * ab + per_layer
    else:
        layers = s.layers * per_layer
    # The final hidden states (student, teacher, gradient) stay; the KL's chunk of logits and a
    # layer's attention are transients of different moments: the larger one counts.
    kl = 4 * min(cfg.kl_chunk_tokens, tokens) * s.vocab * 4
    if device == "cuda":
        # FlexAttention is fused; its block mask holds int32 indices per (128-token block)^2.
        attention = 2 * 4 * cfg.batch_size * (-(-cfg.seq_len // 128)) ** 2
    else:  # a chunk's backward: its recomputed probabilities, their gradient, the scores' gradient
        attention = 3 * 4 * min(CPU_ATTENTION_CHUNK, rows)
    student = layers + 3 * tokens * s.hidden * ab + max(kl, attention)
    out["activations"] = max(student, teacher_phase(s, cfg, ab, full and eager_teacher))
    out["total"] = sum(out.values())
    return out


def teacher_phase(s: Shape, cfg, ab: int, eager: bool = False) -> float:
    """Bytes of the teacher's forward, which runs first, without autograd, one layer at a time:
    the larger half of a layer (attention: its input, normed input, q, k, v, RoPE copies of q
    and k, output; MLP: input, normed input, gate, up, their product), its attention's working
    set, and the final hidden states, kept for the KL. ``eager``: [B, H, T, T] scores."""
    tokens = cfg.batch_size * cfg.seq_len
    layer = max(3 * s.hidden + 3 * s.q + 3 * s.kv, 2 * s.hidden + 3 * s.inter) * tokens * ab
    masks = cfg.batch_size * cfg.seq_len ** 2
    if eager:  # scores (2 copies, or 1 + a float32 softmax) and the mask
        scores = s.q_heads * masks
        attention = max(2 * scores * ab, scores * (ab + 4)) + masks * ab
    elif not cfg.pack:  # left padding: causal_attention's query chunks carry a bool and a float mask
        attention = 5 * min(CPU_ATTENTION_CHUNK, masks)
    else:  # fused causal attention: no scores
        attention = 0
    return layer + attention + tokens * s.hidden * ab


def planned_sharding(sharding: str, world: int) -> str:
    """What ``sharding`` resolves to on ``world`` processes (dms.train.fsdp.resolve_sharding)."""
    if sharding == "auto":
        return "fsdp" if world > 1 else "none"
    return sharding


def format_plan(p: dict[str, float], title: str) -> str:
    lines = [title] + [f"  {k:<12}{v / GiB:10.2f} GiB" for k, v in p.items()]
    return "\n".join(lines)


def plan_for_folder(model: str, cfg, world: int | None = None) -> str:
    """``dms retrofit --plan``: reads config.json only."""
    path = os.path.join(model, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model {model!r} has no config.json")
    with open(path) as f:
        config = json.load(f)
    world = world or int(os.environ.get("WORLD_SIZE", "1"))
    if world < 1:
        raise ValueError(f"world size must be >= 1, got {world}")
    device = "cuda" if (cfg.device or "").startswith("cuda") else "cpu"
    if cfg.device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    sharding = planned_sharding(cfg.sharding, world)
    title = (f"dms retrofit --plan: {config.get('model_type')} x {world} processes ({sharding}, {device}), "
             f"{cfg.batch_size} x {cfg.seq_len} tokens per micro-batch, {cfg.train_mode}/{cfg.variant}, "
             f"{cfg.dtype}{', activation checkpointing' if cfg.activation_checkpointing else ''}; per process:")
    return format_plan(plan(config, cfg, world, device), title)


# -- the check against measured peak memory --------------------------------------------------

def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def _reset_peak() -> None:
    """Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measure(arch: str, sizes: dict, options: dict, data: str) -> dict:
    """Peak RSS (VmHWM, reset first) above the RSS before the model was built, next to the plan.
    Under torchrun the run is sharded with FSDP over a gloo group; the runtime's code (torch,
    transformers, the FSDP and DTensor modules) and the group exist before the reset, as the
    plan leaves them out. Returns the largest peak over the processes."""
    import torch
    import torch.distributed as dist

    from dms.models.tiny import tiny_model
    from dms.train import TrainConfig, retrofit

    world = int(os.environ.get("WORLD_SIZE", "0"))
    if world:
        import torch.distributed.checkpoint  # noqa: F401
        import torch.distributed.fsdp  # noqa: F401
        import torch.distributed.tensor  # noqa: F401

        dist.init_process_group("gloo")
    torch.manual_seed(0)
    cfg = TrainConfig(data=[data], progress=False, sharding="fsdp" if world else "none", **options)
    _reset_peak()
    before = _status_bytes("VmRSS")
    model = tiny_model(arch, **sizes)
    predicted = plan(model.config, cfg, max(world, 1), "cpu", eager_teacher=True)  # tiny models: eager
    retrofit(model, cfg)
    peak = _status_bytes("VmHWM") - before
    if world:
        peaks = [None] * world
        dist.all_gather_object(peaks, peak)
        peak = max(peaks)
        dist.destroy_process_group()
    return {"predicted": predicted["total"], "measured": peak, "terms": predicted}


# glibc keeps freed blocks in its heaps (one per thread that allocates: gloo's too) and the RSS
# stays at the high-water mark of that reuse; with a fixed mmap threshold every block from
# 64 KiB up is mapped on its own and handed back when freed, so the RSS follows live memory.
LIVE_ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": "65536"}


_SMALL = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, vocab_size=4096, num_attention_heads=8,
              num_key_value_heads=4, head_dim=32)
_WIDE = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, vocab_size=4096, num_attention_heads=8,
             num_key_value_heads=2, head_dim=64)
# Two steps: from the second on, AdamW's moments exist (a one-step run peaks before they do).
COMMON = dict(steps=2, window=16, target_cr=4.0, batch_size=1, lr=1e-4)
CASES = [  # (name, tiny_model sizes, TrainConfig options): each a minute or less on one core
    ("qwen3 h256 L4, adapter-only neuron, T=2048", _SMALL, dict(seq_len=2048)),
    ("qwen3 h256 L4, adapter-only neuron, T=4096", _SMALL, dict(seq_len=4096)),
    ("llama h512 L4, full adapter, T=2048", _WIDE, dict(seq_len=2048, train_mode="full", variant="adapter")),
    ("llama h512 L4, full adapter, T=2048, AC", _WIDE, dict(seq_len=2048, train_mode="full", variant="adapter",
                                                             activation_checkpointing=True)),
]


def run_case(i: int, data: str, out: str, nproc: int, env: dict) -> dict:
    """``measure`` of CASES[i] in a new process (``nproc`` 0) or under torchrun with FSDP, with
    ``env`` added to the environment (e.g. LIVE_ALLOCATOR)."""
    import subprocess

    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] if nproc else []
    cmd = [sys.executable, *launch, "-m", "dms.train.memory", "--case", str(i), data, out]
    res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1", **env))
    if res.returncode:
        raise RuntimeError(f"case {CASES[i][0]!r} failed: {res.stderr.strip().splitlines()[-1]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def write_data(path: str) -> None:
    """4 random documents of 16,383 tokens (+ EOS): 65,536 tokens, whole blocks at every seq_len
    of CASES."""
    import torch

    g = torch.Generator().manual_seed(0)
    with open(path, "w") as f:
        for _ in range(4):
            f.write(json.dumps({"input_ids": torch.randint(3, 4000, (16383,), generator=g).tolist()}) + "\n")


def _main(argv: list[str]) -> int:
    """python -m dms.train.memory [--nproc N] [CASE ...]: runs the cases (all by default) each in
    its own process, or in N torchrun processes with FSDP, once with the allocator handing freed
    memory back (live) and once with glibc's defaults; prints the table of docs/memory.md."""
    import argparse
    import tempfile

    ap = argparse.ArgumentParser(prog="python -m dms.train.memory")
    ap.add_argument("--nproc", type=int, default=0, help="FSDP over N torchrun processes (default: one, unsharded)")
    ap.add_argument("--case", type=int, help=argparse.SUPPRESS)  # one measurement, in this process
    ap.add_argument("rest", nargs="*", help="case indices")
    args = ap.parse_args(argv)
    if args.case is not None:
        data, out = args.rest
        name, sizes, options = CASES[args.case]
        r = measure(name.split()[0], sizes, {**COMMON, "output_dir": out, **options}, data)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(r))
        return 0
    cases = [int(c) for c in args.rest] or range(len(CASES))
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "data.jsonl")
        write_data(data)
        print(f"| case ({f'{args.nproc} processes, FSDP' if args.nproc else 'one process'}) | predicted (MiB) "
              "| live peak (MiB) | error | peak RSS, glibc defaults (MiB) | error |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for i in cases:
            live = run_case(i, data, os.path.join(tmp, f"{i}-live"), args.nproc, LIVE_ALLOCATOR)
            rss = run_case(i, data, os.path.join(tmp, f"{i}-rss"), args.nproc, {})
            p = live["predicted"]
            print(f"| {CASES[i][0]} | {p / 2**20:.0f} | {live['measured'] / 2**20:.0f} | {p / live['measured'] - 1:+.0%} "
                  f"| {rss['measured'] / 2**20:.0f} | {p / rss['measured'] - 1:+.0%} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
