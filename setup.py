"""Builds rope_ext._C against the torch installed in the current environment.

Install with `pip install --no-build-isolation .` (the Makefile does this):
an isolated build would compile against a freshly downloaded torch, and the
binary would then fail to load next to the torch you actually run.

The version carries the torch (and CUDA) the binary is built for as a PEP 440
local label: 0.1.0+torch2.13.cpu, 0.1.0+torch2.14.cu130 (see version() below);
`make wheel` builds such a wheel into dist/.

Knobs (environment variables):
  ROPE_EXT_CUDA=0/1     skip / require the CUDA kernel (default: built when the
                        installed torch is a CUDA build and nvcc is found)
  TORCH_CUDA_ARCH_LIST  GPU architectures (default "8.0;9.0": A100 and H100)
  ROPE_EXT_DEBUG=1      -O0 -g, for debuggers and sanitizers
  ROPE_EXT_SANITIZE=address,undefined   build with those sanitizers
  ROPE_EXT_CPU_ISAS=default,avx2   build only these CPU kernel variants (default: all
                        four on x86; `default` is always built). The GPU check uses it
                        to save build time; the CPU kernel picks among what was built.
  ROPE_EXT_JOBS=N       compile N sources at once (default: the number of CPUs)
"""

import glob
import os
import platform
import re
import threading
from concurrent.futures import ThreadPoolExecutor

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
    # The CUDA kernel's host executor: no contraction of a*b - c*d into an FMA, as the
    # device code is built with -fmad=false, so both do the same rounding steps.
    "rope_cuda_host.cpp": ["-ffp-contract=off"],
}
# The optional instruction-set variants, by the name ROPE_EXT_CPU_ISAS and
# ROPE_EXT_CPU_KERNEL use; each built one defines ROPE_EXT_HAVE_<NAME>.
ISA_FILES = {"avx2": "rope_cpu_avx2.cpp", "avx512": "rope_cpu_avx512.cpp",
             "avx512_bf16": "rope_cpu_avx512bf16.cpp"}
X86 = platform.machine().lower() in ("x86_64", "amd64")


