"""dms.compat: a DMS model takes its cache under either argument name (transformers 5.24 renamed
past_key_values to cache), and both give the same logits and the same cache contents."""
import inspect

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaForCausalLM

import dms
from dms.compat import CACHE_ARG, either_cache
from dms.models.tiny import tiny_model


def test_cache_arg_is_the_installed_release_name():
    assert CACHE_ARG in inspect.signature(LlamaForCausalLM.forward).parameters


def test_either_cache():
    a, b = object(), object()
    assert either_cache(a, None) is a and either_cache(None, b) is b and either_cache(a, a) is a
    assert either_cache(None, None) is None
    with pytest.raises(ValueError, match="both"):
        either_cache(a, b)


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_both_names_reach_the_dms_cache(name):
    model = tiny_model("llama", seed=1)
    dms.apply(model, dms_window_size=4)
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    ref_cache, cache = dms.DMSCache(model), dms.DMSCache(model)
    with torch.no_grad():
        ref = model(input_ids=ids, **{CACHE_ARG: ref_cache}).logits
        out = model(input_ids=ids, **{name: cache}).logits
    torch.testing.assert_close(out, ref)
    assert cache.get_seq_length() == ref_cache.get_seq_length() > 0
