"""vLLM plugin: serve DMS checkpoints with ``LLM(model=DIR)`` or ``vllm serve DIR`` (docs/vllm.md).

vLLM calls ``register`` in each of its processes through the ``vllm.general_plugins``
entry point of this package. It registers, under the architecture names dms supports, model
classes that build the DMS model for configs with ``dms_*`` keys and vLLM's own model
otherwise, makes prefix caching default to off for DMS checkpoints (turning it on
explicitly is refused at start-up, dms.vllm.model.refuse_unsupported), and serves DMS configs
without ``architectures`` (as the reference implementation saves them) as causal LMs.
"""
from __future__ import annotations

_DONE = False


def register() -> None:
    global _DONE
    if _DONE:
        return
    import vllm.config.model as model_config
    from vllm import ModelRegistry
    from vllm.config import ModelConfig

    from dms.vllm.model import ARCHITECTURES, dispatcher, is_dms_config, name_causal_lm

    for arch in ARCHITECTURES:
        ModelRegistry.register_model(arch, dispatcher(arch))

    stock = ModelConfig.is_prefix_caching_supported

    def is_prefix_caching_supported(self) -> bool:
        return False if is_dms_config(self.hf_config) else stock.fget(self)

    ModelConfig.is_prefix_caching_supported = property(is_prefix_caching_supported)
    stock_get_config = model_config.get_config

    def get_config(*args, **kwargs):
        config = stock_get_config(*args, **kwargs)
        name_causal_lm(config)
        return config

    model_config.get_config = get_config
    _DONE = True
