"""torch.func.vmap for the functional ops: one call for the whole batch, no per-sample loop.

The vmapped dimension (size N) is folded into the op's own batch dimension: per-sample x
[B, S, H, D] becomes [N * B, S, H, D], and per-sample packed x [T, H, D] becomes [N, T, H, D]
(N sequences of T tokens). A table or positions that differ per sample become one table
row per token ([N * B, S, r/2], positions None), which the op takes as it is; shared ones
broadcast where the op allows and are repeated where it does not.
"""

import torch

ops = torch.ops.rope


def _padded(in_dims, count):
    """in_dims with an entry for each of the op's first `count` arguments. The dispatcher
    leaves out trailing arguments that are at their defaults (positions=None of
    ``apply(x, cos, sin)``), and in_dims has entries only for the arguments it passes: the
    missing ones are not batched."""
    return tuple(in_dims) + (None,) * (count - len(in_dims))


def _lead(t, dim, n):
    """t with the vmapped dimension first (expanded when t is shared by the samples)."""
    return t.movedim(dim, 0) if dim is not None else t.expand((n,) + tuple(t.shape))


def _fold_x(x, dim, n):
    """(x as the op takes it, per-sample shape): N folded into the batch."""
    x = _lead(x, dim, n)
    sample = tuple(x.shape[1:])
    if len(sample) == 3:  # packed [T, H, D]: N sequences of T tokens
        return x, sample
    return x.reshape((n * sample[0],) + sample[1:]), sample


def _per_token_table(t, dim, pos, n, batch, seq):
    """One table row per token, [N * batch, seq, r/2] (batch 1 for packed x)."""
    t = _lead(t, dim, n)
    if pos is not None:  # t: [N, P, r/2], pos: [N, batch|1, seq] -> rows of each sample's table
        rows = t[torch.arange(n, device=t.device).view(n, 1, 1), pos]
    elif t.dim() == 3:  # [N, P >= seq, r/2]: row s for token s
        rows = t[:, None, :seq]
    else:  # [N, batch|1, seq, r/2]
        rows = t
    return rows.expand(n, batch, seq, t.shape[-1]).reshape(n * batch, seq, t.shape[-1])


def _fold(info, in_dims, xs, cos, sin, positions, inv_freq):
    """The xs with N folded into their batch, their per-sample shapes, and the table and
    positions made to match. in_dims: those of the xs, then cos, sin, positions."""
    n = info.batch_size
    x_dims, (cos_dim, sin_dim, pos_dim) = in_dims[:len(xs)], in_dims[len(xs):len(xs) + 3]
    folded = [_fold_x(x, d, n) for x, d in zip(xs, x_dims)]
    sample = folded[0][1]
    packed = len(sample) == 3
    batch, seq = (1, sample[0]) if packed else sample[:2]
    if cos_dim is None and sin_dim is None and pos_dim is None:
        # Shared: [P, r/2] tables and [seq] positions broadcast over the folded batch;
        # what is per batch row ([batch, seq] positions, [batch, seq, r/2] tables) repeats.
        if positions is not None and positions.dim() == 2 and positions.shape[0] > 1:
            positions = positions.repeat(n, 1)
        if positions is None and cos.dim() == 3 and cos.shape[0] > 1:
            cos, sin = cos.repeat(n, 1, 1), sin.repeat(n, 1, 1)
    else:
        pos = None
        if positions is not None:
            pos = _lead(positions, pos_dim, n)
            pos = pos.reshape(n, 1, seq) if pos.dim() == 2 else pos  # [N, seq] -> [N, 1, seq]
        if inv_freq is not None and pos is not None:
            raise ValueError("rope: vmap over the table or positions with inv_freq is not "
                             "supported; vmap over q and k only")
        cos = _per_token_table(cos, cos_dim, pos, n, batch, seq)
        sin = _per_token_table(sin, sin_dim, pos, n, batch, seq)
        positions = None
    return [f for f, _ in folded], [sample for _, sample in folded], cos, sin, positions


def _fold_call(info, in_dims, xs, cos, sin, positions, interleaved, inverse, inv_freq,
               attention_factor):
    """Calls apply (one x) or apply_qk (two) on the folded batch; returns per-sample outputs."""
    n = info.batch_size
    in_dims = _padded(in_dims, len(xs) + 7)
    if inv_freq is not None and in_dims[len(xs) + 5] is not None:
        raise ValueError("rope: vmap over inv_freq is not supported; pass one inv_freq for all")
    xs, samples, cos, sin, positions = _fold(info, in_dims, xs, cos, sin, positions, inv_freq)
    folded = list(zip(xs, samples))
    args = (cos, sin, positions, interleaved, inverse, inv_freq, attention_factor)
    if len(xs) == 1:
        outs = (ops.apply(folded[0][0], *args),)
    else:
        outs = ops.apply_qk(folded[0][0], folded[1][0], *args)
    return [o.reshape((n,) + s) for o, (_, s) in zip(outs, folded)]


def _apply_vmap(info, in_dims, x, cos, sin, positions=None, interleaved=False, inverse=False,
                inv_freq=None, attention_factor=1.0):
    (out,) = _fold_call(info, in_dims, (x,), cos, sin, positions, interleaved, inverse,
                        inv_freq, attention_factor)
    return out, 0


def _apply_qk_vmap(info, in_dims, q, k, cos, sin, positions=None, interleaved=False,
                   inverse=False, inv_freq=None, attention_factor=1.0):
    q_out, k_out = _fold_call(info, in_dims, (q, k), cos, sin, positions, interleaved, inverse,
                              inv_freq, attention_factor)
    return (q_out, k_out), (0, 0)


def _rms_norm_rope_qk_vmap(info, in_dims, q, k, cos, sin, positions, q_weight, k_weight,
                           eps=1e-6, across_heads=False, weight_offset=0.0, interleaved=False):
    n = info.batch_size
    in_dims = _padded(in_dims, 7)
    if in_dims[5] is not None or in_dims[6] is not None:  # per-sample weights: one call each
        qw, kw = (_lead(w, d, n) for w, d in zip((q_weight, k_weight), in_dims[5:7]))
        per = [ops.rms_norm_rope_qk(
            *[t if d is None else t.select(d, i) for t, d in zip((q, k, cos, sin, positions),
                                                                  in_dims[:5])],
            qw[i], kw[i], eps, across_heads, weight_offset, interleaved) for i in range(n)]
        return tuple(torch.stack(o) for o in zip(*per)), (0, 0, 0, 0)
    xs, samples, cos, sin, positions = _fold(info, in_dims, (q, k), cos, sin, positions, None)
    outs = ops.rms_norm_rope_qk(xs[0], xs[1], cos, sin, positions, q_weight, k_weight, eps,
                                across_heads, weight_offset, interleaved)
    shapes = [s for s in samples] + [s[:-2] + ((1,) if across_heads else s[-2:-1])
                                     for s in samples]
    return tuple(o.reshape((n,) + tuple(s)) for o, s in zip(outs, shapes)), (0, 0, 0, 0)


torch.library.register_vmap("rope::rms_norm_rope_qk", _rms_norm_rope_qk_vmap)
torch.library.register_vmap("rope::apply", _apply_vmap)
torch.library.register_vmap("rope::apply_qk", _apply_qk_vmap)
