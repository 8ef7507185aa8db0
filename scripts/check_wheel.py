"""Runs in an environment where dms comes only from the built wheel: the operators load, from
`import dms` and, as another engine would, from the bare shared library."""
import glob
import os
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import torch

import dms

assert os.path.realpath(dms.__file__).startswith(os.path.realpath(sys.prefix)), (
    f"dms imported from {dms.__file__}, not from the wheel installed in {sys.prefix}")
assert "transformers" not in sys.modules, "import dms must not pull in transformers"
# Packaging: one version (dms.__version__ read by pyproject.toml), the licenses, the shipped models.
dist = metadata.distribution("dms-kv")
assert dist.version == dms.__version__, (dist.version, dms.__version__)
licenses = {Path(str(f)).name for f in dist.files if "licenses" in str(f)}
assert {"LICENSE", "NOTICE"} <= licenses, licenses
assert not any(r.startswith("matplotlib") and "extra ==" not in r for r in dist.requires or []), \
    "matplotlib must stay an extra"
for model in ("base", "dms-4x", "dms-8x"):
    assert (Path(dms.__file__).parent / "assets" / model / "model.safetensors").is_file(), model
print(f"check_wheel: dms-kv {dist.version}, licenses {sorted(licenses)}, shipped models present")
x = torch.randn(2, 5, 4, dtype=torch.bfloat16)
keep = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 0, 0, 1]], dtype=torch.bool)
packed, cu_seqlens, max_seqlen = torch.ops.dms.compact(x, keep)
assert torch.equal(packed, x[keep]) and cu_seqlens.tolist() == [0, 3, 4] and max_seqlen == 3
print(f"check_wheel: torch.ops.dms.compact ran from the wheel at {os.path.dirname(dms.__file__)}")

# Another engine: load the library by path, never importing the dms package.
lib = glob.glob(os.path.join(os.path.dirname(dms.__file__), "_C*.so"))[0]
code = textwrap.dedent(f"""
    import sys, torch
    torch.ops.load_library({lib!r})
    assert 'dms' not in sys.modules
    out = torch.ops.dms.scan_flags(torch.tensor([[0, 1, 1, 0]], dtype=torch.bool), None, 0)
    assert out[0].tolist() == [[False, False, True, True]], out
    print('check_wheel: torch.ops.load_library + torch.ops.dms.scan_flags ran without importing dms')
""")
subprocess.run([sys.executable, "-c", code], check=True, cwd="/")
