"""Every SIMD decode kernel in the built extension issues its software prefetches. GCC 12 drops
the prefetch of a baseline-ISA inline helper (csrc/cpu/decode.h) when an always-inline function
of an ISA target region inlines it, silently: the kernels stay correct and only lose the
prefetch that keeps pages scattered through the pool from costing a DRAM round trip each
(docs/building.md #14)."""
from __future__ import annotations

import platform
import re
import shutil
import subprocess

import pytest

import dms._C


@pytest.mark.skipif(platform.machine() != "x86_64", reason="reads x86-64 object code (prefetcht1)")
def test_every_simd_decode_kernel_prefetches():
    objdump = shutil.which("objdump")
    assert objdump, "objdump (binutils) is needed to read the extension's object code"
    asm = subprocess.run([objdump, "-d", "-C", "--no-show-raw-insn", dms._C.__file__], check=True,
                         capture_output=True, text=True).stdout
    kernels: dict[str, int] = {}
    name = None
    for line in asm.splitlines():
        head = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if head:
            name = head.group(1) if "decode_pieces_dim<" in head.group(1) else None
            if name:
                kernels[name] = 0
        elif name and "prefetcht1" in line:
            kernels[name] += 1
    assert kernels, "no decode_pieces_dim kernel found in the extension"
    assert all(kernels.values()), [k for k, n in kernels.items() if n == 0]
