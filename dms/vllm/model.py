"""The DMS causal LM for vLLM, and the classes registered under the stock architecture names.

vLLM picks a model class by the ``architectures`` of config.json (``LlamaForCausalLM``...), so
the plugin registers, under each supported name, a subclass of vLLM's own class whose
``__new__`` builds the DMS model when the config has the ``dms_*`` keys and vLLM's model
otherwise: DMS checkpoints need no flag and plain ones keep the stock path.

The DMS model runs the checkpoint's transformers modules (embeddings, norms, projections,
MLP, rotary embedding) on the flattened batch, so its arithmetic is the transformers path's;
attention is dms.vllm.attention on the plugin's store. Weights load under the checkpoint's
own names; the adapter lives under the reference implementation's names
(``self_attn.dms_proj_alpha_norm``, ``self_attn.dms_proj_alpha``, as dms.from_pretrained
builds it) and is also read under dms's earlier ones (``self_attn.dms_adapter.{norm,proj}``,
one output per layer for ``dms_alpha_per="layer"``). ``dms_disable_eviction`` keeps every token.
"""
from __future__ import annotations

import sys
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from dms.attention.decisions import ADAPTER_NORM, ADAPTER_PROJ, add_adapter, adapter_logits
from dms.config import DMSConfig
from dms.vllm.attention import DMSAttention, SlotTable, build_stores

