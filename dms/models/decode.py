"""A DMS decode step written directly on the weights, the whole model in one function.

Through transformers, a decode step of a small model spends much of its time in per-module
Python (hooks, kwargs, mask builders, Cache bookkeeping) rather than in the attention and the
projections. ``FastDecoder.step`` runs the same arithmetic as a DMS model in infer mode
(dms.apply / dms.from_pretrained; Llama, Qwen2, Qwen3, Mistral; borrowed-neuron and adapter
variants) for one new token per batch row: embedding, then per layer RMSNorm, one fused
q/k/v matmul, q_norm/k_norm where the architecture has them, RoPE on q and k at once, the
eviction decision (the formulas of dms.attention.decisions), ``DMSLayer.append`` +
``DMSLayer.decode_attention`` on the model's own DMSCache, o_proj, the MLP with gate and up
fused, and finally the norm and the LM head. It adds no host sync: the cache's page
bookkeeping is the only one, amortised as in the transformers path.

The prompt goes through the model itself (``generate`` does that prefill), so the fast path
only continues a cache the model filled; logits and cache state equal the transformers path
step by step up to rounding (tests/models/test_fast_decode.py).

    from dms.models.decode import generate
    out = generate(model, input_ids, attention_mask, max_new_tokens=64)             # greedy
    out = generate(model, input_ids, attention_mask, max_new_tokens=64, do_sample=True,
                   temperature=0.7, top_p=0.9, generator=torch.Generator().manual_seed(0))

At decode sizes every kernel launch costs about as much as its arithmetic, so the step is
written in few of them. Fusing copies the q/k/v and gate/up weights (about as many bytes
again), and the copies take in what depends only on the weights: the input norms' weights,
and the eviction logits (the adapter, its norm included, or the borrowed neuron's row, with
alpha's scale and offset) as extra rows of the q/k/v matmul, so that one matmul of the
normalised residual yields q, k, v and the decisions. ``fuse=None`` (the default) fuses only
while the copies stay under ``_FUSE_BYTES`` and otherwise multiplies by the model's own
weights one projection at a time (the adapter and the norms then run as in the model).
RoPE's cos/sin and the borrowed neuron's masks are computed once per step, residual adds
ride in addmm. torch.compile is not applied: compiling ``step`` (the ``dms bench`` model at
4K, one thread) took 32 s for 12 graphs, split by the cache's host-side bookkeeping around
each layer's append, and gave no faster step (6.5 vs 5.9 ms of CPU time); compiling only the
parts around the attention (2026-12-01, with and without inductor's C++ wrapper) did not beat
this eager code either (243 vs 237 us of CPU time per layer). The whole step as one graph, with the
cache's bookkeeping moved out of it and inductor's C++ wrapper (2026-12-02, 4K, one thread, 6
alternated rounds): the same median step with dynamic shapes (5.91 ms), 11% faster with static ones
(5.25 ms), which recompile (about 12 s) whenever the page pool grows.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dms.attention.decisions import ADAPTER_NORM, ADAPTER_PROJ, adapter_logits, neuron_heads, zero_neuron
from dms.cache import DMSCache, _describe
from dms.compat import cache_kwargs
from dms.models.patch import _decoder_layers, runtime

# Largest total copy of fused weights made by default (bytes).
_FUSE_BYTES = 256 * 2**20


def _normalize(x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """RMS-normalise the last dimension without a weight: x * rsqrt(mean(x^2) + eps), statistics
    in fp32 (``eps`` a 0-dim fp32 tensor), result in x's dtype. Four kernels: F.rms_norm runs
    about fifteen for a mean (sum, divide, dtype copies), which at decode sizes cost more than
    the arithmetic."""
    xf = x if x.dtype == torch.float32 else x.float()
    norm = torch.linalg.vector_norm(xf, dim=-1, keepdim=True)
    out = xf * torch.addcmul(eps, norm, norm, value=1 / x.shape[-1]).rsqrt_()
    return out if x.dtype == torch.float32 else out.to(x.dtype)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The Llama/Qwen RMSNorm over the last dimension: statistics in fp32, weight applied in
    the input dtype. ``weight`` [..., D] may hold one row per head."""
    return weight * _normalize(x, eps)


