"""Loads the compiled operator library and registers the fake (meta) kernels.

The schemas live in csrc/torch_bindings.cpp. Another engine can skip this module and call
``torch.ops.load_library(dms.library_path())`` (or the .so path) itself.
"""
from __future__ import annotations

import torch

from dms import _C  # noqa: F401  (importing runs the static TORCH_LIBRARY registration)

ops = torch.ops.dms
cuda_compiled: bool = _C.cuda_compiled


def library_path() -> str:
    """Path of the shared library holding every dms operator."""
    return _C.__file__
