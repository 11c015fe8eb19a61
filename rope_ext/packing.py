"""Packed (variable-length) batches: the position of every token from ``cu_seqlens``.

A packed batch lays its sequences end to end on one token axis, ``x: [tokens, heads,
head_dim]`` (``layout="thd"``), and describes them by ``cu_seqlens``, the cumulative sequence
lengths ``[0, len_0, len_0 + len_1, ..., tokens]`` that flash-attn's varlen functions take.
Each sequence counts its positions from 0, or from ``seqlen_offsets[i]`` (a prompt already in
the KV cache, say): token j of sequence i sits at position ``seqlen_offsets[i] + j``.

The positions are built with torch ops on cu_seqlens's device, from the token count x's shape
already holds on the host, so deriving them never waits for the device, and the whole
derivation traces into one graph under ``torch.compile(fullgraph=True)``.
"""

from typing import Optional, Union

import torch

_INDEX_DTYPES = (torch.int32, torch.int64)


class _ArgumentTypeError(TypeError, ValueError):
    """A cu_seqlens or seqlen_offsets of the wrong type or dtype. rope_ext raises TypeError
    for a wrong dtype (docs/api.md section 8) and the contract promises ValueError for every
    bad cu_seqlens (section 2d): this is both, so either ``except`` catches it."""


def _can_read_values(t: torch.Tensor) -> bool:
    """Whether t's values can be read on the host for free: a plain CPU tensor, outside
    tracing. On CUDA reading them would cost a device sync; under torch.compile, export or
    FakeTensor there are no values; a functorch-wrapped tensor (vmapped over) refuses
    data-dependent control flow."""
    if torch.compiler.is_compiling() or type(t) is not torch.Tensor or t.device.type != "cpu":
        return False
    return not torch._C._functorch.is_functorch_wrapped_tensor(t)


