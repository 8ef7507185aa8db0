"""Retrofit-training options, validated up front so a bad value fails before any model loads."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3", "mistral")
TRAIN_MODES = ("adapter-only", "full")
VARIANTS = ("neuron", "adapter")
DTYPES = ("float32", "bfloat16", "float16")
SHARDINGS = ("auto", "none", "ddp", "fsdp")


@dataclass
class TrainConfig:
    """``batch_size`` is per process and micro-batch: one optimizer step sees
    ``batch_size * grad_accum * world_size`` sequences of ``seq_len`` tokens."""

    data: list[str] = field(default_factory=list)
    output_dir: str = "dms-retrofit"
    target_cr: float = 8.0
    window: int = 256
    steps: int = 1000
    ramp_steps: int | None = None  # steps over which CR grows from 1 to target_cr; None = steps
    batch_size: int = 1
    grad_accum: int = 1
    global_batch_size: int | None = None  # sequences per optimizer step over all processes; sets grad_accum
    seq_len: int = 1024
    pack: bool = True  # False: one document per row, left-padded to seq_len (documents must fit)
    lr: float = 1e-4
    warmup_steps: int = 0
    decay_steps: int = 0  # final steps over which the lr falls linearly to 0 (0 = constant to the end)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    train_mode: str = "adapter-only"
    variant: str = "neuron"
    tau: float = 0.1
    alpha_scale: float = 100.0
    alpha_offset: float = 5.0
    compression_weight: float = 1.0
    compression_ema: float = 0.0  # 0: the term sees each micro-batch alone (the paper); see trainer
    # None: the paper's one-sided term on the batch mean; a number: loss.calibrated_compression_loss
    # with this tolerance (0.05 holds each sequence within 5% of the target ratio at its length).
    calibrated_tolerance: float | None = None
    calibrated_cap: float = 0.98  # the most of a sequence's older tokens the calibrated term asks to evict
    kl_chunk_tokens: int = 256  # rows of the [tokens, vocab] logit matrix alive at once
    attention_chunk: int | None = None  # query rows per chunk of the CPU training attention
    activation_checkpointing: bool = False
    dtype: str = "float32"  # used when loading a model folder; a model object keeps its dtype
    device: str | None = None  # default: cuda:LOCAL_RANK when CUDA is available, else cpu
    sharding: str = "auto"  # auto: fsdp under torchrun with more than one process, else none; see resolve_sharding
    seed: int = 0  # data order; the eviction noise uses torch's global RNG seeded with seed + rank
    save_every: int = 0  # 0 = only the final model
    log_every: int = 1
    resume_from: str | None = None  # a checkpoint-* directory of an earlier run, or "latest" in output_dir
    progress: bool = True

    def __post_init__(self) -> None:
        checks = [
            ("target_cr", self.target_cr >= 1, "a number >= 1 (target compression ratio)"),
            ("window", isinstance(self.window, int) and self.window >= 1, "an int >= 1"),
            ("steps", self.steps >= 1, "an int >= 1"),
            ("ramp_steps", self.ramp_steps is None or self.ramp_steps >= 0, "None or an int >= 0"),
            ("batch_size", self.batch_size >= 1, "an int >= 1"),
            ("grad_accum", self.grad_accum >= 1, "an int >= 1"),
            ("global_batch_size", self.global_batch_size is None or self.global_batch_size >= 1, "None or an int >= 1"),
            ("seq_len", self.seq_len >= 2, "an int >= 2"),
            ("lr", self.lr > 0, "a number > 0"),
            ("warmup_steps", self.warmup_steps >= 0, "an int >= 0"),
            ("decay_steps", 0 <= self.decay_steps <= self.steps, "an int in [0, steps]"),
            ("weight_decay", self.weight_decay >= 0, "a number >= 0"),
            ("grad_clip", self.grad_clip >= 0, "a number >= 0 (0 = no clipping)"),
            ("train_mode", self.train_mode in TRAIN_MODES, f"one of {TRAIN_MODES}"),
            ("variant", self.variant in VARIANTS, f"one of {VARIANTS}"),
            ("tau", self.tau > 0, "a number > 0"),
            ("compression_weight", self.compression_weight >= 0, "a number >= 0"),
            ("compression_ema", 0 <= self.compression_ema < 1, "a number in [0, 1)"),
            ("calibrated_tolerance", self.calibrated_tolerance is None or 0 <= self.calibrated_tolerance < 1,
             "None or a number in [0, 1)"),
            ("calibrated_cap", 0 < self.calibrated_cap <= 1, "a number in (0, 1]"),
            ("kl_chunk_tokens", self.kl_chunk_tokens >= 1, "an int >= 1"),
            ("attention_chunk", self.attention_chunk is None or self.attention_chunk >= 1, "None or an int >= 1"),
            ("dtype", self.dtype in DTYPES, f"one of {DTYPES}"),
            ("sharding", self.sharding in SHARDINGS, f"one of {SHARDINGS}"),
            ("save_every", self.save_every >= 0, "an int >= 0 (0 = only the final model)"),
            ("log_every", self.log_every >= 1, "an int >= 1"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"{name} must be {expected}, got {getattr(self, name)!r}")
        if not self.data:
            raise ValueError("data must list at least one JSONL file")
        if self.global_batch_size is not None and self.grad_accum != 1:
            raise ValueError("give grad_accum or global_batch_size, not both (global_batch_size sets grad_accum)")

    def grad_accum_for(self, world: int) -> int:
        """Micro-batches per optimizer step for ``world`` processes."""
        if self.global_batch_size is None:
            return self.grad_accum
        per_micro = self.batch_size * world
        if self.global_batch_size % per_micro:
            raise ValueError(f"global_batch_size {self.global_batch_size} is not a multiple of batch_size "
                             f"{self.batch_size} x {world} processes")
        return self.global_batch_size // per_micro

    @property
    def ramp(self) -> int:
        return self.steps if self.ramp_steps is None else self.ramp_steps

    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step ``step`` (0-based): linear warm-up, constant, then a
        linear decay over the last ``decay_steps`` that ends one step short of 0."""
        warm = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        decay = min(1.0, (self.steps - step) / self.decay_steps) if self.decay_steps else 1.0
        return self.lr * min(warm, decay)

    def dms_kwargs(self) -> dict:
        """The dms_* keys handed to ``dms.apply``."""
        return dict(dms_window_size=self.window, dms_alpha_scale=float(self.alpha_scale),
                    dms_initial_alpha_offset=float(self.alpha_offset), dms_tau=float(self.tau),
                    dms_separate_alpha=self.variant == "adapter", dms_cr=float(self.target_cr))

    def to_dict(self) -> dict:
        return asdict(self)
