"""After a build: the extension imports, every operator has its CPU kernel (and its CUDA kernel
when CUDA was compiled), and the build log shows every csrc/cuda/*.cu going through nvcc.

usage: python scripts/check_build.py REPO_ROOT
"""
import os
import re
import sys
from pathlib import Path

import torch

import dms

OPS = ("scan_flags", "compact", "append", "paged_decode_attention", "gather_varlen")


def main(root: Path) -> int:
    problems = []
    keys = ["CPU"] + (["CUDA"] if dms.cuda_compiled else [])
    for op in OPS:
        for key in keys:
            if not torch._C._dispatch_has_kernel_for_dispatch_key(f"dms::{op}", key):
                problems.append(f"dms::{op} has no {key} kernel")
    print(f"check_build: {dms.library_path()} (CUDA kernels compiled: {dms.cuda_compiled})")

    cuda_expected = os.environ.get("DMS_BUILD_CUDA", "1" if os.environ.get("CUDA_HOME") else "0") == "1"
    if cuda_expected:
        if not dms.cuda_compiled:
            problems.append("a CUDA toolkit is set up (CUDA_HOME) but the CUDA kernels were not compiled")
        log = (root / "build-extension.log").read_text(errors="replace")
        nvcc_lines = [line for line in log.splitlines() if re.search(r"\bnvcc\b", line)]
        for cu in sorted((root / "csrc" / "cuda").glob("*.cu")):
            if any(f"csrc/cuda/{cu.name}" in line for line in nvcc_lines):
                print(f"check_build: nvcc compiled csrc/cuda/{cu.name}")
            else:
                problems.append(f"csrc/cuda/{cu.name} does not appear in an nvcc command of build-extension.log")
    for p in problems:
        print(f"check_build: FAIL: {p}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else ".").resolve()))
