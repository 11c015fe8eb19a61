"""Gradients: gradcheck/gradgradcheck in float64, and grad_x = R(-phi) grad_out
(docs/math.md sections 5 and 12.8)."""

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import reference as ref
import rope_ext
from conftest import build_qkv, build_table, build_x

ops = torch.ops.rope

PAIRINGS = pytest.mark.parametrize("interleaved", [False, True], ids=["halfsplit", "interleaved"])
ROTARY = pytest.mark.parametrize("r", [6, 4], ids=["full", "partial"])  # head_dim 6
FORMS = pytest.mark.parametrize("form", ["pos_bs", "pos_s", "rows", "tok_bs"])
STORAGES = pytest.mark.parametrize("storage", ["contiguous", "strided", "fused"])
LAYOUTS = pytest.mark.parametrize("layout", ["bshd", "bhsd"])
D = 6


def _leaf(view):
    """The view itself as a leaf that requires grad: gradcheck must see the strided tensor."""
    return view.detach().requires_grad_()


@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
@STORAGES
@LAYOUTS
@FORMS
@ROTARY
@PAIRINGS
def test_gradcheck_apply(interleaved, r, form, layout, storage, inverse):
    s = build_x(layout, storage, 2, 3, 2, D, torch.float64)
    x = _leaf(s.op)
    cos, sin, pos = build_table(form, 2, 3, r // 2, torch.float64)

    def fn(x):
        return ops.apply(x, cos, sin, pos, interleaved, inverse)

    assert gradcheck(fn, (x,))
    assert gradgradcheck(fn, (x,))


def test_gradcheck_apply_thd():
    x = _leaf(build_x("thd", "fused", None, 5, 2, D, torch.float64).op)
    cos, sin, pos = build_table("pos_s", None, 5, 2, torch.float64, torch.int32)
    for interleaved in (False, True):
        def fn(x):
            return ops.apply(x, cos, sin, pos, interleaved)
        assert gradcheck(fn, (x,))
        assert gradgradcheck(fn, (x,))


@FORMS
@ROTARY
@PAIRINGS
def test_gradcheck_apply_qk(interleaved, r, form):
    # GQA slices of one fused qkv buffer: q has 2 heads, k 1, both at non-trivial strides.
    _, q, k, _ = build_qkv((2, 3), 2, 1, D, torch.float64)
    q, k = _leaf(q), _leaf(k)
    cos, sin, pos = build_table(form, 2, 3, r // 2, torch.float64)

    def fn(q, k):
        return ops.apply_qk(q, k, cos, sin, pos, interleaved)

    assert gradcheck(fn, (q, k))
    assert gradgradcheck(fn, (q, k))


# grad_x is the inverse rotation of grad_out, also with A folded into the table (then it is the
# transpose A R(-phi), which the reference's inverse computes: it negates sin and keeps A).

@pytest.mark.parametrize("attention_factor", [1.0, 1.25])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dims", [(12, 12), (12, 6), (130, 98)], ids=str)
@PAIRINGS
def test_grad_is_inverse_rotation(interleaved, dims, dtype, attention_factor):
    head_dim, r = dims
    x = torch.randn(2, 3, 2, head_dim, dtype=dtype, requires_grad=True)
    cos, sin = ref.default_table(r, 16, attention_factor=attention_factor)
    cos, sin = cos.float(), sin.float()
    pos = torch.randint(0, 16, (2, 3))
    grad_out = torch.randn(2, 3, 2, head_dim, dtype=dtype)

    ops.apply(x, cos, sin, pos, interleaved).backward(grad_out)

    expected = ref.rope(grad_out, cos, sin, pos, interleaved, inverse=True)
    ref.assert_pairs_close(x.grad, expected, grad_out, r, interleaved)  # tail grad = grad_out


@PAIRINGS
@pytest.mark.parametrize("layout", ["bshd", "bhsd", "thd"])
def test_backward_through_sum(layout, interleaved):
    """.sum() hands the backward an expanded (zero-stride) gradient of ones."""
    r = 8
    batch, seq = (None, 5) if layout == "thd" else (2, 3)
    s = build_x(layout, "contiguous", batch or 0, seq, 2, 10, torch.float32)
    x = _leaf(s.x)
    form = "pos_s" if layout == "thd" else "pos_bs"
    cos, sin, pos = build_table(form, batch, seq, r // 2)

    rope_ext.apply_rope(x, cos, sin, pos, interleaved=interleaved, layout=layout).sum().backward()

    ones = torch.ones_like(s.op)
    expected = ref.rope(ones, cos, sin, pos, interleaved, inverse=True)
    grad = x.grad.transpose(1, 2) if layout == "bhsd" else x.grad
    ref.assert_pairs_close(grad, expected, ones, r, interleaved)


@PAIRINGS
def test_backward_through_sum_qk(interleaved):
    r = 8
    _, q, k, _ = build_qkv((2, 3), 4, 2, 10)
    q, k = _leaf(q), _leaf(k)
    cos, sin, pos = build_table("pos_bs", 2, 3, r // 2)
    q_out, k_out = rope_ext.apply_rope_qk(q, k, cos, sin, pos, interleaved=interleaved)
    (q_out.sum() + 2 * k_out.sum()).backward()
    for grad, scale in ((q.grad, 1.0), (k.grad, 2.0)):
        g = torch.full_like(grad, scale)
        ref.assert_pairs_close(grad, ref.rope(g, cos, sin, pos, interleaved, inverse=True), g, r,
                               interleaved)


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
@PAIRINGS
def test_rotary_embedding_forward_backward(interleaved, layout):
    head_dim, r, max_positions = 16, 8, 64
    module = rope_ext.RotaryEmbedding(head_dim, rotary_dim=r, max_positions=max_positions,
                                      interleaved=interleaved, layout=layout)
    shape = (2, 3, 5, head_dim) if layout == "bhsd" else (2, 5, 3, head_dim)
    q = torch.randn(shape, requires_grad=True)
    k = torch.randn(shape[:-2] + (1, head_dim) if layout == "bshd" else (2, 1, 5, head_dim),
                    requires_grad=True)
    pos = torch.randint(0, max_positions, (2, 5))

    q_out, k_out = module(q, k, pos)

    # The module's table: exact float64 values rounded once to float32 (docs/api.md section 5).
    cos, sin = ref.default_table(r, max_positions)
    cos, sin = cos.float(), sin.float()

    def view(t):
        return t.transpose(1, 2) if layout == "bhsd" else t

    for inp, out in ((q, q_out), (k, k_out)):
        ref.assert_pairs_close(view(out), ref.rope(view(inp.detach()), cos, sin, pos, interleaved),
                               view(inp.detach()), r, interleaved)
    gq, gk = torch.randn_like(q_out), torch.randn_like(k_out)
    torch.autograd.backward((q_out, k_out), (gq, gk))
    for inp, g in ((q, gq), (k, gk)):
        ref.assert_pairs_close(view(inp.grad), ref.rope(view(g), cos, sin, pos, interleaved, True),
                               view(g), r, interleaved)
