"""Context parallelism: each rank rotates its shard of the sequence with the global positions of
its tokens and gets exactly the unsharded result.

Two processes on this machine (torch.distributed, gloo, tcp://127.0.0.1 on a free port) shard
one batch three ways:
  - contiguous: rank r holds tokens [r S/W, (r + 1) S/W) (plain sequence/context parallel);
  - zigzag: the sequence cut into 2W chunks, rank r holds chunks r and 2W-1-r (the load-balanced
    layout of ring attention with a causal mask);
  - thd: variable-length sequences packed as [tokens, heads, head_dim], each sequence zigzag-
    sharded on its own, positions counted from each sequence's start (TransformerEngine's THD
    context parallel).
Each rank calls apply_rope_qk with the full-length [P, r/2] table and its tokens' global
positions (a per-sequence prefix offset included, as after a cached prompt). Its q/k outputs
and the gradients with respect to its shard must equal, bit for bit, the rows of the unsharded
computation (done locally on every rank from the same seeded inputs), and the shards all_gathered
and put back in order must rebuild the unsharded tensors.

Bounded time: process-group timeouts of 30 s, a 50 s deadline on the whole run after which the
workers are killed and the test fails.
"""

import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

import rope_ext
from conftest import run_ranks
from reference import same_bits

WORLD = 2
DEADLINE_S = 50
PG_TIMEOUT = timedelta(seconds=30)

# One batch: 2 sequences of 48 tokens (divisible by 2W = 4), GQA 4 q heads / 2 k heads,
# head_dim 64 with rotary_dim 48 (partial: the tail must pass through), a table of P rows.
B, S, HQ, HK, D, R = 2, 48, 4, 2, 64, 48
P = 512
OFFSETS = (0, 300)  # position of each sequence's first token (a prompt already in the cache)
THD_LENGTHS = (16, 40, 8)  # packed sequences, each divisible by 2W


def contiguous_index(seq, rank, world):
    n = seq // world
    return torch.arange(rank * n, (rank + 1) * n)


def zigzag_index(seq, rank, world):
    """Chunks rank and 2W-1-rank of 2W equal chunks."""
    c = seq // (2 * world)
    return torch.cat([torch.arange(rank * c, (rank + 1) * c),
                      torch.arange((2 * world - 1 - rank) * c, (2 * world - rank) * c)])


def thd_zigzag_index(lengths, rank, world):
    """Each packed sequence zigzag-sharded on its own; indices into the packed token axis."""
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    return torch.cat([st + zigzag_index(n, rank, world) for st, n in zip(starts, lengths)])


def _inputs(dtype):
    """The whole batch, identical on every rank (fixed seed)."""
    g = torch.Generator().manual_seed(2024)

    def randn(*shape):
        return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)

    inv_freq, attn = rope_ext.rope_frequencies(R, base=10000.0)
    cos, sin = rope_ext.cos_sin_table(inv_freq, P, attn)
    bshd = dict(q=randn(B, S, HQ, D), k=randn(B, S, HK, D), wq=randn(B, S, HQ, D),
                wk=randn(B, S, HK, D),
                pos=torch.stack([torch.arange(S) + o for o in OFFSETS]))
    t = sum(THD_LENGTHS)
    thd = dict(q=randn(t, HQ, D), k=randn(t, HK, D), wq=randn(t, HQ, D), wk=randn(t, HK, D),
               pos=torch.cat([torch.arange(n) + 7 * i for i, n in enumerate(THD_LENGTHS)]))
    return cos, sin, bshd, thd


def _forward_backward(q, k, wq, wk, cos, sin, pos, layout):
    """apply_rope_qk, then a loss whose gradient w.r.t. the outputs is (wq, 2 ko); returns the
    outputs and the gradients w.r.t. q and k."""
    q = q.detach().clone().requires_grad_()
    k = k.detach().clone().requires_grad_()
    qo, ko = rope_ext.apply_rope_qk(q, k, cos, sin, pos, layout=layout)
    loss = (qo.float() * wq.float()).sum() + ko.float().square().sum()
    gq, gk = torch.autograd.grad(loss, (q, k))
    return [qo.detach(), ko.detach(), gq, gk]


