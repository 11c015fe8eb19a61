"""The CUDA kernel: the CPU matrix again on the GPU, against the float64 reference and the CPU.

Skipped (and reported as skipped, not passed) without a GPU. ROPE_TEST_DEVICE=cpu runs the
device-independent part on the CPU, which checks this file's own logic on a machine
without one.
"""

import os

import pytest
import torch

import reference as ref
import rope_ext
from conftest import STORAGES, X_DTYPES, build_qkv, build_table, build_x

DEVICE = os.environ.get("ROPE_TEST_DEVICE", "cuda")
ON_GPU = DEVICE == "cuda"
pytestmark = pytest.mark.skipif(ON_GPU and not torch.cuda.is_available(),
                                reason="needs a CUDA device")
gpu_only = pytest.mark.skipif(not ON_GPU, reason="CUDA-specific (streams, graphs, devices)")

ops = torch.ops.rope
PAIRINGS = pytest.mark.parametrize("interleaved", [False, True], ids=["halfsplit", "interleaved"])
DTYPES = pytest.mark.parametrize("dtype", X_DTYPES, ids=lambda d: str(d).split(".")[-1])
# head_dim 64: the 16-byte vector path; 12 (r/2 = 3 or 6): the scalar path.
HEAD_DIMS = pytest.mark.parametrize("head_dim", [64, 12])
B, S, H, T = 2, 7, 3, 9


def to_device(t):
    """t on DEVICE with the same strides and offset (a view of a copy of its whole buffer)."""
    if t is None:
        return None
    base = t if t._base is None else t._base
    moved = base.to(DEVICE)
    return moved.as_strided(t.size(), t.stride(), t.storage_offset())


def _shape(layout):
    return (None, T) if layout == "thd" else (B, S)


@HEAD_DIMS
@PAIRINGS
@DTYPES
@pytest.mark.parametrize("rotary", ["full", "partial"])
@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("layout,form", [(lay, f) for lay in ("bshd", "bhsd")
                                         for f in ("pos_bs", "pos_s", "rows", "tok_bs")]
                         + [("thd", "pos_s")])
