"""Shared test setup: deterministic seeding, builders of sample inputs, and the devices a kernel
test runs on (the float64 reference and the comparisons made with it are in reference.py).

The builders return tensors laid out the ways callers really hold them: plain
contiguous tensors, q/k slices of one fused qkv projection, [batch, heads, seq, head_dim]
tensors seen through .transpose(1, 2), and head_dim at a non-unit stride. Test modules
import them (`from conftest import build_x`); pytest puts tests/ on sys.path.
"""

import contextlib
import os
import socket
import time
from dataclasses import dataclass

import pytest
import torch

import reference as ref

LAYOUTS = ("bshd", "bhsd", "thd")
STORAGES = ("contiguous", "fused", "strided")
X_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# How the table is given. "pos_*": a [P, r/2] table indexed by positions of shape [batch, seq],
# [1, seq], [seq] ([tokens] for thd); "rows": [P, r/2] with P > seq, positions None (row s for
# token s); "tok_*": one row per token, [seq, r/2], [batch, seq, r/2], [1, seq, r/2].
POS_FORMS = ("pos_bs", "pos_1s", "pos_s")
NOPOS_FORMS = ("rows", "tok_s", "tok_bs", "tok_1s")
TABLE_FORMS = POS_FORMS + NOPOS_FORMS


@pytest.fixture(autouse=True)
def _seed():
    # Every test draws the same numbers whatever ran before it.
    torch.manual_seed(0)


def _randn(shape, dtype, generator=None):
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)


def user_shape(layout, batch, seq, heads, head_dim):
    return {"bshd": (batch, seq, heads), "bhsd": (batch, heads, seq),
            "thd": (seq, heads)}[layout] + (head_dim,)


def op_view(x, layout):
    """x as the op takes it: bhsd is handed over as its [b, s, h, d] transpose."""
    return x.transpose(1, 2) if layout == "bhsd" else x


@dataclass
class Sample:
    x: torch.Tensor      # in the caller's layout
    op: torch.Tensor     # the op's view of the same memory: [b, s, h, d] or [t, h, d]
    base: torch.Tensor   # the whole buffer x lives in (to check nothing else was written)


def build_x(layout, storage, batch, seq, heads, head_dim, dtype=torch.float32, generator=None,
            offset=0):
    """One x of the given layout ("bshd", "bhsd", "thd") and storage:
    "contiguous"; "fused": heads [1, 1 + heads) of a buffer with heads + 2 heads per token (a k
    slice of a fused qkv projection; bhsd: of a heads-major [b, h_total, s, d] buffer);
    "fused_hf": the same, but bhsd as Hugging Face makes it (the bshd slice transposed);
    "strided": every other element of a buffer twice as wide in head_dim, from `offset`;
    "transposed": bshd from seq-major [s, b, h, d], bhsd from a contiguous [b, s, h, d], thd
    from head-major [h, t, d]; "expand": batch and heads broadcast with zero strides."""
    shape = user_shape(layout, batch, seq, heads, head_dim)
    lead = {"bshd": (batch, seq), "bhsd": (batch,), "thd": (seq,)}[layout]
    randn = lambda shape: _randn(shape, dtype, generator)  # noqa: E731
    if storage == "contiguous":
        base = x = randn(shape)
    elif storage == "fused" and layout == "bhsd":
        base = randn((batch, heads + 2, seq, head_dim))
        x = base[:, 1:1 + heads]
    elif storage in ("fused", "fused_hf"):  # a [.., (h_total * d)] projection viewed per head
        lead = (seq,) if layout == "thd" else (batch, seq)
        base = randn(lead + ((heads + 2) * head_dim,))
        x = base.view(lead + (heads + 2, head_dim))[..., 1:1 + heads, :]
        x = x.transpose(1, 2) if layout == "bhsd" else x
    elif storage == "strided":
        base = randn(shape[:-1] + (2 * head_dim,))
        x = base[..., offset::2][..., :head_dim]
    elif storage == "transposed":
        base = randn({"bshd": (seq, batch, heads), "bhsd": (batch, seq, heads),
                      "thd": (heads, seq)}[layout] + (head_dim,))
        x = base.transpose(*{"bshd": (0, 1), "bhsd": (1, 2), "thd": (0, 1)}[layout])
    elif storage == "expand":
        base = randn((seq, 1, head_dim) if layout == "thd" else
                     user_shape(layout, 1, seq, 1, head_dim))
        x = base.expand(shape)
    else:
        raise ValueError(storage)
    return Sample(x, op_view(x, layout), base)