ARCHITECTURES = {  # HF architecture -> (vLLM module, class); the model types dms supports
    "LlamaForCausalLM": ("vllm.model_executor.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("vllm.model_executor.models.mistral", "MistralForCausalLM"),
    "Qwen2ForCausalLM": ("vllm.model_executor.models.qwen2", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("vllm.model_executor.models.qwen3", "Qwen3ForCausalLM"),
}
_EARLIER_NAMES = {".dms_adapter.norm.": f".{ADAPTER_NORM}.", ".dms_adapter.proj.": f".{ADAPTER_PROJ}."}


def is_dms_config(hf_config) -> bool:
    return getattr(hf_config, "dms_window_size", None) is not None


def name_causal_lm(hf_config) -> None:
    """The reference implementation saves DMS checkpoints without ``architectures``, and vLLM
    then names the model type's base model (``Qwen3Model``): name its causal LM instead."""
    if not is_dms_config(hf_config) or any(a in ARCHITECTURES for a in hf_config.architectures or ()):
        return
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    arch = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(hf_config.model_type)
    if arch in ARCHITECTURES:
        hf_config.architectures = [arch]


def refuse_unsupported(vllm_config) -> None:
    """Refuse at start-up what the DMS store cannot combine with, naming the option."""
    c = vllm_config
    if c.cache_config.enable_prefix_caching:
        raise ValueError("DMS checkpoints cannot use prefix caching (enable_prefix_caching / "
                         "--enable-prefix-caching): evicted tokens are gone, so a cached prefix block does not hold "
                         "what a new request would retain; leave it off")
    if c.speculative_config is not None:
        raise ValueError("DMS checkpoints cannot use speculative decoding (speculative_config / "
                         "--speculative-config): the DMS store cannot roll back rejected draft tokens")
    if c.lora_config is not None:
        raise ValueError("DMS checkpoints cannot use LoRA (enable_lora / --enable-lora): the plugin's DMS model "
                         "has no LoRA layers")
    p = c.parallel_config
    if p.tensor_parallel_size > 1 or p.pipeline_parallel_size > 1:
        raise ValueError("DMS checkpoints run with tensor_parallel_size=1 and pipeline_parallel_size=1 only: "
                         "memory-true admission needs the scheduler and the model in one process (docs/vllm.md)")
    if c.scheduler_config.async_scheduling:
        raise ValueError("DMS checkpoints cannot use async scheduling (async_scheduling / --async-scheduling): "
                         "the KV manager budgets each step from the store's state after the previous one")


class DMSForCausalLM(nn.Module):
    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__()
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

        refuse_unsupported(vllm_config)
        self.vllm_config = vllm_config
        config = vllm_config.model_config.hf_config
        self.config = config
        self.dms = DMSConfig.from_model_config(config)
        hf = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)](config)
        self.model, self.lm_head = hf.model, hf.lm_head
        windowed = [i for i, layer in enumerate(self.model.layers)
                    if getattr(layer.self_attn, "sliding_window", None) is not None
                    or (config.model_type == "mistral" and getattr(config, "sliding_window", None) is not None)]
        if windowed:
            raise ValueError(f"layers {windowed} use sliding-window attention, which DMS does not combine with "
                             "eviction; serve the checkpoint with sliding_window set to null in config.json")
        self.rope = sys.modules[type(hf).__module__].apply_rotary_pos_emb
        H, Hq = config.num_key_value_heads, config.num_attention_heads
        first = self.model.layers[0].self_attn
        self.head_dim, self.scale = first.head_dim, first.scaling
        if self.dms.dms_separate_alpha:
            for layer in self.model.layers:  # with a bias, zero unless the checkpoint has one
                add_adapter(layer.self_attn, config.hidden_size, H, config.rms_norm_eps)
        else:
            group = Hq // H
            self.neuron_heads = [0] if self.dms.dms_alpha_per == "layer" else [h * group for h in range(H)]
        self.attn = nn.ModuleList(
            DMSAttention(vllm_config=vllm_config, prefix=f"{prefix}.dms_attn.{i}" if prefix else f"dms_attn.{i}",
                         num_kv_heads=H, head_size=self.head_dim, window=self.dms.window, scale=self.scale,
                         num_layers=config.num_hidden_layers)
            for i in range(config.num_hidden_layers))
        self.slots = SlotTable(vllm_config.scheduler_config.max_num_seqs)
        self.max_tokens = vllm_config.model_config.max_model_len
        self._bound: tuple | None = None  # data pointers of the KV memory the stores were built on

    # -- vLLM model interface -----------------------------------------------------------------
    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head_gemm(hidden_states)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        from vllm.forward_context import get_forward_context

        h = self.embed_input_ids(input_ids) if inputs_embeds is None else inputs_embeds
        h = h[None]
        cos, sin = self.model.rotary_emb(h, positions[None])
        meta = get_forward_context().attn_metadata
        if isinstance(meta, dict):
            meta = meta.get(self.attn[0].layer_name)
        stores = self._stores()
        plan = self.slots.plan(meta, stores, h.device) if meta is not None and stores else None
        for layer, attn, gemm in zip(self.model.layers, self.attn, self.gemms):
            residual = h
            x = self._attention(layer.self_attn, attn, gemm, layer.input_layernorm(h), residual, cos, sin, plan)
            h = residual + x
            gate, up = gemm.gate_up(layer.post_attention_layernorm(h)).chunk(2, dim=-1)
            h = h + gemm.down(layer.mlp.act_fn(gate) * up)
        if plan is not None:
            self.slots.report(plan, meta, stores)
        return self.model.norm(h)[0]

    def _stores(self) -> list | None:
        kvs = [getattr(a, "kv_cache", None) for a in self.attn]
        if any(not isinstance(kv, torch.Tensor) or kv.numel() == 0 for kv in kvs):
            return None  # before vLLM allocated the KV memory (profiling)
        key = tuple(kv.data_ptr() for kv in kvs)
        if key != self._bound:
            spec = self.attn[0].get_kv_cache_spec(self.vllm_config)
            build_stores(list(self.attn), self.slots.capacity, self.max_tokens, spec.dms_page_size)
            self.slots = SlotTable(self.slots.capacity)
            self._bound = key
        return [a.store for a in self.attn]

    def _attention(self, mod, attn: DMSAttention, gemm, x, residual, cos, sin, plan):
        """The transformers attention module's projections around the DMS store."""
        _, N, _ = x.shape
        D = self.head_dim
        q, k, v = gemm.qkv(x).split(gemm.qkv_sizes, dim=-1)
        q, k, v = q.view(1, N, -1, D), k.view(1, N, -1, D), v.reshape(N, -1, D)
        if hasattr(mod, "q_norm"):
            q, k = mod.q_norm(q), mod.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [1, heads, N, D]
        H = k.shape[1]
        cfg = self.dms
        if cfg.dms_separate_alpha:
            logits = adapter_logits(mod, residual, cfg.dms_alpha_per, cfg.dms_alpha_scale,
                                    cfg.dms_initial_alpha_offset)[0].T  # [N, H]
        else:
            logits = q[0, self.neuron_heads, :, -1].T * cfg.dms_alpha_scale - cfg.dms_initial_alpha_offset
            logits = logits.expand(N, H)
            q = self._zero_neuron(q)
        q, k = self.rope(q, k, cos, sin)
        if not cfg.dms_separate_alpha:
            q = self._zero_neuron(q)  # RoPE mixed the zeroed dimension with its pair: zero it again
        decisions = (logits > 0) & (not cfg.dms_disable_eviction)
        out = attn(q[0].transpose(0, 1), k[0].transpose(0, 1), v, decisions.contiguous(), plan)
        return gemm.o(out.reshape(1, N, -1))

    def _zero_neuron(self, q):
        keep = torch.ones(q.shape[1], q.shape[-1], dtype=q.dtype, device=q.device)
        keep[self.neuron_heads, -1] = 0
        return q * keep[None, :, None, :]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        per_layer = self.dms.dms_alpha_per == "layer"
        loaded = set()
        for name, w in weights:
            earlier = ".dms_adapter." in name
            for old, new in _EARLIER_NAMES.items():
                name = name.replace(old, new)
            if name not in params:
                if name == "lm_head.weight" and self.config.tie_word_embeddings:
                    continue
                if ".dms_" in name:
                    raise ValueError(f"checkpoint has DMS weight {name} that the config does not use (check "
                                     "dms_separate_alpha / dms_alpha_per in config.json)")
                continue  # buffers such as rotary inv_freq
            p = params[name]
            if earlier and per_layer and f".{ADAPTER_PROJ}." in name and w.shape[:1] == (1,):
                w = torch.cat([w, w.new_zeros((p.shape[0] - 1, *w.shape[1:]))])  # outputs 1.. are unused
            if p.shape != w.shape:
                raise ValueError(f"weight {name} has shape {tuple(w.shape)}, the model expects {tuple(p.shape)}")
            with torch.no_grad():
                p.copy_(w)
            loaded.add(name)
        # The reference has no adapter bias unless attention_bias: it stays zero.
        missing = sorted(n for n in params if n not in loaded and not n.endswith(f"{ADAPTER_PROJ}.bias"))
        if missing:
            raise ValueError(f"checkpoint lacks weights {missing[:4]}{' ...' if len(missing) > 4 else ''}")
        self._fuse()
        return set(params)

    def _fuse(self) -> None:
        """One GEMM for q/k/v and one for gate/up per layer, through vLLM's GEMM for the platform
        (on CPU oneDNN with packed weights, as vLLM's own models): a decode step is a few small
        matrix products per layer, so per-call cost decides its time. The transformers modules'
        projection and MLP weights are dropped once copied into the fused ones."""
        gemms = nn.ModuleList()
        for layer in self.model.layers:
            a, m = layer.self_attn, layer.mlp
            if any(getattr(p, "bias", None) is not None for p in (m.gate_proj, m.up_proj, m.down_proj)):
                raise ValueError("the DMS plugin's model has no MLP bias (mlp_bias must be false)")
            g = nn.Module()
            g.qkv = Gemm.cat([a.q_proj, a.k_proj, a.v_proj])
            g.qkv_sizes = [a.q_proj.out_features, a.k_proj.out_features, a.v_proj.out_features]
            g.o, g.gate_up, g.down = Gemm.cat([a.o_proj]), Gemm.cat([m.gate_proj, m.up_proj]), Gemm.cat([m.down_proj])
            for lin in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj):
                lin.weight.data = lin.weight.data.new_empty(0)
            gemms.append(g)
        self.gemms = gemms
        self.lm_head_gemm = Gemm.cat([self.lm_head])


