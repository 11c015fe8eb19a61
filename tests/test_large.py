"""64-bit indexing: a bf16 x of more than 2**31 elements (4.3 GB).

x is [1, S, 8, 128] with S = 2**31 / (8 * 128) + 64 tokens, so the last 64 tokens (65536
elements) lie past element 2**31: any 32-bit offset in the kernel would wrap there and write
into the first rows (or outside the buffer). The kernel has to touch every element, so x is
initialised in full (a cheap broadcast copy of one random [8, 128] token); the tokens we check
(the first few, those straddling element 2**31, the last few and a random sample) get their own
random values and positions, are copied out before the call, and are compared with the float64
reference computed on just those tokens.

The rotations (and the fused QK-RMSNorm + RoPE, last) run in place, so the module holds one
4.3 GB buffer; the functional test adds its 4.3 GB output (8.6 GB peak). Each test skips,
saying why, when /proc/meminfo reports too little available memory for it. Runtime is a few
seconds per call on 2 cores.
"""

import time

import pytest
import torch

import reference as ref
import rope_ext

ops = torch.ops.rope

HEADS, HEAD_DIM = 8, 128
SEQ = 2**31 // (HEADS * HEAD_DIM) + 64
NUMEL = SEQ * HEADS * HEAD_DIM
X_BYTES = NUMEL * 2  # bf16
TABLE_ROWS = 4096
GiB = 2**30
# Available memory the in-place tests need before the buffer exists (x plus a wide margin for
# the rest of the machine), and what the functional test needs on top of x for its output.
NEED_INPLACE = 12 * GiB
NEED_FUNCTIONAL_EXTRA = X_BYTES + 3 * GiB
TIME_LIMIT_S = 60  # per call: far above what a memory-bound pass over 8.6 GB takes

assert NUMEL > 2**31


def mem_available():
    """MemAvailable from /proc/meminfo, in bytes (None where there is no /proc/meminfo)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def require_memory(nbytes, what):
    avail = mem_available()
    if avail is None:
        pytest.skip(f"{what}: cannot read MemAvailable from /proc/meminfo")
    if avail < nbytes:
        pytest.skip(f"{what} needs {nbytes / GiB:.1f} GiB of available memory, "
                    f"/proc/meminfo reports {avail / GiB:.1f} GiB")


# Tokens checked: the first ones, those around element 2**31 (token 2**31 / 1024 = 2097152 is
# the first whose elements all lie past it), the last ones, and a deterministic sample.
_BOUNDARY = 2**31 // (HEADS * HEAD_DIM)
_gen = torch.Generator().manual_seed(1234)
CHECK = sorted(set([0, 1, 2, _BOUNDARY - 2, _BOUNDARY - 1, _BOUNDARY, _BOUNDARY + 1,
                    SEQ - 64, SEQ - 3, SEQ - 2, SEQ - 1]
                   + torch.randint(0, SEQ, (16,), generator=_gen).tolist()))
CHECK_IDX = torch.tensor(CHECK)


@pytest.fixture(scope="module")
def big():
    """x [1, SEQ, 8, 128] bf16, filled; the checked tokens random. Freed after the module."""
    require_memory(NEED_INPLACE, f"a {X_BYTES / GiB:.1f} GiB bf16 tensor of {NUMEL} elements")
    g = torch.Generator().manual_seed(0)
    x = torch.empty((1, SEQ, HEADS, HEAD_DIM), dtype=torch.bfloat16)
    pattern = torch.randn((1, HEADS * HEAD_DIM), generator=g).to(torch.bfloat16)
    x.view(SEQ, HEADS * HEAD_DIM).copy_(pattern.expand(SEQ, -1))
    x[:, CHECK_IDX] = torch.randn((1, len(CHECK), HEADS, HEAD_DIM), generator=g).to(
        torch.bfloat16)
    yield x
    del x


def positions(dtype, seed):
    """Every token at (s * 7919) mod P; the checked tokens at random rows of the table, the
    last row included."""
    pos = (torch.arange(SEQ, dtype=torch.int64) * 7919) % TABLE_ROWS
    g = torch.Generator().manual_seed(seed)
    pos[CHECK_IDX] = torch.randint(1, TABLE_ROWS, (len(CHECK),), generator=g)
    pos[CHECK[-1]] = TABLE_ROWS - 1
    return pos.to(dtype)


def check_rows(out, x_rows, cos, sin, pos, rotary_dim, interleaved):
    """out's checked tokens against the reference on the saved input tokens."""
    out_rows = out[:, CHECK_IDX]
    expected = ref.rope(x_rows, cos, sin, pos[CHECK_IDX][None], interleaved)
    ref.assert_pairs_close(out_rows, expected, x_rows, rotary_dim, interleaved)
    # The tokens changed at all (a pass that stopped at 2**31 would leave the last ones as
    # they were: every checked position is >= 1, so each rotated token differs).
    moved = (out_rows.float() != x_rows.float()).flatten(2).any(-1)
    assert bool(moved.all()), f"tokens left unrotated: {CHECK_IDX[~moved[0]].tolist()}"


