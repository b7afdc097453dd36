"""Builds the one extension, ``fastdl._C``.

* CPU kernels (``csrc/cpu/*.cpp``) are always compiled.
* CUDA kernels (``csrc/cuda/*.cu`` and their torch glue ``csrc/cuda/*.cpp``) are compiled when torch is
  a CUDA build and nvcc is found. No GPU is needed, so wheels can be built on CPU-only builders.
  ``FASTDL_CUDA=1`` forces them (and fails loudly if that is impossible), ``FASTDL_CUDA=0`` skips them.
  ``TORCH_CUDA_ARCH_LIST`` picks the architectures (default ``8.0;9.0+PTX``); ``MAX_JOBS`` bounds the
  parallel compile jobs (both read by torch.utils.cpp_extension).

Nothing here uses ``-march=native``: a wheel must run on any x86-64 CPU. The CPU kernels pick their
instruction set at run time instead (see ``csrc/cpu/isa.h``).
"""
import glob
import os
import shutil

from setuptools import setup

from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    flag = os.environ.get("FASTDL_CUDA", "").strip()
    nvcc = cpp_extension.CUDA_HOME is not None and (
        shutil.which("nvcc") is not None or os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc"))
    )
    torch_has_cuda = cpp_extension.torch.version.cuda is not None
    if flag == "0":
        return False
    if flag == "1":
        if not torch_has_cuda:
            raise RuntimeError("FASTDL_CUDA=1 but this torch is a CPU-only build; install a CUDA build of torch")
        if not nvcc:
            raise RuntimeError("FASTDL_CUDA=1 but nvcc was not found; set CUDA_HOME or put nvcc on PATH")
        return True
    if flag:
        raise RuntimeError(f"FASTDL_CUDA must be 0 or 1, got {flag!r}")
    return torch_has_cuda and nvcc


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _extension():
    with_cuda = _want_cuda()
    # -fno-math-errno -fno-trapping-math: lets GCC if-convert and vectorize loops with selects and math
    # calls; NaN and Inf still behave as IEEE says (this is not -ffast-math).
    # -fopenmp: at::parallel_for is an OpenMP loop compiled into our own code; torch ships libgomp.so.1,
    # which the loader reuses for us, so both share one thread pool.
    # -Wno-psabi: the per-ISA kernels (csrc/cpu/isa.h) pass AVX vectors between always_inline functions that
    # are inlined into code compiled for that ISA; GCC still notes the ABI such a call would have otherwise.
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-Wno-psabi"]
    sources = ["csrc/module.cpp"] + _sources("csrc/cpu/*.cpp")
    if not with_cuda:
        return cpp_extension.CppExtension(
            "fastdl._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"]
        )
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    sources += _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/*.cpp")
    return cpp_extension.CUDAExtension(
        "fastdl._C",
        sources,
        define_macros=[("FASTDL_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17", "-lineinfo"]},
        extra_link_args=["-fopenmp"],
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
)
