"""Shared pieces of the benchmarks: timing, the baselines users run today, shapes."""

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


def hf_apply_rotary_pos_emb():
    """transformers' own Llama apply_rotary_pos_emb (eager PyTorch)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    return apply_rotary_pos_emb


def hf_cos_sin(cos_half, sin_half, dtype):
    """Our [S, r/2] table in transformers' format: [1, S, r], halves duplicated, x's dtype."""
    cos = torch.cat([cos_half, cos_half], dim=-1)[None].to(dtype)
    sin = torch.cat([sin_half, sin_half], dim=-1)[None].to(dtype)
    return cos, sin


def llama3_8b_qk(seq, batch=1, dtype=torch.bfloat16, seed=0):
    """q [b, s, 32, 128] and k [b, s, 8, 128], Llama-3-8B's attention shapes."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq, 32, 128, generator=g).to(dtype)
    k = torch.randn(batch, seq, 8, 128, generator=g).to(dtype)
    return q, k
