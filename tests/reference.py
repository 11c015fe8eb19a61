"""An independent float64 reference for RoPE, written from docs/math.md sections 1 to 5, 12 and 13.

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
    half = rotary_dim // 2
    i = torch.arange(half)
    if interleaved:
        return 2 * i, 2 * i + 1
    return i, i + half


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


def rope(x, cos, sin, positions=None, interleaved=False, inverse=False):
    """The op's result computed in float64 (returned as float64, x's shape).

    Per pair (a, b): a' = a cos - b sin, b' = a sin + b cos; `inverse` negates sin.
    The table is used exactly as given (cast to float64), so table rounding is not
    counted as kernel error.
    """
    c, s = token_rows(x, cos, sin, positions)
    if inverse:
        s = -s
    rotary_dim = 2 * cos.shape[-1]
    ia, ib = pair_slots(rotary_dim, interleaved)
    x64 = x.double()
    a, b = x64[..., ia], x64[..., ib]
    out = x64.clone()
    out[..., ia] = a * c - b * s
    out[..., ib] = a * s + b * c
    return out


def permute_evens_first(x, rotary_dim):
    """P of docs/math.md section 2: the first r dims reordered evens then odds; the tail stays."""
    order = torch.cat([torch.arange(0, rotary_dim, 2), torch.arange(1, rotary_dim, 2),
                       torch.arange(rotary_dim, x.shape[-1])])
    return x[..., order]


def unpermute_evens_first(x, rotary_dim):
    """P^-1."""
    half = rotary_dim // 2
    order = torch.empty(rotary_dim, dtype=torch.long)
    order[0::2] = torch.arange(half)
    order[1::2] = torch.arange(half, rotary_dim)
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
