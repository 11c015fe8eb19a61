"""Concurrent calls from several Python threads give the serial results, bit for bit.

The op releases the GIL while its kernel runs, and the kernel itself splits the tokens over
torch's intra-op threads (at::parallel_for), so calls from a thread pool really overlap: every
thread runs several kinds of call (apply_rope, apply_rope_qk, in place, the raw op with
inverse, forward + backward through autograd, the fused QK-RMSNorm + RoPE and its
gradients) on its own tensors, sharing one read-only cos/sin table, many times in a
shuffled order; every result must equal, in its bits, the result of the same call made
serially beforehand. torch.set_num_threads is left as it is.
"""

import random
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import reference as ref
import rope_ext

ops = torch.ops.rope

THREADS = 6
REPS = 25  # calls of each kind per thread


def _randn(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def _positions(shape, rows, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, rows, shape, generator=g).to(dtype)


ROWS = 1024
COS64, SIN64 = ref.default_table(128, ROWS, base=500000.0)
COS32, SIN32 = COS64.float(), SIN64.float()
HALF = 64


class Kind:
    """One kind of call: `make(seed)` builds its inputs, `run(inputs)` makes the call (on
    copies where it rotates in place) and returns the result tensors."""

    def __init__(self, name, make, run):
        self.name, self.make, self.run = name, make, run


def _make_bshd_f32(seed):
    x = _randn((2, 96, 8, 128), torch.float32, seed)
    return dict(x=x, pos=_positions((2, 96), ROWS, torch.int64, seed + 1))


def _make_bhsd_bf16(seed):
    return dict(x=_randn((1, 4, 300, 128), torch.bfloat16, seed))


def _make_qkv_fp16(seed):
    hq, hk, d = 8, 2, 128
    buf = _randn((2, 40, (hq + 2 * hk) * d), torch.float16, seed)
    q = buf[..., :hq * d].unflatten(-1, (hq, d))
    k = buf[..., hq * d:(hq + hk) * d].unflatten(-1, (hk, d))
    return dict(buf=buf, q=q, k=k, pos=_positions((2, 40), ROWS, torch.int32, seed + 1))


def _make_thd_f32(seed):
    return dict(q=_randn((500, 4, 64), torch.float32, seed),
                k=_randn((500, 2, 64), torch.float32, seed + 1),
                pos=_positions((500,), ROWS, torch.int64, seed + 2))


def _make_strided_f64(seed):
    base = _randn((3, 50, 2, 2 * 96), torch.float64, seed)
    return dict(base=base, pos=_positions((50,), ROWS, torch.int32, seed + 1))


def _make_grad(seed):
    return dict(q=_randn((2, 64, 4, 128), torch.float32, seed),
                k=_randn((2, 64, 2, 128), torch.float32, seed + 1),
                w=_randn((2, 64, 4, 128), torch.float32, seed + 2),
                pos=_positions((2, 64), ROWS, torch.int64, seed + 3))


def _run_bshd_f32(a):
    return (rope_ext.apply_rope(a["x"], COS32, SIN32, a["pos"]),)


def _run_bhsd_bf16(a):
    # bf16 x with a table in x's dtype, no positions (row s for token s), adjacent pairs.
    return (rope_ext.apply_rope(a["x"], COS32.bfloat16(), SIN32.bfloat16(), interleaved=True,
                                layout="bhsd"),)


def _run_qkv_fp16_inplace(a):
    buf = a["buf"].clone()
    hq, hk, d = 8, 2, 128
    q = buf[..., :hq * d].unflatten(-1, (hq, d))
    k = buf[..., hq * d:(hq + hk) * d].unflatten(-1, (hk, d))
    # Partial rotary (r = 64 of 128) from a float64 table.
    cos, sin = COS64[:, :HALF // 2], SIN64[:, :HALF // 2]
    rope_ext.apply_rope_qk(q, k, cos, sin, a["pos"], inplace=True)
    return (buf,)


def _run_qkv_fp16(a):
    cos, sin = COS64[:, :HALF // 2], SIN64[:, :HALF // 2]
    return rope_ext.apply_rope_qk(a["q"], a["k"], cos, sin, a["pos"])


def _run_thd_inplace(a):
    q, k = a["q"].clone(), a["k"].clone()
    rope_ext.apply_rope_qk(q, k, COS32[:, :32], SIN32[:, :32], a["pos"], layout="thd",
                           interleaved=True, inplace=True)
    return q, k


def _run_strided_inverse(a):
    x = a["base"][..., ::2]  # head_dim at stride 2
    out = ops.apply(x, COS64[:, :40], SIN64[:, :40], a["pos"], False, True)
    x2 = a["base"].clone()[..., ::2]
    ops.apply_(x2, COS64[:, :40], SIN64[:, :40], a["pos"], False, True)
    return out, x2


def _run_grad(a):
    q = a["q"].clone().requires_grad_()
    k = a["k"].clone().requires_grad_()
    qo, ko = rope_ext.apply_rope_qk(q, k, COS32, SIN32, a["pos"])
    loss = (qo * a["w"]).sum() + ko.square().sum()
    gq, gk = torch.autograd.grad(loss, (q, k))
    return qo.detach(), ko.detach(), gq, gk


def _make_norm_bf16(seed):
    return dict(q=_randn((1, 200, 8, 128), torch.bfloat16, seed),
                k=_randn((1, 200, 2, 128), torch.bfloat16, seed + 1),
                qw=_randn((128,), torch.bfloat16, seed + 2),
                kw=_randn((128,), torch.bfloat16, seed + 3))


def _run_norm_bf16(a):
    # The fused QK-RMSNorm + RoPE (Qwen3's per-head norm), rows s for token s.
    return rope_ext.rms_norm_rope_qk(a["q"], a["k"], COS32, SIN32, q_weight=a["qw"],
                                     k_weight=a["kw"])


def _make_norm_grad(seed):
    return dict(q=_randn((2, 48, 4, 64), torch.float32, seed),
                k=_randn((2, 48, 2, 64), torch.float32, seed + 1),
                qw=_randn((4 * 64,), torch.float32, seed + 2),
                kw=_randn((2 * 64,), torch.float32, seed + 3),
                pos=_positions((2, 48), ROWS, torch.int64, seed + 4))


def _run_norm_grad(a):
    # Across heads (OLMo 2), Gemma's 1 + w: the gradients of q, k and both weights (the
    # weights' sums over tokens in fixed groups: the same bits whatever the threads).
    leaves = [a[n].clone().requires_grad_() for n in ("q", "k", "qw", "kw")]
    qo, ko = rope_ext.rms_norm_rope_qk(leaves[0], leaves[1], COS32[:, :32], SIN32[:, :32],
                                       a["pos"], q_weight=leaves[2], k_weight=leaves[3],
                                       across_heads=True, weight_offset=1.0)
    grads = torch.autograd.grad(qo.square().sum() + (ko * 3).sum(), leaves)
    return (qo.detach(), ko.detach()) + grads


KINDS = [
    Kind("apply_rope bshd f32 positions", _make_bshd_f32, _run_bshd_f32),
    Kind("apply_rope bhsd bf16 interleaved", _make_bhsd_bf16, _run_bhsd_bf16),
    Kind("apply_rope_qk fused fp16", _make_qkv_fp16, _run_qkv_fp16),
    Kind("apply_rope_qk fused fp16 in place", _make_qkv_fp16, _run_qkv_fp16_inplace),
    Kind("apply_rope_qk thd f32 in place", _make_thd_f32, _run_thd_inplace),
    Kind("op strided f64 inverse", _make_strided_f64, _run_strided_inverse),
    Kind("apply_rope_qk autograd", _make_grad, _run_grad),
    Kind("rms_norm_rope_qk bf16", _make_norm_bf16, _run_norm_bf16),
    Kind("rms_norm_rope_qk autograd across heads", _make_norm_grad, _run_norm_grad),
]


def test_threads_match_serial():
    num_threads = torch.get_num_threads()
    # Every thread gets its own inputs (different seeds: different values and positions).
    inputs = {(t, i): kind.make(1000 * t + 10 * i) for t in range(THREADS)
              for i, kind in enumerate(KINDS)}
    pristine = {key: {n: v.clone() for n, v in a.items()} for key, a in inputs.items()}
    serial = {key: KINDS[key[1]].run(a) for key, a in inputs.items()}

    def worker(t):
        order = [i for i in range(len(KINDS)) for _ in range(REPS)]
        random.Random(t).shuffle(order)
        mismatches = []
        for rep, i in enumerate(order):
            got = KINDS[i].run(inputs[(t, i)])
            want = serial[(t, i)]
            if len(got) != len(want) or not all(map(ref.same_bits, got, want, [True] * len(got))):
                mismatches.append(f"thread {t}, call {rep}: {KINDS[i].name}")
        return mismatches

    with ThreadPoolExecutor(max_workers=THREADS) as pool:
        results = list(pool.map(worker, range(THREADS), timeout=300))
    mismatches = [m for r in results for m in r]
    assert not mismatches, f"{len(mismatches)} concurrent results differ from serial: " + \
        "; ".join(mismatches[:10])
    # No call wrote into its inputs, and the thread setting is untouched.
    for key, a in inputs.items():
        for n, v in a.items():
            assert ref.same_bits(v, pristine[key][n]), \
                f"{KINDS[key[1]].name}: input {n} changed"
    assert torch.get_num_threads() == num_threads


@pytest.mark.parametrize("threads", [2, 8])
def test_threads_share_one_tensor_read_only(threads):
    """Many threads reading the same x, table and positions at once (functional calls only)."""
    x = _randn((4, 128, 8, 64), torch.bfloat16, 5)
    pos = _positions((4, 128), ROWS, torch.int32, 6)
    cos, sin = COS32[:, :32], SIN32[:, :32]
    want = rope_ext.apply_rope(x, cos, sin, pos, interleaved=True)
    x_before = x.clone()

    def worker(t):
        return all(ref.same_bits(rope_ext.apply_rope(x, cos, sin, pos, interleaved=True), want,
                                 strides=True) for _ in range(40))

    with ThreadPoolExecutor(max_workers=threads) as pool:
        assert all(pool.map(worker, range(threads), timeout=120))
    assert ref.same_bits(x, x_before, strides=True)
