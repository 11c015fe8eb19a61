"""After `make cuda-build`: load the CUDA-enabled library and check that it holds what it should.

Run from the build folder (where rope_ext/_C*.so was written). Without a GPU this
checks that the library loads against the CUDA build of torch, registers a CUDA
kernel for every op, and still computes on the CPU; and, in the compiled GPU code
(SASS, read with cuobjdump), that every kernel of the vector path writes x's output
16 bytes per store instruction (docs/kernels.md, "On CUDA").
"""

import glob
import os
import re
import shutil
import subprocess
import sys

import torch

so = glob.glob(os.path.join("rope_ext", "_C*.so"))
assert so, "no rope_ext/_C*.so in the current folder: run `make cuda-build` first"
torch.ops.load_library(so[0])

for op in ("apply", "apply_", "apply_qk", "apply_qk_"):
    name = f"rope::{op}"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA"), f"{name}: no CUDA kernel"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU"), f"{name}: no CPU kernel"

x = torch.randn(1, 3, 2, 4, dtype=torch.float64)
cos, sin = torch.ones(3, 2, dtype=torch.float64), torch.zeros(3, 2, dtype=torch.float64)
assert torch.equal(torch.ops.rope.apply(x, cos, sin), x), "position-0 rotation is not the identity"
print(f"cuda-build: {so[0]} loads with torch {torch.__version__} (CUDA {torch.version.cuda}); "
      f"CPU and CUDA kernels registered for all four ops; GPU present: {torch.cuda.is_available()}",
      file=sys.stderr)


def cuobjdump():
    """The CUDA toolkit's cuobjdump, else the copy the CUDA build of torch's triton carries."""
    for folder in (os.path.join(os.environ.get("CUDA_HOME", ""), "bin"), None):
        found = shutil.which("cuobjdump", path=folder)
        if found:
            return found
    try:
        import triton
    except ImportError:
        return None
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return bundled if os.path.exists(bundled) else None


# A kernel of the vector path: the rotation's or the fused norm's, N > 1 elements per access
# (the template argument N, mangled as Li<N>E; the fused norm's direction is Lb0E/Lb1E).
VECTOR_KERNEL = re.compile(r"(rope_kernel|rope_kernel_occupancy|norm_rope_kernel|"
                           r"norm_rope_forward_kernel_occupancy)I.*?Li(\d+)E")


def narrow_stores_of_vector_kernels(sass):
    """{mangled kernel: (stores under 16 bytes, stores of 16 bytes)} of the vector path."""
    counts, kernel = {}, None
    for line in sass.splitlines():
        if "Function :" in line:
            name = line.split("Function :")[1].strip()
            match = VECTOR_KERNEL.search(name)
            kernel = name if match and int(match.group(2)) > 1 else None
            if kernel:
                counts[kernel] = [0, 0]
        elif kernel and re.search(r"\bSTG\.", line):
            counts[kernel][1 if "STG.E.128" in line else 0] += 1
    return counts


tool = cuobjdump()
if tool is None:
    if os.environ.get("CI"):
        sys.exit("cuda-build: no cuobjdump (CUDA_HOME/bin or triton's) to read the GPU code with")
    print("cuda-build: no cuobjdump found; the check of the GPU code's stores was not run",
          file=sys.stderr)
else:
    sass = subprocess.run([tool, "-sass", so[0]], check=True, capture_output=True,
                          text=True).stdout
    counts = narrow_stores_of_vector_kernels(sass)
    bad = []
    for kernel, (narrow, wide) in counts.items():
        # The fused forward also stores one rstd value (4 or 8 bytes) per item.
        allowed = 1 if re.search(r"norm_rope_kernelILb0E|norm_rope_forward_kernel_occupancy",
                                 kernel) else 0
        if narrow > allowed or wide == 0:
            bad.append(f"{kernel}: {narrow} stores under 16 bytes, {wide} of 16")
    families = {VECTOR_KERNEL.search(k).group(1) for k in counts} | {
        "norm backward" for k in counts if "norm_rope_kernelILb1E" in k}
    assert {"rope_kernel", "norm_rope_kernel", "norm backward"} <= families, (
        f"cuda-build: the vector kernels were not found in the SASS ({sorted(families)})")
    assert not bad, "cuda-build: vector-path kernels that split their stores:\n" + "\n".join(bad)
    print(f"cuda-build: {len(counts)} vector-path kernels in the SASS; each writes x's output "
          "16 bytes per store", file=sys.stderr)
