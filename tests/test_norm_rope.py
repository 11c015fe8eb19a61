"""The fused QK-RMSNorm + RoPE: rope_ext.rms_norm_rope_qk and the ops underneath,
torch.ops.rope.rms_norm_rope_qk, rms_norm_rope_qk_ (in place) and rms_norm_rope_qk_backward.

    q_out = rope(rms_norm(q) * (q_weight + weight_offset)), the same for k,
    rms_norm(x) = x / sqrt(mean(x**2) + eps)

the mean over head_dim (across_heads=False, weights [head_dim]) or over heads * head_dim of
each token (across_heads=True, OLMo 2; weights [heads * head_dim]), then the rotation exactly
as apply_rope_qk does it (docs/api.md section 2b).

Checked against the independent float64 RMSNorm and RoPE of
tests/reference.py, applied to the same (rounded) inputs: the kernel computes in float32
(float64 for float64 x) and rounds once at the store.

Every test runs for each device under test (`device` fixture): "cpu" (the CPU kernel as
configured), "cuda-host" (the CUDA kernel's host executor, through
torch.ops.rope_testing.set_cpu_kernel, as tests/test_cuda.py does) and "cuda" when a GPU is
present. ROPE_TEST_DEVICE narrows the run to one of them.
"""

import math

import pytest
import torch

import reference as ref
import rope_ext
from conftest import (DEVICES, build_qkv, build_table, check_devices, cpu_kernel, on_device,
                      op_view, tdev)

rms_norm_rope_qk = rope_ext.rms_norm_rope_qk
ops = torch.ops.rope

# --- devices ---

check_devices(DEVICES)


@pytest.fixture(autouse=True, params=DEVICES)
def device(request):
    """The device under test: "cpu", "cuda-host" or "cuda" (every test runs on each)."""
    with on_device(request.param):
        yield request.param


def on(device, base, *views):
    """base copied to the device, and each view re-made on the copy (same strides, offset)."""
    moved = base.to(tdev(device), copy=True)
    return (moved,) + tuple(moved.as_strided(v.size(), v.stride(), v.storage_offset())
                            for v in views)


def to(device, t):
    return None if t is None else t.to(tdev(device))


def ref_norm_rope(xv, w, cos, sin, pos, eps, across_heads, weight_offset, interleaved):
    """(the normalized, weighted input, the expected output), both float64 in the op's view."""
    y = ref.rms_norm(xv.detach(), w.detach(), eps, across_heads, weight_offset)
    return y, ref.rope(y, cos.cpu(), sin.cpu(), None if pos is None else pos.cpu(), interleaved)


def aten_norm_rope(xv, w, cos, sin, pos, eps, across_heads, weight_offset, interleaved):
    """The same as a differentiable ATen composition (float64), for gradients."""
    y = ref.rms_norm(xv, w, eps, across_heads, weight_offset)
    return ref.rotate(y, cos.double(), sin.double(), pos, interleaved)


# --- tolerances ---

U32 = 2.0 ** -24


def tolerance(dtype, reduced):
    """Allowed error of the math before the store, in units of an element's pair norm (rotated
    part) or of its own magnitude (the tail). float32 math: the mean of `reduced` squares (at
    most reduced - 1 roundings of a sum of positive terms, halved by the square root), the
    root, the products by x, rstd and the weight, the weight offset and the rotation
    (ref.PAIR_TOL, which includes float32's own store). float64 is held to 1e-12.
    bf16/fp16 add half an ulp of the output dtype on top (assert_norm_rope_close): one
    rounding at the store, so a second rounding (of the normalized value, say) shows."""
    if dtype == torch.float64:
        return 1e-12
    return (reduced / 2 + 12) * U32 + ref.PAIR_TOL[torch.float32]


def half_ulp(want, dtype):
    """Half the spacing of `dtype` at want (float64), the larger of the two binades when the
    rounded value sits on a power of two; 0 for float32 / float64 (in `tolerance`)."""
    if dtype in (torch.float32, torch.float64):
        return torch.zeros_like(want)
    inf = torch.tensor(math.inf, dtype=dtype)
    w = want.abs().to(dtype)
    up = torch.nextafter(w, inf)
    spacing = torch.maximum(up.double() - w.double(),
                            torch.nextafter(up, inf).double() - up.double())
    return 0.5 * spacing


def assert_norm_rope_close(out, want, y, rotary_dim, interleaved, tol, what=""):
    """out (its dtype) against the float64 want: each element within tol * rho + half an ulp of
    out's dtype at want, where rho is, for a rotated element, the larger of its pair's norm in
    y (before the rotation) and in want, and for a tail element |want|. NaN never passes."""
    assert out.shape == want.shape, (what, out.shape, want.shape)
    o = out.detach().double().cpu()
    ia, ib = ref.pair_slots(rotary_dim, interleaved)
    rho_pair = torch.maximum(ref.pair_norms(y, rotary_dim, interleaved),
                             ref.pair_norms(want, rotary_dim, interleaved))
    rho = want.abs().clone()
    rho[..., ia] = rho_pair
    rho[..., ib] = rho_pair
    err = (o - want).abs()
    bound = tol * rho + half_ulp(want, out.dtype) + ref.ABS_FLOOR
    bad = ~(err <= bound)
    if bad.any():
        idx = tuple(t[0].item() for t in bad.nonzero(as_tuple=True))
        part = "tail" if idx[-1] >= rotary_dim else "rotated"
        worst = ((err - half_ulp(want, out.dtype)).clamp_min(0) / (rho + ref.ABS_FLOOR))
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} elements off; first at {idx} ({part}): "
            f"got {o[idx].item()!r}, expected {want[idx].item()!r}, error {err[idx].item():.3g}, "
            f"allowed {bound[idx].item():.3g}; worst (error - half ulp) / rho = "
            f"{worst.nan_to_num(math.inf).max().item():.3g}, allowed {tol:.3g} ({out.dtype})")


# --- inputs ---

B, S, HQ, HK, D = 2, 3, 4, 2, 16
T = 5  # thd tokens
PAIRINGS = pytest.mark.parametrize("interleaved", [False, True], ids=["halfsplit", "interleaved"])
ACROSS = pytest.mark.parametrize("across_heads", [False, True], ids=["per_head", "across_heads"])
OFFSETS = pytest.mark.parametrize("weight_offset", [0.0, 1.0], ids=["offset0", "offset1"])
X_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def dname(d):
    return str(d).split(".")[-1]


def rotary_dim(rotary, head_dim=D):
    return head_dim if rotary == "full" else head_dim // 2  # partial: a tail of head_dim / 2


def make_qk(layout, storage, dtype, head_dim=D, hq=HQ, hk=HK, batch=B, seq=S, tokens=T):
    """(base, q, k, qv, kv): q and k in the caller's layout, qv / kv their op views.

    storage "contiguous": q and k tensors of their own; "fused": slices of one qkv projection
    [*lead, (hq + 2 hk) * d] viewed per head (for bhsd: that [b, s, h, d] view transposed to
    [b, h, s, d], a non-contiguous bhsd view)."""
    lead = (tokens,) if layout == "thd" else (batch, seq)
    if storage == "fused":
        base, qv, kv, _ = build_qkv(lead, hq, hk, head_dim, dtype)
    else:
        base = torch.randn(lead + ((hq + hk) * head_dim,), dtype=torch.float64).to(dtype)
        qv = base[..., :hq * head_dim].unflatten(-1, (hq, head_dim))
        kv = base[..., hq * head_dim:].unflatten(-1, (hk, head_dim))
        if layout == "bhsd":  # contiguous [b, h, s, d] tensors
            qc = qv.transpose(1, 2).contiguous()
            kc = kv.transpose(1, 2).contiguous()
            base = torch.cat([qc.reshape(-1), kc.reshape(-1)])
            q = base[:qc.numel()].view(qc.shape)
            k = base[qc.numel():].view(kc.shape)
            return base, q, k, q.transpose(1, 2), k.transpose(1, 2)
        qv, kv = qv.clone(), kv.clone()
        return None, qv, kv, qv, kv
    if layout == "bhsd":
        return base, qv.transpose(1, 2), kv.transpose(1, 2), qv, kv
    return base, qv, kv, qv, kv