def _check_index_tensor(t, name: str, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise _ArgumentTypeError(
            f"{name} must be an int32 or int64 torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _INDEX_DTYPES:
        raise _ArgumentTypeError(f"{name} must be int32 or int64, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the tokens are on {device}; "
                         f"move {name} to {device}")


def check_seqlen_offsets(seqlen_offsets: Union[torch.Tensor, int, None], num_seqs: int,
                         device: torch.device) -> None:
    """Checks seqlen_offsets: None, an int >= 0, or an int32/int64 tensor [num_seqs] on
    `device` (its values are the caller's to check: reading them may need a sync)."""
    if isinstance(seqlen_offsets, torch.Tensor):
        _check_index_tensor(seqlen_offsets, "seqlen_offsets", device)
        if tuple(seqlen_offsets.shape) != (num_seqs,):
            raise ValueError(
                f"seqlen_offsets must be [num_seqs] = [{num_seqs}] (one start position per "
                f"sequence of cu_seqlens), got shape {tuple(seqlen_offsets.shape)}")
    elif seqlen_offsets is not None:
        if isinstance(seqlen_offsets, bool) or not isinstance(seqlen_offsets, int):
            raise _ArgumentTypeError(
                "seqlen_offsets must be an int or an int32/int64 tensor [num_seqs], got "
                f"{type(seqlen_offsets).__name__}")
        if seqlen_offsets < 0:
            raise ValueError(f"seqlen_offsets must not be negative, got {seqlen_offsets}")


def check_cu_seqlens(cu_seqlens: torch.Tensor, num_tokens, device: torch.device,
                     seqlen_offsets: Union[torch.Tensor, int, None] = None,
                     tokens_name: str = "x") -> bool:
    """Checks cu_seqlens (and seqlen_offsets) against a packed batch of `num_tokens` tokens
    on `device`; raises ValueError naming cu_seqlens (or seqlen_offsets) when they are bad.

    The shape, dtype and device are always checked. The values (starting at 0,
    non-decreasing, ending at num_tokens; offsets not negative) are checked when they can be
    read without a device sync, i.e. for a CPU tensor outside torch.compile and functorch
    transforms. Returns whether the values were checked.
    """
    _check_index_tensor(cu_seqlens, "cu_seqlens", device)
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] == 0:
        raise ValueError(
            "cu_seqlens must be 1-D [num_seqs + 1] (0, then each sequence's end: the "
            f"cumulative sequence lengths), got shape {tuple(cu_seqlens.shape)}")
    num_seqs = cu_seqlens.shape[0] - 1
    if num_seqs == 0 and num_tokens != 0:
        raise ValueError(f"cu_seqlens = [0] describes no sequence, but {tokens_name} has "
                         f"{num_tokens} tokens; pass one end per sequence")
    check_seqlen_offsets(seqlen_offsets, num_seqs, device)

    if not _can_read_values(cu_seqlens):
        return False
    first = int(cu_seqlens[0])
    if first != 0:
        raise ValueError(f"cu_seqlens must start at 0, got cu_seqlens[0] = {first}")
    drops = (cu_seqlens[1:] < cu_seqlens[:-1]).nonzero()
    if drops.numel():
        i = int(drops[0, 0])
        raise ValueError(
            f"cu_seqlens must be non-decreasing (each entry is the previous one plus a "
            f"sequence length), got cu_seqlens[{i + 1}] = {int(cu_seqlens[i + 1])} < "
            f"cu_seqlens[{i}] = {int(cu_seqlens[i])}")
    last = int(cu_seqlens[-1])
    if last != num_tokens:
        raise ValueError(
            f"cu_seqlens must end at the token count: {tokens_name} has {num_tokens} tokens "
            f"({tokens_name}.shape[0]) but cu_seqlens[-1] = {last}")
    if isinstance(seqlen_offsets, torch.Tensor) and _can_read_values(seqlen_offsets):
        if bool((seqlen_offsets < 0).any()):
            raise ValueError(f"seqlen_offsets must not be negative, got "
                             f"{int(seqlen_offsets.min())}")
    return True


def _derive_positions(cu_seqlens: torch.Tensor, num_tokens, seqlen_offsets, checked: bool):
    """int64 [num_tokens] positions: token t of sequence i at t - cu_seqlens[i] (+ offset).

    searchsorted finds each token's sequence without knowing the lengths on the host. With
    cu_seqlens whose values were not checked (CUDA, tracing), the sequence index is clamped so
    no gather reads outside cu_seqlens or seqlen_offsets, and a cu_seqlens that breaks the
    rules turns every position into -1: outside every table, so the op raises its
    positions-out-of-table ValueError on the CPU and gives NaN on CUDA, as it does for any
    position outside the table, instead of rotating by a plausible wrong angle.
    """
    cu = cu_seqlens.long()
    num_seqs = cu.shape[0] - 1
    tokens = torch.arange(num_tokens, device=cu.device)
    seq = torch.searchsorted(cu[1:], tokens, right=True)
    if not checked:
        seq = seq.clamp(max=max(num_seqs - 1, 0))
    positions = tokens - cu[seq]
    if isinstance(seqlen_offsets, torch.Tensor):
        positions = positions + seqlen_offsets.long()[seq]
    elif seqlen_offsets:
        positions = positions + seqlen_offsets
    if not checked:
        bad = (cu[0] != 0) | (cu[-1] != num_tokens) | (cu[1:] < cu[:-1]).any()
        if isinstance(seqlen_offsets, torch.Tensor):
            bad = bad | (seqlen_offsets < 0).any()
        positions = torch.where(bad, -1, positions)
    return positions


def positions_for(cu_seqlens: torch.Tensor, num_tokens, device: torch.device,
                  seqlen_offsets=None, tokens_name: str = "x") -> torch.Tensor:
    """Checked cu_seqlens -> int64 [num_tokens] positions (the functional API's path)."""
    checked = check_cu_seqlens(cu_seqlens, num_tokens, device, seqlen_offsets, tokens_name)
    return _derive_positions(cu_seqlens, num_tokens, seqlen_offsets, checked)


def packed_positions(cu_seqlens: torch.Tensor, num_tokens: Optional[int] = None, *,
                     seqlen_offsets: Union[torch.Tensor, int, None] = None) -> torch.Tensor:
    """The position of every token of a packed batch, as ``apply_rope(..., cu_seqlens=...)``
    derives it: token j of sequence i sits at position ``seqlen_offsets[i] + j``.

    Args:
        cu_seqlens: int32/int64 ``[num_seqs + 1]``, the cumulative sequence lengths as
            flash-attn's varlen functions take them: starting at 0, non-decreasing (equal
            neighbours are empty sequences), ending at the token count.
        num_tokens: the token count (``x.shape[0]``). None reads ``cu_seqlens[-1]``, which
            on a GPU waits for the device; pass it to avoid that.
        seqlen_offsets: the position of each sequence's first token, an int for all or an
            int32/int64 tensor ``[num_seqs]`` on cu_seqlens's device; None means 0.

    Returns:
        int64 ``[num_tokens]`` on cu_seqlens's device.

    Raises:
        ValueError: a cu_seqlens or seqlen_offsets of the wrong shape, dtype or device; on the
            CPU also one whose values break the rules above. On CUDA the values are not read
            (that would cost a device sync): every position then comes out -1 instead.
    """
    if num_tokens is None:
        _check_index_tensor(cu_seqlens, "cu_seqlens", getattr(cu_seqlens, "device", None))
        num_tokens = int(cu_seqlens[-1]) if cu_seqlens.dim() == 1 and cu_seqlens.numel() else 0
    device = cu_seqlens.device if isinstance(cu_seqlens, torch.Tensor) else torch.device("cpu")
    return positions_for(cu_seqlens, num_tokens, device, seqlen_offsets, "the batch")
