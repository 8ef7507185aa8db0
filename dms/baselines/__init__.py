"""KV-cache eviction baselines on the DMS paged store, at a fixed token budget per KV head:
StreamingLLM, H2O and TOVA. They run the plain model's attention (a DMS model in mode "off")
and plug into ``generate`` as ``past_key_values=PolicyCache(model, policy, budget)``.

Quest-style query-aware page selection is not implemented."""
from dms.baselines.cache import PolicyCache, PolicyLayer
from dms.baselines.policies import POLICIES, h2o_keep, streaming_keep, tova_keep

__all__ = ["POLICIES", "PolicyCache", "PolicyLayer", "h2o_keep", "streaming_keep", "tova_keep"]
