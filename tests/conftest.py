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


def build_table(form, batch, seq, half, dtype=torch.float32, pos_dtype=torch.int64,
                rows=None):
    """(cos, sin, positions) for the op, in one of TABLE_FORMS (batch None means thd).

    Values are a genuine RoPE table (base 10000) at scattered positions, rounded to `dtype`.
    """
    thd = batch is None
    rows = seq + 5 if rows is None else rows
    cos, sin = ref.default_table(2 * half, max(rows, 1))
    cos, sin = cos[:rows], sin[:rows]
    if form in POS_FORMS:
        if thd:
            shape = (seq,)
        else:
            shape = {"pos_bs": (batch, seq), "pos_1s": (1, seq), "pos_s": (seq,)}[form]
        pos = torch.randint(0, rows, shape)
        if pos.numel() >= 2:  # the first and the last row of the table are always used
            pos.view(-1)[0], pos.view(-1)[-1] = 0, rows - 1
        return cos.to(dtype), sin.to(dtype), pos.to(pos_dtype)
    assert not thd, "thd needs positions"
    if form == "rows":
        return cos.to(dtype), sin.to(dtype), None
    # Per-token tables: rows of the default table at random positions, one per token.
    tok_shape = {"tok_s": (seq,), "tok_bs": (batch, seq), "tok_1s": (1, seq)}[form]
    pick = torch.randint(0, rows, tok_shape)
    return cos[pick].to(dtype), sin[pick].to(dtype), None


# --- devices: where a kernel test runs ---

# "cpu": the CPU kernel; "cuda-host": the CUDA kernel's body run for every (block, thread) of
# its grid by the host executor, on CPU tensors (docs/kernels.md); "cuda": the GPU.
# ROPE_TEST_DEVICE narrows a run to one of them.
ROPE_TEST_DEVICE = os.environ.get("ROPE_TEST_DEVICE")
DEVICES = [ROPE_TEST_DEVICE] if ROPE_TEST_DEVICE else (
    ["cpu", "cuda-host"] + (["cuda"] if torch.cuda.is_available() else []))


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
