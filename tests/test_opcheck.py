"""torch.library.opcheck on all four ops: schema (mutation annotations), autograd registration,
fake kernels, and AOT dispatch with dynamic shapes, for every x dtype."""

import pytest
import torch

import rope_ext  # noqa: F401  (registers torch.ops.rope)
from conftest import X_DTYPES, build_qkv, build_table, build_x

ops = torch.ops.rope

DTYPES = pytest.mark.parametrize("dtype", X_DTYPES, ids=lambda d: str(d).split(".")[-1])


def _samples(dtype, requires_grad):
    """(x, cos, sin, positions, interleaved) tuples: with positions (bshd slice of a fused qkv,
    thd) and without (bhsd transposed view with a per-token table in x's dtype, a strided x)."""
    def leaf(t):
        return t.detach().requires_grad_(requires_grad)

    x1 = leaf(build_x("bshd", "fused", 2, 3, 2, 8, dtype).op)
    cos1, sin1, pos1 = build_table("pos_bs", 2, 3, 4, torch.float32, torch.int32)
    x2 = leaf(build_x("thd", "contiguous", None, 5, 2, 10, dtype).op)
    cos2, sin2, pos2 = build_table("pos_s", None, 5, 3, torch.float64, torch.int64)
    x3 = leaf(build_x("bhsd", "contiguous", 2, 3, 2, 8, dtype).op)
    cos3, sin3, _ = build_table("tok_bs", 2, 3, 4, dtype)
    x4 = leaf(build_x("bshd", "strided", 1, 3, 2, 6, dtype).op)
    cos4, sin4, _ = build_table("rows", 1, 3, 2, torch.float32)
    return [(x1, cos1, sin1, pos1, False), (x2, cos2, sin2, pos2, True),
            (x3, cos3, sin3, None, True), (x4, cos4, sin4, None, False)]


@DTYPES
def test_opcheck_apply(dtype):
    for x, cos, sin, pos, interleaved in _samples(dtype, requires_grad=True):
        torch.library.opcheck(ops.apply.default, (x, cos, sin, pos, interleaved, False))
        torch.library.opcheck(ops.apply.default, (x, cos, sin),
                              {"positions": pos, "interleaved": interleaved, "inverse": True})
        if pos is not None and cos.dim() == 2:  # rows past the table computed from inv_freq
            inv = torch.rand(cos.shape[-1], dtype=torch.float64)
            far = pos + cos.shape[0] * (pos % 2)
            torch.library.opcheck(ops.apply.default, (x, cos, sin, far, interleaved, False),
                                  {"inv_freq": inv, "attention_factor": 1.5})


@DTYPES
def test_opcheck_apply_inplace(dtype):
    # The in-place op is not differentiable: x must not require grad.
    for x, cos, sin, pos, interleaved in _samples(dtype, requires_grad=False):
        torch.library.opcheck(ops.apply_.default, (x, cos, sin, pos, interleaved, False))


def _qk_samples(dtype, requires_grad):
    def leaf(t):
        return t.detach().requires_grad_(requires_grad)

    _, q1, k1, _ = build_qkv((2, 3), 4, 2, 8, dtype)
    cos1, sin1, pos1 = build_table("pos_1s", 2, 3, 4, torch.float32, torch.int64)
    _, q2, k2, _ = build_qkv((5,), 2, 1, 8, dtype, head_dim_k=6)
    cos2, sin2, pos2 = build_table("pos_s", None, 5, 3, dtype, torch.int32)
    q3 = build_x("bhsd", "contiguous", 2, 3, 2, 8, dtype).op
    k3 = build_x("bshd", "contiguous", 2, 3, 1, 8, dtype).op
    cos3, sin3, _ = build_table("tok_1s", 2, 3, 4, torch.float64)
    return [(leaf(q1), leaf(k1), cos1, sin1, pos1, True),
            (leaf(q2), leaf(k2), cos2, sin2, pos2, False),
            (leaf(q3), leaf(k3), cos3, sin3, None, False)]


@DTYPES
def test_opcheck_apply_qk(dtype):
    for q, k, cos, sin, pos, interleaved in _qk_samples(dtype, requires_grad=True):
        torch.library.opcheck(ops.apply_qk.default, (q, k, cos, sin, pos, interleaved, False))


@DTYPES
def test_opcheck_apply_qk_inplace(dtype):
    for q, k, cos, sin, pos, interleaved in _qk_samples(dtype, requires_grad=False):
        torch.library.opcheck(ops.apply_qk_.default, (q, k, cos, sin, pos, interleaved, False))
