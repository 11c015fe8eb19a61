"""DTensor: q and k sharded by batch, heads or tokens (positions alongside) rotate shard by shard,
and full_tensor() equals the unsharded result bit for bit, gradients included; and a small
Llama-style attention block under tensor + sequence parallelism gives one process's loss and
gradients.

Two processes on this machine (gloo, tcp://127.0.0.1 on a free port); every rank builds the
same seeded inputs and checks its DTensor results against the unsharded ones computed locally.
Bounded time: process-group timeouts of 30 s, a deadline on the whole run.
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
DEADLINE_S = 120
B, S, HQ, HK, D, R, P = 2, 8, 4, 2, 16, 12, 32


def _inputs(dtype):
    g = torch.Generator().manual_seed(7)
    q = torch.randn(B, S, HQ, D, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(B, S, HK, D, generator=g, dtype=torch.float64).to(dtype)
    inv, attn = rope_ext.rope_frequencies(R)
    cos, sin = rope_ext.cos_sin_table(inv, P, attn)
    pos = torch.stack([torch.arange(S) + 3, torch.arange(S) * 2 + 1])
    return q, k, cos, sin, pos


def _check_placements(mesh, dtype):
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    q, k, cos, sin, pos = _inputs(dtype)
    cases = {  # name: (placement of q/k, of positions, positions or None)
        "batch": (Shard(0), Shard(0), pos),
        "heads": (Shard(2), Replicate(), pos),
        "tokens": (Shard(1), Shard(1), pos),
        "tokens, positions [seq]": (Shard(1), Shard(0), pos[0]),
        # No positions: token s is at position s. A token shard must not rotate its local rows
        # as global positions: the rule set offers none, so DTensor redistributes.
        "tokens, no positions": (Shard(1), None, None),
        "replicated": (Replicate(), Replicate(), pos),
    }
    rep = [Replicate()]
    for name, (xp, pp, p) in cases.items():
        expected = rope_ext.apply_rope_qk(q, k, cos, sin, p)
        dq, dk = (distribute_tensor(t, mesh, [xp]) for t in (q, k))
        dcos, dsin = (distribute_tensor(t, mesh, rep) for t in (cos, sin))
        dpos = None if p is None else distribute_tensor(p, mesh, [pp])
        # functional, forward
        got = rope_ext.apply_rope_qk(dq, dk, dcos, dsin, dpos)
        for g, e in zip(got, expected):
            assert same_bits(g.full_tensor(), e), f"{name} {dtype}: forward differs"
        single = rope_ext.apply_rope(dq, dcos, dsin, dpos, interleaved=True)
        assert same_bits(single.full_tensor(),
                          rope_ext.apply_rope(q, cos, sin, p, interleaved=True)), name
        # backward
        lq = dq.detach().requires_grad_()
        lk = dk.detach().requires_grad_()
        wq = torch.randn(q.shape, generator=torch.Generator().manual_seed(11)).to(dtype)
        qo, ko = rope_ext.apply_rope_qk(lq, lk, dcos, dsin, dpos)
        loss = (qo * distribute_tensor(wq, mesh, [xp])).sum() + ko.square().sum()
        loss.backward()
        rq, rk = q.clone().requires_grad_(), k.clone().requires_grad_()
        eq, ek = rope_ext.apply_rope_qk(rq, rk, cos, sin, p)
        ((eq * wq).sum() + ek.square().sum()).backward()
        # The gradients go through a sum over shards: compare against the same rotation of
        # the same incoming gradient, bit for bit where the incoming gradients agree.
        torch.testing.assert_close(lq.grad.full_tensor(), rq.grad, rtol=0, atol=0, msg=lambda m: f"{name} {dtype}: {m}")
        torch.testing.assert_close(lk.grad.full_tensor(), rk.grad, rtol=0, atol=0, msg=lambda m: f"{name} {dtype}: {m}")
        # in place
        iq, ik = dq.clone(), dk.clone()
        rope_ext.apply_rope_qk(iq, ik, dcos, dsin, dpos, inplace=True)
        assert iq.placements == dq.placements, f"{name}: in place changed the placement"
        for g, e in zip((iq, ik), expected):
            assert same_bits(g.full_tensor(), e), f"{name} {dtype}: in place differs"


def _check_norm_rope_placements(mesh):
    """The fused QK-norm + RoPE shard by shard: outputs bit for bit, gradients of q and k
    bit for bit, the weights' gradients (sums over the shards' tokens or heads) within
    rounding of the order of the sum."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    q, k, cos, sin, pos = _inputs(torch.float32)
    g = torch.Generator().manual_seed(5)
    rep = [Replicate()]
    for across in (False, True):
        wq = torch.randn(HQ * D if across else D, generator=g)
        wk = torch.randn(HK * D if across else D, generator=g)
        cases = {"batch": (Shard(0), Shard(0)), "tokens": (Shard(1), Shard(1)),
                 "replicated": (Replicate(), Replicate())}
        if not across:
            cases["heads"] = (Shard(2), Replicate())
        for name, (xp, pp) in cases.items():
            what = f"{name}, across_heads={across}"
            rq, rk = q.clone().requires_grad_(), k.clone().requires_grad_()
            rwq, rwk = wq.clone().requires_grad_(), wk.clone().requires_grad_()
            eq, ek = rope_ext.rms_norm_rope_qk(rq, rk, cos, sin, pos, q_weight=rwq, k_weight=rwk,
                                              across_heads=across)
            (eq.square().sum() + (ek * 3).sum()).backward()
            lq, lk = (distribute_tensor(t, mesh, [xp]).detach().requires_grad_() for t in (q, k))
            lwq, lwk = (distribute_tensor(t, mesh, rep).detach().requires_grad_()
                        for t in (wq, wk))
            dcos, dsin = (distribute_tensor(t, mesh, rep) for t in (cos, sin))
            qo, ko = rope_ext.rms_norm_rope_qk(lq, lk, dcos, dsin,
                                               distribute_tensor(pos, mesh, [pp]),
                                               q_weight=lwq, k_weight=lwk, across_heads=across)
            assert qo.placements == (xp,), f"{what}: placement {qo.placements}"
            assert same_bits(qo.full_tensor(), eq.detach()), f"{what}: q forward differs"
            assert same_bits(ko.full_tensor(), ek.detach()), f"{what}: k forward differs"
            (qo.square().sum() + (ko * 3).sum()).backward()
            assert same_bits(lq.grad.full_tensor(), rq.grad), f"{what}: grad q differs"
            assert same_bits(lk.grad.full_tensor(), rk.grad), f"{what}: grad k differs"
            for got, want in ((lwq.grad, rwq.grad), (lwk.grad, rwk.grad)):
                torch.testing.assert_close(got.full_tensor(), want, rtol=1e-5, atol=1e-5,
                                           msg=lambda m: f"{what}: weight grad: {m}")


