"""CPU benchmark: rope_ext against what users run today, ratios measured in one run.

    python benchmarks/bench_cpu.py            # the full table and the plot (about 10 minutes)
    python benchmarks/bench_cpu.py --quick    # the short table of `make demo`
    python benchmarks/bench_cpu.py --quick --dtype fp16
    ATEN_CPU_CAPABILITY=avx2 ROPE_EXT_CPU_KERNEL=avx2 python benchmarks/bench_cpu.py --quick
                                              # the AVX2 kernels, ours and ATen's, on a wider CPU

Each cell is the median of repeated runs after warm-up (compilation excluded), the
implementations timed in turns.
Columns after rope_ext are speed-ups: that implementation's time over rope_ext's
(higher is better for rope_ext); "copy" is rope_ext's time over a plain copy of the
same bytes into fresh tensors (the memory-bandwidth floor; 1.0 would be ideal).
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from baselines import IMPLEMENTATIONS, Case  # noqa: E402
from common import STEADY_MALLOC, use_steady_malloc  # noqa: E402

MODELS = {
    # name: (q heads, k heads, head_dim, rotary_dim, rope_theta)
    "Llama-3-8B": (32, 8, 128, 128, 500000.0),
    "Llama-2-7B": (32, 32, 128, 128, 10000.0),
    "NeoX-partial": (32, 32, 128, 32, 10000.0),
}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
QUICK_DTYPES = {**DTYPES, "fp16": torch.float16}
PREFILL = (512, 1024, 2048, 4096, 8192)
DECODE_BATCH, DECODE_POS = 32, 4096


def make_case(model, dtype, seq, batch=1, start=0):
    hq, hk, d, r, base = MODELS[model]
    return Case(batch=batch, seq=seq, q_heads=hq, k_heads=hk, head_dim=d, rotary_dim=r,
                dtype=dtype, start=start, base=base)


def make_step(build, case, backward):
    """One timed call of an implementation (forward, or forward and backward), or None."""
    run = build(case)
    if run is None:
        return None
    q, k = case.inputs(requires_grad=backward)
    if not backward:
        def forward():
            with torch.no_grad():
                run(q, k)
        return forward
    g = case.inputs(seed=1)

    def step():
        qo, ko = run(q, k)
        torch.autograd.backward([qo, ko], list(g))
        q.grad = k.grad = None

    return step


def bench_row(case, impls, backward, repeats):
    """Median time of each implementation, timed in turns (one call each per round), so
    that drift in the machine's speed reaches every implementation alike."""
    steps = {name: make_step(IMPLEMENTATIONS[name], case, backward) for name in impls}
    live = {name: step for name, step in steps.items() if step is not None}
    for step in live.values():  # warm-up: compilation, allocator, caches
        for _ in range(5):
            step()
    samples = {name: [] for name in live}
    for _ in range(repeats):
        for name, step in live.items():
            t0 = time.perf_counter()
            step()
            samples[name].append(time.perf_counter() - t0)
    torch._dynamo.reset()  # keep compiled graphs of earlier shapes from piling up
    return {name: statistics.median(samples[name]) if name in live else None for name in impls}


def format_row(label, case, times, impls):
    ours = times["rope_ext"]
    cells = [f"{label:<34}", f"{ours * 1e3:9.3f}", f"{case.bytes_moved() / ours / 1e9:6.1f}"]
    for name in impls[1:]:
        t = times[name]
        if t is None:
            cells.append(f"{'n/a':>10}")
        elif name == "copy":
            cells.append(f"{ours / t:9.2f}x")
        else:
            cells.append(f"{t / ours:9.2f}x")
    return " ".join(cells)


def header(impls):
    cols = [f"{'case':<34}", f"{'ms':>9}", f"{'GB/s':>6}"]
    cols += [f"{(name if name != 'copy' else 'vs copy'):>10}" for name in impls[1:]]
    return " ".join(cols)


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, points in results.items():
        pts = [(s, b / t / 1e9) for s, b, t in points if t is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length (prefill, batch 1)")
    ax.set_ylabel("effective GB/s (q and k read + written)")
    ax.set_title(f"RoPE forward, Llama-3-8B q/k, bf16, CPU ({torch.get_num_threads()} threads)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the short table of make demo")
    parser.add_argument("--dtype", choices=sorted(QUICK_DTYPES), default="bf16",
                        help="the quick table's dtype")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--plot", default=os.path.join(os.path.dirname(__file__),
                                                        "cpu_throughput.png"))
    args = parser.parse_args(argv)

    if not args.quick:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
              f"CPU capability {torch.backends.cpu.get_cpu_capability()}, freed memory kept "
              f"in the process ({' '.join(f'{k}={v}' for k, v in STEADY_MALLOC.items())})")
    if args.quick:
        impls = ["rope_ext", "HF eager", "HF compile", "copy"]
        plan = [("Llama-3-8B", args.dtype, s, False) for s in (1024, 4096)]
        plan += [("Llama-3-8B", args.dtype, "decode", False), ("Llama-3-8B", args.dtype, 4096, True)]
        repeats = args.repeats or 15
    else:
        impls = list(IMPLEMENTATIONS)
        plan = [(m, d, s, False) for m in MODELS for d in DTYPES for s in PREFILL + ("decode",)]
        plan += [(m, "bf16", s, True) for m in ("Llama-3-8B", "NeoX-partial") for s in (1024, 4096)]
        repeats = args.repeats or 25

    print(header(impls))
    curve = {name: [] for name in impls}
    for i, (model, dname, seq, backward) in enumerate(plan):
        if seq == "decode":
            case = make_case(model, QUICK_DTYPES[dname], 1, batch=DECODE_BATCH, start=DECODE_POS)
            shape = f"decode b={DECODE_BATCH}"
        else:
            case = make_case(model, QUICK_DTYPES[dname], seq)
            shape = f"s={seq}"
        label = f"{model} {dname} {shape} {'fwd+bwd' if backward else 'fwd'}"
        progress = f"  [{i + 1}/{len(plan)}] {label} ..."
        if sys.stderr.isatty():  # a progress line that the finished row overwrites
            print(progress, end="\r", file=sys.stderr, flush=True)
        times = bench_row(case, impls, backward, repeats)
        print(format_row(label, case, times, impls).ljust(len(progress)), flush=True)
        if model == "Llama-3-8B" and dname == "bf16" and seq != "decode" and not backward:
            for name in impls:
                curve[name].append((seq, case.bytes_moved(), times[name]))
    if not args.quick:
        plot(curve, args.plot)


if __name__ == "__main__":
    use_steady_malloc()
    main()
