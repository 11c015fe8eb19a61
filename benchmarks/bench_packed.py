"""Packed batches: one call with cu_seqlens against explicit positions and a loop per document.

    python benchmarks/bench_packed.py             # the table (about a minute)
    python benchmarks/bench_packed.py --repeats 9 --threads 2

A packed batch lays its documents end to end, q ``[tokens, 32, 128]`` and k ``[tokens, 8,
128]`` (Llama-3-8B heads, layout "thd"), each document counting its positions from 0. Cases:
64 documents of 64 tokens and 8 documents of 512 (4096 tokens each), bf16, one thread.
Rows, all timed in this one run:

  cu_seqlens         rope_ext.apply_rope_qk(q, k, cos, sin, layout="thd", cu_seqlens=cu):
                     positions derived from cu_seqlens inside the call, then one op call
  positions          the same op call with the [tokens] positions given (as a data loader that
                     emits per-document positions hands them over): no derivation
  loop rope_ext      one rope_ext call per document (torch.split views [1, len, h, d], positions
                     0..len-1), the outputs concatenated: what code without varlen support does
  loop HF eager      transformers' apply_rotary_pos_emb per document (tables [len, 128] in
                     x's dtype, built once beforehand), the outputs concatenated

Each cell is the median over rounds; in each round every row is called once in turn, so a
shared machine's drift reaches every row alike. "x" is that row's time over cu_seqlens's in
the same round (median over rounds): above 1 means cu_seqlens is faster. Forward under
no_grad, and forward + backward (gradients of q and k).
"""

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import rope_ext  # noqa: E402
from common import STEADY_MALLOC, use_steady_malloc  # noqa: E402

HEADS_Q, HEADS_K, HEAD_DIM, THETA = 32, 8, 128, 500000.0
CASES = ((64, 64), (8, 512))  # (documents, tokens per document)
ROWS = ("cu_seqlens", "positions", "loop rope_ext", "loop HF eager")


def make_rows(docs, length, dtype):
    """name -> run(q, k) -> (q_out, k_out) over thd q/k; tables built once, as a model does."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    inv_freq, attention = rope_ext.rope_frequencies(HEAD_DIM, THETA)
    cos, sin = rope_ext.cos_sin_table(inv_freq, length, attention)
    cu_seqlens = torch.arange(0, (docs + 1) * length, length, dtype=torch.int32)
    positions = rope_ext.packed_positions(cu_seqlens, docs * length)
    lengths = cu_seqlens.diff().tolist()
    # transformers' tables: [1, len, head_dim], halves duplicated, in x's dtype
    hf_cos = torch.cat([cos, cos], -1)[None].to(dtype)
    hf_sin = torch.cat([sin, sin], -1)[None].to(dtype)

    def varlen(q, k):
        return rope_ext.apply_rope_qk(q, k, cos, sin, layout="thd", cu_seqlens=cu_seqlens)

    def with_positions(q, k):
        return rope_ext.apply_rope_qk(q, k, cos, sin, positions, layout="thd")

    # torch.split, not q[a:b] per document: its backward concatenates the documents'
    # gradients once, where each slice's backward would write a gradient of all of q.
    def loop_rope_ext(q, k):
        outs = [rope_ext.apply_rope_qk(qd[None], kd[None], cos, sin)
                for qd, kd in zip(q.split(lengths), k.split(lengths))]
        return torch.cat([o[0][0] for o in outs]), torch.cat([o[1][0] for o in outs])

    def loop_hf(q, k):
        outs = [apply_rotary_pos_emb(qd[None], kd[None], hf_cos[:, :len(qd)], hf_sin[:, :len(qd)],
                                     unsqueeze_dim=2)
                for qd, kd in zip(q.split(lengths), k.split(lengths))]
        return torch.cat([o[0][0] for o in outs]), torch.cat([o[1][0] for o in outs])

    return dict(zip(ROWS, (varlen, with_positions, loop_rope_ext, loop_hf)))


def check_rows(rows, docs, length, dtype):
    """Every row rotates alike: "positions" is the same op call, bit for bit; the loops round
    differently where a pair's two products nearly cancel (the op's positions-less path, and
    transformers' bf16 products and sum), so they agree within a few bf16 roundings of the
    largest values (a wrong pairing or position would be off by the values themselves)."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(docs * length, HEADS_Q, HEAD_DIM, generator=g).to(dtype)
    k = torch.randn(docs * length, HEADS_K, HEAD_DIM, generator=g).to(dtype)
    with torch.no_grad():
        want = rows["cu_seqlens"](q, k)
        for name, run in rows.items():
            for got, ref in zip(run(q, k), want):
                if name.startswith("loop"):
                    err = (got.float() - ref.float()).abs().max()
                    if not err <= 2 ** -6 * ref.float().abs().max():
                        raise AssertionError(f"{name} differs from cu_seqlens by {err}")
                elif not torch.equal(got, ref):
                    raise AssertionError(f"{name} differs from cu_seqlens")


