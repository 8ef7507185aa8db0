"""The eviction logits of both variants, and the borrowed neuron's zeroing, against formulas
written here from the model's raw weights with plain torch ops (nothing from dms.attention):

    neuron:  q = q_norm(q_proj(input_layernorm(x))) per head, before RoPE;
             logit[h] = q[first query head of KV group h, last dim] * alpha_scale - alpha_offset,
             and that dim is zeroed before and after RoPE (it takes no part in q.k);
    adapter: logit = Linear(hidden -> n_kv)(RMSNorm(x)) * alpha_scale - alpha_offset,
             x = the decoder layer's input (the residual stream).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import VARIANTS, forced_dms_model, left_padded
from dms import reference as ref
from dms.models import last_logits, set_mode, set_noise_generator


def rms_norm(x, weight, eps):
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rotate(x, cos, sin):
    """Llama RoPE on [B, H, T, D] with cos/sin [B, T, D]: pairs dim i with dim i + D/2."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def project(attn, x, name):
    """[B, H, T, D] heads of q or k (after q_norm / k_norm where the architecture has them)."""
    lin = getattr(attn, f"{name}_proj")
    B, T, _ = x.shape
    D = attn.head_dim
    h = F.linear(x, lin.weight, lin.bias).view(B, T, -1, D)
    norm = getattr(attn, f"{name}_norm", None)
    if norm is not None:
        h = rms_norm(h, norm.weight, norm.variance_epsilon)
    return h.transpose(1, 2)


def expected_logits(model, layer_idx, captured):
    """[B, H_kv, T] from the weights and the layer's captured inputs."""
    c = model.config
    attn = model.model.layers[layer_idx].self_attn
    n_kv = c.num_key_value_heads
    group = c.num_attention_heads // n_kv
    per_layer = c.dms_alpha_per == "layer"
    if c.dms_separate_alpha:
        norm, proj = attn.dms_proj_alpha_norm, attn.dms_proj_alpha  # the reference's names
        raw = F.linear(rms_norm(captured["residual"], norm.weight, c.rms_norm_eps), proj.weight, proj.bias)
        raw = raw.transpose(1, 2)[:, :1] if per_layer else raw.transpose(1, 2)  # "layer" reads output 0
    else:
        q = project(attn, captured["attn_in"], "q")
        heads = [0] if per_layer else [h * group for h in range(n_kv)]
        raw = q[:, heads, :, -1]
    return (raw * c.dms_alpha_scale - c.dms_initial_alpha_offset).expand(-1, n_kv, -1)


def capture(model):
    """Hooks recording, per layer, the decoder layer's input (residual), the attention's input,
    its RoPE tables and its output. Returns (records, remove)."""
    records, handles = {}, []
    for i, layer in enumerate(model.model.layers):
        def pre(mod, args, kwargs, i=i):
            records.setdefault(i, {})["residual"] = args[0] if args else kwargs["hidden_states"]

        def post(mod, args, kwargs, out, i=i):
            r = records.setdefault(i, {})
            r["attn_in"] = args[0] if args else kwargs["hidden_states"]
            r["cos_sin"] = kwargs["position_embeddings"] if "position_embeddings" in kwargs else args[1]
            r["out"] = out[0]
        handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(layer.self_attn.register_forward_hook(post, with_kwargs=True))
    return records, lambda: [h.remove() for h in handles]


def model_under_test(arch, variant, alpha_per, device):
    model = forced_dms_model(arch, variant, window=3, seed=3, dms_alpha_per=alpha_per,
                             dms_alpha_scale=40.0, dms_initial_alpha_offset=1.5)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():  # non-trivial norm weights, so a skipped norm would show
        for layer in model.model.layers:
            for name, p in layer.self_attn.named_parameters():
                if name.endswith("norm.weight"):
                    p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
    return model.to(device)


def run(model, ids, mask, first_position=0):
    pos = (mask.cumsum(-1) - 1).clamp_min(0) + first_position
    records, remove = capture(model)
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
    finally:
        remove()
    return records


