"""The CUDA kernel: the CPU matrix again through the CUDA kernel (tests/test_op.py's
test_apply_matches_reference, collected here too), against the float64 reference and the CPU
kernel; the launch plans, the host executor's checks, and what only a GPU has.

ROPE_TEST_DEVICE picks where the CUDA kernel runs:
  cuda       on the GPU (the default when one is present);
  cuda-host  through the host executor (the default without a GPU): the kernel's body,
             compiled for the CPU, run for every (block, thread) of the planned grid,
             with every access checked for alignment and every output element for
             exactly one store (docs/kernels.md). CPU tensors, so CI runs it;
  cpu        the CPU kernel itself (checks this file's own logic).
Tests that need a real stream, graph or second device carry the `needs_gpu` mark and
are deselected (not skipped) without a GPU; every other test runs everywhere.
"""

import contextlib
import functools

import pytest
import torch

import reference as ref
import rope_ext
from conftest import (CUDA_KERNEL_DEVICE, X_DTYPES, build_qkv, build_table, check_devices,
                      cpu_kernel, to_dev)
from test_op import matrix, test_apply_matches_reference

DEVICE = CUDA_KERNEL_DEVICE
check_devices([DEVICE])
ON_GPU = DEVICE == "cuda"
TENSOR_DEVICE = "cuda" if ON_GPU else "cpu"
needs_gpu = pytest.mark.needs_gpu
testing = torch.ops.rope_testing


@contextlib.contextmanager
def _setting(setter, value):
    previous = setter(value)
    try:
        yield
    finally:
        setter(previous)


def cuda_launch(config):
    """CUDA launches (GPU and host executor) plan with these thresholds inside."""
    return _setting(testing.set_cuda_launch, config)


@pytest.fixture
def device():
    """The device test_apply_matches_reference runs on here."""
    return DEVICE


@pytest.fixture
def sizes():
    """(batch, seq, heads, tokens for thd) of test_apply_matches_reference here."""
    return B, S, H, T


def pytest_generate_tests(metafunc):
    """tests/test_op.py's matrix through the CUDA kernel: head_dim 64 (the 16-byte vector path)
    and 12 (r/2 = 3 or 6: the scalar path), the layouts with each kind of table."""
    if metafunc.function is test_apply_matches_reference:
        cases = [(lay, f, torch.int64 if f.startswith("pos") else None)
                 for lay in ("bshd", "bhsd") for f in ("pos_bs", "pos_s", "rows", "tok_bs")]
        matrix(metafunc, cases + [("thd", "pos_t", torch.int64)],
               {"full-64": (64, 64), "partial-64": (64, 32), "full-12": (12, 12),
                "partial-12": (12, 6)})


@pytest.fixture(autouse=True)
def _kernel_under_test():
    with cpu_kernel("cuda-host" if DEVICE == "cuda-host" else "auto"):
        yield


def host_plan():
    """The plan of the last host-executed launch, as a dict of strings."""
    return dict(kv.split("=") for kv in testing.last_host_plan().split(","))


def cpu_kernel_result(fn, *args):
    """fn(*args) computed by the native CPU kernel, whatever this module runs."""
    with cpu_kernel("auto"):
        return fn(*args)


ops = torch.ops.rope
PAIRINGS = pytest.mark.parametrize("interleaved", [False, True], ids=["halfsplit", "interleaved"])
DTYPES = pytest.mark.parametrize("dtype", X_DTYPES, ids=lambda d: str(d).split(".")[-1])
# head_dim 64: the 16-byte vector path; 12 (r/2 = 3 or 6): the scalar path.
HEAD_DIMS = pytest.mark.parametrize("head_dim", [64, 12])
B, S, H, T = 2, 7, 3, 9


to_device = functools.partial(to_dev, DEVICE)