def _cat_bias(linears) -> torch.Tensor | None:
    if all(m.bias is None for m in linears):
        return None
    return torch.cat([m.bias if m.bias is not None else m.weight.new_zeros(m.weight.shape[0]) for m in linears])


def _residual_linear(h: torch.Tensor, x: torch.Tensor, weight_t: torch.Tensor, bias) -> torch.Tensor:
    """h + x @ weight_t (+ bias) in one addmm."""
    return torch.addmm(h if bias is None else h + bias, x, weight_t)


@dataclass
class _Layer:
    attn: torch.nn.Module
    mlp: torch.nn.Module
    ln1: torch.Tensor | None  # None: folded into qkv (and the logit rows)
    ln2: torch.Tensor | None  # None: folded into gate_up
    qkv: tuple | None  # fused (weight, bias) with the logit rows last, or None: project with the modules
    split: tuple  # (q and k, v, eviction logits) widths of the fused projection's output (0 logits: apart)
    gate_up: tuple | None
    qk_norm: torch.Tensor | None  # [Hq + Hkv, D]: q_norm's weight per q head, then k_norm's
    o_proj: tuple  # (weight transposed, bias)
    down: tuple  # (weight transposed, bias)
    adapter: torch.nn.Module | None  # the attention module whose adapter runs apart, or None