def build_qkv(lead, hq, hk, head_dim, dtype=torch.float32, head_dim_k=None, generator=None):
    """q, k, v sliced out of one fused projection [*lead, (hq + 2 hk) * d], viewed per head.
    With head_dim_k, k and v get their own head size (q and k may differ, docs/api.md section 3)."""
    dk = head_dim if head_dim_k is None else head_dim_k
    width = hq * head_dim + 2 * hk * dk
    base = _randn(tuple(lead) + (width,), dtype, generator)
    q = base[..., :hq * head_dim].unflatten(-1, (hq, head_dim))
    k = base[..., hq * head_dim:hq * head_dim + hk * dk].unflatten(-1, (hk, dk))
    v = base[..., hq * head_dim + hk * dk:].unflatten(-1, (hk, dk))
    return base, q, k, v


def cut_table(cos64, sin64, dtype, storage="contiguous"):
    """cos/sin of the given float64 values, rounded to dtype, in one of the memory layouts
    callers use: contiguous; chunk (the two halves of one [.., r] cos|sin cache: row stride r);
    pairs (stack([cos, sin], -1)[..., 0 / 1]: last stride 2); wide (every other column of a
    buffer twice as wide)."""
    if storage == "contiguous":
        return cos64.to(dtype), sin64.to(dtype)
    pairs = cos64.shape[-1]
    if storage == "chunk":
        cs = torch.cat([cos64, sin64], -1).to(dtype)
        return cs[..., :pairs], cs[..., pairs:]
    if storage == "pairs":
        cs = torch.stack([cos64, sin64], -1).to(dtype)
        return cs[..., 0], cs[..., 1]
    if storage == "wide":
        wc = torch.zeros(cos64.shape[:-1] + (2 * pairs,), dtype=dtype)
        ws = torch.zeros_like(wc)
        wc[..., 1::2] = cos64.to(dtype)
        ws[..., 1::2] = sin64.to(dtype)
        return wc[..., 1::2], ws[..., 1::2]
    raise ValueError(storage)


# Positions given in other memory: [batch, seq] as an expanded [1, seq], or every other
# element of a wider buffer ([batch, seq] or, for thd, [tokens]).
POS_LAYOUT_FORMS = ("pos_bs_expand", "pos_bs_strided", "pos_s_strided")


def build_table(form, batch, seq, pairs, dtype=torch.float32, pos_dtype=torch.int64,
                rows=None, base=10000.0, attention_factor=1.0, storage="contiguous",
                generator=None):
    """(cos, sin, positions) for the op, in one of TABLE_FORMS or POS_LAYOUT_FORMS (batch None
    means thd: positions [tokens], "pos_s" or "pos_s_strided"), the table cut by `storage`
    (cut_table).

    Values are a genuine RoPE table (r = 2 * pairs, `base`, `attention_factor`) of `rows` rows
    (default seq + 5), rounded to `dtype`; positions, or the rows picked for a per-token
    table, are random (from `generator`), and positions always use the first and last row.
    """
    thd = batch is None
    rows = seq + 5 if rows is None else rows
    cos, sin = ref.table(ref.inv_freq(2 * pairs, base), max(rows, 1), attention_factor)
    cos, sin = cos[:rows], sin[:rows]
    if form.startswith("pos"):
        strided = form.endswith("_strided")
        if thd:
            shape = (seq, 2) if strided else (seq,)
        else:
            shape = {"pos_bs": (batch, seq), "pos_1s": (1, seq), "pos_s": (seq,),
                     "pos_bs_expand": (1, seq), "pos_bs_strided": (batch, seq, 2),
                     "pos_s_strided": (seq, 2)}[form]
        pos = torch.randint(0, rows, shape, generator=generator)
        if pos.numel() >= 2:  # the first and the last row of the table are always used
            pos.view(-1)[0], pos.view(-1)[-1] = 0, rows - 1
        pos = pos.to(pos_dtype)
        if strided:
            pos = pos[..., 0]
        if form == "pos_bs_expand":
            pos = pos.expand(batch, seq)
        return *cut_table(cos, sin, dtype, storage), pos
    assert not thd, "thd needs positions"
    if form != "rows":  # per-token tables: rows at random positions, one per token
        tok_shape = {"tok_s": (seq,), "tok_bs": (batch, seq), "tok_1s": (1, seq)}[form]
        pick = torch.randint(0, rows, tok_shape, generator=generator)
        cos, sin = cos[pick], sin[pick]
    return *cut_table(cos, sin, dtype, storage), None


