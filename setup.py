"""Builds rope_ext._C against the torch installed in the current environment.

Install with `pip install --no-build-isolation .` (the Makefile does this):
an isolated build would compile against a freshly downloaded torch, and the
binary would then fail to load next to the torch you actually run.

Knobs (environment variables):
  ROPE_EXT_CUDA=0/1     skip / require the CUDA kernel (default: built when the
                        installed torch is a CUDA build and nvcc is found)
  TORCH_CUDA_ARCH_LIST  GPU architectures (default "8.0;9.0": A100 and H100)
  ROPE_EXT_DEBUG=1      -O0 -g, for debuggers and sanitizers
  ROPE_EXT_SANITIZE=address,undefined   build with those sanitizers
"""

import glob
import os
import platform

from setuptools import setup
from torch.utils import cpp_extension

HERE = os.path.dirname(os.path.abspath(__file__))

# The CPU kernel file of each instruction set gets the macros that select
# ATen's vector implementation and the -m flags that let the compiler emit it.
ISA_FLAGS = {
    "rope_cpu_default.cpp": ["-DCPU_CAPABILITY=DEFAULT"],
    "rope_cpu_avx2.cpp": ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2",
                          "-mavx2", "-mfma", "-mf16c"],
    "rope_cpu_avx512.cpp": ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512",
                            "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq",
                            "-mfma", "-mf16c"],
    # ATen's AVX-512 vectors, plus the native float -> bf16 rounding (ROPE_NATIVE_BF16).
    "rope_cpu_avx512bf16.cpp": ["-DCPU_CAPABILITY=AVX512_BF16", "-DCPU_CAPABILITY_AVX512",
                                "-DROPE_NATIVE_BF16", "-mavx512f", "-mavx512bw", "-mavx512vl",
                                "-mavx512dq", "-mavx512bf16", "-mfma", "-mf16c"],
}
X86 = platform.machine().lower() in ("x86_64", "amd64")


def want_cuda():
    forced = os.environ.get("ROPE_EXT_CUDA")
    if forced is not None:
        return forced == "1"
    import torch

    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def sources(cuda):
    # The default-ISA kernel links first, so the linker keeps its copies of any
    # inline function the three kernel files share.
    cpu = ["csrc/cpu/rope_cpu_default.cpp"]
    if X86:
        cpu += ["csrc/cpu/rope_cpu_avx2.cpp", "csrc/cpu/rope_cpu_avx512.cpp",
                "csrc/cpu/rope_cpu_avx512bf16.cpp"]
    srcs = cpu + ["csrc/cpu/rope_cpu.cpp", "csrc/rope_problem.cpp", "csrc/rope_ops.cpp"]
    if cuda:
        srcs += sorted(glob.glob("csrc/cuda/*.cu"))
    return srcs


class BuildExt(cpp_extension.BuildExtension):
    """Adds the per-file instruction-set flags (cpp_extension has only global ones)."""

    def build_extension(self, ext):
        inner = self.compiler._compile

        def compile_one(obj, src, ext_, cc_args, extra_postargs, pp_opts):
            extra = ISA_FLAGS.get(os.path.basename(src))
            if extra:
                if isinstance(extra_postargs, dict):
                    extra_postargs = dict(extra_postargs, cxx=extra_postargs["cxx"] + extra)
                else:
                    extra_postargs = list(extra_postargs) + extra
            inner(obj, src, ext_, cc_args, extra_postargs, pp_opts)

        self.compiler._compile = compile_one
        try:
            super().build_extension(ext)
        finally:
            self.compiler._compile = inner


def extension():
    cuda = want_cuda()
    debug = os.environ.get("ROPE_EXT_DEBUG") == "1"
    sanitize = os.environ.get("ROPE_EXT_SANITIZE")
    opt = ["-O0", "-g"] if debug else ["-O1", "-g"] if sanitize else ["-O3"]
    # -fopenmp: at::parallel_for is serial without it.
    # No -std: cpp_extension picks the standard the installed torch needs (C++20 from 2.14).
    cxx = opt + ["-fopenmp", "-Wall", "-Wno-unused-function", "-Wno-unknown-pragmas",
           "-Wno-maybe-uninitialized"]  # false positives inside GCC's AVX-512 intrinsics
    link = ["-fopenmp"]
    if sanitize:
        # Fatal on the first finding, so a test run cannot pass over one.
        cxx += [f"-fsanitize={sanitize}", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
        link += [f"-fsanitize={sanitize}"]
    kwargs = dict(
        name="rope_ext._C",
        sources=sources(cuda),
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={"cxx": cxx},
        extra_link_args=link,
    )
    if not cuda:
        return cpp_extension.CppExtension(**kwargs)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    kwargs["extra_compile_args"]["nvcc"] = opt + [
        "--expt-relaxed-constexpr", "-lineinfo", "-Xcompiler", "-fopenmp",
    ]
    return cpp_extension.CUDAExtension(**kwargs)


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExt.with_options(use_ninja=False)},
)
