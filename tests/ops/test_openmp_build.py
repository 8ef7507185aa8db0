"""The compiled ops are built with OpenMP. Without it at::parallel_for (an inline template) runs
every range on the calling thread while at::get_num_threads() still reports torch's count, so
nothing fails and every CPU op is silently single-threaded (docs/building.md #13). Linking with
-fopenmp is what records libgomp as a dependency of the library."""
from __future__ import annotations

import shutil
import subprocess

import dms._C


def test_the_extension_links_the_openmp_runtime():
    readelf = shutil.which("readelf")
    assert readelf, "readelf (binutils) is needed to read the extension's dependencies"
    dynamic = subprocess.run([readelf, "-d", dms._C.__file__], check=True, capture_output=True, text=True).stdout
    needed = [line.split("[", 1)[1].rstrip("]") for line in dynamic.splitlines() if "(NEEDED)" in line]
    assert "libgomp.so.1" in needed, needed
