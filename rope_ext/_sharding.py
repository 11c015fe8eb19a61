"""DTensor sharding rules for the ops: q and k may arrive sharded by batch, by heads or by
tokens (tensor, sequence, context and data parallel), and rotate shard by shard.

Each rule lists the placements under which the local op on each shard computes that shard of
the global result (docs/api.md, "Distributed"):
  - everything replicated;
  - x sharded by batch, with whatever of positions and the table has a batch dimension;
  - x sharded by heads (tensor parallel; q and k may hold different head counts), the rest
    replicated;
  - x sharded by tokens together with positions, the [P, r/2] table replicated (it is indexed
    by the positions, which are global), or together with a per-token table.
Never sharded on head_dim. A token shard without positions and with a [P, r/2] table is not
offered: each shard would rotate its local row indices as if they were global positions, so
DTensor redistributes x instead (to a batch or head sharding, or replicated) and the result
stays right.
"""

import torch
from torch.distributed.tensor import Partial, Replicate, Shard
from torch.distributed.tensor.experimental import register_sharding

ops = torch.ops.rope
R = Replicate()


def _rules(xs, cos, sin, positions):
    """[(x placement, cos, sin, positions placement)] for x of xs[0]'s rank."""
    packed = xs[0].ndim == 3  # [tokens, heads, head_dim]
    per_token = positions is None and cos.ndim == 3  # [batch | 1, seq, r/2]
    no_pos = None if positions is None else R
    rules = [(R, R, R, no_pos)]
    if packed:
        if positions is not None:  # positions [tokens], the table indexed by them
            rules.append((Shard(0), R, R, Shard(0)))
        rules.append((Shard(1), R, R, no_pos))
        return rules
    batch, seq = xs[0].shape[0], xs[0].shape[1]
    # By batch: what has a batch dimension of size batch > 1 is split along with x.
    pos_b = no_pos if positions is None or positions.ndim == 1 or positions.shape[0] == 1 \
        else Shard(0)
    table_b = Shard(0) if per_token and cos.shape[0] == batch and batch > 1 else R
    rules.append((Shard(0), table_b, table_b, pos_b))
    # By heads: everything else replicated.
    rules.append((Shard(2), R, R, no_pos))
    # By tokens.
    if positions is not None:
        rules.append((Shard(1), R, R, Shard(positions.ndim - 1)))
    elif per_token:
        rules.append((Shard(1), Shard(1), Shard(1), None))
    elif cos.shape[0] == seq:  # a [seq, r/2] table is one row per token
        rules.append((Shard(1), Shard(0), Shard(0), None))
    return rules


def _strategies(xs, cos, sin, positions, inv_freq, outputs):
    """(output placements, input placements) for each rule: x (q and k), cos, sin,
    positions, interleaved, inverse, inv_freq (replicated: one value per pair), and
    attention_factor."""
    freq = None if inv_freq is None else R
    return [([xp] * outputs, [xp] * len(xs) + [cp, sp, pp, None, None, freq, None])
            for xp, cp, sp, pp in _rules(xs, cos, sin, positions)]


@register_sharding(ops.apply.default)
def _apply_sharding(x, cos, sin, positions=None, interleaved=False, inverse=False,
                    inv_freq=None, attention_factor=1.0):
    return _strategies([x], cos, sin, positions, inv_freq, outputs=1)


@register_sharding(ops.apply_.default)
def _apply_inplace_sharding(x, cos, sin, positions=None, interleaved=False, inverse=False,
                            inv_freq=None, attention_factor=1.0):
    return _strategies([x], cos, sin, positions, inv_freq, outputs=0)


@register_sharding(ops.apply_qk.default)
def _apply_qk_sharding(q, k, cos, sin, positions=None, interleaved=False, inverse=False,
                       inv_freq=None, attention_factor=1.0):
    return _strategies([q, k], cos, sin, positions, inv_freq, outputs=2)


@register_sharding(ops.apply_qk_.default)
def _apply_qk_inplace_sharding(q, k, cos, sin, positions=None, interleaved=False,
                               inverse=False, inv_freq=None, attention_factor=1.0):
    return _strategies([q, k], cos, sin, positions, inv_freq, outputs=0)


# --- the fused QK-RMSNorm + RoPE: the same placements for q and k (a norm over all heads
# of a token cannot be sharded by heads), weights replicated, each group's rstd placed
# like its tensor. The backward's weight gradients are sums over the tokens and heads a
# shard holds: Partial (summed across the shards) unless everything is replicated.


def _norm_rules(xs, cos, sin, positions, across_heads):
    heads = Shard(xs[0].ndim - 2)
    return [r for r in _rules(xs, cos, sin, positions) if not (across_heads and r[0] == heads)]


@register_sharding(ops.rms_norm_rope_qk.default)
def _norm_sharding(q, k, cos, sin, positions, q_weight, k_weight, eps=1e-6, across_heads=False,
                   weight_offset=0.0, interleaved=False):
    return [([xp] * 4, [xp, xp, cp, sp, pp, R, R, None, None, None, None])
            for xp, cp, sp, pp in _norm_rules([q, k], cos, sin, positions, across_heads)]


@register_sharding(ops.rms_norm_rope_qk_.default)
def _norm_inplace_sharding(q, k, cos, sin, positions, q_weight, k_weight, eps=1e-6,
                           across_heads=False, weight_offset=0.0, interleaved=False):
    return [([], [xp, xp, cp, sp, pp, R, R, None, None, None, None])
            for xp, cp, sp, pp in _norm_rules([q, k], cos, sin, positions, across_heads)]


@register_sharding(ops.rms_norm_rope_qk_backward.default)
def _norm_backward_sharding(grad_q, grad_k, q, k, cos, sin, positions, q_weight, k_weight,
                            q_rstd, k_rstd, across_heads, weight_offset, interleaved):
    strategies = []
    for xp, cp, sp, pp in _norm_rules([q, k], cos, sin, positions, across_heads):
        wp = R if xp == R else Partial()
        strategies.append(([xp, xp, wp, wp],
                           [xp, xp, xp, xp, cp, sp, pp, R, R, xp, xp, None, None, None]))
    return strategies
