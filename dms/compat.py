"""What differs between the transformers releases dms supports (>= 5.0, < 6).

transformers 5.24 renamed the KV-cache argument of every model forward and of ``generate``
from ``past_key_values`` to ``cache`` (the old name still works there, with a FutureWarning,
until 6.0). dms's patched forwards accept both names and pass the cache on under the name the
installed release takes; dms's own calls use ``cache_kwargs`` so they never warn.
"""
from __future__ import annotations

import inspect

from transformers.models.llama.modeling_llama import LlamaForCausalLM

CACHE_ARG = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


def cache_kwargs(cache) -> dict:
    """``{name: cache}`` for a model forward or ``generate`` of the installed transformers."""
    return {CACHE_ARG: cache}


def either_cache(cache, past_key_values):
    """The cache a patched forward was given, under either name."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("got both cache= and past_key_values= (two different caches); pass one")
    return cache if cache is not None else past_key_values
