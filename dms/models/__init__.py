"""Model-level DMS API: retrofit / load Llama, Qwen2, Qwen3, Mistral (work in progress)."""
