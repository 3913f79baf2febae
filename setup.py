"""Build rcl_kernels._C (C++ CPU kernels, plus CUDA kernels when they can be built) and install the
rcl_kernels package together with the rcl_train harness.

Build with the PyTorch you run with, without build isolation, so pip never fetches a second
(multi-GB CUDA) PyTorch into a temporary build environment:

    pip install --no-build-isolation -e .

CUDA sources (csrc/cuda/*.cu) are compiled when a CUDA toolkit is found and the installed PyTorch
is a CUDA build. RCL_KERNELS_CUDA=1 forces them (the build fails loudly without nvcc), and
RCL_KERNELS_CUDA=0 skips them. Architectures come from TORCH_CUDA_ARCH_LIST (default
DEFAULT_CUDA_ARCHS: native code for A100, H100/H200, B200 and the RTX 50 series, plus PTX of the
newest, which the driver compiles for any later GPU).

Every build records the torch it compiled against in rcl_kernels/_build_info.json; the package
refuses to import under another torch major.minor (rcl_kernels/_version.py).
"""

import glob
import json
import os

from setuptools import setup

from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0;10.0;12.0+PTX"
BUILD_INFO = os.path.join(ROOT, "rcl_kernels", "_build_info.json")


def cuda_build_requested() -> bool:
    """Decide whether to compile the CUDA sources (see the module docstring)."""
    switch = os.environ.get("RCL_KERNELS_CUDA", "").strip().lower()
    if switch in ("1", "true", "yes", "on"):
        return True
    if switch in ("0", "false", "no", "off"):
        return False
    if switch:
        raise ValueError(f"RCL_KERNELS_CUDA must be 0 or 1 (or unset for auto), got {switch!r}")
    import torch

    return cpp_extension.CUDA_HOME is not None and torch.version.cuda is not None


def relative_sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def make_extension():
    sources = (relative_sources("csrc/*.cpp") + relative_sources("csrc/tiled/*.cpp")
               + relative_sources("csrc/cpu/*.cpp"))
    # -fopenmp: at::parallel_for is header code; without it the CPU kernel runs on one thread.
    # C++20: the headers of torch 2.14 refuse anything older (2.11-2.13 accept it).
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp"]
    link_flags = ["-fopenmp"]
    include_dirs = [os.path.join(ROOT, "csrc")]  # the sources include "tiled/...", "cuda/..."
    if not cuda_build_requested():
        return cpp_extension.CppExtension(
            "rcl_kernels._C", sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags,
        )
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    sources += relative_sources("csrc/cuda/*.cu") + relative_sources("csrc/cuda/*.cpp")
    nvcc_flags = ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo"]
    return cpp_extension.CUDAExtension(
        "rcl_kernels._C",
        sources,
        include_dirs=include_dirs,
        define_macros=[("RCL_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=link_flags,
    )


def write_build_info(cuda: bool) -> None:
    """rcl_kernels/_build_info.json: the torch this build compiles against (package data, so it
    travels in the wheel; git-ignored, and left out of the sdist, whose builds write their own)."""
    import torch

    info = {"torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "cuda_kernels": cuda,
            "cuda_archs": os.environ["TORCH_CUDA_ARCH_LIST"] if cuda else None}
    with open(BUILD_INFO, "w") as f:
        json.dump(info, f, indent=1)


extension = make_extension()
write_build_info(cuda=("RCL_WITH_CUDA", "1") in extension.define_macros)
setup(
    ext_modules=[extension],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
