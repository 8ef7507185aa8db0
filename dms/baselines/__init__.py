"""KV-cache baselines on the DMS paged store, at a fixed token budget per KV head: StreamingLLM,
H2O and TOVA evict down to the budget; Quest keeps everything and reads the budget's worth of
pages per decode step. They run the plain model's attention (a DMS model in mode "off") and
plug into ``generate`` as ``past_key_values=PolicyCache(model, policy, budget)``."""
from dms.baselines.cache import PolicyCache, PolicyLayer
from dms.baselines.policies import POLICIES, h2o_keep, quest_select, streaming_keep, tova_keep

__all__ = ["POLICIES", "PolicyCache", "PolicyLayer", "h2o_keep", "quest_select", "streaming_keep", "tova_keep"]
