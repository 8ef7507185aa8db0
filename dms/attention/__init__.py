"""DMS attention: eviction decisions, visibility masks, prefill/decode over the DMS cache
(``infer``), and the training-time soft attention (``training``)."""
from dms.attention.decisions import DMSAdapter, neuron_heads, neuron_logits
from dms.attention.infer import decode_attention, dense_attention, prefill_attention
from dms.attention.layer import MODES, DMSRuntime, dms_attention_forward
from dms.attention.masks import visibility_mask

__all__ = ["DMSAdapter", "neuron_heads", "neuron_logits", "decode_attention", "dense_attention",
           "prefill_attention", "MODES", "DMSRuntime", "dms_attention_forward", "visibility_mask"]
