"""The production visibility mask (dms.attention.masks) against the loop-based oracle in
dms/reference.py: random decisions, left padding and pads inside a row (multi-turn history),
windows of 0, 1, a few tokens and longer than the sequence, and a prompt split into a cached
part and a new chunk."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dms import reference as ref
from dms.attention import masks

BOUNDED = settings(max_examples=80, deadline=None, derandomize=True)
WINDOWS = st.one_of(st.sampled_from([0, 1]), st.integers(2, 5), st.integers(40, 200))  # T <= 32 < 40


def _inputs(S, T, p, pads, seed):
    """(decisions, valid): evict with probability p; "left" pads a random prefix of each row,
    "inside" also drops random tokens after the first real one."""
    gen = torch.Generator().manual_seed(seed)
    decisions = torch.rand(S, T, generator=gen) < p
    if pads == "none":
        return decisions, None
    lead = torch.randint(0, T + 1, (S,), generator=gen)
    valid = torch.arange(T)[None, :] >= lead[:, None]
    if pads == "inside":
        valid &= torch.rand(S, T, generator=gen) < 0.7
    return decisions, valid


@BOUNDED
@given(S=st.integers(1, 4), T=st.integers(0, 32), window=WINDOWS, p=st.floats(0, 1),
       pads=st.sampled_from(["none", "left", "inside"]), seed=st.integers(0, 2**16))
def test_visibility_mask_matches_reference(device, S, T, window, p, pads, seed):
    decisions, valid = _inputs(S, T, p, pads, seed)
    want = ref.visibility_mask(decisions, window, valid)
    valid = None if valid is None else valid.to(device)
    got = masks.visibility_mask(decisions.to(device), window, valid)
    assert got.device.type == device.type and got.dtype == torch.bool
    assert torch.equal(got.cpu(), want)


@BOUNDED
@given(S=st.integers(1, 4), T=st.integers(1, 32), cut=st.floats(0, 1), window=WINDOWS, p=st.floats(0, 1),
       pads=st.sampled_from(["none", "left", "inside"]), seed=st.integers(0, 2**16))
def test_chunk_after_a_cached_prefix_matches_reference(device, S, T, cut, window, p, pads, seed):
    """The chunk t >= a of a row whose first a positions are already cached: its tokens are
    numbered from ``start`` (the valid tokens seen so far) and the production rule (``visible``
    over ``last_visible_query``, as the prefill uses them) must give the reference's [a:, a:]
    block. (The chunk's last token has no flag yet, exactly as the end of the whole row.)"""
    decisions, valid = _inputs(S, T, p, pads, seed)
    want = ref.visibility_mask(decisions, window, valid)
    ok = torch.ones(S, T, dtype=torch.bool) if valid is None else valid
    a = int(cut * T)
    start = ok[:, :a].sum(-1).to(device)
    d, v = decisions[:, a:].to(device), ok[:, a:].to(device)
    idx = masks.valid_index(v, start)
    last = masks.last_visible_query(d, v, window, start)
    got = masks.visible(idx[:, None, :], last[:, None, :], idx[:, :, None]) & v[:, :, None]
    assert torch.equal(got.cpu(), want[:, a:, a:])