@HEAD_DIMS
@PAIRINGS
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_qk_fused_and_inplace(dtype, interleaved, head_dim):
    base, q, k, _ = build_qkv((B, S), 4, 2, head_dim, dtype)
    cos, sin, pos = build_table("pos_bs", B, S, head_dim // 2)
    base_d = base.to(TENSOR_DEVICE, copy=True)
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


@pytest.mark.parametrize("what", ["x", "x_inplace", "table"])
def test_misaligned_pointer_takes_the_scalar_path(what):
    # One element off a 16-byte boundary: no 16-byte access may be planned there.
    buf = torch.randn(B * S * H * 64 + 1, dtype=torch.float64).to(torch.bfloat16)
    x = buf[1:].view(B, S, H, 64) if what != "table" else buf[:-1].view(B, S, H, 64)
    cos, sin, pos = build_table("pos_bs", B, S, 32)
    if what == "table":  # rows one float off alignment
        cos = torch.cat([cos.new_zeros(cos.numel() + 1)[:1], cos.reshape(-1)])[1:].view_as(cos)
        sin = torch.cat([sin.new_zeros(1), sin.reshape(-1)])[1:].view_as(sin)
    expected = ref.rope(x, cos.double(), sin.double(), pos)
    x_dev = to_device(x)
    args = (to_device(cos), to_device(sin), to_device(pos), False, False)
    if what == "x_inplace":
        ops.apply_(x_dev, *args)
        out = x_dev
    else:
        out = ops.apply(x_dev, *args)
    ref.assert_pairs_close(out.cpu(), expected, x, 64, False)
    if DEVICE == "cuda-host":
        plan = host_plan()
        assert plan["table_vec" if what == "table" else "vec"] == "1", plan


def test_gradcheck_and_gradgradcheck():
    x = torch.randn(2, 3, 2, 8, dtype=torch.float64, device=TENSOR_DEVICE, requires_grad=True)
    cos, sin, pos = (to_device(t) for t in build_table("pos_bs", 2, 3, 3, torch.float64))
    fn = lambda t: ops.apply(t, cos, sin, pos, True, False)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    q = torch.randn(2, 16, 4, 64, device=TENSOR_DEVICE, dtype=torch.bfloat16)
    k = torch.randn(2, 16, 2, 64, device=TENSOR_DEVICE, dtype=torch.bfloat16)
    inv, attn = rope_ext.rope_frequencies(64)
    cos, sin = rope_ext.cos_sin_table(inv, 64, attn, device=TENSOR_DEVICE)
    pos = torch.arange(16, device=TENSOR_DEVICE).expand(2, -1)
    fn = lambda q, k: rope_ext.apply_rope_qk(q, k, cos, sin, pos)  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True)
    for got, want in zip(compiled(q, k), fn(q, k)):
        assert torch.equal(got, want)


@needs_gpu
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


@needs_gpu
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


@needs_gpu
@pytest.mark.parametrize("where", ["cos", "sin", "positions"])
def test_table_on_another_device_raises(where):
    x = torch.randn(1, 4, 2, 8, device="cuda")
    inv, _ = rope_ext.rope_frequencies(8)
    cos, sin = rope_ext.cos_sin_table(inv, 8, device="cuda")
    args = {"cos": cos, "sin": sin, "positions": torch.arange(4, device="cuda")}
    args[where] = args[where].cpu()
    with pytest.raises(ValueError, match=rf"\b{where}\b"):
        ops.apply(x, args["cos"], args["sin"], args["positions"])


@pytest.mark.skipif(DEVICE == "cpu", reason="the CPU kernel raises instead (test_errors.py)")
def test_positions_outside_the_table_give_nan_and_read_nothing():
    # Checking on the GPU would need a device sync, so such tokens come out NaN (documented).
    x = torch.randn(1, 4, 2, 8, device=TENSOR_DEVICE)
    inv, _ = rope_ext.rope_frequencies(8)
    cos, sin = rope_ext.cos_sin_table(inv, 8, device=TENSOR_DEVICE)
    pos = torch.tensor([0, 8, -1, 3], device=TENSOR_DEVICE)
    out = ops.apply(x, cos, sin, pos)
    assert out[0, 1].isnan().all() and out[0, 2].isnan().all()
    good = torch.tensor([0, 3])
    expected = ref.rope(x[:, good].cpu(), cos.cpu().double(), sin.cpu().double(), pos[good].cpu())
    ref.assert_pairs_close(out[:, good].cpu(), expected, x[:, good].cpu(), 8, False)


# --- the launch plans: every path of the planner, forced through its thresholds ---

LAUNCH_CONFIGS = {
    "default": "",
    # One block for everything: the persistent grid's stride loop over items.
    "grid_stride": "sm_count=1,max_blocks_per_sm=1",
    # Fewer threads than chunks per head: the chunk loop; one item row per block.
    "chunk_loop": "block_threads=2",
    "one_thread": "block_threads=1,sm_count=1,max_blocks_per_sm=2",
    # token x head items, one head each, and three (groups straddle q and k).
    "head_items_1": "heads_per_item=1",
    "head_items_3": "heads_per_item=3,sm_count=2,max_blocks_per_sm=1",
    "index64": "index_bits=64,heads_per_item=2",
    "scalar": "vectorize=0,block_threads=64",
    # the vector kernel without __launch_bounds__ (the default holds it to 4 blocks per SM)
    "plain_kernel": "min_blocks=0,heads_per_item=7",
    # the cap on heads per token item: 7 heads in items of 3 (3 + 3 + 1)
    "max_heads_3": "max_heads_per_item=3,fill_blocks_per_sm=0",
    # each head's loads preceded by a hint of the item's next head (items of 3 heads, which
    # straddle q and k; 64-bit offsets; the scalar path): a hint, so the same results; the
    # host executor reads each hinted address (make sanitize: inside its tensor)
    "prefetch": "prefetch=1,heads_per_item=3",
    "prefetch_index64": "prefetch=1,index_bits=64,max_heads_per_item=0",
    "prefetch_scalar": "prefetch=1,vectorize=0,heads_per_item=4",
}


