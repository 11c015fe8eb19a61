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
CHUNK = 1 << 22  # 16 MB of float32: reused buffers, no fresh pages per chunk
# The variants whose bf16 rounding is not ATen's conversion itself.
OWN_BF16_ROUNDING = ["avx512_bf16", "avx512", "avx2"]
ISAS = ["default", "avx2", "avx512", "avx512_bf16"]


def _check(bits, theirs, dtype, isa):
    """narrow_as_stored of the variant in force against ATen's `theirs` of the same bits."""
    ours = testing.narrow_as_stored(bits.view(torch.float32), dtype)
    if torch.equal(ours.view(torch.int16), theirs.view(torch.int16)):
        return
    bad = ~((ours.view(torch.int16) == theirs.view(torch.int16)) | (ours.isnan() & theirs.isnan()))
    if bad.any():
        i = int(bad.nonzero()[0])
        raise AssertionError(
            f"{isa}: {int(bad.sum())} float32 patterns round differently to {dtype}; first: bits "
            f"{int(bits[i]) & 0xffffffff:#010x} -> ours {int(ours.view(torch.int16)[i]) & 0xffff:#06x}, "
            f"ATen {int(theirs.view(torch.int16)[i]) & 0xffff:#06x}")


def test_own_bf16_rounding_every_float32():
    # ATen's rounding of each chunk computed once, for every variant with its own.
    # Capped to what this machine runs: on a narrower machine a narrower variant repeats.
    previous = testing.set_cpu_kernel("auto")
    try:
        bits = torch.empty(CHUNK, dtype=torch.int32)
        theirs = torch.empty(CHUNK, dtype=torch.bfloat16)
        for start in range(-(1 << 31), 1 << 31, CHUNK):
            torch.arange(start, start + CHUNK, out=bits)
            theirs.copy_(bits.view(torch.float32))  # ATen's conversion, as .to() runs it
            for isa in OWN_BF16_ROUNDING:
                testing.set_cpu_kernel(isa)
                _check(bits, theirs, torch.bfloat16, isa)
    finally:
        testing.set_cpu_kernel(previous)


ATEN_ROUNDING = [(isa, dtype) for isa in ISAS for dtype in (torch.bfloat16, torch.float16)
                 if not (dtype == torch.bfloat16 and isa in OWN_BF16_ROUNDING)]


@pytest.mark.parametrize("isa,dtype", ATEN_ROUNDING,
                         ids=[f"{i}-{'bf16' if d == torch.bfloat16 else 'fp16'}"
                              for i, d in ATEN_ROUNDING])
def test_aten_rounding_every_exponent(isa, dtype):
    # ATen's own code: every exponent and sign, 2**15 mantissas each (the low 8 bits in full).
    previous = testing.set_cpu_kernel(isa)
    try:
        hi = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32) << 16
        lo = torch.cat([torch.arange(256, dtype=torch.int32),
                        torch.randint(0, 1 << 16, (1 << 7,), dtype=torch.int32)])
        bits = (hi[:, None] | lo[None, :]).reshape(-1)
        _check(bits, bits.view(torch.float32).to(dtype), dtype, isa)
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
