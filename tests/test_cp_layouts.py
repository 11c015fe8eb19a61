"""rope_ext.context_parallel: which tokens a context-parallel rank holds and their positions,
for the contiguous, zigzag and striped layouts, one sequence or a packed batch (cu_seqlens,
each sequence sharded on its own).

The layouts are checked against small examples written out by hand for cp_size 2 and 4; the
ranks' tokens must together be every token exactly once, at its global position. Then four
gloo processes (tcp://127.0.0.1, a free port) shard real q and k: cp_size 2 as the cp dimension
of a 2 x 2 (data x context) device mesh and cp_size 4 over all four; each rank rotates its shard
with its positions and must get, bit for bit, the matching rows of the unsharded result,
forward and backward, and the shards all_gathered over the cp group must rebuild it. The same
is done with the shards made by torch.distributed.tensor.experimental.context_parallel (its
default head-tail load balancer, which is the zigzag layout) where the installed torch has it.

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
from rope_ext import context_parallel as cp
from rope_ext.packing import packed_positions

# --- hand-derived examples ---

# One sequence: S = 8 over 2 ranks, S = 16 over 4 ranks; token indices (= positions).
SINGLE = {
    (2, "contiguous"): [[0, 1, 2, 3], [4, 5, 6, 7]],
    (2, "zigzag"): [[0, 1, 6, 7], [2, 3, 4, 5]],
    (2, "striped"): [[0, 2, 4, 6], [1, 3, 5, 7]],
    (4, "contiguous"): [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]],
    (4, "zigzag"): [[0, 1, 14, 15], [2, 3, 12, 13], [4, 5, 10, 11], [6, 7, 8, 9]],
    (4, "striped"): [[0, 4, 8, 12], [1, 5, 9, 13], [2, 6, 10, 14], [3, 7, 11, 15]],
}

# Packed: cu_seqlens [0, 4, 4, 12] (lengths 4, 0, 8) over 2 ranks, [0, 8, 16] over 4.
# Per rank: (token indices, positions, local cu_seqlens).
PACKED_CU = {2: [0, 4, 4, 12], 4: [0, 8, 16]}
PACKED = {
    (2, "contiguous"): [([0, 1, 4, 5, 6, 7], [0, 1, 0, 1, 2, 3], [0, 2, 2, 6]),
                        ([2, 3, 8, 9, 10, 11], [2, 3, 4, 5, 6, 7], [0, 2, 2, 6])],
    (2, "zigzag"): [([0, 3, 4, 5, 10, 11], [0, 3, 0, 1, 6, 7], [0, 2, 2, 6]),
                    ([1, 2, 6, 7, 8, 9], [1, 2, 2, 3, 4, 5], [0, 2, 2, 6])],
    (2, "striped"): [([0, 2, 4, 6, 8, 10], [0, 2, 0, 2, 4, 6], [0, 2, 2, 6]),
                     ([1, 3, 5, 7, 9, 11], [1, 3, 1, 3, 5, 7], [0, 2, 2, 6])],
    (4, "contiguous"): [([0, 1, 8, 9], [0, 1, 0, 1], [0, 2, 4]),
                        ([2, 3, 10, 11], [2, 3, 2, 3], [0, 2, 4]),
                        ([4, 5, 12, 13], [4, 5, 4, 5], [0, 2, 4]),
                        ([6, 7, 14, 15], [6, 7, 6, 7], [0, 2, 4])],
    (4, "zigzag"): [([0, 7, 8, 15], [0, 7, 0, 7], [0, 2, 4]),
                    ([1, 6, 9, 14], [1, 6, 1, 6], [0, 2, 4]),
                    ([2, 5, 10, 13], [2, 5, 2, 5], [0, 2, 4]),
                    ([3, 4, 11, 12], [3, 4, 3, 4], [0, 2, 4])],
    (4, "striped"): [([0, 4, 8, 12], [0, 4, 0, 4], [0, 2, 4]),
                     ([1, 5, 9, 13], [1, 5, 1, 5], [0, 2, 4]),
                     ([2, 6, 10, 14], [2, 6, 2, 6], [0, 2, 4]),
                     ([3, 7, 11, 15], [3, 7, 3, 7], [0, 2, 4])],
}


@pytest.mark.parametrize("cp_size,layout", list(SINGLE), ids=[f"{w}-{l}" for w, l in SINGLE])
def test_single_sequence_by_hand(cp_size, layout):
    seq = 4 * cp_size
    for rank, want in enumerate(SINGLE[cp_size, layout]):
        s = cp.shard(seq, cp_size, rank, layout=layout)
        assert s.token_indices.tolist() == want and s.positions.tolist() == want
        assert s.token_indices.dtype == s.positions.dtype == torch.int64
        assert s.cu_seqlens is None
        assert cp.positions(seq, cp_size, rank, layout=layout, seqlen_offsets=100).tolist() == \
            [100 + p for p in want]
        assert cp.token_indices(seq, cp_size, rank, layout=layout).tolist() == want


@pytest.mark.parametrize("cp_size,layout", list(PACKED), ids=[f"{w}-{l}" for w, l in PACKED])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=["int32", "int64"])
def test_packed_by_hand(cp_size, layout, index_dtype):
    cu = torch.tensor(PACKED_CU[cp_size], dtype=index_dtype)
    offsets = torch.arange(cu.numel() - 1, dtype=index_dtype) * 1000
    lengths = (cu[1:] - cu[:-1]).tolist()
    for rank, (indices, positions, local_cu) in enumerate(PACKED[cp_size, layout]):
        s = cp.shard(cu, cp_size, rank, layout=layout)
        assert s.token_indices.tolist() == indices and s.positions.tolist() == positions
        assert s.cu_seqlens.tolist() == local_cu and s.cu_seqlens.dtype == index_dtype
        # With offsets: each sequence's positions shift by its own offset.
        seq_of = [i for i, n in enumerate(lengths) for _ in range(n // cp_size)]
        shifted = cp.positions(cu, cp_size, rank, layout=layout, seqlen_offsets=offsets)
        assert shifted.tolist() == [p + 1000 * i for p, i in zip(positions, seq_of)]


CONFIGS = [(seq, w, layout) for w in (1, 2, 3, 4) for layout in cp.LAYOUTS
           for seq in (0, 2 * w, 6 * w)]


@pytest.mark.parametrize("seq,cp_size,layout", CONFIGS)
def test_ranks_cover_every_token_once(seq, cp_size, layout):
    lengths = [seq, 0, 2 * cp_size, seq]
    cu = torch.tensor([0] + lengths).cumsum(0)
    offsets = torch.tensor([3, 0, 50, 7])
    everywhere = packed_positions(cu, seqlen_offsets=offsets)
    for spec, offset, global_pos, total in ((seq, 5, torch.arange(seq) + 5, seq),
                                            (cu, offsets, everywhere, int(cu[-1]))):
        shards = [cp.shard(spec, cp_size, r, layout=layout, seqlen_offsets=offset)
                  for r in range(cp_size)]
        order = torch.cat([s.token_indices for s in shards])
        assert torch.equal(order.sort().values, torch.arange(total))
        assert all(s.token_indices.numel() == total // cp_size for s in shards)  # balanced
        for s in shards:  # each token at its global position
            assert torch.equal(s.positions, global_pos[s.token_indices])


def test_bad_arguments():
    cu = torch.tensor([0, 4, 7])
    cases = [
        (lambda: cp.shard(6, 4, 0, layout="contiguous"),
         r"the sequence has 6 tokens, not a multiple of cp_size = 4.*pad it"),
        (lambda: cp.shard(4, 4, 0, layout="zigzag"),
         r"not a multiple of 2 \* cp_size = 8 \(zigzag cuts"),
        (lambda: cp.shard(cu, 2, 0, layout="striped"),
         r"sequence 1 of \bcu_seqlens\b has 3 tokens, not a multiple of cp_size = 2"),
        (lambda: cp.shard(8, 2, 2, layout="zigzag"), r"\bcp_rank\b must lie in \[0, cp_size\)"),
        (lambda: cp.shard(8, 2, -1, layout="zigzag"), r"\bcp_rank\b must lie in"),
        (lambda: cp.shard(8, 0, 0, layout="zigzag"), r"\bcp_size\b must be at least 1"),
        (lambda: cp.shard(8, 2, 0, layout="ring"), r"\blayout\b must be one of"),
        (lambda: cp.shard(8, 2, 0, layout="round_robin"), r"round_robin.*ambiguous.*zigzag"),
        (lambda: cp.shard(-2, 2, 0, layout="zigzag"), r"\bseq_len\b must not be negative"),
        (lambda: cp.shard(torch.tensor([0, 4, 2]), 2, 0, layout="zigzag"),
         r"\bcu_seqlens\b must be non-decreasing"),
        (lambda: cp.shard(torch.tensor([1, 4]), 1, 0, layout="zigzag"),
         r"\bcu_seqlens\b must start at 0"),
        (lambda: cp.shard(torch.tensor([[0, 4]]), 1, 0, layout="zigzag"),
         r"\bcu_seqlens\b must be 1-D"),
        (lambda: cp.shard(torch.tensor([0.0, 4.0]), 1, 0, layout="zigzag"),
         r"\bcu_seqlens\b must be int32 or int64"),
        (lambda: cp.shard(8, 2, 0, layout="zigzag", seqlen_offsets=torch.tensor([1])),
         r"\bseqlen_offsets\b must be an int for a single sequence"),
        (lambda: cp.shard(cu, 1, 0, layout="contiguous", seqlen_offsets=torch.tensor([1])),
         r"\bseqlen_offsets\b must be \[num_seqs\] = \[2\]"),
        (lambda: cp.shard(cu, 1, 0, layout="striped", seqlen_offsets=torch.tensor([1, -1])),
         r"\bseqlen_offsets\b must not be negative"),
        (lambda: cp.shard(8, 2, 0, layout="zigzag", seqlen_offsets=-1),
         r"\bseqlen_offsets\b must not be negative"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()
    with pytest.raises(TypeError, match=r"\bcp_rank\b must be an int"):
        cp.shard(8, 2, 0.0, layout="zigzag")
    with pytest.raises(TypeError, match=r"seq_len_or_cu_seqlens must be an int"):
        cp.shard([0, 8], 2, 0, layout="zigzag")
    with pytest.raises(TypeError):  # layout has no default: it must match the attention's
        cp.shard(8, 2, 0)


# --- four gloo ranks ---

WORLD = 4
DEADLINE_S = 50
PG_TIMEOUT = timedelta(seconds=30)
B, S, HQ, HK, D, R = 2, 16, 2, 1, 32, 24  # S divisible by 2 * 4; partial rotary
P = 256
OFFSET = 100  # a cached prompt before the sequence
THD_LENGTHS = (8, 0, 16, 8)  # each divisible by 2 * 4 (an empty one among them)
THD_OFFSETS = (0, 5, 30, 7)


def _inputs(dtype):
    """The whole batch, identical on every rank (fixed seed)."""
    g = torch.Generator().manual_seed(7)

    def randn(*shape):
        return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)

    inv, attn = rope_ext.rope_frequencies(R)
    cos, sin = rope_ext.cos_sin_table(inv, P, attn)
    t = sum(THD_LENGTHS)
    bshd = [randn(B, S, HQ, D), randn(B, S, HK, D), randn(B, S, HQ, D), randn(B, S, HK, D)]
    thd = [randn(t, HQ, D), randn(t, HK, D), randn(t, HQ, D), randn(t, HK, D)]
    return cos, sin, bshd, thd


def _rotate(q, k, wq, wk, cos, sin, layout, **where):
    """apply_rope_qk, then a loss whose gradient w.r.t. the outputs is (wq, wk); returns the
    outputs and the gradients w.r.t. q and k."""
    q, k = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    qo, ko = rope_ext.apply_rope_qk(q, k, cos, sin, layout=layout, **where)
    torch.autograd.backward((qo, ko), (wq, wk))
    return [qo.detach(), ko.detach(), q.grad, k.grad]


def _check(what, full, local, indices, token_dim, group, cp_size):
    names = ("q out", "k out", "grad q", "grad k")
    for n, got, want in zip(names, local, full):
        assert same_bits(got, want.index_select(token_dim, indices)), f"{what}: {n}"
    parts_idx = [torch.empty_like(indices) for _ in range(cp_size)]
    dist.all_gather(parts_idx, indices, group=group)
    order = torch.cat(parts_idx)
    for n, got, want in zip(names, local, full):
        bits = got.contiguous().view(torch.uint8)  # raw bytes: gloo's bf16 support varies
        parts = [torch.empty_like(bits) for _ in range(cp_size)]
        dist.all_gather(parts, bits, group=group)
        gathered = torch.cat(parts, token_dim)
        whole = torch.empty_like(gathered).index_copy_(token_dim, order, gathered)
        assert same_bits(whole.view(got.dtype), want), f"{what}: reassembled {n}"


def _has_torch_context_parallel():
    try:
        from torch.distributed.tensor.experimental import context_parallel  # noqa: F401
    except ImportError:
        return False
    return True


def _torch_context_parallel(mesh, cos, sin, bshd, full, rank_tag):
    """torch's own CP sharding of q, k and the positions (in place, inside its context)."""
    if not _has_torch_context_parallel():
        return False
    from torch.distributed.tensor.experimental import context_parallel

    q, k, wq, wk = (t.clone() for t in bshd)
    pos = (torch.arange(S) + OFFSET).expand(B, S).contiguous()
    buffers = [q, k, wq, wk, pos]
    with context_parallel(mesh, buffers=buffers, buffer_seq_dims=[1] * 5,
                          no_restore_buffers=set(buffers)):
        shards = [b.clone() for b in buffers]
    cp_size, cp_rank = mesh.size(), mesh.get_local_rank()
    ours = cp.shard(S, cp_size, cp_rank, layout="zigzag", seqlen_offsets=OFFSET)
    assert torch.equal(shards[4], ours.positions.expand(B, -1)), f"{rank_tag}: torch's positions"
    assert torch.equal(shards[0], bshd[0].index_select(1, ours.token_indices)), \
        f"{rank_tag}: torch's q shard"
    local = _rotate(*shards[:4], cos, sin, "bshd", positions=shards[4])
    _check(f"{rank_tag} torch context_parallel", full, local, ours.token_indices, 1,
           mesh.get_group(), cp_size)
    return True


