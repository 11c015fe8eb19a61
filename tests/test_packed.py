"""Packed batches described by cu_seqlens (docs/api.md section 12): apply_rope, apply_rope_qk
and rms_norm_rope_qk with ``layout="thd", cu_seqlens=...`` instead of positions.

Each sequence counts its positions from 0 (or from seqlen_offsets[i]). The positions the
library derives on the device are checked against positions written out here by a Python loop
over the sequence lengths; the rotations against the float64 reference, and bit for bit against
the same call with those positions passed explicitly, forward and backward.

Every test runs on each device under test (`device` fixture, tests/conftest.py): "cpu",
"cuda-host" (the CUDA kernel's code through its host executor) and "cuda" on a GPU. On CUDA
the values of cu_seqlens are not checked (that would need a device sync): a bad one gives
NaN there instead of a ValueError, and the tests say so.
"""

import pytest
import torch
from torch.autograd import gradcheck

import reference as ref
import rope_ext
from conftest import DEVICES, check_devices, on_device, tdev
from rope_ext.packing import packed_positions

check_devices(DEVICES)

# Sequences of a packed batch, empty ones (equal neighbours in cu_seqlens) among them.
LENGTHS = (5, 0, 7, 1, 0, 3)
T = sum(LENGTHS)
HQ, HK, D, R = 3, 1, 32, 24  # partial rotary: x[..., R:] passes through
P = 64  # table rows
OFFSETS = (0, 9, 40, 3, 1, 17)  # per-sequence start positions (all within the table)
INDEX_DTYPES = pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64],
                                       ids=["int32", "int64"])


@pytest.fixture(autouse=True, params=DEVICES)
def device(request):
    """The device under test: "cpu", "cuda-host" or "cuda" (every test runs on each)."""
    with on_device(request.param):
        yield request.param


def cu_of(lengths, dtype=torch.int64, device="cpu"):
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=dtype, device=tdev(device))


def loop_positions(lengths, offsets=None):
    """Written out independently of the library: token j of sequence i at offsets[i] + j."""
    out = []
    for i, n in enumerate(lengths):
        out += [(0 if offsets is None else offsets[i]) + j for j in range(n)]
    return torch.tensor(out, dtype=torch.int64)


def table(dtype=torch.float32, rows=P):
    inv, attn = rope_ext.rope_frequencies(R)
    return rope_ext.cos_sin_table(inv, rows, attn, dtype=dtype)