def make_step(run, docs, length, dtype, backward):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(docs * length, HEADS_Q, HEAD_DIM, generator=g).to(dtype)
    k = torch.randn(docs * length, HEADS_K, HEAD_DIM, generator=g).to(dtype)
    if not backward:
        def forward():
            with torch.no_grad():
                run(q, k)
        return forward
    q.requires_grad_()
    k.requires_grad_()
    grads = (torch.randn(q.shape, generator=g).to(dtype), torch.randn(k.shape, generator=g)
             .to(dtype))

    def step():
        torch.autograd.backward(list(run(q, k)), list(grads))
        q.grad = k.grad = None

    return step


def bench(docs, length, dtype, backward, repeats):
    """{row: (median seconds, median ratio to cu_seqlens in the same round)}."""
    rows = make_rows(docs, length, dtype)
    steps = {name: make_step(run, docs, length, dtype, backward) for name, run in rows.items()}
    for step in steps.values():  # warm-up: allocator, caches
        for _ in range(3):
            step()
    samples = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            samples[name].append(time.perf_counter() - t0)
    base = samples["cu_seqlens"]
    return {name: (statistics.median(s), statistics.median(t / b for t, b in zip(s, base)))
            for name, s in samples.items()}


def stamp(argv):
    """Commit, date, machine and command of this run, for the table's header."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, text=True,
                                capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=here, text=True, capture_output=True).stdout.strip()
        commit += " (with uncommitted changes)" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f
                       if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = " ".join(["python"] + [os.path.relpath(argv[0])] + argv[1:])
    return (f"commit {commit}, {date}; {cpu}, {os.cpu_count()} logical CPUs, "
            f"{torch.get_num_threads()} thread(s), torch {torch.__version__}, CPU capability "
            f"{torch.backends.cpu.get_cpu_capability()}; `{command}`")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds per cell")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16

    print(f"Packed batch RoPE, Llama-3-8B heads (q {HEADS_Q}, k {HEADS_K}, head_dim {HEAD_DIM}), "
          f"bf16, layout thd. {stamp(sys.argv)}. Freed memory kept in the process "
          f"({' '.join(f'{k}={v}' for k, v in STEADY_MALLOC.items())}).\n")
    print("| case | pass | " + " | ".join(ROWS) + " |")
    print("|---|---|" + "---:|" * len(ROWS))
    for docs, length in CASES:
        check_rows(make_rows(docs, length, dtype), docs, length, dtype)
        for backward in (False, True):
            result = bench(docs, length, dtype, backward, args.repeats)
            cells = [f"{result['cu_seqlens'][0] * 1e3:.3f} ms"]
            cells += [f"{result[name][0] * 1e3:.3f} ms ({result[name][1]:.2f}x)"
                      for name in ROWS[1:]]
            case = f"{docs} docs x {length} tokens"
            print(f"| {case} | {'fwd+bwd' if backward else 'fwd'} | " + " | ".join(cells)
                  + " |", flush=True)


if __name__ == "__main__":
    use_steady_malloc()
    main()
