"""torch.ops.rope.apply / apply_ / apply_qk / apply_qk_ against the float64 reference.

Every result is compared with tests/reference.py (docs/math.md section 13 tolerances, per pair,
scaled by the pair's norm); only the in-place-vs-functional and qk-vs-two-calls checks
compare the library with itself.

The full matrix (test_apply_matches_reference) is written once for every device: it takes the
device under test and the sizes from the `device` and `sizes` fixtures and is parametrized by
`matrix` from the module's pytest_generate_tests. Here: the CPU kernel; tests/test_cuda.py
collects the same test for the CUDA kernel (the host executor, or the GPU with
ROPE_TEST_DEVICE=cuda) with its own cases, where it also compares with the CPU kernel.
"""

import os
import subprocess
import sys

import pytest
import torch

import reference as ref
import rope_ext
from conftest import (LAYOUTS, NOPOS_FORMS, POS_FORMS, STORAGES, X_DTYPES, build_qkv,
                      build_table, build_x, cpu_kernel, op_view, to_dev)

ops = torch.ops.rope

PAIRINGS = pytest.mark.parametrize("interleaved", [False, True], ids=["halfsplit", "interleaved"])
DTYPES = pytest.mark.parametrize("dtype", X_DTYPES, ids=lambda d: str(d).split(".")[-1])

B, S, H, T = 2, 3, 2, 5  # batch, seq, heads; tokens for thd
D = 12                   # head_dim; partial rotary uses r = 6, so r/2 = 3 is odd
ROTARY = {"full": D, "partial": 6}


def _layout_forms():
    """(layout, table form, positions dtype): every table form the layout admits."""
    cases = []
    for layout in ("bshd", "bhsd"):
        cases += [(layout, f, p) for f in POS_FORMS for p in (torch.int32, torch.int64)]
        cases += [(layout, f, None) for f in NOPOS_FORMS]
    cases += [("thd", "pos_t", p) for p in (torch.int32, torch.int64)]  # thd needs positions
    return cases


def _case_id(case):
    layout, form, pos_dtype = case
    return f"{layout}-{form}" + ("" if pos_dtype is None else f"-{str(pos_dtype)[-5:]}")


def _shape(layout):
    """(batch, seq) for build_x / build_table; batch is None for thd."""
    return (None, T) if layout == "thd" else (B, S)


def _sample(layout, storage, dtype, head_dim=D, heads=H):
    batch, seq = _shape(layout)
    return build_x(layout, storage, batch or 0, seq, heads, head_dim, dtype)


def _table(layout, form, half, dtype=torch.float32, pos_dtype=torch.int64):
    batch, seq = _shape(layout)
    return build_table("pos_s" if form == "pos_t" else form, batch, seq, half, dtype, pos_dtype)


def _assert_like_empty_like(out, x):
    """The output contract: x's dtype, shape and device, laid out as torch.empty_like(x)."""
    like = torch.empty_like(x)
    assert out.dtype == x.dtype and out.device == x.device
    assert out.shape == x.shape
    assert out.stride() == like.stride(), (out.stride(), like.stride())


# --- the full matrix ---


def matrix(metafunc, cases, widths):
    """Parametrizes test_apply_matches_reference: (layout, table form, positions dtype) cases,
    {id: (head_dim, r)} widths, every storage, x dtype and pairing."""
    metafunc.parametrize("interleaved", [False, True], ids=["halfsplit", "interleaved"])
    metafunc.parametrize("width", list(widths.values()), ids=list(widths))
    metafunc.parametrize("case", cases, ids=_case_id)
    metafunc.parametrize("dtype", X_DTYPES, ids=lambda d: str(d).split(".")[-1])
    metafunc.parametrize("storage", STORAGES)


def pytest_generate_tests(metafunc):
    if metafunc.function is test_apply_matches_reference:
        matrix(metafunc, _layout_forms(), {"full": (D, ROTARY["full"]),
                                           "partial": (D, ROTARY["partial"])})


@pytest.fixture
def device():
    """The device under test: the CPU kernel (tests/test_cuda.py has its own)."""
    return "cpu"


@pytest.fixture
def sizes():
    """(batch, seq, heads, tokens for thd) of the matrix (tests/test_cuda.py has its own)."""
    return B, S, H, T


