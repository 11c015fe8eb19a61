"""Shared pieces of the benchmarks: the allocator setting and shapes."""

import os
import sys

import torch

# glibc hands freed blocks of 32 MB and more back to the OS, so each new output that size
# is paged in again: page faults then cost more than any RoPE kernel, and how many there
# are depends on what ran before. The benchmarks keep freed memory in the process, as a
# caching allocator (or jemalloc/tcmalloc) would, for every implementation alike.
STEADY_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 31)}


def use_steady_malloc():
    """Re-run this script with STEADY_MALLOC set (glibc reads it only at start-up)."""
    if any(os.environ.get(k) != v for k, v in STEADY_MALLOC.items()):
        os.execve(sys.executable, [sys.executable] + sys.argv, dict(os.environ, **STEADY_MALLOC))


def llama3_8b_qk(seq, batch=1, dtype=torch.bfloat16, seed=0):
    """q [b, s, 32, 128] and k [b, s, 8, 128], Llama-3-8B's attention shapes."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq, 32, 128, generator=g).to(dtype)
    k = torch.randn(batch, seq, 8, 128, generator=g).to(dtype)
    return q, k
