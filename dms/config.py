"""DMS hyper-parameters, under the config keys of the published checkpoints.

The keys (``dms_window_size`` ...) are stored flat in a transformers ``config.json`` next to
the architecture's own keys, as in ``nvidia/Qwen3-8B-DMS-8x``; ``DMSConfig.from_model_config``
reads them back and ``to_model_config`` writes them. ``dms_separate_alpha`` picks the variant:
False = the borrowed query neuron, True = a separate adapter ``Linear(hidden -> n_kv_heads)``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

ALPHA_PER = ("head", "layer")
# The ring of each (sequence, head) holds window + 1 tokens and the kernels index it with int32;
# no published checkpoint is anywhere near this.
MAX_WINDOW = 1 << 20


class DMSConfigError(ValueError):
    """A ``dms_*`` value is missing or out of range."""


@dataclass(frozen=True)
class DMSConfig:
    dms_window_size: int = 256
    dms_alpha_scale: float = 100.0
    dms_initial_alpha_offset: float = 5.0
    dms_tau: float = 0.1
    dms_alpha_per: str = "head"
    dms_separate_alpha: bool = False
    dms_cr: float = 8.0
    # The reference's switch for running a DMS checkpoint with no eviction: decisions are all 0,
    # everything else (the zeroed borrowed neuron included) as with eviction.
    dms_disable_eviction: bool = False

    def __post_init__(self) -> None:
        checks = [
            ("dms_window_size", isinstance(self.dms_window_size, int) and not isinstance(self.dms_window_size, bool)
             and 1 <= self.dms_window_size <= MAX_WINDOW, f"an int in [1, {MAX_WINDOW}]"),
            ("dms_alpha_scale", _is_number(self.dms_alpha_scale) and self.dms_alpha_scale > 0, "a number > 0"),
            ("dms_initial_alpha_offset", _is_number(self.dms_initial_alpha_offset), "a number"),
            ("dms_tau", _is_number(self.dms_tau) and self.dms_tau > 0, "a number > 0"),
            ("dms_alpha_per", self.dms_alpha_per in ALPHA_PER, f"one of {ALPHA_PER}"),
            ("dms_separate_alpha", isinstance(self.dms_separate_alpha, bool), "a bool"),
            ("dms_cr", _is_number(self.dms_cr) and self.dms_cr >= 1, "a number >= 1 (target compression ratio)"),
            ("dms_disable_eviction", isinstance(self.dms_disable_eviction, bool), "a bool"),
        ]
        for key, ok, expected in checks:
            if not ok:
                raise DMSConfigError(f"{key} must be {expected}, got {getattr(self, key)!r}")

    @property
    def window(self) -> int:
        return self.dms_window_size

    @property
    def variant(self) -> str:
        return "adapter" if self.dms_separate_alpha else "neuron"

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_model_config(cls, config: Any, *, required: bool = True) -> "DMSConfig":
        """Reads the ``dms_*`` keys of a transformers config (or a dict). With ``required``,
        a config without ``dms_window_size`` is not a DMS checkpoint and is rejected."""
        get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
        present = {k: get(k) for k in cls.keys() if get(k) is not None}
        if required and "dms_window_size" not in present:
            raise DMSConfigError(
                "not a DMS checkpoint: its config has no 'dms_window_size' (expected the dms_* keys "
                f"{', '.join(cls.keys())}); use dms.apply(model, ...) to add DMS to a plain model")
        return cls(**present)

    def to_model_config(self, config: Any) -> None:
        for key, value in asdict(self).items():
            setattr(config, key, value)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)
