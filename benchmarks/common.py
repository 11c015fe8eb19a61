"""Shared pieces of the benchmarks: timing and shapes."""

import statistics
import time

import torch


def median_time(fn, *, warmup=3, repeats=15, min_time=0.0):
    """Median wall time of fn() in seconds, after warm-up (first calls compile or allocate)."""
    for _ in range(warmup):
        fn()
    times = []
    while len(times) < repeats or sum(times) < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def llama3_8b_qk(seq, batch=1, dtype=torch.bfloat16, seed=0):
    """q [b, s, 32, 128] and k [b, s, 8, 128], Llama-3-8B's attention shapes."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq, 32, 128, generator=g).to(dtype)
    k = torch.randn(batch, seq, 8, 128, generator=g).to(dtype)
    return q, k
