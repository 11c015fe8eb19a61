"""The fused QK-RMSNorm + RoPE against what Qwen3, OLMo 2 and Gemma 3 run today.

    python benchmarks/bench_norm_rope.py                  # CPU, bf16, Qwen3-8B shapes, s=4096
    python benchmarks/bench_norm_rope.py --device cuda    # the same on a GPU (gpu-check runs it)
    python benchmarks/bench_norm_rope.py --seq 1024 --no-compile   # quicker
    python benchmarks/bench_norm_rope.py --device cuda --sweep      # the fused kernel's launch
                                                                    # settings (gpu-check runs it)

Qwen3-8B attention: q [1, s, 32, 128], k [1, s, 8, 128], per-head norms. Rows, each the
median of timed calls after warm-up, all measured in this one run:
  fused           rope_ext.rms_norm_rope_qk
  rope alone      rope_ext.apply_rope_qk (no norm): the fused op's floor
  norm-then-rope  transformers' Qwen3RMSNorm on q and k, then rope_ext.apply_rope_qk
  HF eager        Qwen3RMSNorm, then transformers' apply_rotary_pos_emb (what the model runs)
  HF compile      the same under torch.compile
  copy            q.clone() and k.clone(): the memory-bandwidth floor
The rows are timed in turns (each round calls every row once), and a ratio is the median
over rounds of the two rows' times in the same round: a shared machine's speed drifts
between rows timed one after the other. Ratios: fused / rope alone (goal <= 1.15), and each
other row's time over fused's (higher is better for the fused op; goal >= 1.8 for
norm-then-rope). Forward under no_grad, and forward + backward (gradients of q, k and both
norm weights).
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import rope_ext  # noqa: E402
from common import use_steady_malloc  # noqa: E402


def build(device, dtype, seq, backward):
    """name -> (run(q, k) -> (q_out, k_out), parameters needing grad)."""
    from transformers.models.qwen3 import modeling_qwen3 as qwen3

    d, theta, eps = 128, 1_000_000.0, 1e-6
    inv_freq, attention = rope_ext.rope_frequencies(d, base=theta)
    cos, sin = rope_ext.cos_sin_table(inv_freq, seq, attention, device=device)
    q_norm = qwen3.Qwen3RMSNorm(d, eps=eps).to(device=device, dtype=dtype)
    k_norm = qwen3.Qwen3RMSNorm(d, eps=eps).to(device=device, dtype=dtype)
    with torch.no_grad():  # weights away from 1, as a trained model's are
        q_norm.weight.uniform_(0.5, 1.5)
        k_norm.weight.uniform_(0.5, 1.5)
    # transformers' tables: [batch, seq, head_dim], halves duplicated, in the model's dtype.
    hf_cos = torch.cat([cos, cos], -1)[None].to(dtype)
    hf_sin = torch.cat([sin, sin], -1)[None].to(dtype)

    def fused(q, k):
        return rope_ext.rms_norm_rope_qk(q, k, cos, sin, q_weight=q_norm.weight,
                                         k_weight=k_norm.weight, eps=eps)

    def rope_alone(q, k):
        return rope_ext.apply_rope_qk(q, k, cos, sin)

    def norm_then_rope(q, k):
        return rope_ext.apply_rope_qk(q_norm(q), k_norm(k), cos, sin)

    def hf_eager(q, k):
        # As Qwen3Attention.forward: norm on [b, s, h, d], transpose, rotate.
        qt = q_norm(q).transpose(1, 2)
        kt = k_norm(k).transpose(1, 2)
        qo, ko = qwen3.apply_rotary_pos_emb(qt, kt, hf_cos, hf_sin)
        return qo.transpose(1, 2), ko.transpose(1, 2)  # views: bshd like the other rows

    def copy(q, k):
        return q.clone(), k.clone()

    rows = {"fused": fused, "rope alone": rope_alone, "norm-then-rope": norm_then_rope,
            "HF eager": hf_eager}
    rows["HF compile"] = torch.compile(hf_eager)
    rows["copy"] = copy
    params = [q_norm.weight, k_norm.weight]
    return rows, params


def timer(device):
    if device == "cuda":
        def now():
            torch.cuda.synchronize()
            return time.perf_counter()
        return now
    return time.perf_counter


def time_in_turns(runs, q, k, params, backward, now, reps, grads):
    """{name: [seconds per call]}: after 3 warm-up calls each, `reps` rounds in which every
    row is called once, in turns, so that a machine getting slower or faster (a shared
    machine does, by up to 2x within minutes) moves all rows of a round alike."""
    def call(run):
        if not backward:
            with torch.no_grad():
                run(q, k)
            return
        qo, ko = run(q, k)
        torch.autograd.backward([qo, ko], list(grads))
        q.grad = k.grad = None
        for p in params:
            p.grad = None

    for run in runs.values():
        for _ in range(3):
            call(run)
    times = {name: [] for name in runs}
    for _ in range(reps):
        for name, run in runs.items():
            t0 = now()
            call(run)
            times[name].append(now() - t0)
    return times


def round_ratio(times, a, b):
    """The median over rounds of a's time over b's in the same round."""
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


# Launch settings the fused CUDA kernel's planner reads (docs/kernels.md, "Launch
# thresholds"): threads per block (items of 8 lanes for bf16 head_dim 128, so 256 threads
# = 32 items), the persistent grid's blocks per SM, the forward's 64-register build, the
# hint of each lane's next item into L2 (the untimed options first: the step has a time
# cap), and the scalar path for reference.
NORM_SWEEP = ["", "norm_prefetch=1", "norm_min_blocks=4", "norm_prefetch=1,norm_min_blocks=4",
              "block_threads=64", "block_threads=128", "block_threads=512",
              "block_threads=1024", "max_blocks_per_sm=2", "max_blocks_per_sm=4",
              "max_blocks_per_sm=16", "max_blocks_per_sm=32",
              "block_threads=128,max_blocks_per_sm=16", "norm_min_blocks=4,max_blocks_per_sm=16",
              "vectorize=0"]


def sweep(args, dtype, reps, now):
    """The fused op's forward and forward + backward under each launch setting (CUDA), over
    rope alone under the defaults, and the largest difference of its outputs from the
    defaults' (the sums of squares are split among lanes by the plan: a different split may
    round differently, a wrong result shows as a large difference)."""
    settings = torch.ops.rope_testing
    rows, params = build(args.device, dtype, args.seq, True)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, args.seq, 32, 128, generator=g).to(args.device, dtype)
    k = torch.randn(1, args.seq, 8, 128, generator=g).to(args.device, dtype)
    grads = (torch.randn_like(q), torch.randn_like(k))
    with torch.no_grad():
        want = rows["fused"](q, k)
    rope = statistics.median(
        time_in_turns({"rope": rows["rope alone"]}, q, k, params, False, now, reps, grads)["rope"])
    print(f"\nlaunch settings (rope alone {rope * 1e3:.4f} ms):")
    print("| setting | forward ms | / rope alone | forward + backward ms | max diff |")
    print("|---|---|---|---|---|")
    qg, kg = q.clone().requires_grad_(), k.clone().requires_grad_()
    for p in params:
        p.requires_grad_(True)
    for spec in NORM_SWEEP:
        previous = settings.set_cuda_launch(spec)
        try:
            with torch.no_grad():
                got = rows["fused"](q, k)
            diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(got, want))
            fused = {"fused": rows["fused"]}
            fwd = statistics.median(
                time_in_turns(fused, q, k, params, False, now, reps, grads)["fused"])
            both = statistics.median(
                time_in_turns(fused, qg, kg, params, True, now, reps, grads)["fused"])
        finally:
            settings.set_cuda_launch(previous)
        print(f"| {spec or '(defaults)'} | {fwd * 1e3:.4f} | {fwd / rope:.2f} | {both * 1e3:.4f} "
              f"| {diff:.3g} |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--reps", type=int, default=0, help="timed calls per row (default: 15 "
                        "on the CPU, 100 on a GPU)")
    parser.add_argument("--no-compile", action="store_true", help="leave out HF compile")
    parser.add_argument("--out", help="also write the table as JSON here")
    parser.add_argument("--sweep", action="store_true", help="instead of the table: the fused "
                        "CUDA kernel under each launch setting (needs --device cuda)")
    args = parser.parse_args()
    if args.sweep and args.device != "cuda":
        parser.error("--sweep times the CUDA kernel's launch settings: add --device cuda")
    if args.device == "cpu":
        use_steady_malloc()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    reps = args.reps or (15 if args.device == "cpu" else 100)
    now = timer(args.device)
    if args.sweep:
        return sweep(args, dtype, reps, now)
    where = (torch.cuda.get_device_name() if args.device == "cuda"
             else f"CPU, {torch.get_num_threads()} threads, "
                  f"{torch.backends.cpu.get_cpu_capability()}")
    print(f"fused QK-RMSNorm + RoPE, Qwen3-8B shapes (q 32 heads, k 8, head_dim 128), "
          f"{args.dtype}, batch 1, seq {args.seq}; {where}")
    results = {}
    for backward in (False, True):
        rows, params = build(args.device, dtype, args.seq, backward)
        if args.no_compile:
            rows.pop("HF compile")
        g = torch.Generator().manual_seed(0)
        q = torch.randn(1, args.seq, 32, 128, generator=g).to(args.device, dtype)
        k = torch.randn(1, args.seq, 8, 128, generator=g).to(args.device, dtype)
        grads = (torch.randn_like(q), torch.randn_like(k))
        q.requires_grad_(backward)
        k.requires_grad_(backward)
        for p in params:
            p.requires_grad_(backward)
        mode = "forward + backward" if backward else "forward"
        if backward:
            rows.pop("copy")
        rounds = time_in_turns(rows, q, k, params, backward, now, reps, grads)
        times = {name: statistics.median(t) for name, t in rounds.items()}
        print(f"\n{mode} (medians of {reps} rounds; x fused: the median of the rounds' ratios):")
        print(f"  {'':16s} {'ms':>9s} {'x fused':>9s}")
        for name, t in times.items():
            print(f"  {name:16s} {t * 1e3:9.3f} {round_ratio(rounds, name, 'fused'):9.2f}")
        print(f"  fused / rope alone = {round_ratio(rounds, 'fused', 'rope alone'):.2f} "
              f"(goal <= 1.15); norm-then-rope / fused = "
              f"{round_ratio(rounds, 'norm-then-rope', 'fused'):.2f} (goal >= 1.8)")
        results[mode] = {name: t * 1e3 for name, t in times.items()}
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"where": where, "dtype": args.dtype, "seq": args.seq, "ms": results}, f,
                      indent=1)


if __name__ == "__main__":
    main()
