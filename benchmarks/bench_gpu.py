"""GPU benchmark: rope_ext against the RoPE kernels of other libraries, in one run.

    python benchmarks/bench_gpu.py

Llama-3-8B shapes (q [b, s, 32, 128], k [b, s, 8, 128]) in bf16: decode (b=64, s=1),
prefill (b=1, s=4096 and 32768), training (b=8, s=4096, forward and backward). Each row:
rope_ext's time, its effective bandwidth (q and k read and written once), its time over a
device copy of the same bytes, and each peer's time over rope_ext's (higher is better for
rope_ext). A peer that is not installed, or fails, shows n/a and the reason below the table.
Times are medians of CUDA-event-timed runs after warm-up.
"""

import sys
import traceback

import torch

import rope_ext

HQ, HK, D, BASE = 32, 8, 128, 500000.0
ROWS = [("decode b=64 s=1", 64, 1, False), ("prefill b=1 s=4096", 1, 4096, False),
        ("prefill b=1 s=32768", 1, 32768, False), ("train b=8 s=4096 fwd+bwd", 8, 4096, True)]


def cuda_time(fn, warmup=10, repeats=50):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


class Setup:
    """Inputs and tables for one row, in each library's own conventions."""

    def __init__(self, batch, seq):
        dev = "cuda"
        self.batch, self.seq = batch, seq
        self.q = torch.randn(batch, seq, HQ, D, device=dev, dtype=torch.bfloat16)
        self.k = torch.randn(batch, seq, HK, D, device=dev, dtype=torch.bfloat16)
        self.pos = torch.arange(seq, device=dev).expand(batch, -1)
        inv, attn = rope_ext.rope_frequencies(D, BASE)
        self.cos, self.sin = rope_ext.cos_sin_table(inv, seq, attn, device=dev)
        # transformers' format: [1, s, D], halves duplicated, x's dtype.
        self.hf_cos = torch.cat([self.cos, self.cos], -1)[None].to(torch.bfloat16)
        self.hf_sin = torch.cat([self.sin, self.sin], -1)[None].to(torch.bfloat16)

    def nbytes(self):
        return 2 * (self.q.numel() + self.k.numel()) * self.q.element_size()


def impl_rope_ext(s):
    return lambda q, k: rope_ext.apply_rope_qk(q, k, s.cos, s.sin, s.pos)


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


def impl_copy(s):
    return lambda q, k: (q.clone(), k.clone())


PEERS = {"HF eager": impl_hf_eager, "HF compile": impl_hf_compile, "Liger": impl_liger,
         "flash-attn": impl_flash_attn, "FlashInfer": impl_flashinfer}


def timed(build, s, backward):
    run = build(s)
    if not backward:
        return cuda_time(lambda: run(s.q, s.k))
    q, k = s.q.clone().requires_grad_(), s.k.clone().requires_grad_()
    gq, gk = torch.randn_like(q), torch.randn_like(k)

    def step():
        qo, ko = run(q, k)
        torch.autograd.backward([qo, ko], [gq, gk])

    return cuda_time(step)


def main():
    if not torch.cuda.is_available():
        sys.exit("bench_gpu: no CUDA device")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, Llama-3-8B q/k")
    cols = ["ms", "GB/s", "vs copy"] + list(PEERS)
    print(f"{'case':<28}" + "".join(f"{c:>12}" for c in cols))
    failures = {}
    for label, batch, seq, backward in ROWS:
        s = Setup(batch, seq)
        ours = timed(impl_rope_ext, s, backward)
        # The copy moves the same bytes once per pass (twice with the backward).
        copy = cuda_time(lambda: impl_copy(s)(s.q, s.k)) * (2 if backward else 1)
        nbytes = s.nbytes() * (2 if backward else 1)
        cells = [f"{ours * 1e3:12.4f}", f"{nbytes / ours / 1e9:12.0f}", f"{ours / copy:11.2f}x"]
        for name, build in PEERS.items():
            try:
                cells.append(f"{timed(build, s, backward) / ours:11.2f}x")
            except Exception as e:  # a peer missing or failing must not stop the table
                failures.setdefault(name, f"{type(e).__name__}: {e}".splitlines()[0])
                cells.append(f"{'n/a':>12}")
        print(f"{label:<28}" + "".join(cells), flush=True)
        torch._dynamo.reset()
    for name, why in failures.items():
        print(f"  {name}: n/a ({why})")
    if failures and "-v" in sys.argv:
        traceback.print_exc()


if __name__ == "__main__":
    main()
