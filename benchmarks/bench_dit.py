"""RoPE and QK-norm + RoPE of diffusion transformers: rope_ext against diffusers' own code.

    python benchmarks/bench_dit.py                        # CPU, bf16, Flux-dev and Wan-14B shapes
    python benchmarks/bench_dit.py --threads 1 --wan-seq 4680   # one core, a shorter video
    python benchmarks/bench_dit.py --device cuda          # the same on a GPU
    python benchmarks/bench_dit.py --no-compile           # quicker: no torch.compile rows

Shapes (batch 1, bf16):
  Flux-dev  a single-stream block's attention: q, k [1, 4096 image + 512 text, 24, 128],
            per-head torch.nn.RMSNorm(128) (norm_q/norm_k), FluxPosEmbed's [4608, 128]
            interleaved (cos, sin), rotated by diffusers.models.embeddings.apply_rotary_emb
            (sequence_dim=1).
  Wan-14B   a self-attention: q, k [1, S, 40, 128], torch.nn.RMSNorm(5120) over each token's
            heads, WanRotaryPosEmbed's [1, S, 1, 128] tables, Wan's nested apply_rotary_emb.
            S = 32760 (21 latent frames of 30 x 52 tokens: 81 frames at 480 x 832) unless
            --wan-seq says otherwise.
Rows, each the median of rounds timed in turns after warm-up (a shared machine's speed
drifts; a ratio is the median over rounds of the two rows' times in the same round):
  RoPE:        rope_ext (rope_ext.diffusers' function, what patch(fuse=False) runs, q and k),
               diffusers eager, diffusers compile (torch.compile of that eager code), copy.
  norm + RoPE: rope_ext fused (rope_ext.rms_norm_rope_qk, what patch() runs),
               norm-then-rope (diffusers' norm modules, then rope_ext's rotation),
               diffusers eager (its norm modules, then its rotation: what the model runs),
               diffusers compile, copy (q.clone(), k.clone(): the memory-bandwidth floor).
Forward under no_grad, and forward + backward (gradients of q, k and, with the norms, both
norm weights). The table ends with a stamp: commit, date, machine, command.
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
import rope_ext.diffusers as rd  # noqa: E402
from common import use_steady_malloc  # noqa: E402

HEADS, HEAD_DIM = {"Flux-dev": 24, "Wan-14B": 40}, 128


def flux_setup(seq, device, dtype):
    """(q_norm, k_norm, diffusers' (cos, sin), eager rope(q, k), rope_ext rope(q, k),
    fused(q, k))."""
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    image = seq - 512
    side = int(round(image ** 0.5))
    ids = torch.zeros(seq, 3)
    grid = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(image // side),
                                      indexing="ij"), -1).reshape(-1, 2)
    ids[512:512 + grid.shape[0], 1:] = grid.float()
    cos, sin = FluxPosEmbed(theta=10000, axes_dim=[16, 56, 56])(ids.to(device))
    norms = [torch.nn.RMSNorm(HEAD_DIM, eps=1e-6).to(device, dtype) for _ in range(2)]

    def eager_rope(q, k):
        return (apply_rotary_emb(q, (cos, sin), sequence_dim=1),
                apply_rotary_emb(k, (cos, sin), sequence_dim=1))

    def ours_rope(q, k):
        return (rd.apply_rotary_emb(q, (cos, sin), sequence_dim=1),
                rd.apply_rotary_emb(k, (cos, sin), sequence_dim=1))

    c, s = cos[:, 0::2], sin[:, 0::2]

    def fused(q, k):
        return rope_ext.rms_norm_rope_qk(q, k, c, s, q_weight=norms[0].weight,
                                         k_weight=norms[1].weight, eps=1e-6, interleaved=True)

    def norm(q, k):
        return norms[0](q), norms[1](k)

    return norms, norm, eager_rope, ours_rope, fused


def wan_setup(seq, device, dtype):
    """The same for Wan-14B's self-attention (norms over each token's 40 heads)."""
    from rope_ext.diffusers.functions import _wan_eager  # Wan's nested function, verbatim

    heads = HEADS["Wan-14B"]
    g = torch.Generator().manual_seed(0)
    angles = torch.rand(seq, HEAD_DIM // 2, generator=g, dtype=torch.float64) * 50
    fc = angles.cos().repeat_interleave(2, -1).float()[None, :, None].to(device)
    fs = angles.sin().repeat_interleave(2, -1).float()[None, :, None].to(device)
    norms = [torch.nn.RMSNorm(heads * HEAD_DIM, eps=1e-6).to(device, dtype) for _ in range(2)]

    def eager_rope(q, k):
        return _wan_eager(q, fc, fs), _wan_eager(k, fc, fs)

    def ours_rope(q, k):
        return rd.wan_apply_rotary_emb(q, fc, fs), rd.wan_apply_rotary_emb(k, fc, fs)

    c, s = fc[:, :, 0, 0::2], fs[:, :, 0, 1::2]

    def fused(q, k):
        return rope_ext.rms_norm_rope_qk(q, k, c, s, q_weight=norms[0].weight,
                                         k_weight=norms[1].weight, eps=1e-6, across_heads=True,
                                         interleaved=True)

    def norm(q, k):
        # Wan normalizes the [b, s, heads * head_dim] projection, then splits the heads
        return (norms[0](q.flatten(2)).unflatten(2, (heads, -1)),
                norms[1](k.flatten(2)).unflatten(2, (heads, -1)))

    return norms, norm, eager_rope, ours_rope, fused


def build(model, seq, device, dtype, compile_):
    """{section: {row: run(q, k) -> (q_out, k_out)}}, and the norm weights."""
    norms, norm, eager_rope, ours_rope, fused = (flux_setup if model == "Flux-dev"
                                                 else wan_setup)(seq, device, dtype)

    def copy(q, k):
        return q.clone(), k.clone()

    def norm_then_ours(q, k):
        return ours_rope(*norm(q, k))

    def norm_then_eager(q, k):
        return eager_rope(*norm(q, k))

    rope_rows = {"rope_ext": ours_rope, "diffusers eager": eager_rope}
    norm_rows = {"rope_ext fused": fused, "norm-then-rope": norm_then_ours,
                 "diffusers eager": norm_then_eager}
    if compile_:
        rope_rows["diffusers compile"] = torch.compile(eager_rope)
        norm_rows["diffusers compile"] = torch.compile(norm_then_eager)
    rope_rows["copy"] = copy
    norm_rows["copy"] = copy
    return {"RoPE": rope_rows, "norm + RoPE": norm_rows}, [n.weight for n in norms]


def timer(device):
    if device == "cuda":
        def now():
            torch.cuda.synchronize()
            return time.perf_counter()
        return now
    return time.perf_counter


def time_in_turns(rows, q, k, params, backward, now, reps, grads):
    """{row: [seconds per call]}: 2 warm-up calls each, then `reps` rounds in which every
    row is called once, in turns."""
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

    for run in rows.values():
        for _ in range(2):
            call(run)
    times = {name: [] for name in rows}
    for _ in range(reps):
        for name, run in rows.items():
            t0 = now()
            call(run)
            times[name].append(now() - t0)
    return times


def round_ratio(times, a, b):
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


def stamp(args, where):
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here,
                                capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=here, capture_output=True, text=True).stdout.strip()
        commit += " (uncommitted changes)" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), cpu)
    except OSError:
        pass
    import diffusers

    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"commit {commit}; {date}; {where} ({cpu}, {os.cpu_count()} CPUs); torch "
            f"{torch.__version__}, diffusers {diffusers.__version__}; command: python "
            f"{' '.join(sys.argv)}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: "
                        "torch's choice)")
    parser.add_argument("--flux-seq", type=int, default=4608, help="Flux tokens, 512 of them "
                        "text (default 4608: a 1024 x 1024 image)")
    parser.add_argument("--wan-seq", type=int, default=32760, help="Wan tokens (default "
                        "32760: 81 frames at 480 x 832)")
    parser.add_argument("--models", default="Flux-dev,Wan-14B")
    parser.add_argument("--reps", type=int, default=0, help="timed rounds (default: 7 on the "
                        "CPU, 50 on a GPU)")
    parser.add_argument("--no-compile", action="store_true", help="leave out the compile rows")
    args = parser.parse_args()
    if args.device == "cpu":
        use_steady_malloc()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    reps = args.reps or (7 if args.device == "cpu" else 50)
    now = timer(args.device)
    where = (torch.cuda.get_device_name() if args.device == "cuda"
             else f"CPU, {torch.get_num_threads()} threads, "
                  f"{torch.backends.cpu.get_cpu_capability()}")
    lines = ["| model | tokens | section | mode | row | ms | x rope_ext |",
             "|---|---|---|---|---|---|---|"]
    goals = []
    for model in args.models.split(","):
        seq = args.flux_seq if model == "Flux-dev" else args.wan_seq
        g = torch.Generator().manual_seed(0)
        shape = (1, seq, HEADS[model], HEAD_DIM)
        q0 = torch.randn(shape, generator=g).to(args.device, dtype)
        k0 = torch.randn(shape, generator=g).to(args.device, dtype)
        for backward in (False, True):
            sections, params = build(model, seq, args.device, dtype, not args.no_compile)
            q = q0.clone().requires_grad_(backward)
            k = k0.clone().requires_grad_(backward)
            for p in params:
                p.requires_grad_(backward)
            grads = (torch.randn_like(q0), torch.randn_like(k0))
            mode = "forward + backward" if backward else "forward"
            for section, rows in sections.items():
                if backward:
                    rows.pop("copy")
                ours = "rope_ext fused" if section == "norm + RoPE" else "rope_ext"
                rounds = time_in_turns(rows, q, k, params if section == "norm + RoPE" else [],
                                       backward, now, reps, grads)
                for name, t in rounds.items():
                    ratio = round_ratio(rounds, name, ours)
                    lines.append(f"| {model} | {seq} | {section} | {mode} | {name} | "
                                 f"{statistics.median(t) * 1e3:.2f} | {ratio:.2f} |")
                    print(lines[-1], flush=True)
                if section == "norm + RoPE":
                    goals.append((model, mode, round_ratio(rounds, "diffusers eager", ours)))
    print()
    print("\n".join(lines))
    print()
    for model, mode, ratio in goals:
        print(f"- {model} {mode}: diffusers eager norm-then-rope / rope_ext fused = "
              f"{ratio:.2f} (goal >= 1.8: {'met' if ratio >= 1.8 else 'not met'})")
    print(f"\n{stamp(args, where)}")


if __name__ == "__main__":
    main()
