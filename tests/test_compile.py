"""torch.compile(fullgraph=True): no graph break, the same results as eager, one compile for
every sequence length with dynamic shapes, and gradients through the compiled function.

Most tests use the "aot_eager" backend: it traces through the fake kernels, the autograd
formula and functionalization of the in-place ops (everything the op has to provide) without
paying for C++ code generation. One test runs inductor, the default backend.
"""

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import reference as ref
import rope_ext
from conftest import build_qkv, build_table, build_x

PAIRINGS = pytest.mark.parametrize("interleaved", [False, True], ids=["halfsplit", "interleaved"])


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compile(fn, **kwargs):
    kwargs.setdefault("backend", "aot_eager")
    return torch.compile(fn, fullgraph=True, **kwargs)


@pytest.mark.parametrize("layout", ["bshd", "bhsd", "thd"])
@PAIRINGS
def test_apply_rope(interleaved, layout):
    batch, seq = (None, 5) if layout == "thd" else (2, 3)
    x = build_x(layout, "fused", batch or 0, seq, 2, 10, torch.float32).x
    cos, sin, pos = build_table("pos_s" if layout == "thd" else "pos_bs", batch, seq, 4)

    def fn(x, cos, sin, pos):
        return rope_ext.apply_rope(x, cos, sin, pos, interleaved=interleaved, layout=layout)

    assert torch.equal(_compile(fn)(x, cos, sin, pos), fn(x, cos, sin, pos))


@pytest.mark.parametrize("form", ["pos_bs", "rows", "tok_bs"])
@PAIRINGS
def test_apply_rope_qk(interleaved, form):
    _, q, k, _ = build_qkv((2, 3), 4, 2, 8)
    cos, sin, pos = build_table(form, 2, 3, 4)

    def fn(q, k, cos, sin, pos):
        return rope_ext.apply_rope_qk(q, k, cos, sin, pos, interleaved=interleaved)

    got, want = _compile(fn)(q, k, cos, sin, pos), fn(q, k, cos, sin, pos)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("layout", ["bshd", "bhsd", "thd"])
def test_apply_rope_inplace(layout):
    batch, seq = (None, 5) if layout == "thd" else (2, 3)
    s = build_x(layout, "strided", batch or 0, seq, 2, 8, torch.float32)
    cos, sin, pos = build_table("pos_s" if layout == "thd" else "pos_bs", batch, seq, 4)
    expected = rope_ext.apply_rope(s.x, cos, sin, pos, layout=layout)
    base_before = s.base.clone()

    def fn(x, cos, sin, pos):
        return rope_ext.apply_rope(x, cos, sin, pos, layout=layout, inplace=True) * 2

    out = _compile(fn)(s.x, cos, sin, pos)

    assert torch.equal(s.x, expected), "the compiled in-place op did not write x"
    assert torch.equal(out, 2 * expected)
    # The elements between x's (head_dim stride 2) are untouched.
    assert torch.equal(s.base[..., 1::2], base_before[..., 1::2])


def test_apply_rope_qk_inplace_on_fused_qkv():
    """q and k are views of one buffer: functionalization must write both back, and not v."""
    base, q, k, v = build_qkv((2, 3), 4, 2, 8)
    cos, sin, pos = build_table("pos_bs", 2, 3, 4)
    q_exp, k_exp = rope_ext.apply_rope_qk(q, k, cos, sin, pos)
    v_before = v.clone()

    def fn(base, cos, sin, pos):
        q, k = base[..., :32].unflatten(-1, (4, 8)), base[..., 32:48].unflatten(-1, (2, 8))
        rope_ext.apply_rope_qk(q, k, cos, sin, pos, inplace=True)
        return base.sum()

    _compile(fn)(base, cos, sin, pos)

    assert torch.equal(q, q_exp) and torch.equal(k, k_exp)
    assert torch.equal(v, v_before)


@PAIRINGS
def test_rotary_embedding(interleaved):
    module = rope_ext.RotaryEmbedding(16, rotary_dim=8, max_positions=32, interleaved=interleaved)
    _, q, k, _ = build_qkv((2, 5), 4, 2, 16)
    pos = torch.randint(0, 32, (2, 5))
    got, want = _compile(module)(q, k, pos), module(q, k, pos)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# --- dynamic shapes: a second sequence length reuses the first compile ---


def _qk_inputs(seq):
    _, q, k, _ = build_qkv((2, seq), 4, 2, 8)
    cos, sin, pos = build_table("pos_bs", 2, seq, 4, rows=64)
    return q, k, cos, sin, pos


def _rope_qk(q, k, cos, sin, pos):
    return rope_ext.apply_rope_qk(q, k, cos, sin, pos)