def _worker(rank, port, result_dir):
    if os.path.isdir("/sys/class/net/lo"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)  # four ranks on a small machine
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD, timeout=PG_TIMEOUT)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        meshes = [init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "cp"))["cp"],
                  init_device_mesh("cpu", (4,), mesh_dim_names=("cp",))["cp"]]
        cu = torch.tensor([0, *THD_LENGTHS]).cumsum(0).to(torch.int32)
        offsets = torch.tensor(THD_OFFSETS, dtype=torch.int32)
        ran_torch = []
        for dtype in (torch.float32, torch.bfloat16):
            cos, sin, bshd, thd = _inputs(dtype)
            full_bshd = _rotate(*bshd, cos, sin, "bshd",
                                positions=torch.arange(S) + OFFSET)
            full_thd = _rotate(*thd, cos, sin, "thd", cu_seqlens=cu, seqlen_offsets=offsets)
            for mesh in meshes:
                cp_size, cp_rank, group = mesh.size(), mesh.get_local_rank(), mesh.get_group()
                for layout in cp.LAYOUTS:
                    tag = f"rank {rank}, cp {cp_rank}/{cp_size}, {layout}, {dtype}"
                    s = cp.shard(S, cp_size, cp_rank, layout=layout, seqlen_offsets=OFFSET)
                    local = _rotate(*(t.index_select(1, s.token_indices) for t in bshd), cos,
                                    sin, "bshd", positions=s.positions)
                    _check(f"{tag}, one sequence", full_bshd, local, s.token_indices, 1, group,
                           cp_size)
                    s = cp.shard(cu, cp_size, cp_rank, layout=layout, seqlen_offsets=offsets)
                    local = _rotate(*(t[s.token_indices] for t in thd), cos, sin, "thd",
                                    positions=s.positions)
                    _check(f"{tag}, packed", full_thd, local, s.token_indices, 0, group,
                           cp_size)
                tag = f"rank {rank}, cp {cp_rank}/{cp_size}, {dtype}"
                ran_torch.append(_torch_context_parallel(mesh, cos, sin, bshd, full_bshd, tag))
        dist.barrier()
        with open(os.path.join(result_dir, f"rank{rank}.ok"), "w") as f:
            f.write("torch context_parallel checked" if all(ran_torch) else "ok")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="torch.distributed with the gloo backend is not available")
def test_shards_match_unsharded_on_gloo(tmp_path):
    """cp_size 2 (the cp dimension of a 2 x 2 mesh) and 4, every layout, one sequence and a
    packed batch; torch's context_parallel sharding too where the installed torch has it."""
    run_ranks(_worker, WORLD, tmp_path, DEADLINE_S, "context-parallel layouts")
    if _has_torch_context_parallel():
        for r in range(WORLD):
            assert (tmp_path / f"rank{r}.ok").read_text() == "torch context_parallel checked"


def test_torch_context_parallel_is_installed():
    # The gloo test compares with torch's context_parallel only where it exists: say so here,
    # so that a torch without it shows up as a skip instead of passing silently.
    if not _has_torch_context_parallel():
        pytest.skip("torch.distributed.tensor.experimental.context_parallel is not in this "
                    "torch: the gloo test checked rope_ext's own layouts only")
