"""The C++ autograd kernel under torch.func and forward-mode AD, against the float64 reference.

The backward and the forward-mode tangent of a rotation are rotations (by -phi and by
phi), so every transform's result is checked against ref.rope applied to its input.
"""

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import reference as ref
import rope_ext
from conftest import build_qkv, build_table

ops = torch.ops.rope
PAIRINGS = pytest.mark.parametrize("interleaved", [False, True], ids=["halfsplit", "interleaved"])
B, S, HQ, HK, D, R = 2, 3, 3, 2, 8, 6  # partial rotary: a pass-through tail of 2


def _inputs():
    _, q, k, _ = build_qkv((B, S), HQ, HK, D, torch.float64)
    cos, sin, pos = build_table("pos_bs", B, S, R // 2, torch.float64)
    return q.contiguous(), k.contiguous(), cos, sin, pos


def _rot(x, cos, sin, pos, interleaved, inverse=False):
    return ref.rope(x, cos, sin, pos, interleaved, inverse)


@PAIRINGS
def test_func_grad_is_the_inverse_rotation(interleaved):
    q, _, cos, sin, pos = _inputs()
    w = torch.randn_like(q)  # loss = <w, R q>, so d loss / d q = R^T w = R(-phi) w
    grad = torch.func.grad(lambda t: (ops.apply(t, cos, sin, pos, interleaved, False) * w).sum())(q)
    torch.testing.assert_close(grad, _rot(w, cos, sin, pos, interleaved, inverse=True))


@PAIRINGS
def test_func_vjp_qk(interleaved):
    q, k, cos, sin, pos = _inputs()
    (qo, ko), vjp = torch.func.vjp(
        lambda a, b: ops.apply_qk(a, b, cos, sin, pos, interleaved, False), q, k)
    torch.testing.assert_close(qo, _rot(q, cos, sin, pos, interleaved))
    gq, gk = torch.randn_like(qo), torch.randn_like(ko)
    dq, dk = vjp((gq, gk))
    torch.testing.assert_close(dq, _rot(gq, cos, sin, pos, interleaved, inverse=True))
    torch.testing.assert_close(dk, _rot(gk, cos, sin, pos, interleaved, inverse=True))


def test_func_jacrev_is_the_rotation_matrix():
    q, _, cos, sin, pos = _inputs()
    x = q[:1, :1, :1]  # one head: a D x D Jacobian
    jac = torch.func.jacrev(lambda t: ops.apply(t, cos, sin, pos[:1, :1], False, False))(x)
    jac = jac.reshape(D, D)
    # Column j is the rotation of the j-th unit vector.
    eye = torch.eye(D, dtype=torch.float64).reshape(D, 1, 1, 1, D)
    expected = torch.stack([_rot(e, cos, sin, pos[:1, :1], False).reshape(D) for e in eye], 1)
    torch.testing.assert_close(jac, expected)
    torch.testing.assert_close(jac.T @ jac, torch.eye(D, dtype=torch.float64))  # orthogonal


@PAIRINGS
def test_func_jvp_is_the_rotation_of_the_tangent(interleaved):
    q, k, cos, sin, pos = _inputs()
    tq, tk = torch.randn_like(q), torch.randn_like(k)
    (qo, ko), (dq, dk) = torch.func.jvp(
        lambda a, b: ops.apply_qk(a, b, cos, sin, pos, interleaved, False), (q, k), (tq, tk))
    torch.testing.assert_close(dq, _rot(tq, cos, sin, pos, interleaved))
    torch.testing.assert_close(dk, _rot(tk, cos, sin, pos, interleaved))


def test_func_vmap_matches_a_loop():
    q, _, cos, sin, pos = _inputs()
    xs = torch.randn((4,) + q.shape, dtype=torch.float64)
    out = torch.func.vmap(lambda t: ops.apply(t, cos, sin, pos, False, False))(xs)
    torch.testing.assert_close(out, torch.stack([_rot(x, cos, sin, pos, False) for x in xs]))


@PAIRINGS
def test_gradcheck_forward_and_backward_mode(interleaved):
    q, k, cos, sin, pos = _inputs()
    q, k = q.requires_grad_(), k.requires_grad_()

    def fn(a, b):
        return ops.apply_qk(a, b, cos, sin, pos, interleaved, False)

    assert gradcheck(fn, (q, k), check_forward_ad=True, check_backward_ad=True)
    assert gradgradcheck(fn, (q, k))


def test_one_output_used_gives_the_other_no_gradient():
    q, k, cos, sin, pos = _inputs()
    q, k = q.requires_grad_(), k.requires_grad_()
    qo, ko = ops.apply_qk(q, k, cos, sin, pos, False, False)
    g = torch.randn_like(qo)
    qo.backward(g)
    torch.testing.assert_close(q.grad, _rot(g, cos, sin, pos, False, inverse=True))
    assert k.grad is None


def test_no_graph_without_grad_and_graph_with_it():
    q, k, cos, sin, pos = _inputs()
    assert ops.apply(q, cos, sin, pos).grad_fn is None
    out = ops.apply(q.requires_grad_(), cos, sin, pos)
    assert type(out.grad_fn).__name__ != "NoneType" and out.requires_grad
    with torch.no_grad():
        assert ops.apply(q, cos, sin, pos).grad_fn is None
    with torch.inference_mode():
        assert not ops.apply(q, cos, sin, pos).requires_grad


def test_module_and_api_grad_through_torch_func():
    q, k, _, _, _ = _inputs()
    rope = rope_ext.RotaryEmbedding(D, rotary_dim=R, max_positions=16).double()
    pos = torch.tensor([[1, 4, 9], [0, 2, 15]])
    grad_q = torch.func.grad(lambda a: rope(a, k, pos)[0].square().sum())(q)
    torch.testing.assert_close(grad_q, 2 * q)  # a rotation keeps |q|^2
    grad_k = torch.func.grad(
        lambda b: rope_ext.apply_rope_qk(q, b, rope.cos, rope.sin, pos)[1].square().sum())(k)
    torch.testing.assert_close(grad_k, 2 * k)
