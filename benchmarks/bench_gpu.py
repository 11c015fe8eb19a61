"""GPU benchmark: rope_ext against a device copy and the RoPE kernels of other libraries.

    python benchmarks/bench_gpu.py [--quick] [--out DIR]
    python benchmarks/bench_gpu.py --sweep

Llama-3-8B shapes (q [b, s, 32, 128], k [b, s, 8, 128]), bf16 q and k, float32 table:
  prefill b=1 s=32768 (forward); FlashInfer's published shape b=2 s=65536 (forward);
  training b=8 s=4096, forward and backward timed apart;
  decode b=64 and b=1, s=1: per launch (CUDA events around 100 launches) and under
  CUDA graph replay (100 launches captured in one graph).
Each row gives rope_ext's time, its bandwidth (q and k read once and written once), its
time over a device copy of the same bytes in the same run, and each peer's time over
rope_ext's (above 1: rope_ext is faster). A peer that is not installed or fails shows
n/a, with the reason under the table. Large rows flush the L2 cache before every timed
launch; times are medians. Before timing, every row checks rope_ext against a float64
rotation on the device.

--quick: the rope_ext and copy columns only (no peers, no torch.compile).
--sweep: instead of the table, rope_ext under each launch-threshold setting
         (torch.ops.rope_testing.set_cuda_launch, the same settings as ROPE_EXT_CUDA_LAUNCH)
         on the prefill, training and decode rows, a table row printed as each is measured.
--out DIR: also write DIR/bench_gpu.md and DIR/bench_gpu.json.
"""

import argparse
import json
import os
import sys
import time

import torch

import rope_ext

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_call  # noqa: E402

HQ, HK, D, BASE = 32, 8, 128, 500000.0
# (label, batch, seq, kind): kind "fwd", "bwd" (the backward alone) or "decode".
ROWS = [("prefill b=1 s=32768", 1, 32768, "fwd"),
        ("FlashInfer b=2 s=65536", 2, 65536, "fwd"),
        ("train b=8 s=4096 fwd", 8, 4096, "fwd"),
        ("train b=8 s=4096 bwd", 8, 4096, "bwd"),
        ("decode b=64 s=1", 64, 1, "decode"),
        ("decode b=1 s=1", 1, 1, "decode")]
SWEEP = ["", "prefetch=1", "prefetch=1,min_blocks=0", "prefetch=1,max_heads_per_item=0",
         "max_heads_per_item=0", "max_heads_per_item=4", "min_blocks=4",
         "min_blocks=4,max_heads_per_item=0", "min_blocks=4,max_heads_per_item=4",
         "min_blocks=4,max_blocks_per_sm=4", "max_blocks_per_sm=3", "block_threads=128",
         "block_threads=512", "fill_blocks_per_sm=4", "heads_per_item=1", "index_bits=64"]
FLUSH_BYTES = 256 << 20  # larger than any Hopper L2 (50-60 MB)


