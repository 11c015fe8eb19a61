"""Context parallelism: which tokens a rank holds, and the global position of each.

RoPE acts on each token alone, so a sequence sharded over ``cp_size`` ranks needs no
communication to be rotated: every rank keeps the full-length ``[P, r/2]`` table and passes the
global positions of its own tokens. What it must get right is which tokens it holds, and that
depends on how the attention implementation lays the sequence out over the ranks:

``"contiguous"``
    Rank r holds the r-th of cp_size equal chunks (plain sequence/context parallelism, no load
    balancing). S = 8, cp_size = 2: rank 0 holds [0 1 2 3], rank 1 holds [4 5 6 7].
``"zigzag"``
    The sequence is cut into 2 * cp_size equal chunks and rank r holds chunks r and
    2 * cp_size - 1 - r, so that every rank does the same amount of causal-attention work:
    Megatron-LM's and TransformerEngine's context parallelism (ring attention), and
    ``torch.distributed.tensor.experimental.context_parallel``'s load balancer (its
    ``_HeadTailLoadBalancer``, earlier ``_RoundRobinLoadBalancer``). S = 8, cp_size = 2:
    rank 0 holds [0 1 6 7], rank 1 holds [2 3 4 5].
``"striped"``
    Token t sits on rank t % cp_size (Striped Attention's token-level round robin).
    S = 8, cp_size = 2: rank 0 holds [0 2 4 6], rank 1 holds [1 3 5 7].

A packed batch (``cu_seqlens``) is sharded one sequence at a time, each sequence laid out on
its own and the rank's pieces concatenated in sequence order, as TransformerEngine's THD
context parallelism does; the positions count from each sequence's start (plus its offset).

Typical use, on each rank::

    shard = rope_ext.context_parallel.shard(cu_seqlens, cp_size, cp_rank, layout="zigzag")
    q, k = q[shard.token_indices], k[shard.token_indices]          # this rank's tokens
    q, k = rope_ext.apply_rope_qk(q, k, cos, sin, shard.positions, layout="thd")
    # shard.cu_seqlens: the rank's own cu_seqlens, for its varlen attention call

The outputs and gradients then equal the matching rows of rotating the whole batch, bit for bit.
"""

from typing import NamedTuple, Optional, Union

import torch

from rope_ext.packing import _ArgumentTypeError, check_cu_seqlens, check_seqlen_offsets

LAYOUTS = ("contiguous", "zigzag", "striped")


class Shard(NamedTuple):
    """One rank's part of a context-parallel sequence or packed batch."""

    token_indices: torch.Tensor
    """int64 ``[local tokens]``: the global tokens this rank holds, in its order (indices
    into the sequence, or into the packed token axis): ``x[token_indices]`` is its shard."""
    positions: torch.Tensor
    """int64 ``[local tokens]``: each of those tokens' positions, for the rotation."""
    cu_seqlens: Optional[torch.Tensor]
    """The rank's own cumulative sequence lengths (each sequence's local share, in
    cu_seqlens's dtype) for a packed batch; None for a single sequence."""


def _check_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return value


def _lengths(seq_len_or_cu_seqlens):
    """(int64 CPU lengths [num_seqs], int64 CPU starts [num_seqs], cu_seqlens or None)."""
    spec = seq_len_or_cu_seqlens
    if isinstance(spec, torch.Tensor):
        cu = spec.detach().cpu()
        num_tokens = int(cu[-1]) if cu.dim() == 1 and cu.numel() and not cu.is_floating_point() \
            else 0
        check_cu_seqlens(cu, num_tokens, cu.device, tokens_name="the batch")
        cu = cu.long()
        return cu[1:] - cu[:-1], cu[:-1], spec
    if isinstance(spec, bool) or not isinstance(spec, int):
        raise _ArgumentTypeError(
            "seq_len_or_cu_seqlens must be an int (the length of one sequence) or cu_seqlens "
            f"(an int32/int64 tensor [num_seqs + 1]), got {type(spec).__name__}")
    if spec < 0:
        raise ValueError(f"seq_len must not be negative, got {spec}")
    return torch.tensor([spec]), torch.tensor([0]), None


