"""Per-call cost: what one decode step's RoPE costs the host, as ratios to torch.add(q, q).

    python benchmarks/bench_call.py [--device cpu|cuda] [--threads N]

Decode-sized input, Llama-3-8B heads: q [1, 1, 32, 128], k [1, 1, 8, 128], bf16, one
position. On a GPU this host time is the whole cost of a decode step's RoPE (the kernel
takes a few microseconds), so it is measured here against the cheapest ATen op on the
same tensors, timed in turns in the same run, with grad mode on (eager training, HF
generate without no_grad) and off. Each figure is the fastest of several rounds of
many calls (the per-call overhead, without the noise of a shared machine). On CUDA the
kernel time per launch (CUDA events) is printed beside it.
"""

import argparse
import time

import torch

import rope_ext

ROUNDS, CALLS = 9, 2000


def per_call(fns, device):
    """{name: seconds per call}: the fastest of ROUNDS rounds of CALLS back-to-back calls,
    the candidates taking turns round by round, so drift hits them alike."""
    for fn in fns.values():
        for _ in range(200):
            fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(ROUNDS):
        for name, fn in fns.items():
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(CALLS):
                fn()
            if device == "cuda":
                torch.cuda.synchronize()
            best[name] = min(best[name], (time.perf_counter() - start) / CALLS)
    return best


def kernel_time(fn):
    """Device seconds per launch (events around 100 launches)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(100):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / 100


def candidates(device):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 32, 128, generator=g).to(device, torch.bfloat16)
    k = torch.randn(1, 1, 8, 128, generator=g).to(device, torch.bfloat16)
    rope = rope_ext.RotaryEmbedding(128, base=500000.0, max_positions=8192).to(device)
    pos = torch.tensor([[4095]], device=device)
    cos, sin = rope.cos, rope.sin
    hf_cos = torch.cat([cos, cos], -1)[pos].to(torch.bfloat16)
    hf_sin = torch.cat([sin, sin], -1)[pos].to(torch.bfloat16)
    out = {
        "torch.add(q, q)": lambda: torch.add(q, q),
        "torch.ops.rope.apply_qk": lambda: torch.ops.rope.apply_qk(q, k, cos, sin, pos),
        "rope_ext.apply_rope_qk": lambda: rope_ext.apply_rope_qk(q, k, cos, sin, pos),
        "RotaryEmbedding.forward": lambda: rope(q, k, pos),
    }
    try:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        out["transformers apply_rotary_pos_emb"] = lambda: apply_rotary_pos_emb(
            q, k, hf_cos, hf_sin, unsqueeze_dim=2)
    except ImportError:
        pass
    return out


def measure(device="cpu"):
    """{(grad_mode, name): seconds per call}, and on CUDA {name: kernel seconds}."""
    fns = candidates(device)
    host, kernel = {}, {}
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            for name, t in per_call(fns, device).items():
                host[(grad, name)] = t
    if device == "cuda":
        for name, fn in fns.items():
            kernel[name] = kernel_time(fn)
    return host, kernel


def table(host, kernel, device):
    names = list(dict.fromkeys(n for _, n in host))
    lines = [f"per call, decode q [1, 1, 32, 128] k [1, 1, 8, 128] bf16 on {device}, "
             f"{torch.get_num_threads()} thread(s); ratio to torch.add(q, q)",
             "| call | grad on | ratio | grad off | ratio |" + (" kernel |" if kernel else ""),
             "|---|---|---|---|---|" + ("---|" if kernel else "")]
    for name in names:
        on, off = host[(True, name)], host[(False, name)]
        row = (f"| {name} | {on * 1e6:.2f} us | {on / host[(True, 'torch.add(q, q)')]:.2f}x | "
               f"{off * 1e6:.2f} us | {off / host[(False, 'torch.add(q, q)')]:.2f}x |")
        if kernel:
            row += f" {kernel[name] * 1e6:.2f} us |"
        lines.append(row)
    return lines


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    host, kernel = measure(args.device)
    print("\n".join(table(host, kernel, args.device)))


if __name__ == "__main__":
    main()