class Attention(torch.nn.Module):
    """A Llama-style attention block: q/k/v projections, RoPE, SDPA, output projection."""

    def __init__(self, dim=32, heads=4, kv_heads=2, head_dim=8):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.wq = torch.nn.Linear(dim, heads * head_dim, bias=False)
        self.wk = torch.nn.Linear(dim, kv_heads * head_dim, bias=False)
        self.wv = torch.nn.Linear(dim, kv_heads * head_dim, bias=False)
        self.wo = torch.nn.Linear(heads * head_dim, dim, bias=False)
        self.rope = rope_ext.RotaryEmbedding(head_dim, max_positions=64)

    def forward(self, x, positions):
        b, s = x.shape[0], x.shape[1]
        # -1 heads: under tensor parallel each rank holds heads / world of them.
        q = self.wq(x).view(b, s, -1, self.head_dim)
        k = self.wk(x).view(b, s, -1, self.head_dim)
        v = self.wv(x).view(b, s, -1, self.head_dim)
        q, k = self.rope(q, k, positions)  # DTensors sharded by heads under tensor parallel
        # Attention on each rank's own heads (whole heads: no communication needed), written
        # out; the output projection takes the local result as its Shard(2) input.
        q, k, v = (t.to_local() if hasattr(t, "to_local") else t for t in (q, k, v))
        rep = q.shape[2] // k.shape[2]
        k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        scores = q @ k.transpose(-1, -2) / self.head_dim ** 0.5
        scores = scores - 1e30 * torch.ones_like(scores).triu(1)  # causal
        o = scores.softmax(-1) @ v
        return self.wo(o.transpose(1, 2).reshape(b, s, -1))


def _check_tensor_parallel_attention(mesh):
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                                   parallelize_module)

    torch.manual_seed(0)
    single = Attention().double()
    tp = Attention().double()
    tp.load_state_dict(single.state_dict())
    x = torch.randn(2, 6, 32, dtype=torch.float64)
    positions = torch.tensor([[0, 1, 2, 3, 4, 5], [9, 10, 11, 12, 13, 14]])

    # Tensor parallel: q/k/v column-sharded (heads split), kept as DTensors so RoPE sees them;
    # the output projection row-sharded back to a replicated result.
    col = ColwiseParallel(use_local_output=False)
    parallelize_module(tp, mesh, {"wq": col, "wk": col, "wv": col,
                                  "wo": RowwiseParallel(input_layouts=Shard(2))})
    loss_single = single(x, positions).square().mean()
    loss_single.backward()
    # Sequence parallel on the input: x sharded by tokens, gathered by the colwise layers.
    dx = distribute_tensor(x, mesh, [Shard(1)]).redistribute(mesh, [Replicate()])
    out = tp(dx, positions)
    out = out.full_tensor() if hasattr(out, "full_tensor") else out
    loss_tp = out.square().mean()
    loss_tp.backward()
    torch.testing.assert_close(loss_tp, loss_single, rtol=1e-12, atol=0)
    for name, p in single.named_parameters():
        if p.grad is None:
            continue
        g = dict(tp.named_parameters())[name].grad
        g = g.full_tensor() if hasattr(g, "full_tensor") else g
        torch.testing.assert_close(g, p.grad, rtol=1e-10, atol=1e-12, msg=name)


def _worker(rank, port, result_dir):
    if os.path.isdir("/sys/class/net/lo"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD, timeout=timedelta(seconds=30))
    try:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (WORLD,))
        for dtype in (torch.float32, torch.bfloat16):
            _check_placements(mesh, dtype)
        _check_norm_rope_placements(mesh)
        _check_tensor_parallel_attention(mesh)
        dist.barrier()
        with open(os.path.join(result_dir, f"rank{rank}.ok"), "w") as f:
            f.write("ok")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="torch.distributed with the gloo backend is not available")
def test_dtensor_shardings_and_tensor_parallel_attention(tmp_path):
    run_ranks(_worker, WORLD, tmp_path, DEADLINE_S, "DTensor")
