"""docs/math.md section 12: the algebraic properties of RoPE, checked on the op's results.

These need no reference rotation: each property is an identity between op results (or
between an op result and its input) that any correct rotation satisfies. Tables come
from tests/reference.py (float64, rounded to the table dtype where a test says so).
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import reference as ref
import rope_ext  # noqa: F401  (registers torch.ops.rope)

ops = torch.ops.rope

PAIRINGS = pytest.mark.parametrize("interleaved", [False, True], ids=["halfsplit", "interleaved"])
# Hypothesis: a fixed, modest number of examples so the run time is predictable.
PROPERTY = settings(max_examples=30, deadline=None, derandomize=True)
NUM_POSITIONS = 1024  # table rows; positions and their sums stay below


def _rand(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def _table(rotary_dim, dtype=torch.float64, attention_factor=1.0):
    cos, sin = ref.default_table(rotary_dim, NUM_POSITIONS, attention_factor=attention_factor)
    return cos.to(dtype), sin.to(dtype)


def _pos(values):
    return torch.tensor(values, dtype=torch.int64)


# 1. Relative position: <rope(q, m), rope(k, n)> depends on n - m only.

@PROPERTY
@given(seed=st.integers(0, 2**31 - 1), dims=st.sampled_from([(8, 8), (12, 6), (64, 64)]),
       shift=st.integers(0, 300), interleaved=st.booleans(),
       dtype=st.sampled_from([torch.float64, torch.float32]),
       attention_factor=st.sampled_from([1.0, 1.25]))
def test_relative_position(seed, dims, shift, interleaved, dtype, attention_factor):
    head_dim, r = dims
    tokens = 6
    g = torch.Generator().manual_seed(seed)
    m = torch.randint(0, 300, (tokens,), generator=g)
    n = m + torch.randint(0, 300, (tokens,), generator=g)  # n >= m, so n - m is a valid row
    q = _rand((1, tokens, 2, head_dim), dtype, seed)
    k = _rand((1, tokens, 2, head_dim), dtype, seed + 1)
    cos, sin = _table(r, dtype, attention_factor)
    cos1, sin1 = _table(r, dtype)

    def dots(pq, pk):
        rq = ops.apply(q, cos, sin, pq[None], interleaved)
        rk = ops.apply(k, cos, sin, pk[None], interleaved)
        return (rq.double() * rk.double()).sum(-1)

    base = dots(m, n)
    shifted = dots(m + shift, n + shift)
    # <q, rope(k, n - m)> with the unscaled table, times A^2 (A scales both q and k).
    relative = (q.double() * ops.apply(k, cos1, sin1, (n - m)[None], interleaved).double()).sum(-1)
    a2 = attention_factor ** 2
    # |q| |k| bounds every term; float32 adds a few roundings per product and sum.
    scale = q.double().norm(dim=-1) * k.double().norm(dim=-1) * a2
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    assert torch.all((base - shifted).abs() <= tol * scale)
    # The tail contributes the same unrotated term to both; only the rotated part carries A^2.
    tail = (q.double()[..., r:] * k.double()[..., r:]).sum(-1)
    assert torch.all((base - (a2 * (relative - tail) + tail)).abs() <= tol * scale)


# 2. Norm: each pair keeps its 2-norm; the tail is bit-identical.

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=str)
@pytest.mark.parametrize("dims", [(16, 16), (20, 10), (34, 34)], ids=str)
@PAIRINGS
def test_pair_norms_preserved_and_tail_identical(interleaved, dims, dtype):
    head_dim, r = dims
    x = _rand((2, 5, 3, head_dim), dtype, 1)
    cos, sin = _table(r)  # float64 table: cos^2 + sin^2 = 1 to float64 precision
    pos = torch.randint(0, NUM_POSITIONS, (2, 5))
    out = ops.apply(x, cos, sin, pos, interleaved)
    rho_in = ref.pair_norms(x, r, interleaved)
    rho_out = ref.pair_norms(out, r, interleaved)
    # An element error of tol * rho moves the norm by at most sqrt(2) * tol * rho.
    tol = 2 * ref.PAIR_TOL[dtype]
    assert torch.all((rho_out - rho_in).abs() <= tol * rho_in + ref.ABS_FLOOR)
    ref.assert_tail_identical(out, x, r)


# 3. Inverse: rope(rope(x, m), m; inverse) = x; inverse is the table with sin negated.

@PROPERTY
@given(seed=st.integers(0, 2**31 - 1), dims=st.sampled_from([(8, 8), (10, 6), (130, 130)]),
       interleaved=st.booleans(),
       dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16, torch.float16]))
def test_inverse_undoes_apply(seed, dims, interleaved, dtype):
    head_dim, r = dims
    x = _rand((2, 3, 2, head_dim), dtype, seed)
    cos, sin = _table(r)
    pos = torch.randint(0, NUM_POSITIONS, (2, 3), generator=torch.Generator().manual_seed(seed))

    there = ops.apply(x, cos, sin, pos, interleaved)
    back = ops.apply(there, cos, sin, pos, interleaved, True)

    # Two roundings to x's dtype (reduced dtypes round the intermediate result too).
    tol = 2 * ref.PAIR_TOL[dtype] + (1e-15 if dtype == torch.float64 else 0)
    ref.assert_pairs_close(back, x.double(), x, r, interleaved, tol=tol)
    assert torch.equal(ops.apply(x, cos, sin, pos, interleaved, True),
                       ops.apply(x, cos, -sin, pos, interleaved))


# 4. Composition: for default tables, rope(rope(x, m), n) = rope(x, m + n).

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("dims", [(8, 8), (12, 6), (64, 64)], ids=str)
@PAIRINGS
def test_composition(interleaved, dims, dtype):
    head_dim, r = dims
    x = _rand((2, 4, 2, head_dim), dtype, 2)
    m = torch.randint(0, NUM_POSITIONS // 2, (2, 4))
    n = torch.randint(0, NUM_POSITIONS // 2, (2, 4))
    cos, sin = _table(r, dtype)
    twice = ops.apply(ops.apply(x, cos, sin, m, interleaved), cos, sin, n, interleaved)
    once = ops.apply(x, cos, sin, m + n, interleaved)
    # float64: the angles (m + n) theta and m theta + n theta differ by a few ulps of ~1000 rad.
    tol = 1e-12 if dtype == torch.float64 else 32 * 2.0 ** -24
    ref.assert_pairs_close(twice, once.double(), x, r, interleaved, tol=tol)


# 5. Zero position: rope(x, 0) = x exactly (cos 1, sin 0), in every dtype.

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=str)
@pytest.mark.parametrize("dims", [(8, 8), (12, 6), (130, 130)], ids=str)
@PAIRINGS
def test_zero_position_is_identity(interleaved, dims, dtype):
    head_dim, r = dims
    x = _rand((2, 3, 2, head_dim), dtype, 3)
    cos, sin = _table(r, torch.float32)
    assert torch.equal(ops.apply(x, cos, sin, torch.zeros(2, 3, dtype=torch.int64), interleaved),
                       x)
    # Without positions, token 0 of every sequence sits at position 0.
    assert torch.equal(ops.apply(x, cos, sin, None, interleaved)[:, 0], x[:, 0])


# 6. Linearity: rope(alpha x + beta y) = alpha rope(x) + beta rope(y).

# Coefficients whose products with x stay normal floats in float32 (no underflow).
COEFFICIENT = st.floats(-4, 4).filter(lambda v: v == 0 or abs(v) >= 1e-3)

@PROPERTY
@given(seed=st.integers(0, 2**31 - 1), alpha=COEFFICIENT, beta=COEFFICIENT,
       interleaved=st.booleans(), dtype=st.sampled_from([torch.float64, torch.float32]))
def test_linearity(seed, alpha, beta, interleaved, dtype):
    head_dim, r = 12, 8
    x = _rand((1, 4, 2, head_dim), dtype, seed)
    y = _rand((1, 4, 2, head_dim), dtype, seed + 1)
    cos, sin = _table(r, dtype)
    pos = torch.randint(0, NUM_POSITIONS, (4,), generator=torch.Generator().manual_seed(seed))

    def rot(v):
        return ops.apply(v, cos, sin, pos, interleaved).double()

    lhs = rot(alpha * x + beta * y)
    rhs = alpha * rot(x) + beta * rot(y)
    # Each side rounds a few times per element; errors scale with |alpha| |x| + |beta| |y|.
    eps = 2.0 ** -52 if dtype == torch.float64 else 2.0 ** -23
    scale = alpha * x.double() + beta * y.double()
    bound = 16 * eps * (abs(alpha) * x.double().abs().amax() + abs(beta) * y.double().abs().amax()
                        + scale.abs().amax()) + 1e-300
    assert (lhs - rhs).abs().max() <= bound


# 7. Pairing equivalence: interleaved(x) = P^-1 half_split(P x), P = evens then odds.

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dims", [(8, 8), (12, 6), (66, 62), (130, 130)], ids=str)
def test_pairing_equivalence(dims, dtype):
    head_dim, r = dims
    x = _rand((2, 3, 2, head_dim), dtype, 4)
    cos, sin = _table(r, torch.float32)
    pos = torch.randint(0, NUM_POSITIONS, (2, 3))
    interleaved = ops.apply(x, cos, sin, pos, True)
    px = ref.permute_evens_first(x, r).contiguous()
    via_half_split = ref.unpermute_evens_first(ops.apply(px, cos, sin, pos, False), r)
    # The same products and sums per pair, only stored elsewhere: equal up to rounding.
    ref.assert_pairs_close(interleaved, via_half_split.double(), x, r, True,
                           tol=2 * ref.PAIR_TOL[dtype])


# 8. Attention factor: with A folded into the table, the rotated part scales by A, the tail not.

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("attention_factor", [0.5, 1.1902381, 1.3688879])
@PAIRINGS
def test_attention_factor_scales_rotated_part(interleaved, attention_factor, dtype):
    head_dim, r = 20, 12
    x = _rand((2, 3, 2, head_dim), dtype, 5)
    pos = torch.randint(0, NUM_POSITIONS, (2, 3))
    cos, sin = _table(r, attention_factor=attention_factor)
    cos1, sin1 = _table(r)
    scaled = ops.apply(x, cos, sin, pos, interleaved)
    unscaled = ops.apply(x, cos1, sin1, pos, interleaved)

    rho_in = ref.pair_norms(x, r, interleaved)
    tol = 2 * ref.PAIR_TOL[dtype]
    assert torch.all((ref.pair_norms(scaled, r, interleaved) - attention_factor * rho_in).abs()
                     <= tol * attention_factor * rho_in + ref.ABS_FLOOR)
    ref.assert_tail_identical(scaled, x, r)
    expected = unscaled.double()
    expected[..., :r] *= attention_factor
    # Both sides within PAIR_TOL of the exact A R x, relative to the larger of |x| and A |x|.
    ref.assert_pairs_close(scaled, expected, x, r, interleaved, tol=tol)
