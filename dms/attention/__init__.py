"""DMS attention: eviction decisions, the visibility rule and masks, the inference kernels in
plain PyTorch (``infer``) and the training-time soft attention (``training``). The layer
forward that ties them to a model and its cache is ``dms.attention.layer`` (installed by
``dms.models``; it imports ``dms.cache``, which itself uses ``infer``, so it is not
re-exported here)."""
from dms.attention.decisions import adapter_logits, neuron_heads, neuron_logits
from dms.attention.infer import dense_attention, prefill_attention
from dms.attention.masks import last_query, visibility_mask, visible

__all__ = ["adapter_logits", "neuron_heads", "neuron_logits", "dense_attention", "prefill_attention",
           "last_query", "visibility_mask", "visible"]