def make_weights(across_heads, weight_offset, dtype, head_dim=D, hq=HQ, hk=HK):
    """Weights near 1 for offset 0 (Qwen3), near 0 for offset 1 (Gemma's 1 + w)."""
    def w(heads):
        n = heads * head_dim if across_heads else head_dim
        v = 0.5 * torch.randn(n, dtype=torch.float64)
        return (v if weight_offset else 1.0 + v).to(dtype)

    return w(hq), w(hk)


def qk_on(device, base, q, k):
    """q and k on the device, sharing one buffer when they did here."""
    if base is None:
        return q.to(tdev(device), copy=True), k.to(tdev(device), copy=True)
    return on(device, base, q, k)[1:]


def check_against_reference(device, layout, form, storage, rotary, interleaved, across_heads,
                            weight_offset, dtype, w_dtype, head_dim=D, eps=None, scale=1.0):
    r = rotary_dim(rotary, head_dim)
    base, q, k, qv, kv = make_qk(layout, storage, dtype, head_dim)
    if scale != 1.0:  # new q and k tensors of their own
        base, q, k = None, (q.double() * scale).to(dtype), (k.double() * scale).to(dtype)
        qv, kv = op_view(q, layout), op_view(k, layout)
    batch = None if layout == "thd" else B
    seq = T if layout == "thd" else S
    cos, sin, pos = build_table(form, batch, seq, r // 2)
    qw, kw = make_weights(across_heads, weight_offset, w_dtype, head_dim)
    qd, kd = qk_on(device, base, q, k)
    kwargs = dict(q_weight=to(device, qw), k_weight=to(device, kw), across_heads=across_heads,
                  weight_offset=weight_offset, interleaved=interleaved, layout=layout)
    if eps is not None:
        kwargs["eps"] = eps
    qo, ko = rms_norm_rope_qk(qd, kd, to(device, cos), to(device, sin), to(device, pos), **kwargs)
    eps = 1e-6 if eps is None else eps
    for name, x, xv, w, out, heads in (("q", q, qv, qw, qo, HQ), ("k", k, kv, kw, ko, HK)):
        assert out.shape == x.shape and out.dtype == dtype, (name, out.shape, out.dtype)
        assert out.device.type == tdev(device)
        y, want = ref_norm_rope(xv, w, cos, sin, pos, eps, across_heads, weight_offset,
                                interleaved)
        reduced = heads * head_dim if across_heads else head_dim
        assert_norm_rope_close(op_view(out, layout), want, y, r, interleaved,
                               tolerance(dtype, reduced), name)
    # the inputs are left alone
    assert torch.equal(qd.cpu(), q) and torch.equal(kd.cpu(), k)


# --- against the float64 reference ---

LAYOUT_FORMS = [("bshd", "pos_bs"), ("bshd", "pos_s"), ("bshd", "rows"), ("bshd", "tok_bs"),
                ("bshd", "tok_s"), ("bhsd", "pos_bs"), ("bhsd", "tok_bs"), ("thd", "pos_s")]


@OFFSETS
@ACROSS
@PAIRINGS
@pytest.mark.parametrize("rotary", ["full", "partial"])
@pytest.mark.parametrize("storage", ["contiguous", "fused"])
@pytest.mark.parametrize("layout,form", LAYOUT_FORMS, ids=[f"{a}-{b}" for a, b in LAYOUT_FORMS])
def test_layouts_tables_pairings(device, layout, form, storage, rotary, interleaved,
                                 across_heads, weight_offset):
    check_against_reference(device, layout, form, storage, rotary, interleaved, across_heads,
                            weight_offset, torch.float32, torch.float32)


# Weights in float32 or in x's dtype (the two allowed); float32 x has only the first.
DTYPE_CASES = [(x, w) for x in X_DTYPES for w in dict.fromkeys([torch.float32, x])]


@OFFSETS
@ACROSS
@pytest.mark.parametrize("layout,form,storage,interleaved", [
    ("bshd", "pos_bs", "fused", False), ("bhsd", "tok_bs", "fused", True),
    ("thd", "pos_s", "contiguous", True)], ids=["bshd", "bhsd", "thd"])
@pytest.mark.parametrize("x_dtype,w_dtype", DTYPE_CASES,
                         ids=[f"x_{dname(x)}-w_{dname(w)}" for x, w in DTYPE_CASES])
def test_dtypes(device, x_dtype, w_dtype, layout, form, storage, interleaved, across_heads,
                weight_offset):
    check_against_reference(device, layout, form, storage, "partial", interleaved, across_heads,
                            weight_offset, x_dtype, w_dtype)


@ACROSS
@PAIRINGS
@pytest.mark.parametrize("head_dim,rotary", [
    (64, "full"), (128, "full"), (256, "full"), (96, "full"), (64, "partial"), (128, "partial"),
    (256, "partial"), (12, "full"), (12, "partial"), (6, "partial")])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=dname)
def test_head_dims(device, dtype, head_dim, rotary, interleaved, across_heads):
    # 64, 128, 256 fully rotated: the CPU kernel's fixed head sizes (unrolled at compile time);
    # 96: a run-time size beside them; partial: a fixed number of pairs in a run-time head_dim
    # (whole vectors of every dtype); 12, 6: the scalar tails (r/2 odd for 6 and 12).
    check_against_reference(device, "bshd", "pos_bs", "fused", rotary, interleaved,
                            across_heads, 0.0, dtype, torch.float32, head_dim=head_dim)