class FastDecoder:
    """Decode steps of one DMS model on its weights (see the module docstring). Build it once
    per model (``decoder(model)`` caches it and rebuilds it when a weight changed)."""

    def __init__(self, model, fuse: bool | None = None):
        rt = runtime(model)  # ValueError for a non-DMS model
        if fuse is not None and not isinstance(fuse, bool):
            raise TypeError(f"fuse must be a bool or None, got {fuse!r}")
        cfg, dcfg = model.config, rt.config
        layers = _decoder_layers(model)
        attn0 = layers[0].self_attn
        self.model, self.runtime = model, rt
        self.Hq, self.Hkv, self.D = cfg.num_attention_heads, cfg.num_key_value_heads, attn0.head_dim
        self.scaling, self.eps = attn0.scaling, cfg.rms_norm_eps
        self.eps_t = torch.tensor(self.eps, dtype=torch.float32, device=attn0.q_proj.weight.device)
        self.adapter = bool(dcfg.dms_separate_alpha)
        self.alpha = (dcfg.dms_alpha_per, dcfg.dms_alpha_scale, dcfg.dms_initial_alpha_offset)
        self.evict = not dcfg.dms_disable_eviction
        self.silu = getattr(cfg, "hidden_act", None) == "silu"
        fused_bytes = sum(sum(m.weight.numel() * m.weight.element_size() for m in
                              (l.self_attn.q_proj, l.self_attn.k_proj, l.self_attn.v_proj, l.mlp.gate_proj,
                               l.mlp.up_proj)) for l in layers)
        fuse = fused_bytes <= _FUSE_BYTES if fuse is None else fuse
        w0 = attn0.q_proj.weight
        self.neuron = neuron_heads(self.Hq, self.Hkv, dcfg.dms_alpha_per)
        # RoPE as qk * cos + roll(qk, D/2) * sin with rotate_half's sign folded into sin. The
        # borrowed neuron is zeroed before and after RoPE (as the model layer does): with the
        # 0/1 mask K over [Hq + Hkv, D] that is qk * (K cos) + roll(qk) * (K roll(K) sin), so
        # the masks go into cos and sin once per step instead of into qk per layer.
        half = self.D // 2
        sign = torch.cat([-torch.ones(half), torch.ones(self.D - half)]).to(w0)
        self.keep, self.rot = None, sign
        if not self.adapter:
            ones = torch.ones(1, self.Hq + self.Hkv, 1, self.D, dtype=w0.dtype, device=w0.device)
            self.keep = zero_neuron(ones, self.neuron)[0, :, 0]
            self.rot = self.keep * self.keep.roll(half, -1) * sign
        # cos/sin computed here with fewer kernels than the rotary module for the RoPE types
        # whose frequencies depend on the position only (dynamic and longrope ones rescale).
        rotary, self.rope = model.model.rotary_emb, None
        rope_type = getattr(rotary, "rope_type", None)
        if isinstance(rope_type, str) and "dynamic" not in rope_type and rope_type != "longrope":
            inv = rotary.inv_freq.float()
            scaling = float(rotary.attention_scaling)
            self.rope = (torch.cat([inv, inv]), scaling, self.rot.float() * scaling)
        self.layers = []
        with torch.no_grad():
            for l in layers:
                self.layers.append(self._layer(l, fuse))
        self.fused = fuse
        self._source = _weights_version(model)
        lm = model.lm_head
        self.lm_head = (lm.weight, lm.bias) if type(lm) is torch.nn.Linear else None

    def _logit_rows(self, attn, ln1: torch.Tensor):
        """The eviction logits as rows of the fused projection of the normalised residual,
        (weight [n, hidden], bias [n]) in fp32 with alpha's scale and offset applied, or None
        when they cannot be folded (q_norm before the neuron; an adapter norm of another eps)."""
        per, scale, offset = self.alpha
        if self.adapter:
            norm, proj = getattr(attn, ADAPTER_NORM), getattr(attn, ADAPTER_PROJ)
            if norm.eps != self.eps:
                return None
            w, b = proj.weight.float() * norm.weight.float(), proj.bias
            if per == "layer":  # one logit for every KV head
                w, b = w[:1], None if b is None else b[:1]
        else:
            if hasattr(attn, "q_norm"):
                return None
            rows = [h * self.D + self.D - 1 for h in self.neuron]
            w, b = attn.q_proj.weight[rows].float() * ln1, None if attn.q_proj.bias is None else attn.q_proj.bias[rows]
        b = w.new_zeros(w.shape[0]) if b is None else b.float()
        return w * scale, b * scale - offset

    def _layer(self, l, fuse: bool) -> _Layer:
        a, m = l.self_attn, l.mlp
        qk_norm = None
        if hasattr(a, "q_norm"):
            qk_norm = torch.cat([a.q_norm.weight.expand(self.Hq, -1), a.k_norm.weight.expand(self.Hkv, -1)])
        o_proj, down = (a.o_proj.weight.t(), a.o_proj.bias), (m.down_proj.weight.t(), m.down_proj.bias)
        adapter = a if self.adapter else None
        if not fuse:
            return _Layer(a, m, l.input_layernorm.weight, l.post_attention_layernorm.weight, None, (), None, qk_norm,
                          o_proj, down, adapter)
        # Fused copies with the input norms' weights folded in (products in fp32, rounded once).
        dtype = a.q_proj.weight.dtype
        ln1, ln2 = l.input_layernorm.weight.float(), l.post_attention_layernorm.weight.float()
        projs = [a.q_proj, a.k_proj, a.v_proj]
        w = torch.cat([p.weight.float() for p in projs]) * ln1
        b = _cat_bias(projs)
        b = None if b is None else b.float()
        rows = self._logit_rows(a, ln1)
        n = 0
        if rows is not None:
            n, adapter = rows[0].shape[0], None
            w = torch.cat([w, rows[0]])
            b = torch.cat([w.new_zeros(w.shape[0] - n) if b is None else b, rows[1]])
        gate_up = torch.cat([m.gate_proj.weight.float(), m.up_proj.weight.float()]) * ln2
        gu_b = _cat_bias([m.gate_proj, m.up_proj])
        split = ((self.Hq + self.Hkv) * self.D, self.Hkv * self.D, n)
        return _Layer(a, m, None, None, (w.to(dtype), None if b is None else b.to(dtype)), split,
                      (gate_up.to(dtype), gu_b), qk_norm, o_proj, down, adapter)

    def check(self, cache, batch: int) -> None:
        """Raise unless ``cache`` is a DMSCache this model filled for ``batch`` rows, and the model
        is in infer mode."""
        if self.runtime.mode != "infer":
            raise ValueError(f"the fast decode path runs DMS infer mode only; the model is in mode "
                             f"{self.runtime.mode!r} (dms.models.set_mode(model, 'infer'))")
        if not isinstance(cache, DMSCache):
            raise TypeError(f"cache must be a dms.DMSCache filled by this model, got {type(cache).__name__}")
        cache.check_model(self.runtime.mode, self.runtime.config.window)
        n = len(self.layers)
        if len(cache.layers) != n:
            raise ValueError(f"cache has {len(cache.layers)} layers, the model {n}: a cache of another model")
        w = self.layers[0].o_proj[0]
        for i, layer in enumerate(cache.layers):
            if layer.unusable:
                raise RuntimeError(layer.unusable)
            if not layer.is_initialized:
                raise ValueError("cache is empty: prefill the prompt through the model first (generate does)")
            if (layer.num_seqs, layer.head_dim, layer.dtype, layer.device) != \
                    (batch * self.Hkv, self.D, w.dtype, w.device):
                raise ValueError(
                    f"cache layer {i} holds {layer.num_seqs} sequences of head_dim {layer.head_dim} ({layer.dtype} on "
                    f"{layer.device}); this model needs batch * kv heads = {batch} * {self.Hkv} of head_dim "
                    f"{self.D} ({w.dtype} on {w.device}): a cache of another model or batch")

    def _evict(self, layer: _Layer, h: torch.Tensor, qk: torch.Tensor, folded: torch.Tensor) -> torch.Tensor:
        """Eviction decisions bool [B, H_kv] of one layer from the folded logit rows of the
        projection when there are, else the adapter on the residual ``h`` or the borrowed
        neuron of ``qk`` (after q_norm)."""
        per, a_scale, offset = self.alpha
        if folded.shape[-1]:
            logits = folded
        elif layer.adapter is not None:
            logits = adapter_logits(layer.adapter, h[:, None], per, a_scale, offset)[..., 0]
        else:
            logits = qk[:, self.neuron, -1] * a_scale - offset
        evict = logits > 0
        return evict if evict.shape[-1] == self.Hkv else evict.expand(-1, self.Hkv)

    def _cos_sin(self, h: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary module's cos and sin [B, 1, D] at ``positions``, sin times ``self.rot``."""
        if self.rope is None:
            cos, sin = self.model.model.rotary_emb(h, positions[:, None])
            return cos, sin * self.rot
        inv_freq, scaling, rot = self.rope
        freqs = positions[:, None, None].float() * inv_freq
        cos, sin = freqs.cos(), freqs.sin() * rot
        if scaling != 1.0:
            cos = cos * scaling
        return (cos, sin) if h.dtype == torch.float32 else (cos.to(h.dtype), sin.to(h.dtype))

    @torch.no_grad()
    def step(self, cache: DMSCache, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One new token per row: tokens, positions int [B] (the token's RoPE position) ->
        logits [B, vocab]. Appends the token to ``cache`` exactly like a model forward whose
        new token is real (attention_mask 1), as every token generate feeds after the prompt."""
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 1:
            raise ValueError(f"tokens must be a 1D tensor [batch], got {_describe(tokens)}")
        if not isinstance(positions, torch.Tensor) or positions.shape != tokens.shape:
            raise ValueError(f"positions must be a tensor of shape {tuple(tokens.shape)} like tokens, got "
                             f"{_describe(positions)}")
        B = tokens.shape[0]
        self.check(cache, B)
        Hq, Hkv, D, eps = self.Hq, self.Hkv, self.D, self.eps_t
        S, G, H = B * Hkv, Hq // Hkv, Hq + Hkv
        base = self.model.model
        h = F.embedding(tokens, base.embed_tokens.weight)
        cos, sin = self._cos_sin(h, positions)  # [B, 1, D], broadcast over heads
        if self.keep is not None:
            cos = cos * self.keep
        no_evict = None if self.evict else torch.zeros(B, Hkv, dtype=torch.bool, device=h.device)
        for layer, store in zip(self.layers, cache.layers):
            if layer.qkv is not None:
                qk, v, folded = F.linear(_normalize(h, eps), *layer.qkv).split(layer.split, -1)
                qk = qk.view(B, H, D)
            else:
                a, x = layer.attn, _rms_norm(h, layer.ln1, eps)
                qk, v, folded = torch.cat([a.q_proj(x), a.k_proj(x)], -1).view(B, H, D), a.v_proj(x), h[:, :0]
            if layer.qk_norm is not None:
                qk = _rms_norm(qk, layer.qk_norm, eps)
            evict = self._evict(layer, h, qk, folded) if no_evict is None else no_evict
            q, k = torch.addcmul(qk * cos, qk.roll(D // 2, -1), sin).split((Hq, Hkv), 1)
            store.append(k.reshape(S, 1, D), v.reshape(S, 1, D), evict.reshape(S, 1), None)
            att = store.decode_attention(q.reshape(S, G, D), self.scaling)
            h = _residual_linear(h, att.view(B, Hq * D), *layer.o_proj)
            m = layer.mlp
            if layer.gate_up is not None:
                gate, up = F.linear(_normalize(h, eps), *layer.gate_up).chunk(2, -1)
            else:
                x = _rms_norm(h, layer.ln2, eps)
                gate, up = m.gate_proj(x), m.up_proj(x)
            act = F.silu(gate) if self.silu else m.act_fn(gate)
            h = _residual_linear(h, act * up, *layer.down)
        h = _rms_norm(h, base.norm.weight, eps)
        return F.linear(h, *self.lm_head) if self.lm_head else self.model.lm_head(h)


def _weights_version(model) -> tuple:
    return tuple((p.data_ptr(), p._version) for p in model.parameters())


def decoder(model, fuse: bool | None = None) -> FastDecoder:
    """The model's FastDecoder, built on first use and rebuilt when a weight changed."""
    fast = model.__dict__.get("_dms_fast_decoder")
    if fast is None or fast.fused != (fast.fused if fuse is None else fuse) or fast._source != _weights_version(model):
        fast = FastDecoder(model, fuse)
        model.__dict__["_dms_fast_decoder"] = fast
    return fast


def _next_token(logits, do_sample, temperature, top_k, top_p, generator):
    if not do_sample:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), -1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
             cache: DMSCache | None = None, max_new_tokens: int = 32, *, do_sample: bool = False,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
             generator: torch.Generator | None = None, fuse: bool | None = None) -> torch.Tensor:
    """Prefill ``input_ids`` [B, T] (left padded, ``attention_mask`` 1 = real token) through the
    model into ``cache`` (a new DMSCache if None; it must be empty), then decode up to
    ``max_new_tokens`` with the fast path -> [B, T + new] like ``model.generate``: positions
    numbered as generate numbers them, greedy unless ``do_sample`` (temperature, top_k,
    top_p), rows that produced an EOS continue with ``pad_token_id``, and it stops when
    every row has (one host sync per step, only when ``eos_token_id`` is given)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must be a 2D tensor [batch, tokens] with at least one token, got "
                         f"{_describe(input_ids)}")
    if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor)
                                       or attention_mask.shape != input_ids.shape):
        raise ValueError(f"attention_mask must be a tensor of shape {tuple(input_ids.shape)} like input_ids, got "
                         f"{_describe(attention_mask)}")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be an int >= 1, got {top_k!r}")
    fast = decoder(model, fuse)
    if runtime(model).mode != "infer":
        raise ValueError(f"the fast decode path runs DMS infer mode only; the model is in mode "
                         f"{runtime(model).mode!r} (dms.models.set_mode(model, 'infer'))")
    cache = DMSCache(model) if cache is None else cache
    if not isinstance(cache, DMSCache):
        raise TypeError(f"cache must be a dms.DMSCache or None, got {type(cache).__name__}")
    if cache.layers[0].is_initialized:
        raise ValueError("cache must be empty: generate prefills input_ids into it")
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
    eos = None
    if eos_token_id is not None:
        eos = torch.as_tensor(eos_token_id, device=input_ids.device).reshape(-1)
        if pad_token_id is None:
            raise ValueError("pad_token_id is required with eos_token_id (finished rows continue with it)")
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                   logits_to_keep=1, **cache_kwargs(cache)).logits[:, -1]
    pos = mask.sum(-1)
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    out = [input_ids]
    for i in range(max_new_tokens):
        tok = _next_token(logits, do_sample, temperature, top_k, top_p, generator)
        if eos is not None:
            tok = tok.masked_fill(done, pad_token_id)
            done = done | torch.isin(tok, eos)
        out.append(tok[:, None])
        if i + 1 == max_new_tokens or (eos is not None and bool(done.all())):
            break
        logits = fast.step(cache, tok, pos)
        pos = pos + 1
    return torch.cat(out, 1)