@pytest.mark.parametrize("interleaved, rotary_dim, pos_dtype", [
    (False, 128, torch.int64),
    (True, 96, torch.int32),  # partial rotary: the tail past 2**31 must pass through
], ids=["halfsplit-r128-int64", "interleaved-r96-int32"])
def test_inplace_past_2_31_elements(big, interleaved, rotary_dim, pos_dtype):
    x = big
    cos, sin = (t.float() for t in ref.default_table(rotary_dim, TABLE_ROWS))
    pos = positions(pos_dtype, seed=rotary_dim)
    x_rows = x[:, CHECK_IDX].clone()
    t0 = time.perf_counter()
    ret = rope_ext.apply_rope(x, cos, sin, pos, interleaved=interleaved, inplace=True)
    elapsed = time.perf_counter() - t0
    assert ret is x
    check_rows(x, x_rows, cos, sin, pos, rotary_dim, interleaved)
    assert elapsed < TIME_LIMIT_S, \
        f"in-place pass over {X_BYTES / GiB:.1f} GiB took {elapsed:.1f} s"


def test_functional_past_2_31_elements(big):
    require_memory(NEED_FUNCTIONAL_EXTRA, f"the functional op's {X_BYTES / GiB:.1f} GiB output "
                   f"(next to the {X_BYTES / GiB:.1f} GiB input)")
    x = big
    cos, sin = (t.float() for t in ref.default_table(HEAD_DIM, TABLE_ROWS))
    pos = positions(torch.int64, seed=7)
    x_rows = x[:, CHECK_IDX].clone()
    t0 = time.perf_counter()
    out = ops.apply(x, cos, sin, pos[None], False, False)
    elapsed = time.perf_counter() - t0
    try:
        assert out.shape == x.shape and out.dtype == x.dtype
        check_rows(out, x_rows, cos, sin, pos, HEAD_DIM, False)
        assert torch.equal(x[:, CHECK_IDX], x_rows), "the functional op changed its input"
        # Two unchecked tokens of the broadcast pattern, one on each side of 2**31, at the same
        # position, must come out identical.
        far = next(s for s in range(SEQ - 10, _BOUNDARY, -1) if s not in CHECK)
        near = next(s for s in range(3, TABLE_ROWS * 4)
                    if int(pos[s]) == int(pos[far]) and s not in CHECK)
        assert torch.equal(out[0, near], out[0, far])
    finally:
        del out
    assert elapsed < TIME_LIMIT_S, \
        f"functional pass over {X_BYTES / GiB:.1f} GiB took {elapsed:.1f} s"


def test_fused_norm_in_place_past_2_31_elements(big):
    """The fused QK-RMSNorm + RoPE in place on q = heads 0-5 and k = heads 6-7 of x (strided
    slices of one buffer, as of a fused qkv projection): the tokens past element 2**31 are
    normalized and rotated like the first ones."""
    x = big
    q, k = x[:, :, :6], x[:, :, 6:]
    cos, sin = (t.float() for t in ref.default_table(HEAD_DIM, TABLE_ROWS))
    pos = positions(torch.int64, seed=11)
    g = torch.Generator().manual_seed(12)
    q_weight = (torch.rand(HEAD_DIM, generator=g) + 0.5).to(torch.bfloat16)
    k_weight = (torch.rand(HEAD_DIM, generator=g) + 0.5).to(torch.bfloat16)
    x_rows = x[:, CHECK_IDX].clone()
    t0 = time.perf_counter()
    ret = rope_ext.rms_norm_rope_qk(q, k, cos, sin, pos[None], q_weight=q_weight,
                                    k_weight=k_weight, inplace=True)
    elapsed = time.perf_counter() - t0
    assert ret[0] is q and ret[1] is k
    for heads, w in ((slice(0, 6), q_weight), (slice(6, 8), k_weight)):
        normalized = ref.rms_norm(x_rows[:, :, heads], w, 1e-6)
        expected = ref.rope(normalized, cos, sin, pos[CHECK_IDX][None])
        # (the input's pair norms there: those of the normalized input, in x's dtype)
        ref.assert_pairs_close(x[:, CHECK_IDX][:, :, heads], expected,
                               normalized.to(x.dtype), HEAD_DIM, False)
    assert elapsed < TIME_LIMIT_S, \
        f"fused in-place pass over {X_BYTES / GiB:.1f} GiB took {elapsed:.1f} s"
