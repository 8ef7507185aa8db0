"""`python -m dms.vllm.serve DIR` (vLLM's server, what `vllm serve DIR` runs) with the plugin:
the OpenAI-compatible server on loopback answers N concurrent completion requests, each with
the greedy tokens of the transformers path."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import ASSETS, prompt_ids, reference_greedy

N_REQUESTS = 8
STARTUP_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    cmd = [sys.executable, "-m", "dms.vllm.serve", str(ASSETS / "dms-8x"), "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "float32", "--max-model-len", "1024", "--enforce-eager",
           "--kv-cache-memory-bytes", str(32 << 20), "--max-num-batched-tokens", "128", "--max-num-seqs", "16"]
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1")
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=str(log.parent))
    import urllib.request

    deadline = time.time() + STARTUP_S
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"vllm serve not healthy after {STARTUP_S} s:\n{log.read_text()[-4000:]}")
            time.sleep(1)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_concurrent_completions(server, tokenizer):
    from openai import OpenAI

    client = OpenAI(base_url=server, api_key="unused", timeout=120, max_retries=0)
    model = client.models.list().data[0].id
    ids = (prompt_ids(tokenizer) * 2)[:N_REQUESTS]

    def complete(prompt):
        r = client.completions.create(model=model, prompt=prompt, max_tokens=16, temperature=0.0,
                                      extra_body={"ignore_eos": True, "return_token_ids": True})
        return r.choices[0]

    with ThreadPoolExecutor(N_REQUESTS) as pool:
        answers = list(pool.map(complete, ids))
    assert len(answers) == N_REQUESTS
    ref = reference_greedy(ASSETS / "dms-8x", ids, 16)
    for choice, want in zip(answers, ref):
        assert choice.finish_reason == "length"
        assert list(choice.token_ids) == want