def test_apply_matches_reference(device, sizes, interleaved, width, case, dtype, storage):
    layout, form, pos_dtype = case
    head_dim, r = width
    batch, seq, heads, tokens = sizes
    batch, seq = (None, tokens) if layout == "thd" else (batch, seq)
    s = build_x(layout, storage, batch or 0, seq, heads, head_dim, dtype)
    cos, sin, pos = build_table("pos_s" if form == "pos_t" else form, batch, seq, r // 2,
                                pos_dtype=pos_dtype)
    xv = to_dev(device, s.op)  # a view of a copy of s.base, on the device

    out = ops.apply(xv, to_dev(device, cos), to_dev(device, sin), to_dev(device, pos), interleaved)

    assert torch.equal(xv._base.cpu(), s.base), "the functional op wrote to its input"
    _assert_like_empty_like(out, xv)
    expected = ref.rope(s.op, cos, sin, pos, interleaved)
    ref.assert_pairs_close(out.cpu(), expected, s.op, r, interleaved)
    if device != "cpu":  # the same formula in the same precision (the CPU one may use FMAs)
        with cpu_kernel("auto"):
            cpu = ops.apply(s.op, cos, sin, pos, interleaved)
        tol = ref.PAIR_TOL[dtype] * 4
        torch.testing.assert_close(out.cpu().double(), cpu.double(), rtol=tol, atol=tol)


