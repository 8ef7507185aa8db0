"""Retrofit training: turn a pretrained Llama / Qwen2 / Qwen3 / Mistral model into a DMS model
(docs/design.md §1). ``retrofit(model, **options)`` or the ``dms retrofit`` command."""
from dms.train.config import TrainConfig
from dms.train.trainer import Trainer, retrofit

__all__ = ["TrainConfig", "Trainer", "retrofit"]
