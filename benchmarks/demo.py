"""make demo: rotate Llama-3-8B-shaped q/k, check them, time them against transformers.

1. Correctness: rope_ext's bf16 result against an independent float64 reference
   (tests/reference.py), as the largest error per pair relative to the pair's norm.
2. Speed: the short table of benchmarks/bench_cpu.py: rope_ext.apply_rope_qk against
   transformers' apply_rotary_pos_emb, eager and under torch.compile, and a plain copy
   of the same bytes, on this machine's CPU, medians of repeated runs.
3. Per call: what one decode step's RoPE costs, as ratios to torch.add(q, q)
   (benchmarks/bench_call.py).
"""

import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, HERE)

import rope_ext  # noqa: E402
import bench_call  # noqa: E402
import bench_cpu  # noqa: E402
from common import llama3_8b_qk, use_steady_malloc  # noqa: E402
from reference import pair_slots, pair_norms, rope  # noqa: E402

SEQ = 4096


def max_pair_error(out, x, cos, sin, positions):
    """Largest error of any rotated element, in units of its input pair's norm
    (docs/math.md section 13)."""
    ref = rope(x, cos.double(), sin.double(), positions)
    ia, ib = pair_slots(2 * cos.shape[-1], interleaved=False)
    err = torch.maximum((out.double()[..., ia] - ref[..., ia]).abs(),
                        (out.double()[..., ib] - ref[..., ib]).abs())
    return (err / pair_norms(x, 2 * cos.shape[-1], False).clamp_min(1e-30)).max().item()


def main():
    print(f"rope_ext demo: torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
    inv_freq, attn = rope_ext.rope_frequencies(128, base=500000.0)   # Llama 3 rope_theta
    cos, sin = rope_ext.cos_sin_table(inv_freq, SEQ, attn)
    q, k = llama3_8b_qk(SEQ)
    positions = torch.arange(SEQ)

    print(f"[1/3] correctness: q {list(q.shape)}, k {list(k.shape)}, bf16, positions 0..{SEQ - 1}")
    q_out, k_out = rope_ext.apply_rope_qk(q, k, cos, sin, positions)
    for name, x, y in (("q", q, q_out), ("k", k, k_out)):
        err = max_pair_error(y, x, cos, sin, positions)
        verdict = "OK" if err <= 2.0**-8 else "FAIL"
        print(f"      {name}: max error / pair norm = {err:.2e} (bf16 bound 2^-8 = {2**-8:.2e}) {verdict}")

    print("[2/3] speed on this CPU: rope_ext's time, then each baseline's time over it "
          "(higher is better for rope_ext; 'vs copy' is rope_ext over a plain copy of the same "
          "bytes: 1.00x is the memory-bandwidth limit). Freed memory stays in the process "
          "(benchmarks/common.py says why).", flush=True)
    bench_cpu.main(["--quick"])

    print("[3/3] per call (one thread), the host cost of a decode step's RoPE:", flush=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    host, kernel = bench_call.measure("cpu")
    print("\n".join(bench_call.table(host, kernel, "cpu")))
    torch.set_num_threads(threads)


if __name__ == "__main__":
    use_steady_malloc()
    main()
