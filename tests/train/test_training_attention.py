"""Training-time DMS attention (dms.attention.training) against dms.reference.visibility_mask."""
import math

import pytest
import torch

from dms import reference
from dms.attention.training import attention_bias, causal_attention, decision_mask, eviction_probs, train_attention

B, HQ, HKV, T, D, W = 2, 4, 2, 11, 8, 3


def _inputs(seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, HQ, T, D, generator=g)
    k = torch.randn(B, HKV, T, D, generator=g)
    v = torch.randn(B, HKV, T, D, generator=g)
    logits = torch.randn(B, HKV, T, generator=g) * 3
    for x in (q, k, v, logits):
        x.requires_grad_(requires_grad)
    return q, k, v, logits


def _left_padding():
    pm = torch.ones(B, T, dtype=torch.bool)
    pm[1, :4] = False
    return pm


def _saturated(decisions):
    """Logits of +-inf: the relaxed decision equals the hard one whatever the noise."""
    return torch.where(decisions, float("inf"), float("-inf"))


@pytest.mark.parametrize("padded", [False, True])
def test_saturated_bias_is_visibility_mask(padded):
    decisions = torch.rand(B, HKV, T, generator=torch.Generator().manual_seed(1)) > 0.5
    pm = _left_padding() if padded else None
    _, log_keep = eviction_probs(_saturated(decisions), 0.1, None)
    bias = attention_bias(log_keep, pm, 0, T, W)  # [B, Hkv, T, T]
    valid = None if pm is None else pm[:, None, :].expand(B, HKV, T).reshape(B * HKV, T)
    visible = reference.visibility_mask(decisions.reshape(B * HKV, T), W, valid).view(B, HKV, T, T)
    expected = torch.where(visible, 0.0, float("-inf"))
    real_q = torch.ones(B, T, dtype=torch.bool) if pm is None else pm
    rows = real_q[:, None, :, None].expand_as(bias)
    assert torch.equal(bias[rows], expected[rows])