def test_matches_reference_and_cpu(layout, form, storage, rotary, dtype, interleaved, head_dim):
    r = head_dim if rotary == "full" else head_dim // 2 - (head_dim // 2) % 2
    batch, seq = _shape(layout)
    sample = build_x(layout, storage, batch or 0, seq, H, head_dim, dtype)
    cos, sin, pos = build_table(form, batch, seq, r // 2)
    x_dev = to_device(sample.op)
    out = ops.apply(x_dev, to_device(cos), to_device(sin), to_device(pos), interleaved, False)
    assert out.device.type == DEVICE and out.shape == x_dev.shape and out.dtype == dtype
    expected = ref.rope(sample.op, cos.double(), sin.double(), pos, interleaved)
    ref.assert_pairs_close(out.cpu(), expected, sample.op, r, interleaved)
    cpu = ops.apply(sample.op, cos, sin, pos, interleaved, False)
    # Same math on both devices; only FMA contraction may differ.
    torch.testing.assert_close(out.cpu().double(), cpu.double(),
                               rtol=ref.PAIR_TOL[dtype] * 4, atol=ref.PAIR_TOL[dtype] * 4)


@HEAD_DIMS
@PAIRINGS
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_qk_fused_and_inplace(dtype, interleaved, head_dim):
    base, q, k, _ = build_qkv((B, S), 4, 2, head_dim, dtype)
    cos, sin, pos = build_table("pos_bs", B, S, head_dim // 2)
    base_d = base.to(DEVICE)
    q_d = base_d.as_strided(q.size(), q.stride(), q.storage_offset())
    k_d = base_d.as_strided(k.size(), k.stride(), k.storage_offset())
    args = (to_device(cos), to_device(sin), to_device(pos), interleaved, False)
    qo, ko = ops.apply_qk(q_d, k_d, *args)
    for x, y in ((q, qo), (k, ko)):
        ref.assert_pairs_close(y.cpu(), ref.rope(x, cos.double(), sin.double(), pos, interleaved),
                               x, head_dim, interleaved)
    v_before = base_d[..., (4 + 2) * head_dim:].clone()
    ops.apply_qk_(q_d, k_d, *args)
    assert torch.equal(q_d, qo) and torch.equal(k_d, ko)
    assert torch.equal(base_d[..., (4 + 2) * head_dim:], v_before), "v was written"


def test_misaligned_pointer_takes_the_scalar_path():
    # One element off a 16-byte boundary: the vector path must not be taken.
    buf = torch.randn(B * S * H * 64 + 1, dtype=torch.float64).to(torch.bfloat16)
    x = buf[1:].view(B, S, H, 64)
    cos, sin, pos = build_table("pos_bs", B, S, 32)
    out = ops.apply(to_device(x), to_device(cos), to_device(sin), to_device(pos), False, False)
    ref.assert_pairs_close(out.cpu(), ref.rope(x, cos.double(), sin.double(), pos), x, 64, False)


def test_gradcheck_and_gradgradcheck():
    x = torch.randn(2, 3, 2, 8, dtype=torch.float64, device=DEVICE, requires_grad=True)
    cos, sin, pos = (to_device(t) for t in build_table("pos_bs", 2, 3, 3, torch.float64))
    fn = lambda t: ops.apply(t, cos, sin, pos, True, False)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    q = torch.randn(2, 16, 4, 64, device=DEVICE, dtype=torch.bfloat16)
    k = torch.randn(2, 16, 2, 64, device=DEVICE, dtype=torch.bfloat16)
    inv, attn = rope_ext.rope_frequencies(64)
    cos, sin = rope_ext.cos_sin_table(inv, 64, attn, device=DEVICE)
    pos = torch.arange(16, device=DEVICE).expand(2, -1)
    fn = lambda q, k: rope_ext.apply_rope_qk(q, k, cos, sin, pos)  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True)
    for got, want in zip(compiled(q, k), fn(q, k)):
        assert torch.equal(got, want)


@gpu_only
def test_cuda_graph_replay():
    x = torch.randn(2, 8, 4, 64, device="cuda")
    inv, _ = rope_ext.rope_frequencies(64)
    cos, sin = rope_ext.cos_sin_table(inv, 32, device="cuda")
    pos = torch.randint(0, 32, (2, 8), device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up outside the graph, as capture requires
        rope_ext.apply_rope(x, cos, sin, pos)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = rope_ext.apply_rope(x, cos, sin, pos)
    for _ in range(2):  # new contents in the captured buffers, then replay
        x.copy_(torch.randn_like(x))
        pos.copy_(torch.randint(0, 32, (2, 8), device="cuda"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, rope_ext.apply_rope(x, cos, sin, pos))


@gpu_only
def test_non_default_stream():
    x = torch.randn(4, 64, 8, 128, device="cuda", dtype=torch.bfloat16)
    inv, _ = rope_ext.rope_frequencies(128)
    cos, sin = rope_ext.cos_sin_table(inv, 64, device="cuda")
    expected = rope_ext.apply_rope(x, cos, sin)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = rope_ext.apply_rope(x, cos, sin)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    assert torch.equal(out, expected)


@gpu_only
@pytest.mark.parametrize("where", ["cos", "sin", "positions"])
def test_table_on_another_device_raises(where):
    x = torch.randn(1, 4, 2, 8, device="cuda")
    inv, _ = rope_ext.rope_frequencies(8)
    cos, sin = rope_ext.cos_sin_table(inv, 8, device="cuda")
    args = {"cos": cos, "sin": sin, "positions": torch.arange(4, device="cuda")}
    args[where] = args[where].cpu()
    with pytest.raises(ValueError, match=rf"\b{where}\b"):
        ops.apply(x, args["cos"], args["sin"], args["positions"])


@gpu_only
def test_positions_outside_the_table_give_nan_and_read_nothing():
    # Checking on the GPU would need a device sync, so such tokens come out NaN (documented).
    x = torch.randn(1, 4, 2, 8, device="cuda")
    inv, _ = rope_ext.rope_frequencies(8)
    cos, sin = rope_ext.cos_sin_table(inv, 8, device="cuda")
    pos = torch.tensor([0, 8, -1, 3], device="cuda")
    out = ops.apply(x, cos, sin, pos)
    torch.cuda.synchronize()
    assert out[0, 1].isnan().all() and out[0, 2].isnan().all()
    good = torch.tensor([0, 3])
    expected = ref.rope(x[:, good].cpu(), cos.cpu().double(), sin.cpu().double(), pos[good].cpu())
    ref.assert_pairs_close(out[:, good].cpu(), expected, x[:, good].cpu(), 8, False)
