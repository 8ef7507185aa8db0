"""lm-evaluation-harness adapter: evaluate a DMS checkpoint with any lm-eval task.

Importing this module registers the model type ``dms`` (needs ``pip install lm-eval
accelerate``; dms itself does not depend on them). From Python:

    import dms.eval.lm_eval  # registers "dms"
    lm_eval.simple_evaluate(model="dms", model_args="pretrained=PATH,page_size=16", tasks=[...])

or from the shell, lm-eval's command line with "dms" registered:
``python -m dms.eval.lm_eval run --model dms --model_args pretrained=PATH --device cpu --tasks ...``

The model loads with ``dms.from_pretrained`` (infer mode: hard eviction decisions).
Log-likelihoods come from a forward through a fresh DMSCache (the prefill path: DMS
visibility), generation decodes with a DMSCache; ``compression`` holds the compression ratio
of every generate call (one per batch).
"""
from __future__ import annotations

try:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as e:  # lm-eval is optional: say what to install
    raise ImportError(f"dms.eval.lm_eval needs lm-evaluation-harness and accelerate: pip install lm-eval accelerate "
                      f"({e})") from e


@register_model("dms")
class DMSLM(HFLM):
    """lm-eval's HF model with a DMS model and DMS KV cache. ``pretrained``: a DMS checkpoint
    folder or hub id, or an already loaded DMS model; ``page_size``: tokens per KV page."""

    def __init__(self, pretrained, page_size: int = 16, **kwargs):
        from dms.models import get_mode

        self.page_size = int(page_size)
        if self.page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size!r}")
        self.compression: list[float] = []
        if not isinstance(pretrained, str):
            get_mode(pretrained)  # raises unless it is a DMS model
            if kwargs.get("tokenizer") is None:
                raise ValueError("pass tokenizer= with an already loaded model")
        kwargs.setdefault("device", "cpu")
        super().__init__(pretrained=pretrained, backend="causal", **kwargs)

    def _create_model(self, pretrained: str, revision: str | None = "main", dtype="auto",
                      trust_remote_code: bool | None = False, subfolder: str = "", **kwargs) -> None:
        import dms
        from lm_eval.models.utils_hf import get_dtype

        if trust_remote_code:
            raise ValueError("DMS models never run remote code; drop trust_remote_code")
        unused = sorted(k for k, v in kwargs.items() if v not in (None, False, "", "./offload") and k != "gpus")
        if unused:
            raise ValueError(f"the dms model type does not support {unused}")
        self._model = dms.from_pretrained(pretrained, revision=revision, dtype=get_dtype(dtype),
                                          **({"subfolder": subfolder} if subfolder else {}))

    def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs):
        import dms
        from dms.compat import cache_kwargs

        cache = dms.DMSCache(self.model, page_size=self.page_size)
        out = super()._model_generate(context, max_length, stop, **cache_kwargs(cache), **generation_kwargs)
        self.compression.append(cache.compression_ratio())
        return out


if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