class Timer:
    """Medians of CUDA-event times; optionally the L2 flushed before each launch."""

    def __init__(self):
        self.flush_buf = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device="cuda")

    def median(self, fn, flush, warmup=5, repeats=25):
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            if flush:
                self.flush_buf.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return sorted(times)[len(times) // 2]

    def per_launch(self, fn, launches=100, repeats=7):
        """Seconds per launch: events around `launches` back-to-back calls."""
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(launches):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / launches)
        return sorted(times)[len(times) // 2]

    def graph_replay(self, fn, launches=100, repeats=7):
        """Seconds per launch when `launches` calls are captured in one CUDA graph."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(launches):
                fn()
        return self.per_launch(graph.replay, launches=1, repeats=repeats) / launches


class Setup:
    """Inputs and tables for one row, in each library's own conventions."""

    def __init__(self, batch, seq):
        dev = "cuda"
        self.batch, self.seq = batch, seq
        self.q = torch.randn(batch, seq, HQ, D, device=dev, dtype=torch.bfloat16)
        self.k = torch.randn(batch, seq, HK, D, device=dev, dtype=torch.bfloat16)
        # Decode rows sit at a late position, as in generation.
        start = 0 if seq > 1 else 4095
        self.pos = torch.arange(start, start + seq, device=dev).expand(batch, -1)
        inv, attn = rope_ext.rope_frequencies(D, BASE)
        self.cos, self.sin = rope_ext.cos_sin_table(inv, start + seq, attn, device=dev)
        # transformers' format: [b, s, D], halves duplicated, x's dtype, per token.
        self.hf_cos = torch.cat([self.cos, self.cos], -1)[self.pos].to(torch.bfloat16)
        self.hf_sin = torch.cat([self.sin, self.sin], -1)[self.pos].to(torch.bfloat16)

    def nbytes(self):
        """q and k read once and written once."""
        return 2 * (self.q.numel() + self.k.numel()) * self.q.element_size()

    def check(self):
        """rope_ext against a float64 rotation on the device (relative L2 error)."""
        q_out, k_out = rope_ext.apply_rope_qk(self.q, self.k, self.cos, self.sin, self.pos)
        worst = 0.0
        for x, y in ((self.q, q_out), (self.k, k_out)):
            c = self.cos.double()[self.pos][:, :, None]
            s = self.sin.double()[self.pos][:, :, None]
            a, b = x.double()[..., :D // 2], x.double()[..., D // 2:]
            ref = torch.cat([a * c - b * s, a * s + b * c], -1)
            worst = max(worst, ((y.double() - ref).norm() / ref.norm()).item())
        assert worst < 1e-2, f"rope_ext off the float64 rotation: relative error {worst:.3g}"
        return worst


def impl_rope_ext(s):
    return lambda q, k: rope_ext.apply_rope_qk(q, k, s.cos, s.sin, s.pos)


def impl_copy(s):
    return lambda q, k: (q.clone(), k.clone())


def impl_hf_eager(s):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    return lambda q, k: apply_rotary_pos_emb(q, k, s.hf_cos, s.hf_sin, unsqueeze_dim=2)


def impl_hf_compile(s):
    return torch.compile(impl_hf_eager(s), fullgraph=True, dynamic=False)


def impl_liger(s):
    from liger_kernel.ops.rope import LigerRopeFunction

    # Liger works on [b, h, s, d]: hand it bhsd views (its native layout).
    return lambda q, k: LigerRopeFunction.apply(q.transpose(1, 2), k.transpose(1, 2),
                                                s.hf_cos, s.hf_sin)


def impl_flash_attn(s):
    from flash_attn.layers.rotary import apply_rotary_emb

    cos, sin = s.cos.to(torch.bfloat16), s.sin.to(torch.bfloat16)
    return lambda q, k: (apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin))


def impl_flashinfer(s):
    import flashinfer

    pos = s.pos.reshape(-1).to(torch.int32)

    def run(q, k):
        return flashinfer.rope.apply_rope_pos_ids(q.reshape(-1, HQ, D), k.reshape(-1, HK, D), pos,
                                                  rotary_dim=D, interleave=False, rope_theta=BASE)

    return run


PEERS = {"HF eager": impl_hf_eager, "HF compile": impl_hf_compile, "Liger": impl_liger,
         "flash-attn": impl_flash_attn, "FlashInfer": impl_flashinfer}


def time_row(timer, build, s, kind):
    """Seconds for one row: (time, graph time or None)."""
    run = build(s)
    if kind == "decode":
        fn = lambda: run(s.q, s.k)  # noqa: E731
        return timer.per_launch(fn), timer.graph_replay(fn)
    if kind == "fwd":
        return timer.median(lambda: run(s.q, s.k), flush=True), None
    # The backward alone: gradients of q and k from the outputs' gradients, no accumulation.
    q, k = s.q.clone().requires_grad_(), s.k.clone().requires_grad_()
    outs = run(q, k)
    grads = [torch.randn_like(o) for o in outs]
    fn = lambda: torch.autograd.grad(outs, (q, k), grads, retain_graph=True)  # noqa: E731
    return timer.median(fn, flush=True), None


def copy_bandwidth(timer):
    """The card's device-to-device copy rate, counting bytes read plus written."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t = timer.median(lambda: dst.copy_(src), flush=True, repeats=11)
    return 2 * src.numel() / t


def bench(args):
    timer = Timer()
    card = torch.cuda.get_device_name()
    copy_bw = copy_bandwidth(timer)
    head = (f"{card}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}; Llama-3-8B q/k, bf16, "
            f"float32 table; device copy {copy_bw / 1e9:.0f} GB/s (read + write)")
    print(head, flush=True)
    peers = {} if args.quick else PEERS
    results, failures = [], {}
    for label, batch, seq, kind in ROWS:
        s = Setup(batch, seq)
        err = s.check()
        ours, ours_graph = time_row(timer, impl_rope_ext, s, kind)
        copy, copy_graph = time_row(timer, impl_copy, s, "decode" if kind == "decode" else "fwd")
        row = {"row": label, "us": ours * 1e6, "GB/s": s.nbytes() / ours / 1e9,
               "vs copy": ours / copy, "rel err": err}
        if ours_graph is not None:
            row["graph us"] = ours_graph * 1e6
            row["copy graph us"] = copy_graph * 1e6
        for name, build in peers.items():
            try:
                theirs, _ = time_row(timer, build, s, kind)
                row[name] = theirs / ours
            except Exception as e:  # a peer missing or failing must not stop the table
                failures.setdefault(name, f"{type(e).__name__}: {e}".splitlines()[0][:160])
                row[name] = None
        results.append(row)
        print(json.dumps(row), flush=True)
        del s
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    cols = ["us", "graph us", "GB/s", "vs copy"] + list(peers)
    lines = [head, "", "| row | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for r in results:
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append("n/a" if v is None else f"{v:.2f}x" if c in peers or c == "vs copy"
                         else f"{v:.1f}" if c != "GB/s" else f"{v:.0f}")
        lines.append(f"| {r['row']} | " + " | ".join(cells) + " |")
    lines += [f"\n{name}: n/a ({why})" for name, why in failures.items()]
    return {"card": card, "copy_GBps": copy_bw / 1e9, "rows": results, "failures": failures}, lines


def sweep():
    timer = Timer()
    settings = torch.ops.rope_testing
    rows = [r for r in ROWS if r[0] in ("prefill b=1 s=32768", "train b=8 s=4096 fwd",
                                        "decode b=64 s=1", "decode b=1 s=1")]
    print("| launch setting | " + " | ".join(r[0] for r in rows) + " |")
    print("|---" * (len(rows) + 1) + "|", flush=True)
    setups = {r[0]: Setup(r[1], r[2]) for r in rows}
    for spec in SWEEP:
        previous = settings.set_cuda_launch(spec)
        cells = []
        for label, _, _, kind in rows:
            s = setups[label]
            s.check()
            t, _ = time_row(timer, impl_rope_ext, s, kind)
            cells.append(t * 1e6)
        settings.set_cuda_launch(previous)
        print(f"| {spec or '(defaults)'} | " + " | ".join(f"{c:.1f} us" for c in cells) + " |",
              flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_gpu: no CUDA device (torch.cuda.is_available() is False)")
    torch.manual_seed(0)
    if args.sweep:
        return sweep()
    data, lines = bench(args)
    host, kernel = bench_call.measure("cuda")
    lines += [""] + bench_call.table(host, kernel, "cuda")
    data["per_call"] = {f"{name} ({'grad' if grad else 'no_grad'})": t * 1e6
                        for (grad, name), t in host.items()}
    data["per_call_kernel_us"] = {name: t * 1e6 for name, t in kernel.items()}
    print("\n".join(lines))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_gpu.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
        with open(os.path.join(args.out, "bench_gpu.json"), "w") as f:
            json.dump(data, f, indent=1)


if __name__ == "__main__":
    main()
