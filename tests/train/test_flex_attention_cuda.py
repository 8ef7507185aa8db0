"""The compiled FlexAttention training path (the default on CUDA) against the chunked path:
same noise, same outputs, decisions and gradients. Collected only where CUDA is available."""
import pytest
import torch

from dms.attention.training import train_attention

if not torch.cuda.is_available():  # only reached when this file is named on the command line
    pytest.skip("needs a CUDA device", allow_module_level=True)
CUDA = torch.device("cuda")


@pytest.mark.parametrize("padded", [False, True])
def test_flex_matches_chunked(padded):
    B, Hq, Hkv, T, D, window = 2, 8, 2, 200, 64, 16
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, h, T, D, generator=gen) for h in (Hq, Hkv, Hkv))
    logits = torch.randn(B, Hkv, T, generator=gen) * 3
    padding = None
    if padded:
        padding = torch.ones(B, T, dtype=torch.bool)
        padding[1, :37] = False

    def run(backend, device):
        leaves = [t.to(device).requires_grad_() for t in (q, k, v, logits)]
        out, hard, probs = train_attention(*leaves, window=window, tau=0.1, scale=D ** -0.5,
                                           padding_mask=None if padding is None else padding.to(device),
                                           generator=torch.Generator(device=device).manual_seed(1), backend=backend)
        (out.square().sum() + hard.sum()).backward()
        return [t.detach().cpu() for t in (out, hard, probs, *(x.grad for x in leaves))]

    flex = run("auto", CUDA)  # "auto" picks the compiled FlexAttention on CUDA
    for got, want in zip(flex, run("chunked", CUDA)):
        torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)
