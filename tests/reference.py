"""An independent float64 reference for RoPE (and the RMSNorm of the fused op), written from
docs/math.md sections 1 to 5, 12, 13 and 15, and the comparisons the tests make with it.

Nothing here imports rope_ext: the tests compare the library against this file, so a
mistake shared by both would have to be made twice, independently.

Conventions (the op's, docs/api.md section 2):
  x is [batch, seq, heads, head_dim] ("bshd", any strides) or [tokens, heads, head_dim] ("thd").
  cos/sin are [P, r/2] (rows picked by positions, or row s for token s), or one row per token,
  [batch | 1, seq, r/2] / [seq, r/2]. r = 2 * cos.size(-1); x[..., r:] passes through.
"""

import math

import torch

# --- tables ---


def inv_freq(rotary_dim, base=10000.0):
    """theta_i = base^(-2i/r), i < r/2, each computed by Python in double precision."""
    return torch.tensor([base ** (-(2 * i) / rotary_dim) for i in range(rotary_dim // 2)],
                        dtype=torch.float64)


def table(theta, num_positions, attention_factor=1.0):
    """cos/sin [num_positions, r/2] in float64: A cos(m theta_i), A sin(m theta_i)."""
    angle = torch.arange(num_positions, dtype=torch.float64)[:, None] * theta[None, :]
    return attention_factor * torch.cos(angle), attention_factor * torch.sin(angle)


def default_table(rotary_dim, num_positions, base=10000.0, attention_factor=1.0):
    return table(inv_freq(rotary_dim, base), num_positions, attention_factor)


# --- the rotation ---


def pair_slots(rotary_dim, interleaved):
    """Indices (a_idx, b_idx) of the r/2 pairs: (i, i + r/2) half-split, (2i, 2i + 1) interleaved."""
    pairs = rotary_dim // 2
    i = torch.arange(pairs)
    if interleaved:
        return 2 * i, 2 * i + 1
    return i, i + pairs


def token_rows(x, cos, sin, positions=None):
    """The cos/sin row of every token, float64, shaped [batch, seq, 1, r/2] (bshd) or [tokens, 1, r/2]
    (thd) so that it broadcasts over heads."""
    c, s = cos.double(), sin.double()
    thd = x.dim() == 3
    lead = x.shape[:1] if thd else x.shape[:2]
    if positions is not None:
        pos = positions.long()
        if not thd:
            pos = pos.expand(lead)  # [seq] and [1, seq] broadcast over the batch
        c, s = c[pos], s[pos]
    elif c.dim() == 2:
        seq = lead[-1]
        c, s = c[:seq].expand(*lead, -1), s[:seq].expand(*lead, -1)  # row s for token s
    else:
        c, s = c.expand(*lead, -1), s.expand(*lead, -1)  # [1, seq, r/2] broadcasts over batch
    return c.unsqueeze(-2), s.unsqueeze(-2)


def rotate(x, cos, sin, positions=None, interleaved=False):
    """The rotation in x's dtype, out of place, with ATen ops only: differentiable, usable under
    torch.func transforms and on any device (gradients of the float64 reference compositions).

    Per pair (a, b): a' = a cos - b sin, b' = a sin + b cos; x[..., r:] is appended unchanged.
    """
    c, s = token_rows(x, cos, sin, positions)
    c, s = c.to(x.dtype), s.to(x.dtype)
    r = 2 * cos.shape[-1]
    rot, tail = x[..., :r], x[..., r:]
    if interleaved:
        a, b = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack([a * c - b * s, a * s + b * c], -1).flatten(-2)
    else:
        a, b = rot[..., :r // 2], rot[..., r // 2:]
        out = torch.cat([a * c - b * s, a * s + b * c], -1)
    return torch.cat([out, tail], -1)


def rope(x, cos, sin, positions=None, interleaved=False, inverse=False):
    """The op's result computed in float64 (returned as float64, x's shape).

    Per pair (a, b): a' = a cos - b sin, b' = a sin + b cos; `inverse` negates sin.
    The table is used exactly as given (cast to float64), so table rounding is not
    counted as kernel error.
    """
    sin = sin.double()
    return rotate(x.double(), cos.double(), -sin if inverse else sin, positions, interleaved)


# --- RMSNorm (docs/math.md section 15) ---


def rms_norm(x, w, eps, across_heads=False, weight_offset=0.0):
    """x / sqrt(mean(x**2) + eps) * (w + weight_offset) in float64, with ATen ops only (as
    rotate); x as the op sees it, [b, s, h, d] or [t, h, d]. The mean runs over head_dim, or
    over heads * head_dim of each token with across_heads (w then [heads * head_dim])."""
    x = x.double()
    g = x.flatten(-2) if across_heads else x
    y = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + eps) * (w.double() + weight_offset)
    return y.reshape(x.shape)


def rms_rstd(x, eps, across_heads=False):
    """1 / sqrt(mean(x**2) + eps) in float64: [.., heads], or [.., 1] across heads."""
    x = x.double()
    if across_heads:
        return torch.rsqrt(x.flatten(-2).pow(2).mean(-1) + eps).unsqueeze(-1)
    return torch.rsqrt(x.pow(2).mean(-1) + eps)


def permute_evens_first(x, rotary_dim):
    """P of docs/math.md section 2: the first r dims reordered evens then odds; the tail stays."""
    order = torch.cat([torch.arange(0, rotary_dim, 2), torch.arange(1, rotary_dim, 2),
                       torch.arange(rotary_dim, x.shape[-1])])
    return x[..., order]


def unpermute_evens_first(x, rotary_dim):
    """P^-1."""
    pairs = rotary_dim // 2
    order = torch.empty(rotary_dim, dtype=torch.long)
    order[0::2] = torch.arange(pairs)
    order[1::2] = torch.arange(pairs, rotary_dim)
    order = torch.cat([order, torch.arange(rotary_dim, x.shape[-1])])
    return x[..., order]


# --- tolerances (docs/math.md section 13) ---

# Allowed error of each output element of a pair, in units of that pair's norm.
# float32: a*c - b*s rounds the two products and the difference (~3.8 units of
# 2^-24); bf16/fp16: one final rounding to the output dtype dominates. float64
# is compared with a float64 reference that rounds too, so both sides count.
PAIR_TOL = {
    torch.float32: 4 * 2.0 ** -24,
    torch.bfloat16: 2.0 ** -8,
    torch.float16: 2.0 ** -11,
    torch.float64: 8 * 2.0 ** -53,
}

# Pairs whose norm is 0 must come out (almost) exactly 0.
ABS_FLOOR = 1e-30


def pair_norms(v, rotary_dim, interleaved):
    ia, ib = pair_slots(rotary_dim, interleaved)
    v = v.double()
    return torch.sqrt(v[..., ia] ** 2 + v[..., ib] ** 2)


def assert_pairs_close(out, ref, x, rotary_dim, interleaved, dtype=None, tol=None):
    """Every rotated element within tol * rho of the reference; the tail bit-identical to x.

    rho is the larger of the input pair's norm and the reference output pair's norm:
    docs/math.md section 13 states the bound on the input norm, and a table whose rows are not
    unit length (a rounded table, or an attention factor A) scales the output, where
    the final rounding happens.
    """
    dtype = out.dtype if dtype is None else dtype
    tol = PAIR_TOL[dtype] if tol is None else tol
    assert out.shape == ref.shape == x.shape, (out.shape, ref.shape, x.shape)
    ia, ib = pair_slots(rotary_dim, interleaved)
    rho = torch.maximum(pair_norms(x, rotary_dim, interleaved),
                        pair_norms(ref, rotary_dim, interleaved))
    o = out.double()
    err = torch.maximum((o[..., ia] - ref[..., ia]).abs(), (o[..., ib] - ref[..., ib]).abs())
    bound = tol * rho + ABS_FLOOR
    bad = ~(err <= bound)  # also catches NaN
    if bad.any():
        idx = tuple(t[0].item() for t in bad.nonzero(as_tuple=True))
        worst = (err / (rho + ABS_FLOOR)).max().item()
        raise AssertionError(
            f"{int(bad.sum())} of {bad.numel()} pairs off; first at {idx}: got "
            f"({o[..., ia][idx].item()}, {o[..., ib][idx].item()}), expected "
            f"({ref[..., ia][idx].item()}, {ref[..., ib][idx].item()}); "
            f"worst error / rho = {worst:.3g}, allowed {tol:.3g} ({dtype})")
    assert_tail_identical(out, x, rotary_dim)


def assert_tail_identical(out, x, rotary_dim):
    """x[..., r:] passes through bit for bit (NaN included)."""
    t_out, t_in = out[..., rotary_dim:], x[..., rotary_dim:]
    assert t_out.dtype == t_in.dtype
    same = (t_out == t_in) | (t_out.isnan() & t_in.isnan())
    assert bool(same.all()), "tail x[..., r:] changed"
    # == treats -0.0 and +0.0 as equal; the tail must be a copy, so compare signs too.
    assert torch.equal(torch.signbit(t_out), torch.signbit(t_in)), "tail x[..., r:] changed sign"


def ulp32(v):
    """The float32 spacing at |v| (v float64)."""
    f = v.abs().float()
    return (torch.nextafter(f, torch.full_like(f, math.inf)) - f).double()


# --- bit-for-bit comparisons ---

BITS = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
        torch.bfloat16: torch.int16, torch.int64: torch.int64, torch.int32: torch.int32}


def same_bits(a, b, strides=False):
    """Same shape, dtype (and strides if asked) and the same bits in every element (so NaN
    payloads and the sign of zero count)."""
    return (a.shape == b.shape and a.dtype == b.dtype and (not strides or a.stride() == b.stride())
            and torch.equal(a.contiguous().view(BITS[a.dtype]), b.contiguous().view(BITS[b.dtype])))


def assert_bit_identical(a, b, what):
    assert a.shape == b.shape and a.dtype == b.dtype, (what, a.shape, b.shape, a.dtype, b.dtype)
    ia, ib = a.contiguous().view(BITS[a.dtype]), b.contiguous().view(BITS[b.dtype])
    if not torch.equal(ia, ib):
        diff = (ia != ib).nonzero()
        raise AssertionError(f"{what}: {len(diff)} elements differ in their bits, first at "
                             f"{tuple(diff[0].tolist())}")


# --- transformers' float32 inv_freq against ours (docs/math.md section 9) ---

# transformers builds inv_freq in float32; ours is float64. They agree to the rounding
# transformers' float32 arithmetic loses:
# * the exponent 2i / r is rounded to float32 (exact when r is a power of two, off by up to
#   half an ulp otherwise), which moves base ** (-2i / r) by ln(base) * |error| relative;
# * each further float32 operation (pow, reciprocal, products, the yarn/llama3 blends) loses
#   about half an ulp: together at most ULP_BUDGET relative (measured: at most 6.1 * 2**-24).
ULP_BUDGET = 8 * 2.0**-24


def hf_exponent_error(r):
    """|fl32(2i / r) - 2i / r|: how far transformers' float32 exponent is from the exact one."""
    exact = torch.arange(0, r, 2, dtype=torch.float64) / r
    rounded = (torch.arange(0, r, 2, dtype=torch.int64).float() / r).double()
    return (rounded - exact).abs()


def hf_inv_freq_rel_bound(base, r):
    """Relative distance allowed between transformers' float32 inv_freq and the exact one."""
    return math.log(base) * hf_exponent_error(r) + ULP_BUDGET


def assert_inv_freq_matches(ours, theirs, base, r):
    """ours (float64) equals transformers' float32 vector up to its float32 rounding.

    `base` is the base transformers raises to the float32 exponent (base' for dynamic).
    """
    assert ours.dtype == torch.float64 and ours.device.type == "cpu"
    assert theirs.dtype == torch.float32
    assert ours.shape == theirs.shape == (r // 2,)
    rel = ((ours - theirs.double()) / theirs.double()).abs()
    bound = hf_inv_freq_rel_bound(base, r)
    worst = int((rel - bound).argmax())
    assert (rel <= bound).all(), (
        f"pair {worst}: ours {ours[worst].item()!r}, transformers {theirs[worst].item()!r}, "
        f"relative difference {rel[worst].item():.3e} > bound {bound[worst].item():.3e}")
