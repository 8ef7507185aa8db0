"""The CUDA append kernel against dms/reference.py (collected only where CUDA is available; the
other four ops run on CUDA through the device parameter of test_ops.py)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dms  # noqa: F401  (loads the ops)
from conftest import new_store
from dms import reference as ref
from dms.store import FIELDS

if not torch.cuda.is_available():  # only reached when this file is named on the command line
    pytest.skip("needs a CUDA device", allow_module_level=True)
CUDA = torch.device("cuda")
BOUNDED = settings(max_examples=40, deadline=None, derandomize=True)


def assert_same(cuda_store, cpu_store):
    for key in FIELDS:
        assert torch.equal(getattr(cuda_store, key).cpu(), getattr(cpu_store, key)), key


@BOUNDED
@given(S=st.integers(1, 8), page_size=st.sampled_from([1, 2, 5, 16]), window=st.sampled_from([0, 1, 3, 50]),
       chunks=st.lists(st.integers(1, 40), min_size=1, max_size=5), p=st.floats(0, 1), masked=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), seed=st.integers(0, 2**16))
def test_cuda_append_matches_reference(S, page_size, window, chunks, p, masked, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    D = 8
    pages, width = 2 * S * sum(chunks) // page_size + S, sum(chunks) // page_size + 1
    got = new_store(S, pages, page_size, width, window, D, dtype, seed, device=CUDA)
    want = new_store(S, pages, page_size, width, window, D, dtype, seed)
    for T in chunks:
        k = torch.randn(S, T, D, generator=gen).to(dtype)
        v = torch.randn(S, T, D, generator=gen).to(dtype)
        decisions = torch.rand(S, T, generator=gen) < p
        valid = torch.rand(S, T, generator=gen) < 0.7 if masked else None
        got.append(k.to(CUDA), v.to(CUDA), decisions.to(CUDA), None if valid is None else valid.to(CUDA))
        want.append(k, v, decisions, valid, op=ref.append)
        assert_same(got, want)


def test_cuda_decode_stream_matches_reference():
    """Hundreds of one-token steps (the decode path), slots reused as flagged tokens leave the window."""
    S, D, window, steps = 6, 16, 4, 400
    gen = torch.Generator().manual_seed(0)
    got = new_store(S, 160, 8, 64, window, D, seed=1, device=CUDA)
    want = new_store(S, 160, 8, 64, window, D, seed=1)
    for _ in range(steps):
        k, v = torch.randn(S, 1, D, generator=gen), torch.randn(S, 1, D, generator=gen)
        decisions = torch.rand(S, 1, generator=gen) < 0.8
        got.append(k.to(CUDA), v.to(CUDA), decisions.to(CUDA))
        want.append(k, v, decisions, op=ref.append)
    assert_same(got, want)
    assert int(want.seq_lens.max()) < steps // 2, "evictions must have reused slots"
