"""The C++ autograd kernel under torch.func and forward-mode AD, against the float64 reference.

The backward and the forward-mode tangent of a rotation are rotations (by -phi and by
phi), so every transform's result is checked against ref.rope applied to its input.
"""

import warnings

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


@PAIRINGS
def test_func_grad_is_the_inverse_rotation(interleaved):
    q, _, cos, sin, pos = _inputs()
    w = torch.randn_like(q)  # loss = <w, R q>, so d loss / d q = R^T w = R(-phi) w
    grad = torch.func.grad(lambda t: (ops.apply(t, cos, sin, pos, interleaved, False) * w).sum())(q)
    torch.testing.assert_close(grad, ref.rope(w, cos, sin, pos, interleaved, inverse=True))


@PAIRINGS
def test_func_vjp_qk(interleaved):
    q, k, cos, sin, pos = _inputs()
    (qo, ko), vjp = torch.func.vjp(
        lambda a, b: ops.apply_qk(a, b, cos, sin, pos, interleaved, False), q, k)
    torch.testing.assert_close(qo, ref.rope(q, cos, sin, pos, interleaved))
    gq, gk = torch.randn_like(qo), torch.randn_like(ko)
    dq, dk = vjp((gq, gk))
    torch.testing.assert_close(dq, ref.rope(gq, cos, sin, pos, interleaved, inverse=True))
    torch.testing.assert_close(dk, ref.rope(gk, cos, sin, pos, interleaved, inverse=True))


def test_func_jacrev_is_the_rotation_matrix():
    q, _, cos, sin, pos = _inputs()
    x = q[:1, :1, :1]  # one head: a D x D Jacobian
    jac = torch.func.jacrev(lambda t: ops.apply(t, cos, sin, pos[:1, :1], False, False))(x)
    jac = jac.reshape(D, D)
    # Column j is the rotation of the j-th unit vector.
    eye = torch.eye(D, dtype=torch.float64).reshape(D, 1, 1, 1, D)
    expected = torch.stack([ref.rope(e, cos, sin, pos[:1, :1], False).reshape(D) for e in eye], 1)
    torch.testing.assert_close(jac, expected)
    torch.testing.assert_close(jac.T @ jac, torch.eye(D, dtype=torch.float64))  # orthogonal


@PAIRINGS
def test_func_jvp_is_the_rotation_of_the_tangent(interleaved):
    q, k, cos, sin, pos = _inputs()
    tq, tk = torch.randn_like(q), torch.randn_like(k)
    (qo, ko), (dq, dk) = torch.func.jvp(
        lambda a, b: ops.apply_qk(a, b, cos, sin, pos, interleaved, False), (q, k), (tq, tk))
    torch.testing.assert_close(dq, ref.rope(tq, cos, sin, pos, interleaved))
    torch.testing.assert_close(dk, ref.rope(tk, cos, sin, pos, interleaved))


def test_func_vmap_matches_a_loop():
    q, _, cos, sin, pos = _inputs()
    xs = torch.randn((4,) + q.shape, dtype=torch.float64)
    out = torch.func.vmap(lambda t: ops.apply(t, cos, sin, pos, False, False))(xs)
    torch.testing.assert_close(out, torch.stack([ref.rope(x, cos, sin, pos, False) for x in xs]))


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
    torch.testing.assert_close(q.grad, ref.rope(g, cos, sin, pos, False, inverse=True))
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


# --- vmap: the batching rule folds the vmapped dimension into the op's batch ---


def _loop(fn, n, *args_and_dims):
    """The per-sample reference: fn applied to each sample's slice."""
    outs = []
    for i in range(n):
        outs.append(fn(*[a if d is None else a.select(d, i) for a, d in args_and_dims]))
    if isinstance(outs[0], tuple):
        return tuple(torch.stack(o) for o in zip(*outs))
    return torch.stack(outs)


