"""dms: Dynamic Memory Sparsification, learned delayed KV-cache eviction for LLM inference.

``import dms`` loads the operator library (``torch.ops.dms.*``) and nothing heavier: the
model-level API (``dms.from_pretrained``, ``dms.apply``) imports transformers on first use.
"""
from dms._ops import cuda_compiled, library_path, ops

__version__ = "0.1.0"

_LAZY = {
    "from_pretrained": "dms.models",
    "apply": "dms.models",
    "DMSCache": "dms.cache",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dms' has no attribute {name!r}")


__all__ = ["ops", "cuda_compiled", "library_path", "from_pretrained", "apply", "DMSCache", "__version__"]
