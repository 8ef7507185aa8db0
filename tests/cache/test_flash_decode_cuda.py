"""The flash-attn decode branch of the paged store (CUDA, fp16/bf16, pages of 256 tokens):
against dms/reference.py, and a DMS model decoding through it against the ops kernel.
Collected only where CUDA is available; skipped there when flash_attn is not installed."""
import pytest
import torch

import dms
import dms.store
from conftest import forced_dms_model, left_padded, new_store, on
from dms import reference as ref
from dms.compat import cache_kwargs

if not torch.cuda.is_available():  # only reached when this file is named on the command line
    pytest.skip("needs a CUDA device", allow_module_level=True)
CUDA = torch.device("cuda")
PAGE = 256  # flash_attn's paged kernel needs pages of a multiple of 256 tokens


@pytest.fixture(autouse=True)
def flash_attn():
    return pytest.importorskip("flash_attn")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_flash_decode_matches_reference(dtype, monkeypatch):
    S, G, D, window = 4, 4, 64, 16
    gen = torch.Generator().manual_seed(0)
    store = new_store(S, 16, PAGE, 4, window, D, dtype, device=CUDA)
    for T in (300, 1, 1, 200, 1):  # prefill-sized chunks and decode steps, evicting half
        k, v = torch.randn(S, T, D, generator=gen).to(dtype), torch.randn(S, T, D, generator=gen).to(dtype)
        store.append(k.to(CUDA), v.to(CUDA), (torch.rand(S, T, generator=gen) < 0.5).to(CUDA))
    q = torch.randn(S, G, D, generator=gen).to(dtype)
    called = []
    real = dms.store.flash_attn_with_kvcache
    monkeypatch.setattr(dms.store, "flash_attn_with_kvcache", lambda *a, **kw: called.append(1) or real(*a, **kw))
    got = store.decode_attention(q.to(CUDA), 0.125)
    assert called, "the flash-attn branch was not taken"
    cpu = [t.cpu() for t in (store.k_pages, store.v_pages, store.block_table, store.seq_lens)]
    want = ref.paged_decode_attention(q, *cpu, 0.125)
    torch.testing.assert_close(got.cpu(), want, atol=2e-2, rtol=2e-2)


def test_model_decode_through_flash_matches_ops_kernel(monkeypatch):
    model = forced_dms_model("qwen3", "adapter", window=8).to(CUDA, torch.bfloat16)
    ids, mask = on(CUDA, left_padded([20, 31], seed=2))

    def generate():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False,
                             **cache_kwargs(dms.DMSCache(model, page_size=PAGE)), return_dict_in_generate=True,
                             output_logits=True, pad_token_id=0, eos_token_id=None)
        return torch.stack(out.logits, 1).float()

    flash = generate()
    monkeypatch.setattr(dms.store, "flash_attn_with_kvcache", None)
    torch.testing.assert_close(flash, generate(), atol=5e-2, rtol=5e-2)