VMAP_CASES = {
    # name: (x shape per sample, thd?, positions form, which args are vmapped)
    "x": ("bshd", "pos_bs", (0, None, None, None)),
    "x_dim2": ("bshd", "pos_bs", (2, None, None, None)),
    "x_rows": ("bshd", "rows", (0, None, None, None)),
    "x_tok_bs": ("bshd", "tok_bs", (0, None, None, None)),
    "positions": ("bshd", "pos_bs", (0, None, None, 0)),
    "positions_s": ("bshd", "pos_s", (None, None, None, 0)),
    "tables": ("bshd", "pos_bs", (0, 0, 0, None)),
    "tables_no_pos": ("bshd", "rows", (None, 0, 0, None)),
    "tok_tables": ("bshd", "tok_bs", (0, 0, 0, None)),
    "all": ("bshd", "pos_1s", (0, 0, 0, 0)),
    "thd_x": ("thd", "pos_s", (0, None, None, None)),
    "thd_all": ("thd", "pos_s", (0, 0, 0, 0)),
}


@pytest.mark.parametrize("case", list(VMAP_CASES))
@pytest.mark.parametrize("fused", [False, True], ids=["apply", "apply_qk"])
def test_vmap_batching_rule_matches_a_loop(case, fused):
    layout, form, dims = VMAP_CASES[case]
    n = 3
    thd = layout == "thd"
    shape_q = (S, HQ, D) if thd else (B, S, HQ, D)
    shape_k = (S, HK, D) if thd else (B, S, HK, D)

    def batched(shape, dim):
        if dim is None:  # shared by the samples
            return torch.randn(shape, dtype=torch.float64)
        return torch.randn((n,) + shape, dtype=torch.float64).movedim(0, dim)

    q = batched(shape_q, dims[0])
    k = batched(shape_k, dims[0])
    tables = [build_table(form, None if thd else B, S, R // 2, torch.float64) for _ in range(n)]
    cos = torch.stack([t[0] for t in tables]) if dims[1] is not None else tables[0][0]
    sin = torch.stack([t[1] for t in tables]) if dims[2] is not None else tables[0][1]
    pos = tables[0][2]
    if pos is not None and dims[3] is not None:
        pos = torch.stack([torch.randint(0, cos.shape[-2], pos.shape) for _ in range(n)])
    pos_dim = dims[3] if pos is not None else None
    in_dims = (dims[0],) * (2 if fused else 1) + (dims[1], dims[2], pos_dim)
    xs = (q, k) if fused else (q,)
    op = ops.apply_qk if fused else ops.apply

    def fn(*a):
        return op(*a, True, False)

    got = torch.func.vmap(fn, in_dims=in_dims)(*xs, cos, sin, pos)
    want = _loop(fn, n, *zip(xs + (cos, sin, pos), in_dims))
    for g, w in zip(got if fused else (got,), want if fused else (want,)):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_jacrev_uses_the_batching_rule():
    q, _, cos, sin, pos = _inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the per-sample fallback warns; the rule must not
        jac = torch.func.jacrev(lambda t: ops.apply(t, cos, sin, pos[:1, :1], False, False))(
            q[:1, :1])
    assert jac.shape == q[:1, :1].shape * 2


# --- the fused QK-RMSNorm + RoPE under torch.func: every transform against the same
# transform of a float64 ATen composition (norm, weight, then the reference rotation),
# which autograd and functorch differentiate without our kernels.

def _norm_inputs(across):
    q, k, cos, sin, pos = _inputs()
    g = torch.Generator().manual_seed(3)
    qw = torch.randn(HQ * D if across else D, generator=g, dtype=torch.float64)
    kw = torch.randn(HK * D if across else D, generator=g, dtype=torch.float64)
    return q, k, cos, sin, pos, qw, kw


def _norm_ours(across):
    def f(q, k, qw, kw, cos, sin, pos):
        return rope_ext.rms_norm_rope_qk(q, k, cos, sin, pos, q_weight=qw, k_weight=kw,
                                         eps=1e-5, across_heads=across, weight_offset=0.5)
    return f


def _norm_composed(across):
    def f(q, k, qw, kw, cos, sin, pos):  # tests/reference.py's norm and rotation, ATen ops only
        return tuple(ref.rotate(ref.rms_norm(x, w, 1e-5, across, 0.5), cos, sin, pos)
                     for x, w in ((q, qw), (k, kw)))
    return f


ACROSS = pytest.mark.parametrize("across", [False, True], ids=["per_head", "across_heads"])


@ACROSS
def test_norm_rope_func_grad_vjp_jvp(across):
    q, k, cos, sin, pos, qw, kw = _norm_inputs(across)
    ours, composed = _norm_ours(across), _norm_composed(across)
    wq, wk = torch.randn_like(q), torch.randn_like(k)

    def loss(f):
        return lambda *a: (f(*a, cos, sin, pos)[0] * wq).sum() + (f(*a, cos, sin, pos)[1] * wk).sum()

    got = torch.func.grad(loss(ours), argnums=(0, 1, 2, 3))(q, k, qw, kw)
    want = torch.func.grad(loss(composed), argnums=(0, 1, 2, 3))(q, k, qw, kw)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    (outs, vjp) = torch.func.vjp(lambda *a: ours(*a, cos, sin, pos), q, k, qw, kw)
    (outs_c, vjp_c) = torch.func.vjp(lambda *a: composed(*a, cos, sin, pos), q, k, qw, kw)
    for g, w in zip(vjp((wq, wk)) + outs, vjp_c((wq, wk)) + outs_c):
        torch.testing.assert_close(g, w)
    tangents = tuple(torch.randn_like(t) for t in (q, k, qw, kw))
    _, jvp = torch.func.jvp(lambda *a: ours(*a, cos, sin, pos), (q, k, qw, kw), tangents)
    _, jvp_c = torch.func.jvp(lambda *a: composed(*a, cos, sin, pos), (q, k, qw, kw), tangents)
    for g, w in zip(jvp, jvp_c):
        torch.testing.assert_close(g, w)


@ACROSS
def test_norm_rope_func_jacrev_and_vmap(across):
    q, k, cos, sin, pos, qw, kw = _norm_inputs(across)
    q, k, pos = q[:1, :1], k[:1, :1], pos[:1, :1]  # one token: small Jacobians
    ours, composed = _norm_ours(across), _norm_composed(across)
    for argnum in (0, 2):  # d q_out / d q and d q_out / d q_weight
        got = torch.func.jacrev(lambda *a: ours(*a, cos, sin, pos)[0], argnums=argnum)(q, k, qw, kw)
        want = torch.func.jacrev(lambda *a: composed(*a, cos, sin, pos)[0],
                                 argnums=argnum)(q, k, qw, kw)
        torch.testing.assert_close(got, want)
    qs, ks = torch.randn(3, *q.shape, dtype=q.dtype), torch.randn(3, *k.shape, dtype=k.dtype)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = torch.func.vmap(lambda a, b: ours(a, b, qw, kw, cos, sin, pos))(qs, ks)
    # The batching rule folds the samples into one call: no per-sample fallback.
    assert not [w for w in caught if "batching rule" in str(w.message)]
    want = [composed(a, b, qw, kw, cos, sin, pos) for a, b in zip(qs, ks)]
    for i, (gq, gk) in enumerate(zip(*got)):
        torch.testing.assert_close(gq, want[i][0])
        torch.testing.assert_close(gk, want[i][1])
    # Per-sample weights (an ensemble): one call per sample, the same values.
    qws = torch.randn(3, *qw.shape, dtype=qw.dtype)
    got = torch.func.vmap(lambda a, w: ours(a, k, w, kw, cos, sin, pos)[0])(qs, qws)
    for i in range(3):
        torch.testing.assert_close(got[i], composed(qs[i], k, qws[i], kw, cos, sin, pos)[0])


@ACROSS
def test_norm_rope_double_backward_matches_composition(across):
    q, k, cos, sin, pos, qw, kw = _norm_inputs(across)
    ins = [t.clone().requires_grad_() for t in (q, k, qw, kw)]
    ins_c = [t.clone().requires_grad_() for t in (q, k, qw, kw)]
    wq = torch.randn_like(q)

    def second(f, args):
        qo, ko = f(*args, cos, sin, pos)
        g = torch.autograd.grad((qo * wq).sum() + ko.square().sum(), args, create_graph=True)
        return torch.autograd.grad(sum(t.square().sum() for t in g), args)

    for g, w in zip(second(_norm_ours(across), ins), second(_norm_composed(across), ins_c)):
        torch.testing.assert_close(g, w)


# --- vmap over every combination of batched, shared and None arguments, through the public
# functions and the ops with their trailing defaults left out (the dispatcher then gives the
# rule no in_dims entry for them): each against a Python loop over the samples, bit for bit.

VMAP_N = 3
POSITIONS_FORMS = ["omitted", "none", "shared", "batched"]


def _vmap_args(positions, x_batched, table_batched):
    """(per-call arguments, their in_dims) for the rotation: q, k, cos, sin[, positions]."""
    g = torch.Generator().manual_seed(7)
    rows = S if positions in ("omitted", "none") else S + 4  # row s for token s without positions

    def sample(shape, batched, dtype=torch.float64, high=None):
        full = (VMAP_N,) + shape if batched else shape
        if high is not None:
            return torch.randint(0, high, full, generator=g)
        return torch.randn(full, generator=g, dtype=dtype)

    q = sample((B, S, HQ, D), x_batched)
    k = sample((B, S, HK, D), x_batched)
    cos = sample((rows, R // 2), table_batched)
    sin = sample((rows, R // 2), table_batched)
    args, dims = [q, k, cos, sin], [0 if x_batched else None] * 2 + [0 if table_batched else None] * 2
    if positions == "none":
        args.append(None)
        dims.append(None)
    elif positions in ("shared", "batched"):
        args.append(sample((B, S), positions == "batched", high=rows))
        dims.append(0 if positions == "batched" else None)
    return args, dims


def _vmap_cases(extra_flags=1):
    cases = []
    for positions in POSITIONS_FORMS:
        for flags in range(2 ** (2 + extra_flags)):
            bits = [bool(flags >> i & 1) for i in range(2 + extra_flags)]
            if not (any(bits) or positions == "batched"):
                continue  # nothing batched: not a vmap
            cases.append(pytest.param(positions, *bits, id=f"{positions}-" + "".join(
                "b" if b else "s" for b in bits)))
    return cases


def _assert_vmap_equals_loop(fn, args, dims):
    got = torch.func.vmap(fn, in_dims=tuple(dims))(*args)
    want = _loop(fn, VMAP_N, *zip(args, dims))
    got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@pytest.mark.parametrize("positions,x_batched,table_batched", _vmap_cases(extra_flags=0))
@pytest.mark.parametrize("entry", ["op", "function"])
def test_vmap_apply_every_batching(entry, positions, x_batched, table_batched):
    args, dims = _vmap_args(positions, x_batched, table_batched)
    del args[1], dims[1]  # one tensor: q
    if entry == "op":  # ops.apply(x, cos, sin) with positions left out when "omitted"
        fn = ops.apply
    else:
        def fn(x, cos, sin, *pos):
            return rope_ext.apply_rope(x, cos, sin, *pos)
    _assert_vmap_equals_loop(fn, args, dims)


@pytest.mark.parametrize("positions,x_batched,table_batched", _vmap_cases(extra_flags=0))
@pytest.mark.parametrize("entry", ["op", "function"])
def test_vmap_apply_qk_every_batching(entry, positions, x_batched, table_batched):
    args, dims = _vmap_args(positions, x_batched, table_batched)
    if entry == "op":
        fn = ops.apply_qk
    else:
        def fn(q, k, cos, sin, *pos):
            return rope_ext.apply_rope_qk(q, k, cos, sin, *pos)
    _assert_vmap_equals_loop(fn, args, dims)


@pytest.mark.parametrize("positions,x_batched,table_batched,weights_batched", _vmap_cases())
@pytest.mark.parametrize("across", [False, True], ids=["per_head", "across_heads"])
def test_vmap_rms_norm_rope_qk_every_batching(positions, x_batched, table_batched,
                                              weights_batched, across):
    args, dims = _vmap_args(positions, x_batched, table_batched)
    if len(args) == 4:  # the op takes positions before the weights: None it is
        args.append(None)
        dims.append(None)
    g = torch.Generator().manual_seed(8)
    for heads in (HQ, HK):
        shape = (heads * D,) if across else (D,)
        shape = (VMAP_N,) + shape if weights_batched else shape
        args.append(torch.randn(shape, generator=g, dtype=torch.float64))
        dims.append(0 if weights_batched else None)

    def fn(q, k, cos, sin, pos, qw, kw):
        return rope_ext.rms_norm_rope_qk(q, k, cos, sin, pos, q_weight=qw, k_weight=kw,
                                         across_heads=across)
    _assert_vmap_equals_loop(fn, args, dims)
    if positions == "omitted":  # the op itself, its trailing defaults left out
        _assert_vmap_equals_loop(
            lambda q, k, cos, sin, pos, qw, kw: ops.rms_norm_rope_qk(
                q, k, cos, sin, pos, qw, kw, 1e-6, across), args, dims)
