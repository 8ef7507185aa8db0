"""Memory model of a retrofit: bytes per process from the model config alone (``dms retrofit
--plan``), and the measurement that checks it (``python -m dms.train.memory``; docs/memory.md).

Terms, per process, for world size W (S = W under FSDP, else 1):
  weights     student parameters / S, in the loaded dtype
  grads       trainable parameters / S (DDP keeps a second copy in its buckets)
  optimizer   AdamW's two moments of the trainable parameters / S (same dtype as the parameters)
  teacher     full fine-tune only: the frozen copy / S (adapter-only: the student's own weights)
  gathered    FSDP only: full weights of the root (embeddings, head) and of two layers (the one
              running and the one prefetched), their gradients before the reduce-scatter, and the
              teacher's head gathered for the KL
  activations what autograd keeps for backward, per micro-batch of batch_size x seq_len tokens,
              plus the working sets of the attention and of the KL
The activation count per token and layer comes from counting the tensors autograd saves in one
decoder layer (``saved_per_token``, counted with torch.autograd.graph.saved_tensors_hooks on tiny
Llama and Qwen3 layers, 2026-12-01; see docs/memory.md); with activation checkpointing a layer
keeps only its input, and one layer at a time is recomputed.
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

    def saved_per_token(self, adapter: bool) -> float:
        """Elements autograd keeps per token for one DMS decoder layer in train mode (counted)."""
        H = self.hidden
        per = 5.1 * H + 4.0 * self.inter + 2.0 * self.q + 2.3 * self.kv
        if self.qk_norm:
            per += 2.0 * self.q + 2.0 * self.kv
        return per + (2.0 * H if adapter else 0.0)


def plan(config, cfg, world: int = 1, device: str = "cpu", dense_teacher: bool | None = None) -> dict[str, float]:
    """Bytes per process, by term, for a retrofit with options ``cfg`` (a TrainConfig) on
    ``world`` processes; ``device`` "cuda" plans FSDP's bfloat16 compute and FlexAttention.
    ``dense_teacher``: does the teacher's attention build [B, H, T, T] scores? Adapter-only: yes
    (DMS "off" mode is eager attention); full fine-tune: the loaded model's own attention, fused
    (transformers' default sdpa) unless it is eager (the tiny test models)."""
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
    out = {"weights": student * pb / shards, "grads": trainable * pb / shards * (2 if sharding == "ddp" else 1),
           "optimizer": 2 * trainable * pb / shards, "teacher": base * pb / shards if full else 0.0}
    gathered = 0.0
    if sharding == "fsdp":  # one process too: FSDP all-gathers into separate full buffers
        layer = s.layer_params(adapter)
        gathered = (s.root_params() + 2 * layer) * ab
        gathered += (layer + (s.root_params() if full else 0)) * ab if full else 0
        gathered += s.vocab * s.hidden * ab if full else 0  # the teacher's head
    out["gathered"] = gathered
    tokens = cfg.batch_size * cfg.seq_len
    per_layer = s.saved_per_token(adapter) * tokens * ab
    if cfg.activation_checkpointing:
        layers = s.layers * tokens * s.hidden * ab + per_layer
    else:
        layers = s.layers * per_layer
    head = 3 * tokens * s.hidden * ab + 4 * min(cfg.kl_chunk_tokens, tokens) * s.vocab * 4
    if device == "cuda":
        # FlexAttention is fused; its block mask holds int32 indices per (128-token block)^2.
        attention = 2 * 4 * cfg.batch_size * (-(-cfg.seq_len // 128)) ** 2
    else:
        rows = cfg.batch_size * s.q_heads * cfg.seq_len * cfg.seq_len
        attention = 4 * 4 * min(CPU_ATTENTION_CHUNK, rows)
    student = layers + head + attention
    # The teacher runs first, without autograd: its attention's transient scores, or nothing.
    dense = (not full) if dense_teacher is None else dense_teacher
    scores = cfg.batch_size * s.q_heads * cfg.seq_len ** 2
    teacher_attention = (max(2 * scores * ab, scores * (ab + 4)) + cfg.batch_size * cfg.seq_len ** 2 * ab
                         if dense else 0.0)
    teacher_phase = teacher_attention + 2 * tokens * s.hidden * ab
    out["activations"] = max(student, teacher_phase)
    out["total"] = sum(out.values())
    return out


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
    """One process (no sharding): peak RSS (VmHWM, reset first) above the RSS before the model
    was built, next to the plan."""
    import torch

    from dms.models.tiny import tiny_model
    from dms.train import TrainConfig, retrofit

    torch.manual_seed(0)
    cfg = TrainConfig(data=[data], progress=False, sharding="none", **options)
    _reset_peak()
    before = _status_bytes("VmRSS")
    model = tiny_model(arch, **sizes)
    predicted = plan(model.config, cfg, 1, "cpu", dense_teacher=True)  # tiny models use eager attention
    retrofit(model, cfg)
    peak = _status_bytes("VmHWM") - before
    return {"predicted": predicted["total"], "measured": peak, "terms": predicted}


_SMALL = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, vocab_size=4096, num_attention_heads=8,
              num_key_value_heads=4, head_dim=32)
_WIDE = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, vocab_size=4096, num_attention_heads=8,
             num_key_value_heads=2, head_dim=64)
CASES = [  # (name, tiny_model sizes, TrainConfig options): each a minute or less on one core
    ("qwen3 h256 L4, adapter-only neuron, T=2048", _SMALL, dict(seq_len=2048)),
    ("qwen3 h256 L4, adapter-only neuron, T=4096", _SMALL, dict(seq_len=4096)),
    ("llama h512 L4, full adapter, T=2048", _WIDE, dict(seq_len=2048, train_mode="full", variant="adapter")),
    ("llama h512 L4, full adapter, T=2048, AC", _WIDE, dict(seq_len=2048, train_mode="full", variant="adapter",
                                                             activation_checkpointing=True)),
]


def _main(argv: list[str]) -> int:
    """python -m dms.train.memory [CASE_INDEX]: without an index, runs every case in its own
    process and prints the table of docs/memory.md."""
    import subprocess
    import tempfile

    import torch

    if argv:
        name, sizes, options = CASES[int(argv[0])]
        data = argv[1]
        common = dict(output_dir=argv[2], steps=1, window=16, target_cr=4.0, batch_size=1, lr=1e-4)
        r = measure(name.split()[0], sizes, {**common, **options}, data)
        print(json.dumps(r))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "data.jsonl")
        g = torch.Generator().manual_seed(0)
        with open(data, "w") as f:
            for _ in range(4):  # + EOS: 65,536 tokens, whole blocks at every seq_len of CASES
                f.write(json.dumps({"input_ids": torch.randint(3, 4000, (16383,), generator=g).tolist()}) + "\n")
        print("| case | predicted (MiB) | measured peak RSS increase (MiB) | error |")
        print("| --- | ---: | ---: | ---: |")
        for i, (name, _, _) in enumerate(CASES):
            res = subprocess.run([sys.executable, "-m", "dms.train.memory", str(i), data, os.path.join(tmp, str(i))],
                                 capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
            if res.returncode:
                raise RuntimeError(f"case {name!r} failed: {res.stderr.strip().splitlines()[-1]}")
            r = json.loads(res.stdout.strip().splitlines()[-1])
            err = r["predicted"] / r["measured"] - 1
            print(f"| {name} | {r['predicted'] / 2**20:.0f} | {r['measured'] / 2**20:.0f} | {err:+.0%} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