def randn(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(shape, dtype=torch.float64).to(dtype).to(tdev(device))


# --- the derived positions ---


@INDEX_DTYPES
def test_positions_follow_the_sequences(device, index_dtype):
    cu = cu_of(LENGTHS, index_dtype, device)
    got = packed_positions(cu, T)
    assert got.dtype == torch.int64 and got.device == cu.device
    assert torch.equal(got.cpu(), loop_positions(LENGTHS))
    offsets = torch.tensor(OFFSETS, dtype=index_dtype, device=cu.device)
    assert torch.equal(packed_positions(cu, T, seqlen_offsets=offsets).cpu(),
                       loop_positions(LENGTHS, OFFSETS))
    assert torch.equal(packed_positions(cu, seqlen_offsets=5).cpu(),
                       loop_positions(LENGTHS, [5] * len(LENGTHS)))


@pytest.mark.parametrize("lengths", [(), (0,), (0, 0, 0), (0, 4, 0), (6,)],
                         ids=["no_seq", "one_empty", "all_empty", "empty_around", "one_seq"])
def test_empty_and_single_sequences(device, lengths):
    cos, sin = table()
    t = sum(lengths)
    x = randn(t, 2, D, device=device)
    cu = cu_of(lengths, device=device)
    y = rope_ext.apply_rope(x, cos.to(x.device), sin.to(x.device), layout="thd", cu_seqlens=cu)
    want = rope_ext.apply_rope(x, cos.to(x.device), sin.to(x.device),
                               loop_positions(lengths).to(x.device), layout="thd")
    assert y.shape == x.shape and ref.same_bits(y, want)


# --- the rotations ---


@INDEX_DTYPES
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("interleaved", [False, True], ids=["halfsplit", "interleaved"])
def test_apply_rope_against_reference_and_positions(device, index_dtype, dtype, interleaved):
    cos, sin = (t.to(tdev(device)) for t in table())
    x = randn(T, HQ, D, dtype=dtype, device=device)
    cu = cu_of(LENGTHS, index_dtype, device)
    pos = loop_positions(LENGTHS).to(x.device)
    y = rope_ext.apply_rope(x, cos, sin, interleaved=interleaved, layout="thd", cu_seqlens=cu)
    assert ref.same_bits(y, rope_ext.apply_rope(x, cos, sin, pos, interleaved=interleaved,
                                                layout="thd"))
    ref.assert_pairs_close(y.cpu(), ref.rope(x.cpu(), cos.cpu(), sin.cpu(), pos.cpu(),
                                             interleaved), x.cpu(), R, interleaved)
    inplace = x.clone()
    assert rope_ext.apply_rope(inplace, cos, sin, layout="thd", inplace=True,
                               interleaved=interleaved, cu_seqlens=cu) is inplace
    assert ref.same_bits(inplace, y)


@INDEX_DTYPES
def test_apply_rope_qk_forward_backward_with_offsets(device, index_dtype):
    cos, sin = (t.to(tdev(device)) for t in table())
    cu = cu_of(LENGTHS, index_dtype, device)
    offsets = torch.tensor(OFFSETS, dtype=index_dtype, device=cu.device)
    q0, k0 = randn(T, HQ, D, device=device), randn(T, HK, D, device=device)
    gq, gk = torch.randn_like(q0), torch.randn_like(k0)

    def run(**where):
        q, k = q0.clone().requires_grad_(), k0.clone().requires_grad_()
        qo, ko = rope_ext.apply_rope_qk(q, k, cos, sin, layout="thd", **where)
        torch.autograd.backward((qo, ko), (gq, gk))
        return qo.detach(), ko.detach(), q.grad, k.grad

    for cu_kwargs, pos in (({"seqlen_offsets": offsets}, loop_positions(LENGTHS, OFFSETS)),
                           ({"seqlen_offsets": 7}, loop_positions(LENGTHS, [7] * len(LENGTHS))),
                           ({}, loop_positions(LENGTHS))):
        got = run(cu_seqlens=cu, **cu_kwargs)
        want = run(positions=pos.to(q0.device))
        for name, a, b in zip(("q out", "k out", "grad q", "grad k"), got, want):
            ref.assert_bit_identical(a, b, f"{name} {sorted(cu_kwargs)}")
        pos = pos.cpu()
        ref.assert_pairs_close(got[0].cpu(), ref.rope(q0.cpu(), cos.cpu(), sin.cpu(), pos),
                               q0.cpu(), R, False)
        ref.assert_pairs_close(got[2].cpu(), ref.rope(gq.cpu(), cos.cpu(), sin.cpu(), pos,
                                                      inverse=True), gq.cpu(), R, False)


def test_gradcheck_float64(device):
    lengths = (2, 0, 3)
    cos, sin = (t.to(tdev(device)) for t in table(torch.float64, rows=8))
    cu = cu_of(lengths, torch.int32, device)
    x = randn(sum(lengths), 2, D, dtype=torch.float64, device=device).requires_grad_()
    assert gradcheck(lambda t: rope_ext.apply_rope(t, cos, sin, layout="thd", cu_seqlens=cu,
                                                   seqlen_offsets=1), (x,))


@INDEX_DTYPES
@pytest.mark.parametrize("across_heads", [False, True], ids=["per_head", "across_heads"])
def test_rms_norm_rope_qk_equals_derived_positions(device, index_dtype, across_heads):
    cos, sin = (t.to(tdev(device)) for t in table())
    cu = cu_of(LENGTHS, index_dtype, device)
    offsets = torch.tensor(OFFSETS, dtype=index_dtype, device=cu.device)
    q0, k0 = randn(T, HQ, D, device=device), randn(T, HK, D, device=device)
    wq0 = randn(HQ * D if across_heads else D, device=device)
    wk0 = randn(HK * D if across_heads else D, device=device)
    gq, gk = torch.randn_like(q0), torch.randn_like(k0)

    def run(**where):
        q, k = q0.clone().requires_grad_(), k0.clone().requires_grad_()
        wq, wk = wq0.clone().requires_grad_(), wk0.clone().requires_grad_()
        qo, ko = rope_ext.rms_norm_rope_qk(q, k, cos, sin, q_weight=wq, k_weight=wk,
                                           across_heads=across_heads, layout="thd", **where)
        torch.autograd.backward((qo, ko), (gq, gk))
        return qo.detach(), ko.detach(), q.grad, k.grad, wq.grad, wk.grad

    got = run(cu_seqlens=cu, seqlen_offsets=offsets)
    want = run(positions=packed_positions(cu, T, seqlen_offsets=offsets))
    names = ("q out", "k out", "grad q", "grad k", "grad q_weight", "grad k_weight")
    for name, a, b in zip(names, got, want):
        ref.assert_bit_identical(a, b, name)
    assert torch.equal(packed_positions(cu, T, seqlen_offsets=offsets).cpu(),
                       loop_positions(LENGTHS, OFFSETS))
    with torch.no_grad():
        q, k = q0.clone(), k0.clone()
        rope_ext.rms_norm_rope_qk(q, k, cos, sin, q_weight=wq0, k_weight=wk0, layout="thd",
                                  across_heads=across_heads, inplace=True, cu_seqlens=cu,
                                  seqlen_offsets=offsets)
    assert ref.same_bits(q, got[0]) and ref.same_bits(k, got[1])


def test_torch_func(device):
    cos, sin = (t.to(tdev(device)) for t in table(torch.float64))
    cu = cu_of(LENGTHS, device=device)
    pos = loop_positions(LENGTHS).to(cu.device)
    x = randn(T, HQ, D, dtype=torch.float64, device=device)
    w = torch.randn_like(x)

    def loss(t, **where):
        return (rope_ext.apply_rope(t, cos, sin, layout="thd", **where) * w).sum()

    assert ref.same_bits(torch.func.grad(lambda t: loss(t, cu_seqlens=cu))(x),
                         torch.func.grad(lambda t: loss(t, positions=pos))(x))
    xs = torch.stack([x, w])  # vmap over x, one cu_seqlens shared by the samples
    got = torch.func.vmap(lambda a, b: rope_ext.apply_rope_qk(a, b, cos, sin, layout="thd",
                                                              cu_seqlens=cu))(xs, xs)
    for i in range(2):
        want = rope_ext.apply_rope(xs[i], cos, sin, pos, layout="thd")
        assert ref.same_bits(got[0][i], want) and ref.same_bits(got[1][i], want)


def test_compile_fullgraph_same_bits(device):
    torch._dynamo.reset()
    cos, sin = (t.to(tdev(device)) for t in table())
    cu = cu_of(LENGTHS, torch.int32, device)
    offsets = torch.tensor(OFFSETS, dtype=torch.int32, device=cu.device)
    q, k = randn(T, HQ, D, device=device), randn(T, HK, D, device=device)
    wq, wk = randn(D, device=device), randn(D, device=device)

    def f(q, k, cu, offsets):
        qa, ka = rope_ext.apply_rope_qk(q, k, cos, sin, layout="thd", cu_seqlens=cu)
        qn, kn = rope_ext.rms_norm_rope_qk(q, k, cos, sin, q_weight=wq, k_weight=wk,
                                           layout="thd", cu_seqlens=cu, seqlen_offsets=offsets)
        return qa, ka, qn, kn

    compiled = torch.compile(f, fullgraph=True)  # fails on any graph break
    for got, want in zip(compiled(q, k, cu, offsets), f(q, k, cu, offsets)):
        assert ref.same_bits(got, want)
    # Without the values on the host, a bad cu_seqlens makes every position -1: the op's
    # positions-out-of-table error on the CPU, NaN on CUDA; never a plausible wrong result.
    bad = cu.clone()
    bad[2] = 1  # decreasing
    if device != "cpu":  # the CUDA kernel (on a GPU or the host executor) never raises for it
        assert all(t[..., :R].isnan().all() for t in compiled(q, k, bad, offsets))
    else:
        with pytest.raises(ValueError, match=r"positions must lie in \[0, "):
            compiled(q, k, bad, offsets)


# --- bad input ---


def _error_cases(device):
    cpu = tdev(device)
    cu = cu_of(LENGTHS, device=device)
    return {
        "not_1d": (dict(cu_seqlens=cu.view(1, -1)), r"\bcu_seqlens\b must be 1-D"),
        "empty_tensor": (dict(cu_seqlens=cu[:0]), r"\bcu_seqlens\b must be 1-D"),
        "no_sequence": (dict(cu_seqlens=cu[:1]), r"\bcu_seqlens\b = \[0\] describes no"),
        "float": (dict(cu_seqlens=cu.float()), r"\bcu_seqlens\b must be int32 or int64"),
        "int16": (dict(cu_seqlens=cu.short()), r"\bcu_seqlens\b must be int32 or int64"),
        "list": (dict(cu_seqlens=cu.tolist()), r"\bcu_seqlens\b must be an int32 or int64"),
        "device": (dict(cu_seqlens=cu.to("meta")), r"\bcu_seqlens\b is on meta"),
        "with_positions": (dict(cu_seqlens=cu, positions=torch.arange(T, device=cpu)),
                           r"either positions or \bcu_seqlens\b"),
        "layout": (dict(cu_seqlens=cu, layout="bshd"), r"\bcu_seqlens\b .*layout='thd'"),
        "offsets_shape": (dict(cu_seqlens=cu, seqlen_offsets=torch.zeros(2, dtype=torch.long,
                                                                          device=cpu)),
                          r"\bseqlen_offsets\b must be \[num_seqs\] = \[6\].*\bcu_seqlens\b"),
        "offsets_dtype": (dict(cu_seqlens=cu, seqlen_offsets=torch.zeros(6, device=cpu)),
                          r"\bseqlen_offsets\b must be int32 or int64"),
        "offsets_alone": (dict(seqlen_offsets=3, positions=torch.arange(T, device=cpu)),
                          r"\bseqlen_offsets\b .*\bcu_seqlens\b"),
        "offsets_negative": (dict(cu_seqlens=cu, seqlen_offsets=-1),
                             r"\bseqlen_offsets\b must not be negative"),
    }


VALUE_CASES = {  # bad values: ValueError where they are read (CPU), NaN on CUDA
    "start": ([1, 5, 5, 12, 13, 13, 16], r"\bcu_seqlens\b must start at 0, got .* = 1"),
    "decreasing": ([0, 5, 4, 12, 13, 13, 16],
                   r"\bcu_seqlens\b must be non-decreasing.*cu_seqlens\[2\] = 4 < "),
    "short": ([0, 5, 5, 12, 13, 13, 15],
              r"\bcu_seqlens\b must end at the token count: .* has 16 tokens"),
    "long": ([0, 5, 5, 12, 13, 13, 17], r"\bcu_seqlens\b must end at the token count"),
}


@pytest.mark.parametrize("case", list(_error_cases("cpu")))
def test_bad_arguments_raise(device, case):
    kwargs, match = _error_cases(device)[case]
    cos, sin = (t.to(tdev(device)) for t in table())
    x = randn(T, HQ, D, device=device)
    kwargs = dict(kwargs)
    layout = kwargs.pop("layout", "thd")
    positions = kwargs.pop("positions", None)
    with pytest.raises(ValueError, match=match):
        rope_ext.apply_rope(x, cos, sin, positions, layout=layout, **kwargs)
    with pytest.raises(ValueError, match=match):
        rope_ext.apply_rope_qk(x, x, cos, sin, positions, layout=layout, **kwargs)
    with pytest.raises(ValueError, match=match):
        w = torch.ones(D, device=x.device)
        rope_ext.rms_norm_rope_qk(x, x, cos, sin, positions, q_weight=w, k_weight=w,
                                  layout=layout, **kwargs)


def test_dtype_errors_are_type_errors_too(device):
    # A dtype error is a TypeError everywhere in rope_ext (docs/api.md section 8), and a bad
    # cu_seqlens a ValueError (section 2d): this one is both.
    cos, sin = table()
    with pytest.raises(TypeError, match=r"\bcu_seqlens\b"):
        rope_ext.apply_rope(torch.randn(4, 1, D), cos, sin, layout="thd",
                            cu_seqlens=torch.tensor([0.0, 4.0]))


@pytest.mark.parametrize("case", list(VALUE_CASES))
def test_bad_values(device, case):
    values, match = VALUE_CASES[case]
    cos, sin = (t.to(tdev(device)) for t in table())
    x = randn(T, HQ, D, device=device)
    cu = torch.tensor(values, dtype=torch.int32, device=x.device)
    if device == "cuda":  # not read (a sync): every token NaN, nothing read out of bounds
        assert rope_ext.apply_rope(x, cos, sin, layout="thd", cu_seqlens=cu)[..., :R].isnan().all()
        return
    with pytest.raises(ValueError, match=match):
        rope_ext.apply_rope(x, cos, sin, layout="thd", cu_seqlens=cu)
    with pytest.raises(ValueError, match=match):
        packed_positions(cu, T)


def test_positions_past_the_table(device):
    # A document longer than the table: the op's own positions-out-of-table error (CPU
    # kernel), NaN rows from the CUDA kernel; with inv_freq the rows past the table are
    # computed instead.
    inv, attn = rope_ext.rope_frequencies(R)
    cos, sin = (t.to(tdev(device)) for t in rope_ext.cos_sin_table(inv, 8, attn))
    x = randn(12, 1, D, device=device)
    cu = cu_of((2, 10), device=device)
    if device != "cpu":  # the CUDA kernel's policy, on a GPU and in the host executor
        y = rope_ext.apply_rope(x, cos, sin, layout="thd", cu_seqlens=cu)
        assert y[10:, ..., :R].isnan().all() and not y[:10].isnan().any()
    else:
        with pytest.raises(ValueError, match=r"positions must lie in \[0, 8\)"):
            rope_ext.apply_rope(x, cos, sin, layout="thd", cu_seqlens=cu)
        with pytest.raises(ValueError, match=r"positions must lie in \[0, 8\)"):
            rope_ext.apply_rope(x[:2], cos, sin, layout="thd",
                                cu_seqlens=cu_of((2,), device=device), seqlen_offsets=7)
    far = rope_ext.apply_rope(x, cos, sin, layout="thd", cu_seqlens=cu,
                              inv_freq=inv.to(x.device), attention_factor=attn)
    long_cos, long_sin = (t.to(x.device) for t in rope_ext.cos_sin_table(inv, 16, attn))
    assert ref.same_bits(far, rope_ext.apply_rope(x, long_cos, long_sin, layout="thd",
                                                  cu_seqlens=cu))
