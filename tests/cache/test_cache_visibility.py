"""What the DMS cache lets each query see, across prefill chunks and decode steps, against
dms.reference.visibility_mask of the whole row. The visibility is read off the attention output:
keys are zero (every visible key gets the same weight) and the value of token j is the one-hot
vector e_j, so output[q, j] > 0 iff query q saw token j."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dms import reference as ref
from dms.cache import DMSLayer

BOUNDED = settings(max_examples=60, deadline=None, derandomize=True)


@BOUNDED
@given(S=st.integers(1, 3), chunks=st.lists(st.integers(1, 9), min_size=1, max_size=6),
       window=st.sampled_from([0, 1, 2, 5, 64]), page_size=st.sampled_from([1, 3, 16]),
       prefill_chunk=st.sampled_from([1, 4, 64]), p=st.floats(0, 1), pads=st.booleans(), seed=st.integers(0, 2**16))
def test_cache_visibility_matches_reference(device, S, chunks, window, page_size, prefill_chunk, p, pads, seed):
    gen = torch.Generator().manual_seed(seed)
    T = sum(chunks)
    decisions = torch.rand(S, T, generator=gen) < p
    valid = torch.ones(S, T, dtype=torch.bool)
    if pads:  # left padding, and pads later in the row (a multi-turn history)
        valid = (torch.arange(T)[None] >= torch.randint(0, T + 1, (S, 1), generator=gen)) & (
            torch.rand(S, T, generator=gen) < 0.8)
    want = ref.visibility_mask(decisions, window, valid)
    values = torch.eye(T).expand(S, T, T)
    layer = DMSLayer(window, page_size=page_size)
    a = 0
    for n in chunks:
        b = a + n
        q = torch.zeros(S, 1, n, T)
        out = layer.attend(q.to(device), torch.zeros(S, n, T, device=device), values[:, a:b].contiguous().to(device),
                           decisions[:, a:b].to(device), valid[:, a:b].to(device), 1.0, prefill_chunk)
        seen = out[:, 0].cpu() > 0.5 / T
        real = valid[:, a:b]  # a pad query's output is not defined
        assert torch.equal(seen[real], want[:, a:b][real]), (a, b)
        a = b