def shard(seq_len_or_cu_seqlens: Union[int, torch.Tensor], cp_size: int, cp_rank: int, *,
          layout: str, seqlen_offsets: Union[torch.Tensor, int, None] = None,
          device: Optional[Union[torch.device, str]] = None) -> Shard:
    """The tokens context-parallel rank `cp_rank` of `cp_size` holds, and their positions.

    Args:
        seq_len_or_cu_seqlens: an int, the length of one sequence; or cu_seqlens, int32/int64
            ``[num_seqs + 1]`` (0, each sequence's end, the token count), for a packed batch
            whose sequences are each sharded on their own. Its values are read on the host
            (on a GPU that waits for the device: call this where the batch is prepared).
        cp_size: the number of context-parallel ranks.
        cp_rank: this rank, ``0 <= cp_rank < cp_size``.
        layout: ``"contiguous"``, ``"zigzag"`` or ``"striped"`` (see the module's docstring);
            keyword only and without a default, because it must match the attention's layout.
        seqlen_offsets: the position of each sequence's first token (a cached prompt): an int,
            or for cu_seqlens an int32/int64 tensor ``[num_seqs]``; None means 0.
        device: where the returned tensors go (default: cu_seqlens's device, else the CPU).

    Returns:
        :class:`Shard` ``(token_indices, positions, cu_seqlens)``.

    Raises:
        ValueError: a sequence length not divisible by cp_size (``2 * cp_size`` for zigzag),
            cp_rank outside ``[0, cp_size)``, an unknown layout, a bad cu_seqlens (as
            :func:`rope_ext.packed_positions` checks it) or seqlen_offsets.

    Example (one sequence of 8 tokens, cp_size 2)::

        >>> shard(8, 2, 1, layout="zigzag")
        Shard(token_indices=tensor([2, 3, 4, 5]), positions=tensor([2, 3, 4, 5]), cu_seqlens=None)
    """
    cp_size, cp_rank = _check_int(cp_size, "cp_size"), _check_int(cp_rank, "cp_rank")
    if cp_size < 1:
        raise ValueError(f"cp_size must be at least 1, got {cp_size}")
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank must lie in [0, cp_size) = [0, {cp_size}), got {cp_rank}")
    if layout == "round_robin":
        raise ValueError(
            "layout='round_robin' is ambiguous: torch's context_parallel _RoundRobinLoadBalancer "
            "(now _HeadTailLoadBalancer) gives rank r chunks r and 2 * cp_size - 1 - r, which is "
            "layout='zigzag'; token t on rank t % cp_size is layout='striped'")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    lengths, starts, cu_seqlens = _lengths(seq_len_or_cu_seqlens)
    packed = cu_seqlens is not None
    num_seqs = lengths.shape[0]

    unit = 2 * cp_size if layout == "zigzag" else cp_size
    uneven = (lengths % unit).nonzero()
    if uneven.numel():
        i = int(uneven[0, 0])
        why = ("zigzag cuts each sequence into 2 * cp_size chunks" if layout == "zigzag"
               else f"{layout} gives every rank the same number of tokens")
        which = f"sequence {i} of cu_seqlens has" if packed else "the sequence has"
        raise ValueError(
            f"{which} {int(lengths[i])} tokens, not a multiple of "
            f"{'2 * cp_size' if layout == 'zigzag' else 'cp_size'} = {unit} ({why}); pad "
            f"{'each sequence' if packed else 'it'} to a multiple of {unit}")

    offsets = torch.zeros(num_seqs, dtype=torch.int64)
    if isinstance(seqlen_offsets, torch.Tensor) and not packed:
        raise ValueError("seqlen_offsets must be an int for a single sequence; a tensor "
                         "[num_seqs] goes with cu_seqlens")
    check_seqlen_offsets(seqlen_offsets, num_seqs, getattr(seqlen_offsets, "device", None))
    if isinstance(seqlen_offsets, torch.Tensor):
        offsets = seqlen_offsets.detach().cpu().long()
        if bool((offsets < 0).any()):
            raise ValueError(f"seqlen_offsets must not be negative, got {int(offsets.min())}")
    elif seqlen_offsets is not None:
        offsets = offsets + seqlen_offsets

    # Each local token j of sequence i maps to g, its index within the sequence.
    local = lengths // cp_size
    total = int(local.sum())
    seq = torch.repeat_interleave(torch.arange(num_seqs), local, output_size=total)
    local_cu = torch.cat([torch.zeros(1, dtype=torch.int64), local.cumsum(0)])
    j = torch.arange(total) - local_cu[seq]
    if layout == "contiguous":
        g = cp_rank * local[seq] + j
    elif layout == "striped":
        g = j * cp_size + cp_rank
    else:
        chunk = lengths[seq] // (2 * cp_size)
        g = torch.where(j < chunk, cp_rank * chunk + j,
                        (2 * cp_size - 1 - cp_rank) * chunk + (j - chunk))

    if device is None:
        device = cu_seqlens.device if packed else torch.device("cpu")
    token_indices = (starts[seq] + g).to(device)
    positions = (g + offsets[seq]).to(device)
    local_cu_seqlens = local_cu.to(device=device, dtype=cu_seqlens.dtype) if packed else None
    return Shard(token_indices, positions, local_cu_seqlens)


def positions(seq_len_or_cu_seqlens: Union[int, torch.Tensor], cp_size: int, cp_rank: int, *,
              layout: str, seqlen_offsets: Union[torch.Tensor, int, None] = None,
              device: Optional[Union[torch.device, str]] = None) -> torch.Tensor:
    """The positions of the tokens rank `cp_rank` holds: ``shard(...).positions``, int64
    ``[local tokens]``, to pass to :func:`rope_ext.apply_rope` and the other functions as
    positions. See :func:`shard` for the arguments.

    Example::

        >>> positions(8, 2, 0, layout="zigzag")
        tensor([0, 1, 6, 7])
    """
    return shard(seq_len_or_cu_seqlens, cp_size, cp_rank, layout=layout,
                 seqlen_offsets=seqlen_offsets, device=device).positions


def token_indices(seq_len_or_cu_seqlens: Union[int, torch.Tensor], cp_size: int, cp_rank: int,
                  *, layout: str,
                  device: Optional[Union[torch.device, str]] = None) -> torch.Tensor:
    """Which global tokens rank `cp_rank` holds, int64 ``[local tokens]`` (``x[indices]`` or
    ``x.index_select(seq_dim, indices)`` is its shard): ``shard(...).token_indices``. See
    :func:`shard` for the arguments.

    Example::

        >>> token_indices(torch.tensor([0, 4, 12]), 2, 1, layout="zigzag")
        tensor([1, 2, 6, 7, 8, 9])
    """
    return shard(seq_len_or_cu_seqlens, cp_size, cp_rank, layout=layout,
                 device=device).token_indices
