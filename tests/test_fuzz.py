"""Property-based fuzzing of the op against the float64 reference (tests/reference.py).

Hypothesis draws whole calls: shapes with zero- and one-sized dimensions (batch, seq, heads,
head_dim), rotary_dim below or equal to head_dim, the three layouts, x held the ways callers
hold it (contiguous, a head slice of a fused qkv projection, head_dim at a non-unit stride,
sequence-major storage seen through a transpose, broadcast by expand), the four x dtypes, every
table form (a [P, r/2] table indexed by int32/int64 positions of every accepted shape and
stride, or one row per token), tables in float32, float64 or x's dtype and cut out of wider
buffers, both pairings, inverse, the functional and the in-place entry points.

Every case must match the reference within docs/math.md section 13 (reference.PAIR_TOL, per pair,
scaled by the pair norm), leave x[..., r:] bit-identical, and the in-place result must be the
functional result bit for bit, without writing anywhere else in the buffer x lives in.

The example counts are fixed and the search is derandomized, so the file runs the same cases in
the same time on every run (about 20 s on a 2-core CPU).
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import reference as ref
import rope_ext
from conftest import X_DTYPES, build_qkv, build_table, build_x, op_view
from reference import assert_bit_identical

ops = torch.ops.rope

FUZZ = settings(max_examples=1500, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FUZZ_QK = settings(FUZZ, max_examples=600)
FUZZ_QK_FUSED = settings(FUZZ, max_examples=300)

# r/2 values: every small count (vector tails) plus widths around the CPU kernel's
# block sizes (16 float64 / 32 float32, bf16, fp16 elements) and real models' 32 and 64.
ROTARY_PAIRS = st.one_of(st.integers(0, 20), st.sampled_from([0, 1, 7, 8, 9, 15, 16, 17, 31, 32, 33,
                                                          48, 64]))
def draw_table(data, layout, b, s, pairs, x_dtype, g):
    """(cos, sin, positions) in a table form, dtype and memory layout drawn for the layout
    (conftest.build_table); values are a genuine RoPE table (random base and attention factor),
    positions random within the table."""
    thd = layout == "thd"
    forms = ["pos_s", "pos_s_strided"] if thd else [
        "pos_bs", "pos_1s", "pos_s", "pos_bs_expand", "pos_bs_strided",
        "rows", "tok_s", "tok_bs", "tok_1s"]
    form = data.draw(st.sampled_from(forms), label="table form")
    tdt = data.draw(st.sampled_from(sorted({torch.float32, torch.float64, x_dtype}, key=str)),
                    label="table dtype")
    tstorage = data.draw(st.sampled_from(["contiguous", "chunk", "pairs", "wide"]),
                         label="table storage")
    pos_dtype = data.draw(st.sampled_from([torch.int32, torch.int64]), label="positions dtype")
    base = data.draw(st.sampled_from([10000.0, 500000.0, 1e6]), label="rope base")
    attn = data.draw(st.sampled_from([1.0, 1.0, 1.1902381, 0.75]), label="attention factor")
    if form.startswith("pos") or form == "rows":
        rows = data.draw(st.integers(max(s, 1), max(s, 1) + 40), label="table rows")
    else:
        rows = data.draw(st.integers(1, 64), label="table rows")
    return build_table(form, None if thd else b, s, pairs, tdt, pos_dtype, rows, base, attn,
                       tstorage, generator=g)


# Zero and one included in each; a zero somewhere in about a third of the cases.
SIZES = dict(batch=st.sampled_from([0, 1, 1, 2, 2, 3]),
             seq=st.sampled_from([0, 1, 1, 2, 3, 5, 8, 13, 13, 24]),
             heads=st.sampled_from([0, 1, 1, 2, 3, 4]))


@FUZZ
@given(data=st.data())
def test_fuzz_apply(data):
    draw = data.draw
    seed = draw(st.integers(0, 2**32 - 1), label="seed")
    g = torch.Generator().manual_seed(seed)
    dtype = draw(st.sampled_from(X_DTYPES), label="dtype")
    layout = draw(st.sampled_from(["bshd", "bhsd", "thd"]), label="layout")
    b = 1 if layout == "thd" else draw(SIZES["batch"], label="batch")
    s = draw(SIZES["seq"], label="seq (tokens for thd)")
    h = draw(SIZES["heads"], label="heads")
    pairs = draw(ROTARY_PAIRS, label="r/2")
    d = 2 * pairs + draw(st.sampled_from([0, 0, 0, 1, 2, 3, 6]), label="head_dim - r")
    # fused_hf: for bhsd, the bshd slice of the projection transposed, as Hugging Face does
    storage = draw(st.sampled_from(["contiguous", "fused_hf", "strided", "transposed", "expand"]),
                   label="x storage")
    interleaved = draw(st.booleans(), label="interleaved")
    entry = draw(st.sampled_from(["apply_rope", "op"]), label="entry")
    inverse = entry == "op" and draw(st.booleans(), label="inverse")

    sample = build_x(layout, storage, b, s, h, d, dtype, g, offset=draw(st.integers(0, 1)))
    x, buf = sample.x, sample.base
    cos, sin, positions = draw_table(data, layout, b, s, pairs, dtype, g)
    xv = op_view(x, layout)  # [b, s, h, d] or [t, h, d], a view of buf
    x_before = x.clone()
    buf_before = buf.clone()

    if entry == "apply_rope":
        out = rope_ext.apply_rope(x, cos, sin, positions, interleaved=interleaved, layout=layout)
        assert out.shape == x.shape and out.dtype == x.dtype
        out_v = op_view(out, layout)
    else:
        out_v = ops.apply(xv, cos, sin, positions, interleaved, inverse)
    assert_bit_identical(buf, buf_before, "the functional op changed its input")

    expected = ref.rope(xv, cos, sin, positions, interleaved, inverse)
    ref.assert_pairs_close(out_v, expected, xv, 2 * pairs, interleaved)

    # In place on a copy of the same memory layout: bit for bit the functional result, and
    # nothing written outside x (the rest of the fused buffer, the skipped strided elements).
    if storage == "expand":
        if x.numel() > 0 and (b > 1 or h > 1):
            with pytest.raises(ValueError, match="overlap"):
                ops.apply_(xv, cos, sin, positions, interleaved, inverse)
            assert_bit_identical(x, x_before, "a rejected in-place call wrote to x")
        # A fresh dense copy (x.contiguous() keeps the zero strides of an empty x, see
        # test_inplace_accepts_empty_broadcast_x).
        x2 = torch.empty(x.shape, dtype=x.dtype).copy_(x)
        buf2 = x2
    else:
        buf2 = buf_before.clone()
        x2 = buf2.as_strided(x.shape, x.stride(), x.storage_offset())
    if entry == "apply_rope":
        ret = rope_ext.apply_rope(x2, cos, sin, positions, interleaved=interleaved,
                                  layout=layout, inplace=True)
        assert ret is x2
    else:
        assert ops.apply_(op_view(x2, layout), cos, sin, positions, interleaved, inverse) is None
    assert_bit_identical(op_view(x2, layout), out_v, "in-place result vs functional result")
    if storage != "expand":
        want = buf_before.clone()
        want.as_strided(x.shape, x.stride(), x.storage_offset()).copy_(x2)
        assert_bit_identical(buf2, want, "the in-place op wrote outside x")


def draw_qk_case(data):
    """q, k, v cut from one fused qkv projection [*lead, hq*dq + 2*hk*dk] (grouped-query head
    counts, possibly different head sizes; transposed to bhsd as Hugging Face does), a table."""
    draw = data.draw
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1), label="seed"))
    dtype = draw(st.sampled_from(X_DTYPES), label="dtype")
    layout = draw(st.sampled_from(["bshd", "bhsd", "thd"]), label="layout")
    b = 1 if layout == "thd" else draw(SIZES["batch"], label="batch")
    s = draw(SIZES["seq"], label="seq (tokens for thd)")
    hk = draw(st.sampled_from([0, 1, 1, 2, 3]), label="k heads")
    hq = hk * draw(st.sampled_from([1, 2, 4]), label="q heads per k head") + draw(
        st.sampled_from([0, 0, 1]), label="extra q heads")
    pairs = draw(ROTARY_PAIRS, label="r/2")
    dq = 2 * pairs + draw(st.sampled_from([0, 0, 2, 5]), label="q head_dim - r")
    dk = dq if draw(st.booleans(), label="same head_dim") else 2 * pairs + draw(
        st.integers(0, 4), label="k head_dim - r")
    interleaved = draw(st.booleans(), label="interleaved")
    lead = (s,) if layout == "thd" else (b, s)
    buf, q, k, v = build_qkv(lead, hq, hk, dq, dtype, head_dim_k=dk, generator=g)
    if layout == "bhsd":  # HF: proj(x).view(b, s, h, d).transpose(1, 2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    cos, sin, positions = draw_table(data, layout, b, s, pairs, dtype, g)
    return dict(buf=buf, q=q, k=k, v=v, cos=cos, sin=sin, positions=positions,
                interleaved=interleaved, layout=layout, r=2 * pairs)


@FUZZ_QK
@given(data=st.data())
def test_fuzz_apply_qk(data):
    """apply_rope_qk on q and k of one fused projection: each matches the reference and
    apply_rope on it alone bit for bit; in place (on copies in their own buffers, see
    test_fuzz_apply_qk_inplace_fused for the fused buffer itself) gives the same bits."""
    c = draw_qk_case(data)
    q, k, buf, layout, interleaved = c["q"], c["k"], c["buf"], c["layout"], c["interleaved"]
    args = (c["cos"], c["sin"], c["positions"])
    buf_before = buf.clone()
    qo, ko = rope_ext.apply_rope_qk(q, k, *args, interleaved=interleaved, layout=layout)
    assert_bit_identical(buf, buf_before, "the functional op changed its input")
    for name, x, out in (("q", q, qo), ("k", k, ko)):
        xv, ov = op_view(x, layout), op_view(out, layout)
        expected = ref.rope(xv, *args, interleaved)
        ref.assert_pairs_close(ov, expected, xv, c["r"], interleaved)
        alone = rope_ext.apply_rope(x, *args, interleaved=interleaved, layout=layout)
        assert_bit_identical(out, alone, f"apply_rope_qk's {name} vs apply_rope on {name}")
    q2, k2 = q.clone(), k.clone()
    rq, rk = rope_ext.apply_rope_qk(q2, k2, *args, interleaved=interleaved, layout=layout,
                                    inplace=True)
    assert rq is q2 and rk is k2
    assert_bit_identical(q2, qo, "in-place q vs functional q")
    assert_bit_identical(k2, ko, "in-place k vs functional k")


@FUZZ_QK_FUSED
@given(data=st.data())
def test_fuzz_apply_qk_inplace_fused(data):
    """In place on the q and k slices of the fused buffer itself (disjoint views, so they must be
    accepted): the functional result bit for bit, and v and everything else left alone."""
    c = draw_qk_case(data)
    q, k, buf, layout, interleaved = c["q"], c["k"], c["buf"], c["layout"], c["interleaved"]
    args = (c["cos"], c["sin"], c["positions"])
    qo, ko = rope_ext.apply_rope_qk(q, k, *args, interleaved=interleaved, layout=layout)
    want = buf.clone()
    want_q = want.as_strided(q.shape, q.stride(), q.storage_offset())
    want_k = want.as_strided(k.shape, k.stride(), k.storage_offset())
    want_q.copy_(qo)
    want_k.copy_(ko)
    rq, rk = rope_ext.apply_rope_qk(q, k, *args, interleaved=interleaved, layout=layout,
                                    inplace=True)
    assert rq is q and rk is k
    assert_bit_identical(buf, want, "fused buffer after in-place apply_rope_qk (q, k rotated, "
                                    "v untouched)")


# --- found by fuzzing ---


@pytest.mark.parametrize("entry", ["op.apply_", "op.apply_qk_", "apply_rope[inplace]"])
def test_inplace_accepts_empty_broadcast_x(entry):
    """An empty x (zero batch) that came out of expand has zero strides. It has no elements, so
    none overlap: the in-place call must be a no-op, like every other empty input (docs/api.md
    section 8). torch calls such a tensor contiguous and x.contiguous() returns it unchanged, so the
    error's advice ("pass x.contiguous()") cannot help the caller either."""
    cos, sin = ref.default_table(4, 8)
    cos, sin = cos.float(), sin.float()
    x = torch.randn(1, 1, 1, 4).expand(0, 3, 2, 4)
    assert x.is_contiguous() and x.contiguous().stride() == x.stride()
    if entry == "op.apply_":
        ops.apply_(x, cos, sin)
    elif entry == "op.apply_qk_":
        ops.apply_qk_(x, torch.randn(0, 3, 1, 4), cos, sin)
    else:
        assert rope_ext.apply_rope(x, cos, sin, inplace=True) is x


