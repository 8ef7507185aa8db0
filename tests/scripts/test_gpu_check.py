"""scripts/gpu_check.sh refuses in one line when torch sees no GPU (CUDA_VISIBLE_DEVICES="" hides
any GPU, so this holds on every machine)."""
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.sh"


def test_refuses_without_a_gpu():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr == ("gpu_check.sh: no CUDA device visible to torch (torch.cuda.is_available() is False); "
                           "run it on a machine with a GPU\n")