@pytest.mark.parametrize("padded", [False, True])
def test_saturated_output_equals_masked_softmax(padded):
    q, k, v, _ = _inputs()
    decisions = torch.rand(B, HKV, T, generator=torch.Generator().manual_seed(2)) > 0.4
    pm = _left_padding() if padded else None
    out, hard, probs = train_attention(q, k, v, _saturated(decisions), window=W, tau=0.1, scale=D ** -0.5,
                                       padding_mask=pm, generator=None)
    assert torch.equal(hard, decisions.float()) and torch.equal(probs, decisions.float())
    valid = None if pm is None else pm[:, None, :].expand(B, HKV, T).reshape(B * HKV, T)
    visible = reference.visibility_mask(decisions.reshape(B * HKV, T), W, valid).view(B, HKV, T, T)
    visible = visible.repeat_interleave(HQ // HKV, dim=1)
    kk, vv = (x.repeat_interleave(HQ // HKV, dim=1) for x in (k, v))
    scores = (q @ kk.transpose(-1, -2) * D ** -0.5).masked_fill(~visible, float("-inf"))
    expected = torch.softmax(scores, -1).nan_to_num(0.0) @ vv  # pad query rows see nothing: 0
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_soft_bias_values():
    """Outside the window the bias is log(1 - p) of the key's decision, taken from the next token."""
    logits = torch.randn(1, 1, 6)
    gen = torch.Generator().manual_seed(3)
    probs, log_keep = eviction_probs(logits, 0.5, gen)
    bias = attention_bias(log_keep, None, 0, 6, 1)
    for qi in range(6):
        for ki in range(6):
            if ki > qi:
                assert bias[0, 0, qi, ki] == float("-inf")
            elif qi - ki <= 1:
                assert bias[0, 0, qi, ki] == 0
            else:
                assert math.isclose(bias[0, 0, qi, ki].item(), math.log1p(-probs[0, 0, ki + 1].item()), rel_tol=1e-4)


def test_noise_is_logistic_and_reproducible():
    logits = torch.zeros(1, 1, 20000)
    p1, _ = eviction_probs(logits, 1.0, torch.Generator().manual_seed(5))
    p2, _ = eviction_probs(logits, 1.0, torch.Generator().manual_seed(5))
    assert torch.equal(p1, p2)
    g = torch.logit(p1.double())  # tau = 1, logit 0: the noise itself
    # Logistic(0, 1): mean 0, variance pi^2 / 3.
    assert abs(g.mean().item()) < 0.05 and abs(g.var().item() / (math.pi ** 2 / 3) - 1) < 0.05


def test_gradients_flow_without_nan():
    q, k, v, logits = _inputs(requires_grad=True)
    out, hard, _ = train_attention(q, k, v, logits, window=2, tau=1.0, scale=D ** -0.5,
                                   padding_mask=_left_padding(), generator=torch.Generator().manual_seed(0))
    (out.square().sum() + hard.sum()).backward()
    for x in (q, k, v, logits):
        assert torch.isfinite(x.grad).all()
    assert logits.grad.abs().sum() > 0 and q.grad.abs().sum() > 0


def test_hard_is_straight_through():
    logits = torch.randn(B, HKV, T, requires_grad=True)
    q, k, v, _ = _inputs()
    _, hard, probs = train_attention(q, k, v, logits, window=W, tau=0.5, scale=1.0, padding_mask=None,
                                     generator=torch.Generator().manual_seed(0))
    assert torch.equal(hard, (probs > 0.5).float())
    g_hard, = torch.autograd.grad(hard.sum(), logits, retain_graph=True)
    g_probs, = torch.autograd.grad(probs.sum(), logits)
    torch.testing.assert_close(g_hard, g_probs)


@pytest.mark.parametrize("chunk", [1, 4])
def test_chunked_equals_unchunked(chunk):
    pm = _left_padding()

    def run(chunk):
        q, k, v, logits = _inputs(requires_grad=True)
        out, hard, _ = train_attention(q, k, v, logits, window=W, tau=0.3, scale=D ** -0.5, padding_mask=pm,
                                       generator=torch.Generator().manual_seed(9), backend="chunked",
                                       chunk_size=chunk)
        (out * torch.linspace(-1, 1, D)).sum().backward()
        return out.detach(), hard.detach(), [x.grad for x in (q, k, v, logits)]

    ref_out, ref_hard, ref_grads = run(T)
    out, hard, grads = run(chunk)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    assert torch.equal(hard, ref_hard)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("padded", [False, True])
def test_flex_forward_equals_chunked(padded):
    """The CUDA path's score_mod / mask_mod, run eagerly (CPU FlexAttention has no backward)."""
    q, k, v, logits = _inputs()
    pm = _left_padding() if padded else None
    outs = [train_attention(q, k, v, logits, window=W, tau=0.3, scale=D ** -0.5, padding_mask=pm,
                            generator=torch.Generator().manual_seed(9), backend=b)[0] for b in ("chunked", "flex")]
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)


def test_decision_mask_excludes_first_real_token():
    m = decision_mask(_left_padding(), B, T)
    assert not m[:, 0].any() and m[0, 1:].all()
    assert not m[1, :5].any() and m[1, 5:].all()


def test_bad_shapes_are_named():
    q, k, v, logits = _inputs()
    with pytest.raises(ValueError, match="logits"):
        train_attention(q, k, v, logits[:, :, :-1], window=W, tau=0.1, scale=1.0, padding_mask=None, generator=None)
    with pytest.raises(ValueError, match="window"):
        train_attention(q, k, v, logits, window=0, tau=0.1, scale=1.0, padding_mask=None, generator=None)


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("chunk", [None, 3 * B * T])
def test_causal_attention_equals_eager(padded, chunk):
    """Mode "off" without a cache (fused, chunked when padded) against the eager arithmetic it
    replaced, at every real query."""
    from dms.attention.infer import causal_padding_mask, dense_attention

    q, k, v, _ = _inputs(3)
    pm = _left_padding() if padded else None
    eager = dense_attention(q, k, v, causal_padding_mask(pm, B, T, 0, q.device), 0.3)
    fused = causal_attention(q, k, v, pm, 0.3, **({} if chunk is None else {"chunk_elements": chunk}))
    real = torch.ones(B, T, dtype=torch.bool) if pm is None else pm
    torch.testing.assert_close(fused.transpose(1, 2)[real], eager.transpose(1, 2)[real], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(fused).all()


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_teacher_logits_equal_the_eager_model(arch):
    """The adapter-only teacher (the DMS model in mode "off", no cache) gives the logits of the
    plain model, whose tiny configuration uses transformers' eager attention."""
    import copy

    import dms
    from conftest import left_padded
    from dms.models import set_mode
    from dms.models.tiny import tiny_model

    plain = tiny_model(arch)
    model = copy.deepcopy(plain)
    dms.apply(model, dms_window_size=4)
    set_mode(model, "off")
    ids, mask = left_padded([19, 12], seed=2)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        for m, p, real in ((mask, pos, mask.bool()), (None, None, torch.ones_like(mask, dtype=torch.bool))):
            got = model(input_ids=ids, attention_mask=m, position_ids=p, use_cache=False).logits
            want = plain(input_ids=ids, attention_mask=m, position_ids=p, use_cache=False).logits
            torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)