@pytest.mark.parametrize("how", ["dynamic=True", "mark_dynamic"])
def test_dynamic_seq_compiles_once(how):
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(_rope_qk, backend=counter, fullgraph=True,
                             dynamic=True if how == "dynamic=True" else None)
    for seq in (3, 7):
        q, k, cos, sin, pos = _qk_inputs(seq)
        if how == "mark_dynamic":
            for t, dim in ((q, 1), (k, 1), (pos, 1)):
                torch._dynamo.mark_dynamic(t, dim)
        got = compiled(q, k, cos, sin, pos)
        want = _rope_qk(q, k, cos, sin, pos)
        assert got[0].shape == q.shape and got[1].shape == k.shape
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert counter.frame_count == 1, f"recompiled for seq={seq}"


def test_dynamic_thd_tokens_compile_once():
    counter = CompileCounterWithBackend("aot_eager")

    def fn(x, cos, sin, pos):
        return rope_ext.apply_rope(x, cos, sin, pos, layout="thd")

    compiled = torch.compile(fn, backend=counter, fullgraph=True, dynamic=True)
    for tokens in (5, 9):
        x = build_x("thd", "contiguous", 0, tokens, 2, 8, torch.float32).x
        cos, sin, pos = build_table("pos_s", None, tokens, 4, rows=64)
        assert torch.equal(compiled(x, cos, sin, pos), fn(x, cos, sin, pos))
    assert counter.frame_count == 1


# --- gradients through the compiled function ---


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
@PAIRINGS
def test_grad_through_compiled(interleaved, layout):
    r = 8
    s = build_x(layout, "contiguous", 2, 3, 2, 10, torch.float64)
    cos, sin, pos = build_table("pos_bs", 2, 3, r // 2, torch.float64)

    def loss(x):
        y = rope_ext.apply_rope(x, cos, sin, pos, interleaved=interleaved, layout=layout)
        return (y * weight).sum()

    weight = torch.randn_like(s.x)
    x_c = s.x.detach().requires_grad_()
    _compile(loss)(x_c).backward()
    # The gradient of sum(weight * rope(x)) is the inverse rotation of weight.
    w = weight.transpose(1, 2) if layout == "bhsd" else weight
    grad = x_c.grad.transpose(1, 2) if layout == "bhsd" else x_c.grad
    ref.assert_pairs_close(grad, ref.rope(w, cos, sin, pos, interleaved, inverse=True), w, r,
                           interleaved)


# --- inductor, the default backend: one case, forward and backward ---


def test_inductor_matches_eager():
    module = rope_ext.RotaryEmbedding(16, rotary_dim=12, max_positions=32)
    _, q, k, _ = build_qkv((2, 5), 4, 2, 16)
    pos = torch.randint(0, 32, (2, 5))

    def fn(q, k, pos):
        q_out, k_out = module(q, k, pos)
        return (q_out * 3 + 1).sum() + (k_out ** 2).sum(), q_out, k_out

    def run(f):
        qq, kk = q.detach().requires_grad_(), k.detach().requires_grad_()
        loss, q_out, k_out = f(qq, kk, pos)
        loss.backward()
        return q_out, k_out, qq.grad, kk.grad

    compiled = torch.compile(fn, fullgraph=True)  # backend="inductor"
    for got, want in zip(run(compiled), run(fn)):
        # Inductor fuses the surrounding arithmetic and may round differently: float32 rtol.
        torch.testing.assert_close(got, want)


def test_inductor_matches_eager_fused_norm():
    """The fused QK-RMSNorm + RoPE under inductor: outputs and the gradients of q, k and both
    norm weights (the op's saved rstd crosses from the forward graph to the backward's)."""
    _, q, k, _ = build_qkv((2, 5), 4, 2, 16)
    inv_freq, attention_factor = rope_ext.rope_frequencies(16)
    cos, sin = rope_ext.cos_sin_table(inv_freq, 32, attention_factor)
    pos = torch.randint(0, 32, (2, 5))
    q_weight, k_weight = torch.rand(16) + 0.5, torch.rand(16) + 0.5

    def fn(q, k, q_weight, k_weight):
        q_out, k_out = rope_ext.rms_norm_rope_qk(q, k, cos, sin, pos, q_weight=q_weight,
                                                 k_weight=k_weight, weight_offset=1.0)
        return (q_out * 3 + 1).sum() + (k_out ** 2).sum(), q_out, k_out

    def run(f):
        leaves = [t.detach().requires_grad_() for t in (q, k, q_weight, k_weight)]
        loss, q_out, k_out = f(*leaves)
        loss.backward()
        return [q_out, k_out] + [t.grad for t in leaves]

    compiled = torch.compile(fn, fullgraph=True)  # backend="inductor"
    for got, want in zip(run(compiled), run(fn)):
        torch.testing.assert_close(got, want)