def process_libstdcxx():
    """The libstdc++.so.6 this process runs (the one torch loaded): _C links against it by
    path, ahead of the driver's own -lstdc++.

    A libstdc++ linked statically into _C is a second copy beside the one torch uses; the
    two disagree on locale state, and the first number formatted into a stream (an error
    message) jumps into the wrong virtual function. Seen on the GPU machine's image (Ubuntu
    24.04, GCC 13, Python's LDSHARED with -Bsymbolic-functions): its build of _C needed no
    libstdc++.so and defined std::locale itself. With the shared library named on the link
    line, every C++ runtime symbol resolves to it and no archive member is pulled in."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            path = line.split()[-1]
            if "/libstdc++.so" in path and os.path.exists(path):
                return path
    return None


def want_cuda():
    forced = os.environ.get("ROPE_EXT_CUDA")
    if forced is not None:
        return forced == "1"
    import torch

    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def cpu_isas():
    """The optional CPU kernel variants to build (x86 only)."""
    if not X86:
        return []
    asked = os.environ.get("ROPE_EXT_CPU_ISAS")
    if asked is None:
        return list(ISA_FILES)
    names = [n.strip() for n in asked.split(",") if n.strip() and n.strip() != "default"]
    unknown = sorted(set(names) - set(ISA_FILES))
    if unknown:
        raise SystemExit(f"ROPE_EXT_CPU_ISAS: unknown {unknown}; choose from default, "
                         f"{', '.join(ISA_FILES)}")
    return names


def sources(cuda, isas):
    # The default-ISA kernel links first, so the linker keeps its copies of any
    # inline function the four kernel files share.
    cpu = ["csrc/cpu/rope_cpu_default.cpp"] + [f"csrc/cpu/{ISA_FILES[n]}" for n in isas]
    srcs = cpu + ["csrc/cpu/rope_cpu.cpp", "csrc/cuda/rope_cuda_host.cpp",
                  "csrc/rope_adapter.cpp", "csrc/norm_rope_adapter.cpp",
                  "csrc/rope_registration.cpp"]
    if cuda:
        srcs += sorted(glob.glob("csrc/cuda/*.cu"))
    return srcs


class BuildExt(cpp_extension.BuildExtension):
    """Adds the per-file flags (cpp_extension has only global ones) and compiles the
    sources in parallel. The per-file flags need the compiler's one-file hook, which
    only the non-ninja build calls (hence use_ninja=False below); that build compiles
    one file at a time, so `parallel_compile` runs the hook for all files at once."""

    def build_extension(self, ext):
        inner = self.compiler._compile
        compiler = self.compiler
        serial_compile = compiler.compile
        serial_class = compiler.__class__
        # cpp_extension compiles a .cu file by swapping compiler_so to nvcc and back:
        # with files compiled at once, each thread must see only its own swap.
        default_so = compiler.compiler_so
        local = threading.local()

        class ThreadLocalCompiler(serial_class):
            compiler_so = property(lambda self: getattr(local, "so", default_so),
                                   lambda self, value: setattr(local, "so", value))

        compiler.__dict__.pop("compiler_so", None)
        compiler.__class__ = ThreadLocalCompiler

        def parallel_compile(sources, output_dir=None, macros=None, include_dirs=None, debug=0,
                             extra_preargs=None, extra_postargs=None, depends=None):
            macros, objects, extra_postargs, pp_opts, build = compiler._setup_compile(
                output_dir, macros, include_dirs, sources, depends, extra_postargs)
            cc_args = compiler._get_cc_args(pp_opts, debug, extra_preargs)
            # Longest first: the CUDA file and the AVX-512 kernels decide the wall time.
            todo = sorted((o for o in objects if o in build),
                          key=lambda o: (not build[o][0].endswith(".cu"), "avx512" not in o))
            jobs = int(os.environ.get("ROPE_EXT_JOBS", os.cpu_count() or 1))
            with ThreadPoolExecutor(max(1, jobs)) as pool:
                for done in [pool.submit(compiler._compile, o, build[o][0], build[o][1], cc_args,
                                         extra_postargs, pp_opts) for o in todo]:
                    done.result()
            return objects

        def compile_one(obj, src, ext_, cc_args, extra_postargs, pp_opts):
            extra = ISA_FLAGS.get(os.path.basename(src))
            if extra:
                if isinstance(extra_postargs, dict):
                    extra_postargs = dict(extra_postargs, cxx=extra_postargs["cxx"] + extra)
                else:
                    extra_postargs = list(extra_postargs) + extra
            inner(obj, src, ext_, cc_args, extra_postargs, pp_opts)

        self.compiler._compile = compile_one
        self.compiler.compile = parallel_compile
        try:
            super().build_extension(ext)
            # Beside the library: in the source tree for an in-place or editable build
            # (where `import rope_ext` finds it), else in the build folder (-b, wheels).
            in_tree = getattr(self, "inplace", False) or getattr(self, "editable_mode", False)
            write_build_info(os.path.join(HERE, "rope_ext") if in_tree
                             else os.path.dirname(self.get_ext_fullpath(ext.name)))
        finally:
            self.compiler._compile = inner
            self.compiler.compile = serial_compile
            compiler.__class__ = serial_class
            compiler.compiler_so = default_so


def extension():
    cuda = want_cuda()
    debug = os.environ.get("ROPE_EXT_DEBUG") == "1"
    sanitize = os.environ.get("ROPE_EXT_SANITIZE")
    # The sanitizer build at -O0: a memory error is one at any level, and with UBSan's checks
    # the optimizer's work at -O1 is expensive (the host executor's file: 108 s to compile at
    # -O1, 25 s at -O0; the whole build, that file already at -O0: 307 CPU-s against 139),
    # while the sanitized suite ran only ~15% faster at -O1.
    opt = ["-O0", "-g"] if debug or sanitize else ["-O3"]
    # -fopenmp: at::parallel_for is serial without it.
    # No -std: cpp_extension picks the standard the installed torch needs (C++20 from 2.14).
    cxx = opt + ["-fopenmp", "-Wall", "-Wno-unused-function", "-Wno-unknown-pragmas",
           "-Wno-maybe-uninitialized"]  # false positives inside GCC's AVX-512 intrinsics
    isas = cpu_isas()
    cxx += [f"-DROPE_EXT_HAVE_{n.upper()}" for n in isas]
    link = ["-fopenmp"]
    libstdcxx = process_libstdcxx() if platform.system() == "Linux" else None
    if libstdcxx:
        link.append(libstdcxx)
    if sanitize:
        # Fatal on the first finding, so a test run cannot pass over one.
        cxx += [f"-fsanitize={sanitize}", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
        cxx += ["-DROPE_EXT_SANITIZE_BUILD"]  # see ROPE_HEAD_INLINE in csrc/cpu/rope_cpu_kernel.h
        link += [f"-fsanitize={sanitize}"]
    kwargs = dict(
        name="rope_ext._C",
        sources=sources(cuda, isas),
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={"cxx": cxx},
        extra_link_args=link,
    )
    if not cuda:
        return cpp_extension.CppExtension(**kwargs)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    # -fmad=false: no a*b - c*d contracted into an FMA, so the GPU rounds as the host
    # executor does and the two agree bit for bit (RoPE is bound by memory, not FLOPs).
    # --diag-error 20011/20014: a device function calling a host-only one is an error, not a
    # warning (the call would have no device code behind it).
    kwargs["extra_compile_args"]["nvcc"] = opt + [
        "--expt-relaxed-constexpr", "-lineinfo", "-fmad=false", "-Xcompiler", "-fopenmp",
        "--diag-error=20011,20014",
    ] + [f"-DROPE_EXT_HAVE_{n.upper()}" for n in isas]
    return cpp_extension.CUDAExtension(**kwargs)


def torch_release():
    """The installed torch's major.minor: the binary is built for that release alone (torch
    keeps no C++ ABI across releases, even where a library happens to load)."""
    import torch

    return ".".join(torch.__version__.split("+")[0].split(".")[:2])


def version():
    """rope_ext.__version__ plus the torch and CUDA the binary is built for, as a PEP 440
    local label: 0.1.0+torch2.13.cpu, 0.1.0+torch2.14.cu130 (cpu: no CUDA kernel built)."""
    import torch

    try:
        with open(os.path.join(HERE, "rope_ext", "__init__.py")) as f:
            public = re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)
    except FileNotFoundError:  # setup.py and csrc/ alone, for build_ext (.ci/gpu_check.sh)
        public = "0"
    cuda = torch.version.cuda if want_cuda() else None
    return f"{public}+torch{torch_release()}." + (f"cu{cuda.replace('.', '')}" if cuda else "cpu")


def write_build_info(folder):
    """_build_info.py beside the built library: the torch (and CUDA) it is built against,
    which the import error names next to the torch it finds (a binary loads only beside
    the torch it was built for)."""
    import torch

    cuda = torch.version.cuda if want_cuda() else None
    with open(os.path.join(folder, "_build_info.py"), "w") as f:
        f.write('"""Written by setup.py when it built _C."""\n\n'
                f"TORCH_VERSION = {torch.__version__!r}\nCUDA_VERSION = {cuda!r}\n")


setup(
    version=version(),
    # The torch release the binary is built for: pip keeps a wheel away from any other
    # (it cannot tell CUDA builds apart: the version's local label says which one).
    install_requires=[f"torch=={torch_release()}.*"],
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExt.with_options(use_ninja=False)},
)
