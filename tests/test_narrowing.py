"""The CPU kernels' float32 -> bf16/fp16 rounding against ATen's, bit for bit.

Each instruction-set variant rounds its stores its own way: ATen's vector conversion,
(AVX-512-BF16, bf16) the processor's own instruction, which flushes subnormal inputs
where ATen rounds them, or (AVX2, bf16) rope_ext's own integer rounding on 16-bit halves
with ATen's conversion for blocks holding a NaN. Where the rounding is rope_ext's own, every one of the
2**32 float32 bit patterns is checked; where it is ATen's own code, a sample covering
every exponent. NaN must stay NaN (its payload may differ).
"""

import pytest
import torch

import rope_ext  # noqa: F401  (loads the ops)

testing = torch.ops.rope_testing
CHUNK = 1 << 26
# (variant, dtype) pairs whose rounding is not ATen's conversion itself.
OWN_ROUNDING = {("avx512_bf16", torch.bfloat16), ("avx512", torch.bfloat16), ("avx2", torch.bfloat16)}
ISAS = ["default", "avx2", "avx512", "avx512_bf16"]


def _check(bits, dtype, isa):
    x = bits.view(torch.float32)
    ours = testing.narrow_as_stored(x, dtype)
    theirs = x.to(dtype)
    if torch.equal(ours.view(torch.int16), theirs.view(torch.int16)):
        return
    bad = ~((ours.view(torch.int16) == theirs.view(torch.int16)) | (ours.isnan() & theirs.isnan()))
    if bad.any():
        i = int(bad.nonzero()[0])
        raise AssertionError(
            f"{isa}: {int(bad.sum())} float32 patterns round differently to {dtype}; first: bits "
            f"{int(bits[i]) & 0xffffffff:#010x} -> ours {int(ours.view(torch.int16)[i]) & 0xffff:#06x}, "
            f"ATen {int(theirs.view(torch.int16)[i]) & 0xffff:#06x}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("isa", ISAS)
def test_rounding_matches_aten(isa, dtype):
    # Capped to what this machine runs: on a narrower machine a narrower variant repeats.
    previous = testing.set_cpu_kernel(isa)
    try:
        if (isa, dtype) in OWN_ROUNDING:
            for start in range(-(1 << 31), 1 << 31, CHUNK):
                _check(torch.arange(start, start + CHUNK, dtype=torch.int32), dtype, isa)
        else:  # every exponent and sign, 2**15 mantissas each (the low 8 bits in full)
            hi = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32) << 16
            lo = torch.cat([torch.arange(256, dtype=torch.int32),
                            torch.randint(0, 1 << 16, (1 << 7,), dtype=torch.int32)])
            _check((hi[:, None] | lo[None, :]).reshape(-1), dtype, isa)
    finally:
        testing.set_cpu_kernel(previous)


def test_rounding_of_a_short_tail():
    # Fewer elements than one vector block: the masked path, a subnormal included.
    x = torch.tensor([1.0, -0.0, float("inf"), float("nan"), 1 + 2**-8, 3e-39], dtype=torch.float32)
    for dtype in (torch.bfloat16, torch.float16):
        ours = testing.narrow_as_stored(x, dtype)
        theirs = x.to(dtype)
        keep = torch.tensor([True, True, True, False, True, True])
        assert torch.equal(ours[keep].view(torch.int16), theirs[keep].view(torch.int16))
        assert ours[3].isnan()