# --- devices: where a kernel test runs ---

# "cpu": the CPU kernel; "cuda-host": the CUDA kernel's body run for every (block, thread) of
# its grid by the host executor, on CPU tensors (docs/kernels.md); "cuda": the GPU.
# ROPE_TEST_DEVICE narrows a run to one of them.
ROPE_TEST_DEVICE = os.environ.get("ROPE_TEST_DEVICE")
DEVICES = [ROPE_TEST_DEVICE] if ROPE_TEST_DEVICE else (
    ["cpu", "cuda-host"] + (["cuda"] if torch.cuda.is_available() else []))
# tests/test_cuda.py runs on one of them: the GPU where there is one, else the host executor.
CUDA_KERNEL_DEVICE = ROPE_TEST_DEVICE or ("cuda" if torch.cuda.is_available() else "cuda-host")


def check_devices(devices):
    """Called by the modules that run on DEVICES (a bad ROPE_TEST_DEVICE fails them only)."""
    assert set(devices) <= {"cpu", "cuda-host", "cuda"}, f"ROPE_TEST_DEVICE={ROPE_TEST_DEVICE}"
    if "cuda" in devices and not torch.cuda.is_available():
        raise RuntimeError("ROPE_TEST_DEVICE=cuda but torch sees no GPU")


@contextlib.contextmanager
def cpu_kernel(name):
    """The CPU ops run the named kernel ("auto", "cuda-host", an ISA) inside."""
    previous = torch.ops.rope_testing.set_cpu_kernel(name)
    try:
        yield
    finally:
        torch.ops.rope_testing.set_cpu_kernel(previous)


def on_device(device):
    """Selects the kernel of a device under test for the CPU ops (a context manager)."""
    return cpu_kernel("cuda-host") if device == "cuda-host" else contextlib.nullcontext()


def tdev(device):
    """Where the tensors live for a device under test."""
    return "cuda" if device == "cuda" else "cpu"


def to_dev(device, t):
    """t on the device under test with the same strides and offset: a view of a copy of its
    whole buffer (a copy on the CPU too, so the test's input stays untouched)."""
    if t is None:
        return None
    base = t if t._base is None else t._base
    return base.to(tdev(device), copy=True).as_strided(t.size(), t.stride(), t.storage_offset())


def pytest_collection_modifyitems(config, items):
    """Without a GPU, tests that need a real stream, graph or second device are deselected:
    the rest of tests/test_cuda.py runs through the CUDA kernel's host executor instead."""
    if torch.cuda.is_available():
        return
    keep = [item for item in items if item.get_closest_marker("needs_gpu") is None]
    if len(keep) != len(items):
        config.hook.pytest_deselected(items=[i for i in items if i not in keep])
        items[:] = keep


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(worker, world, result_dir, deadline_s, what):
    """Runs worker(rank, port, result_dir) in `world` spawned processes; fails the test if one
    raises (with its traceback) or the whole run outlasts deadline_s; each rank must leave
    result_dir/rank<r>.ok behind."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(worker, args=(free_port(), str(result_dir)), nprocs=world,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + deadline_s
    try:
        while not ctx.join(timeout=1):  # raises if a worker failed, with its traceback
            if time.monotonic() > deadline:
                pytest.fail(f"{what} workers still running after {deadline_s} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join(5)
    assert sorted(os.listdir(result_dir)) == [f"rank{r}.ok" for r in range(world)]