class Gemm(nn.Module):
    """x @ weight.T + bias through vLLM's unquantized GEMM for the platform (F.linear off CPU)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        # Buffers: built from loaded weights, so vLLM's loader must not expect them in a checkpoint.
        self.register_buffer("weight", weight, persistent=False)
        self.register_buffer("bias", bias, persistent=False)
        self.cpu_linear = F.linear
        if weight.device.type == "cpu":
            from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

            dispatch_cpu_unquantized_gemm(self, remove_weight=False)

    @classmethod
    def cat(cls, linears: list[nn.Linear]) -> "Gemm":
        """One GEMM whose outputs are those of ``linears`` side by side (same input)."""
        biases = [lin.bias for lin in linears]
        if any(b is None for b in biases) and any(b is not None for b in biases):
            biases = [torch.zeros(lin.out_features, dtype=lin.weight.dtype, device=lin.weight.device)
                      if b is None else b for lin, b in zip(linears, biases)]
        bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
        return cls(torch.cat([lin.weight.detach() for lin in linears]), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cpu_linear(x, self.weight, self.bias)


def dispatcher(arch: str) -> type:
    """A subclass of vLLM's class for ``arch`` that builds DMSForCausalLM for DMS configs."""
    import importlib

    module, name = ARCHITECTURES[arch]
    stock = getattr(importlib.import_module(module), name)

    def __new__(cls, *args, vllm_config=None, prefix: str = "", **kwargs):
        if vllm_config is not None and is_dms_config(vllm_config.model_config.hf_config):
            return DMSForCausalLM(vllm_config=vllm_config, prefix=prefix)
        return stock.__new__(cls)

    return type(name, (stock,), {"__new__": __new__, "__module__": __name__, "__qualname__": name})