@pytest.mark.parametrize("alpha_per", ["head", "layer"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_the_formula(arch, variant, alpha_per, device):
    model = model_under_test(arch, variant, alpha_per, device)
    ids, mask = (t.to(device) for t in left_padded([7, 12], seed=9))
    set_mode(model, "train")
    set_noise_generator(model, torch.Generator(device=device).manual_seed(0))
    records = run(model, ids, mask)
    got = last_logits(model)
    for i, logits in enumerate(got):
        want = expected_logits(model, i, records[i])
        assert logits.shape == want.shape == (2, model.config.num_key_value_heads, 12)
        torch.testing.assert_close(logits, want, atol=1e-4, rtol=1e-5)
        real = mask.bool()[:, None, :].expand_as(want)
        assert (want[real] > 0).any() and (want[real] < 0).any(), "both decisions must occur"


def expected_attention(model, layer_idx, captured, mask, zero_before=True, zero_after=True):
    """The layer's attention output (cache-free inference) from the weights: q/k/v, the borrowed
    dim zeroed, RoPE, the reference visibility of 1[logit > 0], softmax, o_proj."""
    c = model.config
    attn = model.model.layers[layer_idx].self_attn
    x = captured["attn_in"]
    B, T, _ = x.shape
    n_kv, D = c.num_key_value_heads, attn.head_dim
    group = c.num_attention_heads // n_kv
    q, k, v = (project(attn, x, n) for n in "qkv")
    heads = [0] if c.dms_alpha_per == "layer" else [h * group for h in range(n_kv)]
    zero = torch.ones(c.num_attention_heads, D, device=x.device)
    zero[heads, -1] = 0
    if not c.dms_separate_alpha and zero_before:
        q = q * zero[None, :, None]
    cos, sin = captured["cos_sin"]
    q, k = rotate(q, cos, sin), rotate(k, cos, sin)
    if not c.dms_separate_alpha and zero_after:
        q = q * zero[None, :, None]
    decisions = expected_logits(model, layer_idx, captured) > 0
    valid = mask.bool()[:, None, :].expand(B, n_kv, T).reshape(-1, T)
    allowed = ref.visibility_mask(decisions.reshape(-1, T).cpu(), c.dms_window_size, valid.cpu())
    allowed = allowed.view(B, n_kv, T, T).repeat_interleave(group, 1).to(x.device)
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = (q @ k.transpose(-1, -2) * D ** -0.5).masked_fill(~allowed, float("-inf"))
    out = torch.softmax(scores, -1).nan_to_num(0.0) @ v  # a pad query sees nothing
    out = out.transpose(1, 2).reshape(B, T, -1)
    return F.linear(out, attn.o_proj.weight, attn.o_proj.bias)


# RoPE pairs the last dim with the slowest rotation (angle ~ 3e-4 * position at head dim 16): only
# far positions rotate it enough that a missed zeroing shows clearly.
FAR = 4000


@pytest.mark.parametrize("variant", VARIANTS)
def test_attention_output_matches_the_formula(arch, variant, device):
    """Inference without a cache: the whole attention output of every layer, which holds the
    decisions (through the visibility) and, for the neuron variant, the zeroing."""
    model = model_under_test(arch, variant, "head", device)
    ids, mask = (t.to(device) for t in left_padded([9, 14], seed=10))
    records = run(model, ids, mask, FAR)
    real = mask.bool()
    for i in range(len(model.model.layers)):
        want = expected_attention(model, i, records[i], mask)
        torch.testing.assert_close(records[i]["out"][real], want[real], atol=1e-5, rtol=1e-4)


def test_borrowed_dim_takes_no_part_in_q_dot_k(arch, device):
    """Leaving out either zeroing changes the output: the formula above is discriminating, and the
    model zeroes the dim both before RoPE (else it leaks into its rotation partner) and after."""
    model = model_under_test(arch, "neuron", "head", device)
    ids, mask = (t.to(device) for t in left_padded([9, 14], seed=10))
    records = run(model, ids, mask, FAR)
    real = mask.bool()
    got = records[0]["out"][real]
    for before, after in ((False, True), (True, False), (False, False)):
        wrong = expected_attention(model, 0, records[0], mask, zero_before=before, zero_after=after)[real]
        assert (got - wrong).abs().max() > 10 * (1e-5 + 1e-4 * got.abs().max()), (before, after)