@DTYPES
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("rotary", ROTARY)
@PAIRINGS
def test_apply_inverse_matches_reference(interleaved, rotary, layout, dtype):
    r = ROTARY[rotary]
    s = _sample(layout, "contiguous", dtype)
    cos, sin, pos = _table(layout, "pos_t" if layout == "thd" else "pos_bs", r // 2)
    out = ops.apply(s.op, cos, sin, pos, interleaved, True)
    expected = ref.rope(s.op, cos, sin, pos, interleaved, inverse=True)
    ref.assert_pairs_close(out, expected, s.op, r, interleaved)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("storage", STORAGES)
@PAIRINGS
def test_python_api_layouts(interleaved, storage, layout):
    """apply_rope takes x in the caller's layout (bhsd as [b, h, s, d]) and answers in it."""
    r = 8
    s = _sample(layout, storage, torch.float32)
    cos, sin, pos = _table(layout, "pos_t" if layout == "thd" else "pos_bs", r // 2)
    out = rope_ext.apply_rope(s.x, cos, sin, pos, interleaved=interleaved, layout=layout)
    assert out.shape == s.x.shape
    expected = ref.rope(s.op, cos, sin, pos, interleaved)
    ref.assert_pairs_close(op_view(out, layout), expected, s.op, r, interleaved)


# --- table dtypes ---


def _table_dtypes(x_dtype):
    return list(dict.fromkeys([torch.float32, torch.float64, x_dtype]))


@pytest.mark.parametrize("case", [(x, t) for x in X_DTYPES for t in _table_dtypes(x)],
                         ids=lambda c: f"x_{str(c[0])[6:]}-table_{str(c[1])[6:]}")
@pytest.mark.parametrize("form", ["pos_bs", "tok_bs"])
@PAIRINGS
def test_table_dtypes(interleaved, form, case):
    x_dtype, table_dtype = case
    r = 8
    s = _sample("bshd", "contiguous", x_dtype)
    cos, sin, pos = _table("bshd", form, r // 2, dtype=table_dtype)
    out = ops.apply(s.op, cos, sin, pos, interleaved)
    tol = None
    if x_dtype == torch.float32 and table_dtype == torch.float64:
        # The arithmetic is float32 (docs/api.md section 2), so the kernel rounds the float64
        # table once more: up to sqrt(2) * 2^-24 * rho on top of the float32 arithmetic bound.
        tol = 6 * 2.0 ** -24
    ref.assert_pairs_close(out, ref.rope(s.op, cos, sin, pos, interleaved), s.op, r,
                           interleaved, tol=tol)


# --- apply_qk ---


def _qk(layout, dtype, hq=4, hk=2, head_dim=D, head_dim_k=None):
    """q and k (the op's view) as slices of one fused qkv buffer; bhsd ones are transposes of
    [b, h, s, d] tensors, q contiguous and k at a non-unit head_dim stride."""
    if layout == "bhsd":
        q = build_x("bhsd", "contiguous", B, S, hq, head_dim, dtype).op
        k = build_x("bhsd", "strided", B, S, hk, head_dim_k or head_dim, dtype).op
        return None, q, k, None
    lead = (T,) if layout == "thd" else (B, S)
    return build_qkv(lead, hq, hk, head_dim, dtype, head_dim_k)


@pytest.mark.parametrize("head_dims", [(D, D), (D, 8)], ids=["same_d", "k_d8"])
@pytest.mark.parametrize("form", ["pos_bs", "rows", "tok_bs"])
@pytest.mark.parametrize("layout", LAYOUTS)
@DTYPES
@PAIRINGS
def test_apply_qk_matches_two_applies(interleaved, dtype, layout, form, head_dims):
    if layout == "thd":
        form = "pos_t"  # thd takes positions only
    r = 8
    _, q, k, _ = _qk(layout, dtype, head_dim=head_dims[0], head_dim_k=head_dims[1])
    cos, sin, pos = _table(layout, form, r // 2)

    q_out, k_out = ops.apply_qk(q, k, cos, sin, pos, interleaved)

    _assert_like_empty_like(q_out, q)
    _assert_like_empty_like(k_out, k)
    ref.assert_pairs_close(q_out, ref.rope(q, cos, sin, pos, interleaved), q, r, interleaved)
    ref.assert_pairs_close(k_out, ref.rope(k, cos, sin, pos, interleaved), k, r, interleaved)
    # One fused pass is the same arithmetic as two separate calls.
    assert torch.equal(q_out, ops.apply(q, cos, sin, pos, interleaved))
    assert torch.equal(k_out, ops.apply(k, cos, sin, pos, interleaved))


# --- in place ---


def _expected_buffer(base, view, value):
    """`base` with the elements of `view` (a view into base) replaced by `value`."""
    expected = base.clone()
    expected.as_strided(view.size(), view.stride(), view.storage_offset()).copy_(value)
    return expected


# head_dim, rotary dim: the CPU kernel's fixed sizes (32, 64, 128 pairs, unrolled at compile
# time), fully rotated or with a tail; 96 and 192 (48, 96 pairs) are run-time sizes beside them.
HEAD_SIZES = [(64, 64), (128, 128), (256, 256), (128, 64), (256, 128), (96, 96), (192, 96)]


@pytest.mark.parametrize("head_dim,r", HEAD_SIZES, ids=[f"d{d}_r{r}" for d, r in HEAD_SIZES])
@pytest.mark.parametrize("storage", ["contiguous", "fused"])
@DTYPES
@PAIRINGS
def test_head_sizes_models_use(interleaved, dtype, storage, head_dim, r):
    s = _sample("bshd", storage, dtype, head_dim=head_dim, heads=3)
    cos, sin, pos = _table("bshd", "pos_bs", r // 2)
    out = ops.apply(s.op, cos, sin, pos, interleaved)
    ref.assert_pairs_close(out, ref.rope(s.op, cos, sin, pos, interleaved), s.op, r, interleaved)
    expected_base = _expected_buffer(s.base, s.op, out)
    ops.apply_(s.op, cos, sin, pos, interleaved)
    assert torch.equal(s.op, out)
    assert torch.equal(s.base, expected_base), "the in-place op wrote outside x"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("storage", STORAGES)
@DTYPES
@pytest.mark.parametrize("rotary", ROTARY)
@PAIRINGS
def test_apply_inplace_equals_functional(interleaved, rotary, dtype, storage, layout):
    r = ROTARY[rotary]
    s = _sample(layout, storage, dtype)
    cos, sin, pos = _table(layout, "pos_t" if layout == "thd" else "pos_bs", r // 2)
    functional = ops.apply(s.op, cos, sin, pos, interleaved)
    expected_base = _expected_buffer(s.base, s.op, functional)
    version = s.op._version

    assert ops.apply_(s.op, cos, sin, pos, interleaved) is None

    assert torch.equal(s.op, functional)
    # Nothing outside x was written: the rest of the fused buffer, the skipped elements.
    assert torch.equal(s.base, expected_base)
    assert s.op._version > version, "in-place op did not bump the version counter"


@pytest.mark.parametrize("form", ["pos_bs", "rows", "tok_bs"])
@pytest.mark.parametrize("layout", LAYOUTS)
@DTYPES
@PAIRINGS
def test_apply_qk_inplace_equals_functional(interleaved, dtype, layout, form):
    if layout == "thd":
        form = "pos_t"
    r = 8
    base, q, k, v = _qk(layout, dtype)
    cos, sin, pos = _table(layout, form, r // 2)
    q_exp, k_exp = ops.apply_qk(q, k, cos, sin, pos, interleaved)
    if base is not None:
        v_before = v.clone()
        expected_base = _expected_buffer(_expected_buffer(base, q, q_exp), k, k_exp)

    assert ops.apply_qk_(q, k, cos, sin, pos, interleaved) is None

    assert torch.equal(q, q_exp) and torch.equal(k, k_exp)
    if base is not None:
        assert torch.equal(v, v_before), "v, next to k in the fused buffer, was written"
        assert torch.equal(base, expected_base)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("storage", STORAGES)
def test_python_inplace_returns_same_object(storage, layout):
    r = 8
    s = _sample(layout, storage, torch.float32)
    cos, sin, pos = _table(layout, "pos_t" if layout == "thd" else "pos_bs", r // 2)
    x_in = s.op.clone()
    ptr = s.x.data_ptr()

    out = rope_ext.apply_rope(s.x, cos, sin, pos, layout=layout, inplace=True)

    assert out is s.x and out.data_ptr() == ptr
    ref.assert_pairs_close(op_view(out, layout), ref.rope(x_in, cos, sin, pos), x_in, r, False)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_python_qk_inplace_returns_same_objects(layout):
    r = 8
    s_q = _sample(layout, "fused", torch.float32, heads=4)
    s_k = _sample(layout, "strided", torch.float32, heads=2)
    cos, sin, pos = _table(layout, "pos_t" if layout == "thd" else "pos_bs", r // 2)
    q_exp, k_exp = rope_ext.apply_rope_qk(s_q.x, s_k.x, cos, sin, pos, layout=layout)

    q_out, k_out = rope_ext.apply_rope_qk(s_q.x, s_k.x, cos, sin, pos, layout=layout,
                                          inplace=True)

    assert q_out is s_q.x and k_out is s_k.x
    assert torch.equal(q_out, q_exp) and torch.equal(k_out, k_exp)


# --- empty inputs ---

EMPTY_SHAPES = {
    "zero_batch": (0, 3, 2, D),
    "zero_seq": (2, 0, 2, D),
    "zero_heads": (2, 3, 0, D),
    "thd_zero_tokens": (0, 2, D),
    "thd_zero_heads": (4, 0, D),
}


@pytest.mark.parametrize("form", ["pos_bs", "rows", "tok_bs"])
@pytest.mark.parametrize("name", EMPTY_SHAPES)
def test_empty_inputs(name, form):
    shape = EMPTY_SHAPES[name]
    thd = len(shape) == 3
    if thd:
        form = "pos_s"
    batch, seq = (None, shape[0]) if thd else shape[:2]
    cos, sin, pos = build_table(form, batch, seq, 4)
    x = torch.randn(shape)
    k = torch.randn(shape[:-2] + (1, D))  # q and k share only the token dimensions
    k_expected = ref.rope(k, cos, sin, pos)

    out = ops.apply(x, cos, sin, pos)
    assert out.shape == x.shape and out.dtype == x.dtype
    q_out, k_out = ops.apply_qk(x, k, cos, sin, pos)
    assert q_out.shape == x.shape and k_out.shape == k.shape
    assert ops.apply_(x, cos, sin, pos) is None
    k_in = k.clone()
    assert ops.apply_qk_(x, k, cos, sin, pos) is None
    if k.numel():  # x has zero heads, k has one: k is still rotated, by both ops
        ref.assert_pairs_close(k_out, k_expected, k_in, 8, False)
        ref.assert_pairs_close(k, k_expected, k_in, 8, False)


# --- vector tails: head_dim and r/2 that are not multiples of the SIMD width ---

# (head_dim, r): r/2 odd, r/2 just below/above 16 and 32 (AVX-512 float/bf16 block sizes) and
# 8 (float64 vectors), large head_dim 256, and partial rotary with odd tails.
WIDTHS = [(2, 2), (6, 6), (10, 10), (18, 18), (34, 34), (130, 130), (130, 66), (34, 2),
          (66, 62), (64, 64), (96, 32), (256, 256), (256, 128), (130, 98)]


@pytest.mark.parametrize("inplace", [False, True], ids=["functional", "inplace"])
@pytest.mark.parametrize("storage", ["contiguous", "strided"])
@DTYPES
@pytest.mark.parametrize("width", WIDTHS, ids=lambda w: f"d{w[0]}_r{w[1]}")
@PAIRINGS
def test_head_dim_widths(interleaved, width, dtype, storage, inplace):
    head_dim, r = width
    s = build_x("bshd", storage, 1, 3, 2, head_dim, dtype)
    cos, sin, pos = build_table("pos_bs", 1, 3, r // 2)
    x_in = s.op.clone()
    expected = ref.rope(x_in, cos, sin, pos, interleaved)
    if inplace:
        ops.apply_(s.op, cos, sin, pos, interleaved)
        out = s.op
    else:
        out = ops.apply(s.op, cos, sin, pos, interleaved)
    ref.assert_pairs_close(out, expected, x_in, r, interleaved)


@pytest.mark.parametrize("capability", ["default", "avx2", "avx512"])
def test_other_cpu_kernels(capability):
    """The CPU kernel is compiled per instruction set and picked at run time; rerun the width
    tests under the narrower ones, the fused norm + rope kernel's too (ROPE_EXT_CPU_KERNEL caps
    rope_ext's choice; on a machine without that instruction set the widest one it has runs)."""
    env = dict(os.environ, ROPE_EXT_CPU_KERNEL=capability, ROPE_TEST_DEVICE="cpu")
    fused = os.path.join(os.path.dirname(__file__), "test_norm_rope.py")
    run = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, fused, "-q", "-x", "-p", "no:cacheprovider",
         "-k", "test_head_dim_widths or test_nan_inf or test_head_dims or "
               "test_gradients_match_aten_composition"],
        env=env, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]


def test_unknown_cpu_kernel_name_is_rejected():
    """An unknown kernel name raises (it was once taken as "the widest"): from set_cpu_kernel
    at once, from ROPE_EXT_CPU_KERNEL at the first CPU op call (and each one after it)."""
    with pytest.raises(ValueError, match=r"'widest' is not a CPU kernel"):
        torch.ops.rope_testing.set_cpu_kernel("widest")
    code = ("import torch, rope_ext\n"
            "x = torch.randn(1, 2, 1, 8)\n"
            "cos, sin = rope_ext.cos_sin_table(rope_ext.rope_frequencies(8)[0], 4)\n"
            "for _ in range(2):\n"
            "    try:\n"
            "        torch.ops.rope.apply(x, cos, sin)\n"
            "    except ValueError as e:\n"
            "        print(e)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, ROPE_EXT_CPU_KERNEL="widest"))
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.count("ROPE_EXT_CPU_KERNEL 'widest' is not a CPU kernel") == 2, run.stdout


# --- NaN and Inf stay inside their pair (docs/math.md section 12.6) ---


@pytest.mark.parametrize("storage", ["contiguous", "strided"])
@DTYPES
@PAIRINGS
def test_nan_inf_stay_in_their_pair(interleaved, dtype, storage):
    head_dim, r = 40, 36  # 18 pairs: more than one vector block, and a tail of 4
    s = build_x("bshd", storage, 1, 2, 2, head_dim, dtype)
    # Token 0 at position 0 (cos 1, sin 0: Inf * 0 makes NaN), token 1 at a generic angle.
    cos, sin = ref.default_table(r, 8)
    cos, sin = cos.float(), sin.float()
    pos = torch.tensor([[0, 5]])
    ia, ib = ref.pair_slots(r, interleaved)
    x = s.op
    x[0, :, 0, ia[0]] = float("nan")
    x[0, :, 0, ib[3]] = float("inf")
    x[0, :, 1, ia[17]] = -float("inf")
    x[0, :, 1, r] = float("nan")       # tail
    x[0, :, 1, r + 1] = -float("inf")  # tail
    x_in = x.clone()

    out = ops.apply(x, cos, sin, pos, interleaved)

    expected = ref.rope(x_in, cos, sin, pos, interleaved)
    # Non-finite values exactly where float arithmetic puts them, nowhere else.
    assert torch.equal(out.isnan(), expected.isnan())
    assert torch.equal(out.isposinf(), expected.isposinf())
    assert torch.equal(out.isneginf(), expected.isneginf())
    ref.assert_tail_identical(out, x_in, r)
    # Every other pair is rotated as usual.
    finite = lambda t: torch.where(torch.isfinite(t), t, torch.zeros_like(t))  # noqa: E731
    clean_x = x_in.double().clone()
    bad = ~torch.isfinite(clean_x[..., ia]) | ~torch.isfinite(clean_x[..., ib])
    clean_x[..., ia] = torch.where(bad, 0.0, clean_x[..., ia])
    clean_x[..., ib] = torch.where(bad, 0.0, clean_x[..., ib])
    clean_x[..., r:] = 0.0
    clean_out = finite(out.double())
    clean_out[..., r:] = 0.0
    clean_exp = finite(expected)
    clean_exp[..., r:] = 0.0
    ref.assert_pairs_close(clean_out, clean_exp, clean_x, r, interleaved, dtype=dtype)


@PAIRINGS
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_large_output_written_around_the_cache(dtype, interleaved):
    # Outputs of 16 MB and more take the kernel's streaming-store path.
    x = torch.randn(1, 2048, 32, 128, dtype=torch.float64).to(dtype)
    cos, sin, pos = build_table("pos_bs", 1, 2048, 48)  # partial rotary: the tail is copied too
    out = ops.apply(x, cos, sin, pos, interleaved, False)
    assert out.numel() * out.element_size() >= 16 << 20
    ref.assert_pairs_close(out, ref.rope(x, cos.double(), sin.double(), pos, interleaved), x, 96,
                           interleaved)
