"""Builds the `dms` package and its extension `dms._C` (every kernel + the op registration).

CUDA kernels are compiled when a CUDA toolkit and a CUDA build of torch are present;
DMS_BUILD_CUDA=0/1 forces the choice. Never decided by torch.cuda.is_available():
build machines need not have a GPU (BUILD-NOTES.md #5).
"""
import glob
import os

# Must be set before torch.utils.cpp_extension is imported (BUILD-NOTES.md #1, #2).
if os.path.isdir("/usr/local/cuda"):
    os.environ.setdefault("CUDA_HOME", "/usr/local/cuda")
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

import torch  # noqa: E402
from setuptools import find_packages, setup  # noqa: E402
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
    cxx = ["-O3", "-std=c++20", f"-DDMS_WITH_CUDA={int(with_cuda)}"]
    include_dirs = [os.path.join(HERE, "csrc", "include")]
    if not with_cuda:
        return CppExtension("dms._C", sources, include_dirs=include_dirs,
                            extra_compile_args={"cxx": cxx})
    # torch's CUDA headers want cusparse.h & co., shipped by pip's nvidia packages (BUILD-NOTES #4).
    nvidia_include = os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", "cu13", "include")
    if os.path.isdir(nvidia_include):
        include_dirs.append(os.path.abspath(nvidia_include))
    nvcc = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", f"-DDMS_WITH_CUDA=1"]
    return CUDAExtension("dms._C", sources + sorted(glob.glob("csrc/cuda/*.cu")),
                         include_dirs=include_dirs,
                         extra_compile_args={"cxx": cxx, "nvcc": nvcc})


setup(
    # "dms" on PyPI is an unrelated project (BUILD-NOTES.md #12); the import name stays dms.
    name="dms-kv",
    version="0.1.0",
    description="Dynamic Memory Sparsification: learned, delayed KV-cache eviction for LLM inference",
    packages=find_packages(include=["dms", "dms.*"]),
    package_data={"dms": ["assets/**/*"]},
    include_package_data=True,
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
    install_requires=["torch>=2.6", "transformers>=5.0", "safetensors", "tokenizers", "tqdm", "numpy",
                      "matplotlib"],
    extras_require={"test": ["pytest", "hypothesis"]},
    entry_points={"console_scripts": ["dms=dms.cli:main"]},
)
