"""Builds the extension `dms._C` (every kernel + the op registration); the package's metadata,
dependencies and version live in pyproject.toml.

CUDA kernels are compiled when a CUDA toolkit and a CUDA build of torch are present;
DMS_BUILD_CUDA=0/1 forces the choice. Never decided by torch.cuda.is_available():
build machines need not have a GPU (docs/building.md #5).
"""
import glob
import os

# Must be set before torch.utils.cpp_extension is imported (docs/building.md #1, #2).
if os.path.isdir("/usr/local/cuda"):
    os.environ.setdefault("CUDA_HOME", "/usr/local/cuda")
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

import torch  # noqa: E402
from setuptools import setup  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def build_cuda() -> bool:
    forced = os.environ.get("DMS_BUILD_CUDA")
    if forced is not None:
        return forced == "1"
    return CUDA_HOME is not None and torch.version.cuda is not None


def extension():
    with_cuda = build_cuda()
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # -fopenmp: at::parallel_for is inline and runs its whole range on the calling thread unless
    # the including file is compiled with OpenMP (libgomp.so.1 resolves to the copy torch loaded).
    cxx = ["-O3", "-std=c++20", "-fopenmp", f"-DDMS_WITH_CUDA={int(with_cuda)}"]
    include_dirs = [os.path.join(HERE, "csrc", "include")]
    link = ["-fopenmp"]
    if not with_cuda:
        return CppExtension("dms._C", sources, include_dirs=include_dirs,
                            extra_compile_args={"cxx": cxx}, extra_link_args=link)
    # torch's CUDA headers want cusparse.h & co., shipped by pip's nvidia packages (docs/building.md #4).
    nvidia_include = os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", "cu13", "include")
    if os.path.isdir(nvidia_include):
        include_dirs.append(os.path.abspath(nvidia_include))
    nvcc = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", f"-DDMS_WITH_CUDA=1"]
    return CUDAExtension("dms._C", sources + sorted(glob.glob("csrc/cuda/*.cu")),
                         include_dirs=include_dirs,
                         extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=link)


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