def _fused_qk(hq, dq, hk, dk, lead=(2, 3)):
    return build_qkv(lead, hq, hk, dq, head_dim_k=dk)


@pytest.mark.parametrize("entry", ["op.apply_qk_", "apply_rope_qk[inplace]"])
def test_inplace_qk_fused_different_head_dims(entry):
    """q and k of different head sizes (docs/api.md section 3: "so may their head_dim") cut from
    one fused projection are disjoint, and the error itself says fused slices are fine: rotate
    them in place and get the functional result."""
    cos, sin = (t.float() for t in ref.default_table(4, 8))
    _, q, k, v = _fused_qk(hq=2, dq=4, hk=1, dk=6)
    v_before = v.clone()
    qo, ko = ops.apply_qk(q, k, cos, sin)
    if entry == "op.apply_qk_":
        ops.apply_qk_(q, k, cos, sin)
    else:
        rope_ext.apply_rope_qk(q, k, cos, sin, inplace=True)
    assert_bit_identical(q, qo, "in-place q")
    assert_bit_identical(k, ko, "in-place k")
    assert_bit_identical(v, v_before, "v")


@pytest.mark.parametrize("entry", ["op.apply_qk_", "apply_rope_qk[inplace]"])
def test_inplace_qk_fused_zero_q_heads(entry):
    """Zero q heads (an empty q) sliced from the fused buffer shares nothing with k; k must be
    rotated in place as it is when q lives in its own buffer."""
    cos, sin = (t.float() for t in ref.default_table(4, 8))
    _, q, k, _ = _fused_qk(hq=0, dq=6, hk=1, dk=4)
    ko = ops.apply(k, cos, sin)
    if entry == "op.apply_qk_":
        ops.apply_qk_(q, k, cos, sin)
    else:
        rope_ext.apply_rope_qk(q, k, cos, sin, inplace=True)
    assert_bit_identical(k, ko, "in-place k")


@pytest.mark.parametrize("layout", ["bshd", "bhsd", "thd"])
def test_inplace_qk_fused_decode_step(layout):
    """The usual decode step: batch 1, one new token, grouped-query heads, q and k sliced from the
    fused projection. Size-1 dims carry arbitrary strides (torch gives q and k different ones
    there), which must not make the disjoint slices look shared."""
    cos, sin = (t.float() for t in ref.default_table(8, 64))
    lead = (1,) if layout == "thd" else (1, 1)
    buf, q, k, v = _fused_qk(hq=4, dq=8, hk=1, dk=8, lead=lead)
    if layout == "bhsd":
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    pos = torch.tensor([37]) if layout == "thd" else torch.tensor([[37]])
    v_before = v.clone()
    qo, ko = rope_ext.apply_rope_qk(q, k, cos, sin, pos, layout=layout)
    rope_ext.apply_rope_qk(q, k, cos, sin, pos, layout=layout, inplace=True)
    assert_bit_identical(q, qo, "in-place q")
    assert_bit_identical(k, ko, "in-place k")
    assert_bit_identical(v, v_before, "v")
