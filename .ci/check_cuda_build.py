"""After `make cuda-build`: load the CUDA-enabled library and check that it holds what it should.

Run from the build folder (where rope_ext/_C*.so was written). Without a GPU this
checks that the library loads against the CUDA build of torch, registers a CUDA
kernel for every op, and still computes on the CPU.
"""

import glob
import os
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