def _check_scheme(rank, name, full_inputs, index, token_dim, cos, sin, layout):
    """Rotate this rank's shard; compare with the unsharded rows locally and, after all_gather,
    the reassembled whole."""
    d = full_inputs
    full = _forward_backward(d["q"], d["k"], d["wq"], d["wk"], cos, sin, d["pos"], layout)

    def shard(t):  # this rank's tokens, as a tensor of its own (what the rank would hold)
        return t.index_select(token_dim, index).contiguous()

    pos_shard = d["pos"].index_select(d["pos"].dim() - 1, index).contiguous()
    local = _forward_backward(shard(d["q"]), shard(d["k"]), shard(d["wq"]), shard(d["wk"]),
                              cos, sin, pos_shard, layout)
    names = ("q out", "k out", "grad q", "grad k")
    for n, got, want in zip(names, local, full):
        assert same_bits(got, shard(want)), f"rank {rank}, {name}: {n} differs from unsharded"

    # all_gather the shards and their token indices; rebuild the whole in token order.
    indices = [torch.empty_like(index) for _ in range(WORLD)]
    dist.all_gather(indices, index)
    order = torch.cat(indices)
    assert torch.equal(order.sort().values, torch.arange(order.numel())), \
        f"{name}: the shards do not cover every token exactly once"
    for n, got, want in zip(names, local, full):
        # Move the raw bytes (gloo's bf16 support varies); the last dim becomes bytes.
        bits = got.contiguous().view(torch.uint8)
        parts = [torch.empty_like(bits) for _ in range(WORLD)]
        dist.all_gather(parts, bits)
        whole = torch.empty_like(torch.cat(parts, token_dim))
        whole.index_copy_(token_dim, order, torch.cat(parts, token_dim))
        assert same_bits(whole.view(got.dtype), want), \
            f"rank {rank}, {name}: reassembled {n} differs from unsharded"


def _worker(rank, port, result_dir):
    if os.path.isdir("/sys/class/net/lo"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)  # two ranks on a small machine
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD, timeout=PG_TIMEOUT)
    try:
        for dtype in (torch.float32, torch.bfloat16):
            cos, sin, bshd, thd = _inputs(dtype)
            _check_scheme(rank, f"contiguous {dtype}", bshd, contiguous_index(S, rank, WORLD), 1,
                          cos, sin, "bshd")
            _check_scheme(rank, f"zigzag {dtype}", bshd, zigzag_index(S, rank, WORLD), 1,
                          cos, sin, "bshd")
            _check_scheme(rank, f"thd zigzag {dtype}", thd,
                          thd_zigzag_index(THD_LENGTHS, rank, WORLD), 0, cos, sin, "thd")
        dist.barrier()
        with open(os.path.join(result_dir, f"rank{rank}.ok"), "w") as f:
            f.write("ok")
    finally:
        dist.destroy_process_group()


def test_index_helpers():
    """The shard layouts themselves: zigzag for W = 2, S = 8 is [0, 1, 6, 7] and [2, 3, 4, 5]."""
    assert zigzag_index(8, 0, 2).tolist() == [0, 1, 6, 7]
    assert zigzag_index(8, 1, 2).tolist() == [2, 3, 4, 5]
    assert contiguous_index(8, 1, 2).tolist() == [4, 5, 6, 7]
    assert thd_zigzag_index((4, 8), 0, 2).tolist() == [0, 3, 4, 5, 10, 11]


def test_library_helpers_agree():
    """rope_ext.context_parallel and cu_seqlens give the indices and positions written out
    above (tests/test_cp_layouts.py tests them on their own, on 4 gloo ranks)."""
    from rope_ext import context_parallel as cp
    from rope_ext.packing import packed_positions

    cu = torch.tensor([0, *THD_LENGTHS]).cumsum(0)
    for rank in range(WORLD):
        assert torch.equal(cp.token_indices(S, WORLD, rank, layout="contiguous"),
                           contiguous_index(S, rank, WORLD))
        assert torch.equal(cp.token_indices(S, WORLD, rank, layout="zigzag"),
                           zigzag_index(S, rank, WORLD))
        assert torch.equal(cp.token_indices(cu, WORLD, rank, layout="zigzag"),
                           thd_zigzag_index(THD_LENGTHS, rank, WORLD))
    thd_pos = _inputs(torch.float32)[3]["pos"]
    offsets = 7 * torch.arange(len(THD_LENGTHS))
    assert torch.equal(packed_positions(cu, seqlen_offsets=offsets), thd_pos)
    for rank in range(WORLD):
        assert torch.equal(cp.positions(cu, WORLD, rank, layout="zigzag", seqlen_offsets=offsets),
                           thd_pos[thd_zigzag_index(THD_LENGTHS, rank, WORLD)])


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="torch.distributed with the gloo backend is not available")
def test_context_parallel_shards_match_unsharded(tmp_path):
    run_ranks(_worker, WORLD, tmp_path, DEADLINE_S, "context-parallel")