@ACROSS
@pytest.mark.parametrize("head_dim", [128, 96], ids=["fixed_size", "runtime_size"])
def test_streamed_outputs(device, head_dim, across_heads):
    """Outputs of 16 MB and more are written around the cache on the CPU (streaming stores,
    as the rotation's; the kernel counts 2 * tokens * the larger row, here 2 * 704 * 64 * d
    bf16 elements): bf16 q [1, 704, 64, d] and k [1, 704, 2, d], every token checked."""
    seq, hq, hk = 704, 64, 2
    g = torch.Generator().manual_seed(7)
    q = torch.randn(1, seq, hq, head_dim, generator=g, dtype=torch.float64).to(torch.bfloat16)
    k = torch.randn(1, seq, hk, head_dim, generator=g, dtype=torch.float64).to(torch.bfloat16)
    cos, sin, pos = build_table("pos_bs", 1, seq, head_dim // 2, generator=g)
    qw, kw = make_weights(across_heads, 0.0, torch.float32, head_dim, hq, hk)
    qo, ko = rms_norm_rope_qk(to(device, q), to(device, k), to(device, cos), to(device, sin),
                              to(device, pos), q_weight=to(device, qw), k_weight=to(device, kw),
                              across_heads=across_heads)
    for name, x, w, out, heads in (("q", q, qw, qo, hq), ("k", k, kw, ko, hk)):
        y, want = ref_norm_rope(x, w, cos, sin, pos, 1e-6, across_heads, 0.0, False)
        reduced = heads * head_dim if across_heads else head_dim
        assert_norm_rope_close(out, want, y, head_dim, False, tolerance(torch.bfloat16, reduced),
                               name)


@ACROSS
@pytest.mark.parametrize("eps", [1e-2, 0.5])
def test_eps_enters_the_norm(device, eps, across_heads):
    # x scaled so that mean(x**2) is near eps: a kernel that ignored eps would be far off.
    check_against_reference(device, "bshd", "pos_bs", "contiguous", "partial", False,
                            across_heads, 0.0, torch.float32, torch.float32, eps=eps,
                            scale=math.sqrt(eps))


@ACROSS
@pytest.mark.parametrize("dtype", X_DTYPES, ids=dname)
def test_zero_rows_give_zero_not_nan(device, dtype, across_heads):
    _, q, k, _, _ = make_qk("bshd", "contiguous", dtype)
    if across_heads:
        q[0, 1] = 0  # a whole token of q
        k[1, 2] = 0
    else:
        q[0, 1, 2] = 0  # one head
        k[1, 2, 0] = 0
    cos, sin, pos = build_table("pos_bs", B, S, D // 4)
    qw, kw = make_weights(across_heads, 0.0, torch.float32)
    qd, kd = to(device, q).requires_grad_(), to(device, k)
    qo, ko = rms_norm_rope_qk(qd, kd, to(device, cos), to(device, sin), to(device, pos),
                              q_weight=to(device, qw), k_weight=to(device, kw),
                              across_heads=across_heads)
    assert torch.isfinite(qo).all() and torch.isfinite(ko).all()
    zq, zk = (qo[0, 1], ko[1, 2]) if across_heads else (qo[0, 1, 2], ko[1, 2, 0])
    assert torch.equal(zq, torch.zeros_like(zq)) and torch.equal(zk, torch.zeros_like(zk))
    # The gradient at a zero row is finite too: rstd = 1/sqrt(eps), the d(rstd) term is 0.
    g = torch.randn(qo.shape, dtype=torch.float64).to(dtype)
    (grad,) = torch.autograd.grad(qo, qd, to(device, g))
    assert torch.isfinite(grad).all()
    x64 = q.detach().double().requires_grad_()
    want = aten_norm_rope(x64, qw, cos, sin, pos, 1e-6, across_heads, 0.0, False)
    (want,) = torch.autograd.grad(want, x64, g.double())
    zg, zw = (grad[0, 1], want[0, 1]) if across_heads else (grad[0, 1, 2], want[0, 1, 2])
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 2.0 ** -7)
    torch.testing.assert_close(zg.double().cpu(), zw, rtol=0, atol=tol * zw.abs().max().item())


@ACROSS
@pytest.mark.parametrize("empty", ["q", "k"])
def test_zero_heads(device, empty, across_heads):
    """A tensor with no heads (its weight [head_dim], or [0] across heads): an empty output and
    a zero weight gradient; the other tensor as if alone (float64 reference and gradients)."""
    hq, hk = (0, HK) if empty == "q" else (HQ, 0)
    _, q, k, _, _ = make_qk("bshd", "contiguous", torch.float64, hq=hq, hk=hk)
    qw, kw = make_weights(across_heads, 0.0, torch.float64, hq=hq, hk=hk)
    cos, sin, pos = build_table("pos_bs", B, S, D // 2, torch.float64)
    leaves = [to(device, t).requires_grad_() for t in (q, k, qw, kw)]
    qo, ko = rms_norm_rope_qk(*leaves[:2], to(device, cos), to(device, sin), to(device, pos),
                              q_weight=leaves[2], k_weight=leaves[3], across_heads=across_heads)
    assert qo.shape == q.shape and ko.shape == k.shape
    g = [torch.randn(t.shape, dtype=torch.float64) for t in (q, k)]
    got = torch.autograd.grad((qo, ko), leaves, [to(device, t) for t in g])
    x64 = [t.detach().clone().requires_grad_() for t in (q, k, qw, kw)]
    want_q = aten_norm_rope(x64[0], x64[2], cos, sin, pos, 1e-6, across_heads, 0.0, False)
    want_k = aten_norm_rope(x64[1], x64[3], cos, sin, pos, 1e-6, across_heads, 0.0, False)
    torch.testing.assert_close(qo.cpu(), want_q.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ko.cpu(), want_k.detach(), rtol=1e-12, atol=1e-12)
    want = torch.autograd.grad((want_q, want_k), x64, g, allow_unused=True)
    for name, a, b, leaf in zip(("q", "k", "q_weight", "k_weight"), got, want, x64):
        b = torch.zeros_like(leaf) if b is None else b
        assert a.shape == leaf.shape, name
        torch.testing.assert_close(a.cpu(), b, rtol=1e-10, atol=1e-10, msg=name)


@ACROSS
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_input_stays_in_its_norm_group(device, across_heads, value):
    """A NaN or an infinity in one element of q reaches no output outside its norm group (its
    head, or with across_heads its token of q): every other element of q and k is bit for bit
    what it is without it, and the group holds no finite value but zeros."""
    _, q, k, _, _ = make_qk("bshd", "contiguous", torch.float32)
    cos, sin, pos = build_table("pos_bs", B, S, D // 2)
    qw, kw = make_weights(across_heads, 0.0, torch.float32)
    bad = q.clone()
    bad[1, 2, 1, 3] = value

    def run(x):
        return rms_norm_rope_qk(to(device, x), to(device, k), to(device, cos), to(device, sin),
                                to(device, pos), q_weight=to(device, qw), k_weight=to(device, kw),
                                across_heads=across_heads)

    (qo, ko), (q_bad, k_bad) = run(q), run(bad)
    assert torch.equal(k_bad, ko)
    group = torch.zeros(q.shape, dtype=torch.bool)
    if across_heads:
        group[1, 2] = True
    else:
        group[1, 2, 1] = True
    group = to(device, group)
    assert torch.equal(q_bad[~group], qo[~group])
    in_group = q_bad[group]
    assert (~torch.isfinite(in_group) | (in_group == 0)).all(), in_group
    assert not torch.isfinite(in_group).all()


# --- properties ---


@ACROSS
@pytest.mark.parametrize("layout", ["bshd", "bhsd", "thd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dname)
def test_unit_weight_keeps_rms_one(device, dtype, layout, across_heads):
    """Weight 1, offset 0: every rotated head has RMS sqrt(ms / (ms + eps)), 1 up to eps
    (the rotation keeps each head's norm); across heads, every token's RMS."""
    _, q, k, qv, kv = make_qk(layout, "fused", dtype)
    batch, seq = (None, T) if layout == "thd" else (B, S)
    # partial, r = head_dim / 2; a float64 table for float64 (a float32 row is not unit length)
    cos, sin, pos = build_table("pos_s", batch, seq, D // 4, dtype)
    qw = torch.ones(HQ * D if across_heads else D, dtype=dtype)
    kw = torch.ones(HK * D if across_heads else D, dtype=dtype)
    outs = rms_norm_rope_qk(to(device, q), to(device, k), to(device, cos), to(device, sin),
                            to(device, pos), q_weight=to(device, qw), k_weight=to(device, kw),
                            across_heads=across_heads, layout=layout)
    tol = 1e-12 if dtype == torch.float64 else 4e-6
    for xv, out in ((qv, outs[0]), (kv, outs[1])):
        o = op_view(out, layout).double().cpu()
        x = xv.double()
        if across_heads:
            o, x = o.flatten(-2), x.flatten(-2)
        ms = x.pow(2).mean(-1)
        want = torch.sqrt(ms / (ms + 1e-6))
        got = o.pow(2).mean(-1).sqrt()
        torch.testing.assert_close(got, want, rtol=tol, atol=0)
        assert (got - 1).abs().max() < 1e-4  # randn inputs: ms >> eps


@ACROSS
@OFFSETS
@PAIRINGS
@pytest.mark.parametrize("layout,form", [("bshd", "pos_bs"), ("bhsd", "rows"), ("thd", "pos_s")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dname)
def test_equals_apply_rope_qk_of_the_normalized_input(device, dtype, layout, form, interleaved,
                                                      weight_offset, across_heads):
    _, q, k, qv, kv = make_qk(layout, "fused", dtype)
    batch, seq = (None, T) if layout == "thd" else (B, S)
    r = rotary_dim("partial")
    cos, sin, pos = build_table(form, batch, seq, r // 2)
    qw, kw = make_weights(across_heads, weight_offset, dtype)
    args = [to(device, t) for t in (cos, sin, pos)]
    got = rms_norm_rope_qk(to(device, q), to(device, k), *args, q_weight=to(device, qw),
                           k_weight=to(device, kw), across_heads=across_heads,
                           weight_offset=weight_offset, interleaved=interleaved, layout=layout)
    yq = op_view(ref.rms_norm(qv, qw, 1e-6, across_heads, weight_offset), layout)
    yk = op_view(ref.rms_norm(kv, kw, 1e-6, across_heads, weight_offset), layout)
    want = rope_ext.apply_rope_qk(to(device, yq.to(dtype)), to(device, yk.to(dtype)), *args,
                                  interleaved=interleaved, layout=layout)
    # float64: the same rotation of the same values; float32: apart by the normalization's
    # rounding (y is rounded to float32 before apply_rope_qk, the kernel keeps it in registers).
    for heads, g, w in ((HQ, got[0], want[0]), (HK, got[1], want[1])):
        reduced = heads * D if across_heads else D
        tol = 1e-12 if dtype == torch.float64 else tolerance(dtype, reduced) + 2 * U32
        scale = w.abs().amax(-1, keepdim=True).double().cpu()
        err = (g.double().cpu() - w.double().cpu()).abs()
        assert bool((err <= tol * scale).all()), f"max error / scale {(err / scale).max():.3g}"


# --- gradients ---


def _grad_inputs(device, dtype, across_heads, weight_offset, layout="bshd", hq=2, hk=1,
                 head_dim=6, batch=1, seq=3, pairs=2):
    """Small leaves for gradcheck: q, k (layout), weights, table (r = 2 * pairs: 4 of
    head_dim 6)."""
    _, q, k, _, _ = make_qk(layout, "fused", dtype, head_dim, hq, hk, batch, seq, tokens=seq)
    qw, kw = make_weights(across_heads, weight_offset, dtype, head_dim, hq, hk)
    form = "pos_s" if layout == "thd" else "pos_bs"
    table_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    cos, sin, pos = build_table(form, None if layout == "thd" else batch, seq, pairs, table_dtype)
    leaves = [to(device, t).detach().requires_grad_() for t in (q, k, qw, kw)]
    return leaves, [to(device, t) for t in (cos, sin, pos)]


@ACROSS
@PAIRINGS
@pytest.mark.parametrize("layout,weight_offset", [("bshd", 0.0), ("bhsd", 1.0), ("thd", 1.0)])
def test_gradcheck_and_gradgradcheck(device, layout, interleaved, across_heads, weight_offset):
    leaves, (cos, sin, pos) = _grad_inputs(device, torch.float64, across_heads, weight_offset,
                                           layout)

    def fn(q, k, qw, kw):
        return rms_norm_rope_qk(q, k, cos, sin, pos, q_weight=qw, k_weight=kw, eps=1e-3,
                                across_heads=across_heads, weight_offset=weight_offset,
                                interleaved=interleaved, layout=layout)

    assert torch.autograd.gradcheck(fn, leaves)
    assert torch.autograd.gradgradcheck(fn, leaves)


@ACROSS
@PAIRINGS
@pytest.mark.parametrize("layout", ["bshd", "bhsd", "thd"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=dname)
def test_gradients_match_aten_composition(device, dtype, layout, interleaved, across_heads):
    check_gradients(device, dtype, layout, interleaved, across_heads,
                    1.0 if interleaved else 0.0, head_dim=16, pairs=2)


@ACROSS
@PAIRINGS
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=dname)
def test_gradients_at_head_sizes_models_use(device, dtype, head_dim, interleaved, across_heads):
    """Fully rotated heads of 64, 128, 256: the CPU backward's fixed-size path (half-split
    pairs, a norm per head or across heads; interleaved ones take the general path)."""
    check_gradients(device, dtype, "bshd", interleaved, across_heads, 0.0, head_dim=head_dim,
                    pairs=head_dim // 2)


def check_gradients(device, dtype, layout, interleaved, across_heads, weight_offset, head_dim,
                    pairs):
    """The op's gradients of q, k and both weights against the float64 ATen composition's."""
    leaves, (cos, sin, pos) = _grad_inputs(device, dtype, across_heads, weight_offset, layout,
                                           hq=4, hk=2, head_dim=head_dim, batch=2, seq=5,
                                           pairs=pairs)
    q, k, qw, kw = leaves
    gq = torch.randn(q.shape, dtype=torch.float64).to(dtype).to(q.device)
    gk = torch.randn(k.shape, dtype=torch.float64).to(dtype).to(q.device)
    qo, ko = rms_norm_rope_qk(q, k, cos, sin, pos, q_weight=qw, k_weight=kw,
                              across_heads=across_heads, weight_offset=weight_offset,
                              interleaved=interleaved, layout=layout)
    torch.autograd.backward([qo, ko], [gq, gk])
    got = [t.grad for t in leaves]

    ref_leaves = [t.detach().double().cpu().requires_grad_() for t in leaves]
    rq, rk, rqw, rkw = ref_leaves
    c64, s64 = cos.double().cpu(), sin.double().cpu()
    p = pos.cpu()
    outs = [op_view(aten_norm_rope(op_view(x, layout), w, c64, s64, p, 1e-6, across_heads,
                                   weight_offset, interleaved), layout)
            for x, w in ((rq, rqw), (rk, rkw))]
    torch.autograd.backward(outs, [gq.double().cpu(), gk.double().cpu()])
    # Relative to the largest gradient element: float32 math with sums over tokens, then one
    # rounding to the leaf's dtype.
    tol = {torch.float64: 1e-11, torch.float32: 2e-5, torch.bfloat16: 2.0 ** -7,
           torch.float16: 2.0 ** -10}[dtype]
    for name, g, want in zip(("q", "k", "q_weight", "k_weight"), got, ref_leaves):
        assert g.dtype == dtype and g.shape == want.shape, (name, g.dtype, g.shape)
        want = want.grad
        scale = want.abs().max().item()
        err = (g.double().cpu() - want).abs().max().item()
        assert err <= tol * scale, f"{name}: max error {err:.3g}, scale {scale:.3g}, tol {tol}"


@ACROSS
def test_weight_grads_deterministic(device, across_heads):
    """Weight gradients (a sum over every token) are bitwise reproducible: run to run, and on
    the CPU whatever the thread count."""
    _, q, k, _, _ = make_qk("bshd", "fused", torch.float32, 32, 4, 2, batch=4, seq=64)
    cos, sin, pos = build_table("pos_bs", 4, 64, 8)
    qw, kw = make_weights(across_heads, 0.0, torch.float32, 32, 4, 2)
    gq, gk = torch.randn(q.shape), torch.randn(k.shape)

    def weight_grads():
        qw_ = to(device, qw).requires_grad_()
        kw_ = to(device, kw).requires_grad_()
        qo, ko = rms_norm_rope_qk(to(device, q), to(device, k), to(device, cos), to(device, sin),
                                  to(device, pos), q_weight=qw_, k_weight=kw_,
                                  across_heads=across_heads)
        torch.autograd.backward([qo, ko], [to(device, gq), to(device, gk)])
        return qw_.grad.cpu(), kw_.grad.cpu()

    first = weight_grads()
    for again in (weight_grads(), weight_grads()):
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    if tdev(device) == "cpu":
        threads = torch.get_num_threads()
        try:
            results = {}
            for n in (1, 2, 3):
                torch.set_num_threads(n)
                results[n] = weight_grads()
        finally:
            torch.set_num_threads(threads)
        for n in (2, 3):
            assert torch.equal(results[1][0], results[n][0]), f"q_weight grad, 1 vs {n} threads"
            assert torch.equal(results[1][1], results[n][1]), f"k_weight grad, 1 vs {n} threads"


# --- the ops underneath: rstd, backward op, opcheck ---


def _op_samples(device, dtype, requires_grad):
    """(q, k, cos, sin, positions, q_weight, k_weight, eps, across_heads, weight_offset,
    interleaved) as the op takes them ([b, s, h, d] / [t, h, d] views)."""
    def leaf(t):
        return to(device, t).detach().requires_grad_(requires_grad)

    samples = []
    # bshd slices of a fused qkv, [b, s] int32 positions, float32 weights, per head.
    base, q, k, _ = build_qkv((2, 3), 4, 2, 8, dtype)
    _, qd, kd = on(device, base, q, k)
    qd, kd = qd.detach().requires_grad_(requires_grad), kd.detach().requires_grad_(requires_grad)
    cos, sin, pos = build_table("pos_bs", 2, 3, 4, torch.float32, torch.int32)
    qw, kw = make_weights(False, 0.0, torch.float32, 8, 4, 2)
    samples.append((qd, kd, to(device, cos), to(device, sin), to(device, pos), leaf(qw), leaf(kw),
                    1e-6, False, 0.0, False))
    # thd, across heads, Gemma offset, interleaved, partial, weights and table in x's dtype.
    _, q, k, _ = build_qkv((5,), 2, 1, 8, dtype)
    cos, sin, pos = build_table("pos_s", None, 5, 2, dtype, torch.int64)
    qw, kw = make_weights(True, 1.0, dtype, 8, 2, 1)
    samples.append((leaf(q), leaf(k), to(device, cos), to(device, sin), to(device, pos),
                    leaf(qw), leaf(kw), 1e-5, True, 1.0, True))
    # a bhsd tensor's [b, s, h, d] view, per-token float64 table, no positions, partial.
    _, q, k, _, _ = make_qk("bhsd", "contiguous", dtype, 8, 2, 2)
    qv = to(device, q.clone()).transpose(1, 2)  # [b, s, h, d], non-contiguous
    kv = to(device, k.clone()).transpose(1, 2)
    cos, sin, _ = build_table("tok_bs", 2, 3, 3, torch.float64)
    qw, kw = make_weights(False, 0.0, dtype, 8, 2, 2)
    samples.append((qv.detach().requires_grad_(requires_grad),
                    kv.detach().requires_grad_(requires_grad), to(device, cos), to(device, sin),
                    None, leaf(qw), leaf(kw), 1e-6, False, 0.0, False))
    return samples


@pytest.mark.parametrize("dtype", X_DTYPES, ids=dname)
def test_op_rstd_and_outputs(device, dtype):
    for q, k, cos, sin, pos, qw, kw, eps, across, offset, inter in _op_samples(device, dtype,
                                                                             False):
        qo, ko, q_rstd, k_rstd = ops.rms_norm_rope_qk(q, k, cos, sin, pos, qw, kw, eps, across,
                                                      offset, inter)
        rstd_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        for name, x, w, out, rstd in (("q", q, qw, qo, q_rstd), ("k", k, kw, ko, k_rstd)):
            want_shape = x.shape[:-2] + (1,) if across else x.shape[:-1]
            assert rstd.shape == want_shape and rstd.dtype == rstd_dtype, (name, rstd.shape,
                                                                           rstd.dtype)
            want = ref.rms_rstd(x.detach().cpu(), eps, across)
            torch.testing.assert_close(rstd.double().cpu(), want, atol=0,
                                       rtol=1e-12 if dtype == torch.float64 else 64 * U32)
            y, want = ref_norm_rope(x.cpu(), w.cpu(), cos, sin, pos, eps, across, offset, inter)
            reduced = x.shape[-2] * x.shape[-1] if across else x.shape[-1]
            assert_norm_rope_close(out, want, y, 2 * cos.shape[-1], inter,
                                   tolerance(dtype, reduced), name)


@pytest.mark.parametrize("heads", [(16, 8), (40, 17)], ids=["16_8", "40_17"])
@pytest.mark.parametrize("head_dim", [128, 96])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=dname)
def test_many_heads_per_head_norm(device, dtype, head_dim, heads):
    """A per-head norm over many heads: the AVX-512 kernels sum the squares of sixteen heads
    at a time in one transposing sum, the heads past the last sixteen one at a time, so each
    head's rstd (checked head by head) and output must be its own: 16 heads (one group), 40
    (two groups and 8 more), 17 (one group and one), 8 (none)."""
    hq, hk = heads
    _, q, k, qv, kv = make_qk("bshd", "contiguous", dtype, head_dim=head_dim, hq=hq, hk=hk,
                              batch=2, seq=5)
    # Heads of different scales, so that a head given another's sum shows.
    with torch.no_grad():
        q.mul_(torch.linspace(0.25, 4.0, hq, dtype=torch.float64).to(dtype)[:, None])
        k.mul_(torch.linspace(4.0, 0.5, hk, dtype=torch.float64).to(dtype)[:, None])
    cos, sin, pos = build_table("pos_bs", 2, 5, head_dim // 2)
    qw, kw = make_weights(False, 0.0, torch.float32, head_dim, hq, hk)
    args = [to(device, t) for t in (q, k, cos, sin, pos, qw, kw)]
    qo, ko, q_rstd, k_rstd = ops.rms_norm_rope_qk(*args, 1e-6, False, 0.0, False)
    for name, x, w, out, rstd in (("q", q, qw, qo, q_rstd), ("k", k, kw, ko, k_rstd)):
        torch.testing.assert_close(rstd.double().cpu(), ref.rms_rstd(x.detach(), 1e-6, False),
                                   atol=0, rtol=64 * U32)
        y, want = ref_norm_rope(x, w, cos, sin, pos, 1e-6, False, 0.0, False)
        assert_norm_rope_close(out, want, y, head_dim, False, tolerance(dtype, head_dim), name)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dname)
def test_op_backward_matches_autograd(device, dtype):
    for q, k, cos, sin, pos, qw, kw, eps, across, offset, inter in _op_samples(device, dtype,
                                                                             True):
        qo, ko, q_rstd, k_rstd = ops.rms_norm_rope_qk(q, k, cos, sin, pos, qw, kw, eps, across,
                                                      offset, inter)
        gq, gk = torch.randn_like(qo), torch.randn_like(ko)
        want = torch.autograd.grad([qo, ko], [q, k, qw, kw], [gq, gk])
        with torch.no_grad():
            got = ops.rms_norm_rope_qk_backward(gq, gk, q, k, cos, sin, pos, qw, kw, q_rstd,
                                                k_rstd, across, offset, inter)
        tol = 1e-12 if dtype == torch.float64 else 1e-6
        for name, g, w in zip(("grad_q", "grad_k", "grad_q_weight", "grad_k_weight"), got, want):
            assert g.shape == w.shape and g.dtype == w.dtype, (name, g.shape, g.dtype)
            # the autograd formula should be this op: equal up to a reassociated sum at most
            torch.testing.assert_close(g, w, rtol=tol, atol=tol * w.abs().max().item(),
                                       msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("launch", ["block_threads=2", "block_threads=2,vectorize=0"])
def test_lanes_with_several_units(device, launch):
    """A block narrower than a head's units: each lane takes several runs of the head and
    phase 2 of the CUDA forward reads them again, where with one run a lane keeps it in
    registers from phase 1. The plan must say so, and the results match the default plan's
    (up to the order of the sum of squares) and the float64 reference."""
    if device == "cpu":
        pytest.skip("a launch setting of the CUDA kernel")
    d = 64  # 4 runs of 16 bytes a head in bf16, 32 of one element
    _, q, k, qv, kv = make_qk("bshd", "contiguous", torch.bfloat16, head_dim=d)
    cos, sin, pos = build_table("pos_bs", B, S, d // 2)
    qw, kw = make_weights(False, 0.0, torch.float32, head_dim=d)
    args = [to(device, t) for t in (q, k, cos, sin, pos, qw, kw)]
    default = ops.rms_norm_rope_qk(*args, 1e-6, False, 0.0, False)
    previous = torch.ops.rope_testing.set_cuda_launch(launch)
    try:
        narrow = ops.rms_norm_rope_qk(*args, 1e-6, False, 0.0, False)
        if device == "cuda-host":
            plan = dict(kv_.split("=") for kv_ in
                        torch.ops.rope_testing.last_host_plan().split(","))
            assert int(plan["units"]) > int(plan["block_x"]), plan
    finally:
        torch.ops.rope_testing.set_cuda_launch(previous)
    for got, want in zip(narrow, default):
        torch.testing.assert_close(got, want, rtol=0, atol=float(want.abs().max()) * 2 ** -7)
    for name, xv, w, out in (("q", qv, qw, narrow[0]), ("k", kv, kw, narrow[1])):
        y, want = ref_norm_rope(xv, w, cos, sin, pos, 1e-6, False, 0.0, False)
        assert_norm_rope_close(out, want, y, d, False, tolerance(torch.bfloat16, d), name)


def test_occupancy_build_of_the_forward(device):
    """norm_min_blocks=4 runs the forward's vector path in the kernel built for 4 blocks of
    256 threads per SM (64 registers): the same arithmetic, so the same bits as the default
    plan; the backward and the scalar path keep the plain kernel."""
    if device == "cpu":
        pytest.skip("a launch setting of the CUDA kernel")
    _, q, k, qv, kv = make_qk("bshd", "contiguous", torch.bfloat16, head_dim=64)
    cos, sin, pos = build_table("pos_bs", B, S, 32)
    qw, kw = make_weights(False, 0.0, torch.float32, head_dim=64)
    args = [to(device, t) for t in (q, k, cos, sin, pos, qw, kw)]
    grads = [to(device, torch.randn_like(t.float()).to(t.dtype)) for t in (q, k)]

    def run():
        out = ops.rms_norm_rope_qk(*args, 1e-6, False, 0.0, False)
        back = ops.rms_norm_rope_qk_backward(*grads, *args, out[2], out[3], False, 0.0, False)
        return out, back

    def plan():
        return dict(kv_.split("=") for kv_ in torch.ops.rope_testing.last_host_plan().split(","))

    default = run()
    previous = torch.ops.rope_testing.set_cuda_launch("norm_min_blocks=4")
    try:
        ops.rms_norm_rope_qk(*args, 1e-6, False, 0.0, False)
        if device == "cuda-host":
            assert plan()["min_blocks"] == "4", plan()
        bounded = run()
        if device == "cuda-host":
            assert plan()["min_blocks"] == "0", plan()  # the backward's plan, run last
    finally:
        torch.ops.rope_testing.set_cuda_launch(previous)
    for got, want in zip(bounded[0] + bounded[1], default[0] + default[1]):
        assert torch.equal(got, want)
    y, want = ref_norm_rope(qv, qw, cos, sin, pos, 1e-6, False, 0.0, False)
    assert_norm_rope_close(bounded[0][0], want, y, 64, False, tolerance(torch.bfloat16, 64), "q")


@ACROSS
@pytest.mark.parametrize("rotary", [64, 32], ids=["full", "partial"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dname)
def test_prefetch_of_the_next_item(device, dtype, rotary, across_heads):
    """norm_prefetch=1: each lane hints its next item's runs (x; in the backward the gradient
    and the saved x) into L2 before its current item. A hint only: the same bits, forward and
    backward, on a grid of one block that strides over every item (so nearly every item is
    someone's next), with pass-through runs (partial) and lanes of several runs (across
    heads). On the host each hinted address is read, so `make sanitize` checks that every
    one lies inside its tensor."""
    if device == "cpu":
        pytest.skip("a launch setting of the CUDA kernel")
    d = 64
    _, q, k, qv, kv = make_qk("bshd", "contiguous", dtype, head_dim=d)
    cos, sin, pos = build_table("pos_bs", B, S, rotary // 2)
    qw, kw = make_weights(across_heads, 0.0, torch.float32, head_dim=d)
    args = [to(device, t) for t in (q, k, cos, sin, pos, qw, kw)]
    grads = [to(device, torch.randn_like(t.float()).to(t.dtype)) for t in (q, k)]

    def run(launch):
        previous = torch.ops.rope_testing.set_cuda_launch(launch)
        try:
            out = ops.rms_norm_rope_qk(*args, 1e-6, across_heads, 0.0, False)
            plan = torch.ops.rope_testing.last_host_plan() if device == "cuda-host" else ""
            back = ops.rms_norm_rope_qk_backward(*grads, *args, out[2], out[3], across_heads,
                                                 0.0, False)
        finally:
            torch.ops.rope_testing.set_cuda_launch(previous)
        return out + back, plan

    one_block = "sm_count=1,max_blocks_per_sm=1,block_threads=64"
    plain, _ = run(one_block)
    hinted, plan = run(one_block + ",norm_prefetch=1")
    if device == "cuda-host":
        fields = dict(kv_.split("=") for kv_ in plan.split(","))
        assert fields["prefetch"] == "1" and fields["grid"] == "1", fields
        assert int(fields["items"]) > int(fields["block_y"]), fields  # the grid strides
    for got, want in zip(hinted, plain):
        assert torch.equal(got, want)
    y, want = ref_norm_rope(qv, qw, cos, sin, pos, 1e-6, across_heads, 0.0, False)
    reduced = d * HQ if across_heads else d
    assert_norm_rope_close(hinted[0], want, y, rotary, False, tolerance(dtype, reduced), "q")


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dname)
def test_weight_off_a_16_byte_boundary(device, dtype, backward):
    """A float32 weight one element off a 16-byte boundary (a slice of a larger buffer) is
    used as the kernel's scale as it is: the CUDA kernel must then read it one element per
    access (plan scale_runs=0; a 16-byte access would fault on a GPU, and the host executor
    refuses it), an aligned one 16 bytes per access (scale_runs=1). The same results."""
    _, q, k, _, _ = make_qk("bshd", "contiguous", dtype)
    cos, sin, pos = build_table("pos_bs", B, S, D // 2)
    args = [to(device, t) for t in (q, k, cos, sin, pos)]
    weights = [to(device, w) for w in make_weights(False, 0.0, torch.float32)]
    shifted = [torch.cat([w.new_zeros(1), w])[1:] for w in weights]
    assert shifted[0].data_ptr() % 16 == 4
    results, plans = [], []
    for qw, kw in (weights, shifted):
        outs = ops.rms_norm_rope_qk(*args, qw, kw, 1e-6, False, 0.0, False)
        if backward:
            grads = [torch.full_like(t, 0.5) for t in outs[:2]]
            outs = ops.rms_norm_rope_qk_backward(*grads, *args, qw, kw, outs[2], outs[3], False,
                                                 0.0, False)
        results.append(outs)
        if device == "cuda-host":
            plans.append(dict(kv.split("=") for kv in
                              torch.ops.rope_testing.last_host_plan().split(",")))
    for a, b in zip(*results):
        assert torch.equal(a, b)
    if device == "cuda-host":
        assert [p_["scale_runs"] for p_ in plans] == ["1", "0"], plans


@pytest.mark.parametrize("dtype", X_DTYPES, ids=dname)
def test_op_opcheck(device, dtype):
    for sample in _op_samples(device, dtype, requires_grad=True):
        torch.library.opcheck(ops.rms_norm_rope_qk.default, sample)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=dname)
def test_op_opcheck_backward(device, dtype):
    for sample in _op_samples(device, dtype, requires_grad=False):
        q, k, cos, sin, pos, qw, kw, eps, across, offset, inter = sample
        qo, ko, q_rstd, k_rstd = ops.rms_norm_rope_qk(*sample)
        gq, gk = torch.randn_like(qo), torch.randn_like(ko)
        torch.library.opcheck(ops.rms_norm_rope_qk_backward.default,
                              (gq, gk, q, k, cos, sin, pos, qw, kw, q_rstd, k_rstd, across,
                               offset, inter))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dname)
def test_op_opcheck_inplace(device, dtype):
    for sample in _op_samples(device, dtype, requires_grad=False):
        torch.library.opcheck(ops.rms_norm_rope_qk_.default, sample)


def same_layout(t, where):
    """t's whole storage copied to `where`, viewed with t's sizes, strides and offset."""
    if t is None:
        return None
    storage = t.untyped_storage()
    flat = t.new_empty(0).set_(storage, 0, (storage.nbytes() // t.element_size(),))
    return flat.to(where, copy=True).as_strided(t.size(), t.stride(), t.storage_offset())


@pytest.mark.needs_gpu
@pytest.mark.parametrize("dtype", X_DTYPES, ids=dname)
def test_gpu_bit_identical_to_host_executor(device, dtype):
    """The fused kernels on the GPU and executed on the host do the same operations in the same
    order (lane sums, butterfly, token-group partials; -fmad=false on the device,
    -ffp-contract=off on the host), so forward, rstd and backward agree bit for bit."""
    if device != "cuda":
        pytest.skip("compares the GPU with the host executor")
    for sample in _op_samples("cpu", dtype, requires_grad=False):
        q, k, cos, sin, pos, qw, kw, eps, across, offset, inter = sample
        with cpu_kernel("cuda-host"):
            host = ops.rms_norm_rope_qk(*sample)
            gq, gk = torch.randn_like(host[0]), torch.randn_like(host[1])
            host += ops.rms_norm_rope_qk_backward(gq, gk, q, k, cos, sin, pos, qw, kw, host[2],
                                                  host[3], across, offset, inter)
        on_gpu = [same_layout(t, "cuda") for t in (q, k, cos, sin, pos, qw, kw)]
        gpu = ops.rms_norm_rope_qk(*on_gpu, eps, across, offset, inter)
        gpu += ops.rms_norm_rope_qk_backward(gq.cuda(), gk.cuda(), *on_gpu, gpu[2], gpu[3],
                                             across, offset, inter)
        names = ("q_out", "k_out", "q_rstd", "k_rstd", "grad_q", "grad_k", "grad_q_weight",
                 "grad_k_weight")
        for name, g, h in zip(names, gpu, host):
            assert torch.equal(g.cpu(), h), (name, (g.cpu().double() - h.double()).abs().max())


# --- torch.compile ---


@pytest.mark.parametrize("layout,across_heads", [("bshd", False), ("bhsd", True),
                                                 ("thd", False)])
def test_compile_fullgraph_forward_and_backward(device, layout, across_heads):
    torch._dynamo.reset()
    try:
        leaves, (cos, sin, pos) = _grad_inputs(device, torch.float32, across_heads, 1.0, layout,
                                               hq=4, hk=2, head_dim=16, batch=2, seq=5)

        def fn(q, k, qw, kw, cos, sin, pos):
            qo, ko = rms_norm_rope_qk(q, k, cos, sin, pos, q_weight=qw, k_weight=kw,
                                      across_heads=across_heads, weight_offset=1.0,
                                      interleaved=True, layout=layout)
            return (qo * qo).sum() + (ko * 3).sum(), qo, ko

        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
        eager_leaves = [t.detach().clone().requires_grad_() for t in leaves]
        loss_c, qo_c, ko_c = compiled(*leaves, cos, sin, pos)
        loss_e, qo_e, ko_e = fn(*eager_leaves, cos, sin, pos)
        assert torch.equal(qo_c, qo_e) and torch.equal(ko_c, ko_e)
        loss_c.backward()
        loss_e.backward()
        for name, a, b in zip(("q", "k", "q_weight", "k_weight"), leaves, eager_leaves):
            assert torch.equal(a.grad, b.grad), (name, (a.grad - b.grad).abs().max().item())
    finally:
        torch._dynamo.reset()


def test_compile_inplace_on_fused_qkv(device):
    torch._dynamo.reset()
    try:
        base, q, k, v = build_qkv((2, 3), 4, 2, 8)
        cos, sin, pos = (to(device, t) for t in build_table("pos_bs", 2, 3, 4))
        qw, kw = (to(device, t) for t in make_weights(False, 0.0, torch.float32, 8))
        base_e, qe, ke, ve = on(device, base, q, k, v)
        base_c, _, _, vc = on(device, base, q, k, v)
        want = rms_norm_rope_qk(qe, ke, cos, sin, pos, q_weight=qw, k_weight=kw)

        def fn(base):
            q, k = base[..., :32].unflatten(-1, (4, 8)), base[..., 32:48].unflatten(-1, (2, 8))
            rms_norm_rope_qk(q, k, cos, sin, pos, q_weight=qw, k_weight=kw, inplace=True)
            return base.sum()

        torch.compile(fn, fullgraph=True, backend="aot_eager")(base_c)
        assert torch.equal(base_c[..., :32].unflatten(-1, (4, 8)), want[0])
        assert torch.equal(base_c[..., 32:48].unflatten(-1, (2, 8)), want[1])
        assert torch.equal(vc, ve), "v was written"
    finally:
        torch._dynamo.reset()


# --- in place ---


@ACROSS
@pytest.mark.parametrize("layout", ["bshd", "bhsd", "thd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dname)
def test_inplace_equals_functional(device, dtype, layout, across_heads):
    base, q, k, _, _ = make_qk(layout, "fused", dtype)
    batch, seq = (None, T) if layout == "thd" else (B, S)
    cos, sin, pos = (to(device, t) for t in build_table("pos_s", batch, seq, D // 4))
    qw, kw = (to(device, t) for t in make_weights(across_heads, 1.0, torch.float32))
    kwargs = dict(q_weight=qw, k_weight=kw, across_heads=across_heads, weight_offset=1.0,
                  interleaved=True, layout=layout)
    qd, kd = qk_on(device, base, q, k)
    want = rms_norm_rope_qk(qd, kd, cos, sin, pos, **kwargs)
    full = qd._base if qd._base is not None else qd
    hq_d, hk_d = HQ * D, HK * D
    v_before = full[..., hq_d + hk_d:].clone()
    got = rms_norm_rope_qk(qd, kd, cos, sin, pos, inplace=True, **kwargs)
    assert got[0] is qd and got[1] is kd
    assert torch.equal(qd, want[0]) and torch.equal(kd, want[1])
    assert torch.equal(full[..., hq_d + hk_d:], v_before), "v was written"


def _inplace_inputs(device):
    _, q, k, _, _ = make_qk("bshd", "contiguous", torch.float32)
    cos, sin, pos = (to(device, t) for t in build_table("pos_bs", B, S, D // 2))
    qw, kw = (to(device, t) for t in make_weights(False, 0.0, torch.float32))
    return to(device, q), to(device, k), cos, sin, pos, qw, kw


@pytest.mark.parametrize("which", ["q", "k", "q_weight", "k_weight"])
def test_inplace_refuses_what_needs_a_gradient(device, which):
    q, k, cos, sin, pos, qw, kw = _inplace_inputs(device)
    args = {"q": q, "k": k, "q_weight": qw, "k_weight": kw}
    args[which].requires_grad_()
    with pytest.raises(ValueError, match=rf"\b{which}\b"):
        rms_norm_rope_qk(args["q"], args["k"], cos, sin, pos, q_weight=args["q_weight"],
                         k_weight=args["k_weight"], inplace=True)
    with torch.no_grad():  # allowed there
        qo, ko = rms_norm_rope_qk(args["q"], args["k"], cos, sin, pos,
                                  q_weight=args["q_weight"], k_weight=args["k_weight"],
                                  inplace=True)
    assert qo is args["q"] and ko is args["k"]


# --- bad input ---


def _call(entry, q, k, cos, sin, pos, qw, kw, eps=1e-6, across_heads=False):
    if entry == "op":
        return ops.rms_norm_rope_qk(q, k, cos, sin, pos, qw, kw, eps, across_heads, 0.0, False)
    if entry == "op_":
        return ops.rms_norm_rope_qk_(q, k, cos, sin, pos, qw, kw, eps, across_heads, 0.0, False)
    return rms_norm_rope_qk(q, k, cos, sin, pos, q_weight=qw, k_weight=kw, eps=eps,
                            across_heads=across_heads, inplace=entry == "fn[inplace]")


ENTRIES = pytest.mark.parametrize("entry", ["fn", "fn[inplace]", "op", "op_"])


@ENTRIES
@pytest.mark.parametrize("which", ["q_weight", "k_weight"])
@pytest.mark.parametrize("size", [D + 1, D - 2, HQ * D, 0])
def test_error_weight_size(device, entry, which, size):
    q, k, cos, sin, pos, qw, kw = _inplace_inputs(device)
    w = {"q_weight": qw, "k_weight": kw}
    w[which] = torch.ones(size, device=q.device)
    with pytest.raises(ValueError, match=rf"\b{which}\b"):
        _call(entry, q, k, cos, sin, pos, w["q_weight"], w["k_weight"])


@ENTRIES
@pytest.mark.parametrize("which", ["q_weight", "k_weight"])
def test_error_weight_rank(device, entry, which):
    q, k, cos, sin, pos, qw, kw = _inplace_inputs(device)
    w = {"q_weight": qw, "k_weight": kw}
    w[which] = w[which].expand(2, -1)
    with pytest.raises(ValueError, match=rf"\b{which}\b"):
        _call(entry, q, k, cos, sin, pos, w["q_weight"], w["k_weight"])


@ENTRIES
@pytest.mark.parametrize("which", ["q_weight", "k_weight"])
@pytest.mark.parametrize("x_dtype,w_dtype", [
    (torch.float32, torch.int64), (torch.float32, torch.int32), (torch.float32, torch.bool),
    (torch.float32, torch.float16), (torch.float32, torch.bfloat16),
    (torch.float32, torch.float64), (torch.bfloat16, torch.float16),
    (torch.float16, torch.float64), (torch.float32, torch.complex64)],
    ids=lambda d: dname(d))
def test_error_weight_dtype(device, entry, which, x_dtype, w_dtype):
    q, k, cos, sin, pos, qw, kw = _inplace_inputs(device)
    q, k = q.to(x_dtype), k.to(x_dtype)
    w = {"q_weight": qw, "k_weight": kw}
    w[which] = w[which].to(w_dtype)
    with pytest.raises(TypeError, match=rf"\b{which}\b"):
        _call(entry, q, k, cos, sin, pos, w["q_weight"], w["k_weight"])


@ENTRIES
@pytest.mark.parametrize("which", ["q_weight", "k_weight"])
def test_error_weight_none(device, entry, which):
    q, k, cos, sin, pos, qw, kw = _inplace_inputs(device)
    w = {"q_weight": qw, "k_weight": kw}
    w[which] = None
    with pytest.raises(TypeError, match=rf"\b{which} must be a tensor\b"):
        _call(entry, q, k, cos, sin, pos, w["q_weight"], w["k_weight"])


@ENTRIES
def test_error_head_dims_differ(device, entry):
    q, k, cos, sin, pos, qw, kw = _inplace_inputs(device)
    k = torch.cat([k, k[..., :2]], -1)  # head_dim + 2: still holds r, so only the norm objects
    with pytest.raises(ValueError, match=r"same head_dim"):
        _call(entry, q, k, cos, sin, pos, qw, kw)


@pytest.mark.parametrize("offset", [float("inf"), float("nan")])
def test_error_weight_offset_not_finite(device, offset):
    q, k, cos, sin, pos, qw, kw = _inplace_inputs(device)
    with pytest.raises(ValueError, match=r"weight_offset must be finite"):
        rms_norm_rope_qk(q, k, cos, sin, pos, q_weight=qw, k_weight=kw, weight_offset=offset)


def test_error_inplace_q_and_k_share_elements(device):
    q, _, cos, sin, pos, qw, _ = _inplace_inputs(device)
    with pytest.raises(ValueError, match=r"q and k share elements"):
        rms_norm_rope_qk(q, q[:, :, :2], cos, sin, pos, q_weight=qw, k_weight=qw, inplace=True)


def test_error_backward_op_arguments(device):
    q, k, cos, sin, pos, qw, kw = _inplace_inputs(device)
    qo, ko, qr, kr = ops.rms_norm_rope_qk(q, k, cos, sin, pos, qw, kw, 1e-6, False, 0.0, False)
    gq, gk = torch.ones_like(qo), torch.ones_like(ko)
    with pytest.raises(ValueError, match=r"grad_k must have k's shape"):
        ops.rms_norm_rope_qk_backward(gq, gk[..., :1, :], q, k, cos, sin, pos, qw, kw, qr, kr,
                                      False, 0.0, False)
    with pytest.raises(ValueError, match=r"q_rstd must be the forward's contiguous"):
        ops.rms_norm_rope_qk_backward(gq, gk, q, k, cos, sin, pos, qw, kw, qr[..., :1], kr,
                                      False, 0.0, False)


@ENTRIES
@pytest.mark.parametrize("eps", [0.0, -1e-6, -1.0])
def test_error_eps_not_positive(device, entry, eps):
    q, k, cos, sin, pos, qw, kw = _inplace_inputs(device)
    with pytest.raises(ValueError, match=r"\beps\b"):
        _call(entry, q, k, cos, sin, pos, qw, kw, eps=eps)


@ENTRIES
@pytest.mark.parametrize("which", ["q_weight", "k_weight"])
def test_error_across_heads_weight_sizes(device, entry, which):
    q, k, cos, sin, pos, _, _ = _inplace_inputs(device)
    dev = q.device
    good = {"q_weight": torch.ones(HQ * D, device=dev), "k_weight": torch.ones(HK * D, device=dev)}
    # per-head size with across_heads=True ...
    w = dict(good)
    w[which] = torch.ones(D, device=dev)
    with pytest.raises(ValueError, match=rf"\b{which}\b"):
        _call(entry, q, k, cos, sin, pos, w["q_weight"], w["k_weight"], across_heads=True)
    # ... the other's head count (q 4 heads, k 2) ...
    w = dict(good)
    w[which] = torch.ones((HK if which == "q_weight" else HQ) * D, device=dev)
    with pytest.raises(ValueError, match=rf"\b{which}\b"):
        _call(entry, q, k, cos, sin, pos, w["q_weight"], w["k_weight"], across_heads=True)
    # ... and the across-heads size without it.
    w = {"q_weight": torch.ones(D, device=dev), "k_weight": torch.ones(D, device=dev)}
    w[which] = good[which]
    with pytest.raises(ValueError, match=rf"\b{which}\b"):
        _call(entry, q, k, cos, sin, pos, w["q_weight"], w["k_weight"], across_heads=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device (a GPU)")
@ENTRIES
@pytest.mark.parametrize("which", ["q_weight", "k_weight"])
def test_error_weight_on_another_device(device, entry, which):
    if device != "cuda":
        pytest.skip("q and k on the GPU: runs once, for device cuda")
    q, k, cos, sin, pos, qw, kw = _inplace_inputs("cuda")
    w = {"q_weight": qw, "k_weight": kw}
    w[which] = w[which].cpu()
    with pytest.raises(ValueError, match=rf"\b{which}\b"):
        _call(entry, q, k, cos, sin, pos, w["q_weight"], w["k_weight"])


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("layout", ["sbhd", "BSHD", "", None])
def test_error_layout_through_the_wrapper(device, layout, inplace):
    q, k, cos, sin, pos, qw, kw = _inplace_inputs(device)
    with pytest.raises(ValueError, match=r"\blayout\b"):
        rms_norm_rope_qk(q, k, cos, sin, pos, q_weight=qw, k_weight=kw, layout=layout,
                         inplace=inplace)


# --- empty inputs ---


@ACROSS
@pytest.mark.parametrize("layout,lead", [("bshd", (0, S)), ("bshd", (B, 0)), ("bhsd", (B, 0)),
                                         ("thd", (0,))], ids=["b0", "s0", "bhsd_s0", "t0"])
@pytest.mark.parametrize("inplace", [False, True])
def test_empty_inputs(device, layout, lead, across_heads, inplace):
    def shape(h):
        if layout == "bhsd":
            return (lead[0], h, lead[1], D)
        return lead + (h, D)

    q = torch.randn(shape(HQ), device=tdev(device), requires_grad=not inplace)
    k = torch.randn(shape(HK), device=tdev(device), requires_grad=not inplace)
    qw, kw = (to(device, t).requires_grad_(not inplace)
              for t in make_weights(across_heads, 0.0, torch.float32))
    cos, sin = (to(device, t) for t in ref.default_table(D, 8))
    cos, sin = cos.float(), sin.float()
    pos = torch.zeros(lead, dtype=torch.int64, device=tdev(device)) if layout == "thd" else None
    qo, ko = rms_norm_rope_qk(q, k, cos, sin, pos, q_weight=qw, k_weight=kw,
                              across_heads=across_heads, layout=layout, inplace=inplace)
    assert qo.shape == q.shape and ko.shape == k.shape and qo.numel() == ko.numel() == 0
    assert qo.dtype == ko.dtype == torch.float32
    if inplace:
        assert qo is q and ko is k
    else:
        (qo.sum() + ko.sum()).backward()
        assert torch.equal(qw.grad, torch.zeros_like(qw)) and torch.equal(kw.grad,
                                                                          torch.zeros_like(kw))
        assert q.grad is None or q.grad.shape == q.shape
