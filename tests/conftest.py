"""Shared fixtures and helpers: the device an op or model test runs on (CPU, plus CUDA when
available; modules named *_cuda.py are collected only there), tiny DMS models of the four
architectures with evictions forced often, the dense oracle (a model forward without cache whose visibility mask comes from
dms.reference.visibility_mask), an empty paged store, and a folder of tiny models laid out like
dms/assets."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest
import torch

from dms.models.tiny import ARCHS

VARIANTS = ("neuron", "adapter")

# CUDA joins only where it exists, so a CPU-only run shows no skips.
DEVICES = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
# Modules named *_cuda.py exercise GPU-only code paths: collected only where CUDA is available.
collect_ignore_glob = [] if torch.cuda.is_available() else ["*_cuda.py"]


@pytest.fixture(params=DEVICES, scope="session")
def device(request):
    """The device an op or model test runs on (session scope, so hypothesis tests can take it)."""
    return torch.device(request.param)


def on(device, tensors):
    """The tensors (e.g. left_padded's ids and mask) moved to ``device``, as a tuple."""
    return tuple(t.to(device) for t in tensors)


def forced_dms_model(arch: str, variant: str = "neuron", window: int = 3, seed: int = 0, **dms_kwargs):
    """A tiny DMS model whose decisions evict about half of the tokens, with margins far from
    the threshold so that fp32 rounding cannot flip a decision between code paths."""
    import dms
    from dms.models.tiny import tiny_model

    model = tiny_model(arch, seed=seed)
    dms.apply(model, dms_window_size=window, dms_separate_alpha=(variant == "adapter"), **dms_kwargs)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            if variant == "adapter":
                w = attn.dms_proj_alpha.weight
                w.copy_(torch.randn(w.shape, generator=gen) * 0.3)
                attn.dms_proj_alpha.bias.fill_(0.05)
            else:
                D = attn.head_dim
                rows = attn.q_proj.weight.view(-1, D, attn.q_proj.weight.shape[1])[:, -1]
                rows.copy_(torch.randn(rows.shape, generator=gen) * 0.5)
    return model


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


@pytest.fixture
def dense_oracle(monkeypatch):
    """Returns f(model, ids, mask) -> logits of a cache-free forward that uses the reference mask."""
    import dms.attention.layer as layer
    from dms import reference

    monkeypatch.setattr(layer, "visibility_mask", reference.visibility_mask)

    def run(model, ids, mask=None):
        # Positions as generate() derives them: pads (also in the middle, multi-turn) take none.
        pos = None if mask is None else (mask.long().cumsum(-1) - 1).clamp_min(0)
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits

    return run


def left_padded(lengths, vocab: int = 128, pad: int = 0, seed: int = 0):
    """(input_ids, attention_mask) of random prompts with the given lengths, left padded."""
    gen = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.full((len(lengths), T), pad, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, T - n:] = torch.randint(3, vocab, (n,), generator=gen)
        mask[b, T - n:] = 1
    return ids, mask


def new_store(S, P, page_size, max_pages, window, D, dtype=torch.float32, seed=0, device="cpu"):
    """An empty dms.store.PagedStore with a shuffled free list (so page order matters)."""
    from dms.store import PagedStore

    return PagedStore.empty(S, D, window=window, page_size=page_size, pages=P, table_width=max_pages, dtype=dtype,
                            device=device, generator=torch.Generator().manual_seed(seed))


TINY_WINDOWS = {4: 24, 8: 12}


def tiny_model_dir(root, seed: int = 0) -> dict:
    """Writes root/base (random tiny Qwen3 + the dms.tasks tokenizer) and root/dms-4x, root/dms-8x
    (the same weights with a DMS adapter that evicts everything leaving its window)."""
    import dms
    from dms.models.tiny import tiny_model
    from dms.tasks.tokenizer import save_tokenizer

    tok = save_tokenizer(root / "base")
    ids = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id)
    tiny_model("qwen3", seed=seed, **ids).save_pretrained(root / "base")
    paths = {"base": root / "base"}
    for ratio, window in TINY_WINDOWS.items():
        model = tiny_model("qwen3", seed=seed, **ids)
        dms.apply(model, dms_window_size=window, dms_separate_alpha=True)
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.dms_proj_alpha.bias.fill_(1.0)  # logit 100 - 5 > 0: always evict
        folder = root / f"dms-{ratio}x"
        model.save_pretrained(folder)
        save_tokenizer(folder)
        paths[ratio] = folder
    return paths


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(script, args, nproc: int = 2, timeout: float = 240, env=None) -> tuple[int, str]:
    """Runs ``script args...`` as ``nproc`` torchrun processes on 127.0.0.1 with 1 thread each;
    returns (exit code, stderr). Launched in its own session, so a hang kills the launcher and
    its workers, not just the launcher."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(script), *map(str, args)]
    proc = subprocess.Popen(cmd, env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return proc.returncode, stderr
