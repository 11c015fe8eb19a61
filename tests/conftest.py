"""Shared test setup: deterministic seeding, and builders of sample inputs.

The builders return tensors laid out the ways callers really hold them: plain
contiguous tensors, q/k slices of one fused qkv projection, [batch, heads, seq, head_dim]
tensors seen through .transpose(1, 2), and head_dim at a non-unit stride. Test modules
import them (`from conftest import build_x`); pytest puts tests/ on sys.path.
"""

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


def _randn(shape, dtype):
    return torch.randn(shape, dtype=torch.float64).to(dtype)


def op_view(x, layout):
    """x as the op takes it: bhsd is handed over as its [b, s, h, d] transpose."""
    return x.transpose(1, 2) if layout == "bhsd" else x


@dataclass
class Sample:
    x: torch.Tensor      # in the caller's layout
    op: torch.Tensor     # the op's view of the same memory: [b, s, h, d] or [t, h, d]
    base: torch.Tensor   # the whole buffer x lives in (to check nothing else was written)


def build_x(layout, storage, batch, seq, heads, head_dim, dtype=torch.float32):
    """One x of the given layout ("bshd", "bhsd", "thd") and storage:
    "contiguous"; "fused": heads [1, 1 + heads) of a buffer with heads + 2 heads per token (a k
    slice of a fused qkv projection); "strided": every other element of a buffer twice as wide
    in head_dim."""
    lead = {"bshd": (batch, seq), "bhsd": (batch,), "thd": (seq,)}[layout]
    if storage == "contiguous":
        shape = {"bshd": (batch, seq, heads), "bhsd": (batch, heads, seq),
                 "thd": (seq, heads)}[layout] + (head_dim,)
        base = _randn(shape, dtype)
        x = base
    elif storage == "fused":
        total = heads + 2
        if layout == "bhsd":  # a heads-major [b, h_total, s, d] buffer sliced on heads
            base = _randn((batch, total, seq, head_dim), dtype)
            x = base[:, 1:1 + heads]
        else:  # a [.., (h_total * d)] projection output viewed per head, then sliced
            base = _randn(lead + (total * head_dim,), dtype)
            x = base.view(lead + (total, head_dim))[..., 1:1 + heads, :]
    elif storage == "strided":
        shape = {"bshd": (batch, seq, heads), "bhsd": (batch, heads, seq),
                 "thd": (seq, heads)}[layout] + (2 * head_dim,)
        base = _randn(shape, dtype)
        x = base[..., ::2]
    else:
        raise ValueError(storage)
    return Sample(x, op_view(x, layout), base)


def build_qkv(lead, hq, hk, head_dim, dtype=torch.float32, head_dim_k=None):
    """q, k, v sliced out of one fused projection [*lead, (hq + 2 hk) * d], viewed per head.
    With head_dim_k, k and v get their own head size (q and k may differ, docs/api.md section 3)."""
    dk = head_dim if head_dim_k is None else head_dim_k
    width = hq * head_dim + 2 * hk * dk
    base = _randn(tuple(lead) + (width,), dtype)
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