@pytest.mark.parametrize("config", list(LAUNCH_CONFIGS), ids=list(LAUNCH_CONFIGS))
@PAIRINGS
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64],
                         ids=["bf16", "fp32", "fp64"])
@pytest.mark.parametrize("rotary", ["full", "partial"])
def test_launch_plans(config, dtype, interleaved, rotary):
    # q 5 heads, k 2 (GQA); head_dim 64 with r 64 or 48 (a pass-through tail of 16).
    head_dim, r = 64, (64 if rotary == "full" else 48)
    base, q, k, _ = build_qkv((3, 5), 5, 2, head_dim, dtype)
    cos, sin, pos = build_table("pos_bs", 3, 5, r // 2)
    qd, kd = to_device(q), to_device(k)
    args = (to_device(cos), to_device(sin), to_device(pos), interleaved, False)
    with cuda_launch(LAUNCH_CONFIGS[config]):
        qo, ko = ops.apply_qk(qd, kd, *args)
        for x, y in ((q, qo), (k, ko)):
            ref.assert_pairs_close(y.cpu(), ref.rope(x, cos.double(), sin.double(), pos, interleaved),
                                   x, r, interleaved)
        ops.apply_qk_(qd, kd, *args)
        assert torch.equal(qd.cpu(), qo.cpu()) and torch.equal(kd.cpu(), ko.cpu())
        # The inverse undoes the rotation, to the rounding of x and of the float32 table.
        back = ops.apply(qo, *args[:3], interleaved, True)
        tol = 4 * max(ref.PAIR_TOL[dtype], ref.PAIR_TOL[torch.float32]) * q.abs().max().item()
        torch.testing.assert_close(back.cpu().double(), q.double(), rtol=0, atol=tol)


@pytest.mark.parametrize("spec", ["blocks=3", "block_threads=0", "index_bits=16", "sm_count=-1",
                                  "heads_per_item=x", "block_threads", "min_blocks=3",
                                  "norm_min_blocks=2", "norm_prefetch=2", "prefetch=2"])
def test_launch_config_rejects_bad_settings(spec):
    with pytest.raises(ValueError, match="launch config"):
        testing.set_cuda_launch(spec)


@pytest.mark.skipif(DEVICE != "cuda-host", reason="reads the host executor's plan")
def test_planner_picks_the_grid_for_the_shape():
    """Decode splits heads into token x head items; prefill keeps all heads of a token in
    one item with several tokens per block; the grid never exceeds one wave."""
    inv, _ = rope_ext.rope_frequencies(128)
    cos, sin = rope_ext.cos_sin_table(inv, 4096)

    def plan_of(batch, seq, hq, hk, dtype=torch.bfloat16):
        q = torch.randn(batch, seq, hq, 128, dtype=dtype)
        k = torch.randn(batch, seq, hk, 128, dtype=dtype)
        pos = torch.arange(seq).expand(batch, -1)
        ops.apply_qk(q, k, cos, sin, pos)
        return host_plan()

    decode = plan_of(64, 1, 32, 8)  # Llama-3-8B decode: 64 tokens cannot fill 132 SMs
    assert int(decode["heads_per_item"]) < 40 and decode["vec"] == "8" and decode["table_vec"] == "4"
    # 2048 tokens x 32 per block = 64 blocks of 256 threads: enough for 16 SMs, so each
    # item is one token with all its heads ...
    with cuda_launch("sm_count=16,max_heads_per_item=0"):
        prefill = plan_of(1, 2048, 4, 2)
    assert prefill["heads_per_item"] == "6", prefill
    assert (prefill["block_x"], prefill["block_y"], prefill["grid"]) == ("8", "32", "64"), prefill
    assert prefill["index64"] == "0"
    # ... of at most max_heads_per_item (4) heads: 12 heads go in 3 items of 4, each run by
    # the kernel built for 4 resident blocks per SM.
    with cuda_launch("sm_count=4"):
        capped = plan_of(1, 512, 8, 4)
    assert (capped["heads_per_item"], capped["items"]) == ("4", str(512 * 3)), capped
    assert capped["min_blocks"] == "4", capped
    # ... but not for 132 (2 blocks per SM wanted): the heads are split in 3 groups of 2.
    assert plan_of(1, 2048, 4, 2)["heads_per_item"] == "2"
    fp32 = plan_of(1, 2048, 4, 2, torch.float32)  # 4 floats per access: 16 threads per head
    assert (fp32["vec"], fp32["block_x"], fp32["block_y"]) == ("4", "16", "16"), fp32
    with cuda_launch("sm_count=2"):  # 128 blocks wanted, one wave of 2 SMs x 8 blocks
        assert plan_of(1, 4096, 1, 1)["grid"] == "16"
    # The next-head hint only where asked for.
    assert capped["prefetch"] == "0", capped
    with cuda_launch("sm_count=4,prefetch=1"):
        assert plan_of(1, 512, 8, 4)["prefetch"] == "1"


@pytest.mark.skipif(DEVICE == "cpu", reason="the CUDA kernel's index width")
def test_offsets_past_int32_take_the_64_bit_path():
    # x's last token starts past element 2**31 of its buffer (4 GiB of bf16, left
    # untouched but for the elements read), so 32-bit offsets would wrap.
    seq, heads, head_dim = 3, 2, 16
    step = (2**31 + 2**12) // (seq - 1)
    step -= step % 8
    buf = torch.empty(step * (seq - 1) + heads * head_dim, dtype=torch.bfloat16, device=TENSOR_DEVICE)
    x = buf.as_strided((1, seq, heads, head_dim), (0, step, head_dim, 1))
    x.copy_(torch.randn(1, seq, heads, head_dim, dtype=torch.float64).to(torch.bfloat16))
    cos, sin, pos = build_table("pos_bs", 1, seq, head_dim // 2)
    out = ops.apply(x, to_device(cos), to_device(sin), to_device(pos), False, False)
    x_cpu = x.cpu()
    ref.assert_pairs_close(out.cpu(), ref.rope(x_cpu, cos.double(), sin.double(), pos), x_cpu,
                           head_dim, False)
    if DEVICE == "cuda-host":
        assert host_plan()["index64"] == "1"


@needs_gpu
@pytest.mark.parametrize("config", list(LAUNCH_CONFIGS), ids=list(LAUNCH_CONFIGS))
@PAIRINGS
@DTYPES
def test_gpu_bit_identical_to_host_executor(config, dtype, interleaved):
    """The device code and its host execution do the same operations (the device built
    with -fmad=false, the host with -ffp-contract=off), so they agree bit for bit."""
    base, q, k, _ = build_qkv((2, 9), 4, 2, 64, dtype)
    cos, sin, pos = build_table("pos_bs", 2, 9, 24)
    pos[0, 3] = 99  # outside the table: NaN on both
    with cuda_launch(LAUNCH_CONFIGS[config]):
        gpu = ops.apply_qk(to_device(q), to_device(k), to_device(cos), to_device(sin),
                           to_device(pos), interleaved, False)
        with cpu_kernel("cuda-host"):
            host = ops.apply_qk(q, k, cos, sin, pos, interleaved, False)
    for g, h in zip(gpu, host):
        g = g.cpu()
        assert torch.equal(g.isnan(), h.isnan())
        assert torch.equal(g.nan_to_num(0.0), h.nan_to_num(0.0))


# --- RotaryEmbedding at any position: rows past the table computed in the kernel ---


@pytest.mark.parametrize("scaling", [None, {"rope_type": "yarn", "factor": 4.0,
                                            "original_max_position_embeddings": 32}],
                         ids=["default", "yarn"])
def test_module_far_positions_match_the_cpu(scaling):
    rope = rope_ext.RotaryEmbedding(64, rotary_dim=48, max_positions=32, scaling=scaling)
    positions = torch.tensor([[0, 31, 32, 19999, 10**6, 2**31 - 1]])
    q = torch.randn(1, 6, 3, 64, dtype=torch.float64).to(torch.bfloat16)
    k = torch.randn(1, 6, 1, 64, dtype=torch.float64).to(torch.bfloat16)
    want = cpu_kernel_result(rope, q, k, positions)
    rope_d = rope.to(TENSOR_DEVICE)
    got = rope_d(to_device(q), to_device(k), to_device(positions))
    for g, w in zip(got, want):
        torch.testing.assert_close(g.cpu().double(), w.double(), rtol=ref.PAIR_TOL[torch.bfloat16],
                                   atol=ref.PAIR_TOL[torch.bfloat16] * 4)


@needs_gpu
def test_module_far_positions_without_a_sync_and_in_a_graph():
    rope = rope_ext.RotaryEmbedding(128, max_positions=64).cuda()
    q = torch.randn(4, 1, 32, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(4, 1, 8, 128, device="cuda", dtype=torch.bfloat16)
    pos = torch.tensor([[5], [64], [100000], [2**31 - 1]], device="cuda")
    torch.cuda.set_sync_debug_mode("error")  # a host sync would raise
    try:
        rope(q, k, pos)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        rope(q, k, pos)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_q, out_k = rope(q, k, pos)
    pos.copy_(torch.tensor([[7], [70000], [2**30], [12345678]], device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    want_q, want_k = rope(q, k, pos)
    assert torch.equal(out_q, want_q) and torch.equal(out_k, want_k)
