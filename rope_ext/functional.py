"""The functional API: rotate q and/or k given a cos/sin table."""

from typing import Optional, Sequence, Tuple, Union

import torch

from rope_ext._ops import ops
from rope_ext.mrope import mrope_cos_sin
from rope_ext.packing import positions_for

LAYOUTS = ("bshd", "bhsd", "thd")


def _op_view(x: torch.Tensor, layout: str, name: str) -> torch.Tensor:
    """x as the op sees it ([batch, seq, heads, head_dim] or [tokens, heads, head_dim]): a view, never a copy."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    want = 3 if layout == "thd" else 4
    if x.dim() != want:
        dim_names = {"b": "batch", "s": "seq", "h": "heads", "d": "head_dim", "t": "tokens"}
        shape = "[" + ", ".join(dim_names[letter] for letter in layout) + "]"
        raise ValueError(
            f"{name} must be {want}-D {shape} for layout={layout!r}, got shape {tuple(x.shape)}")
    return x.transpose(1, 2) if layout == "bhsd" else x


def _is_dtensor(x: torch.Tensor) -> bool:
    if type(x) is torch.Tensor:  # the common case, without importing torch.distributed.tensor
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(x, DTensor)


def _replicated(xv: torch.Tensor, *tensors):
    """Plain tensors as replicated DTensors on DTensor xv's mesh (every rank holds the same
    ones, as a module's buffers and a model's position_ids are); DTensors and None as they are."""
    from torch.distributed.tensor import DTensor, Replicate

    mesh = xv.device_mesh
    replicated = [Replicate()] * mesh.ndim
    return tuple(t if t is None or isinstance(t, DTensor)
                 else DTensor.from_local(t, mesh, replicated, run_check=False) for t in tensors)


def _distributed_args(xv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions,
                      inv_freq=None):
    """cos, sin, positions for a DTensor x, replicated where plain, and a missing positions
    with a [P, r/2] table made arange(seq): token s is at position s of the whole sequence,
    which a shard of the tokens cannot know locally."""
    if not _is_dtensor(xv):
        return cos, sin, positions, inv_freq
    if positions is None and cos.dim() == 2 and xv.dim() == 4:
        positions = torch.arange(xv.shape[1], device=xv.device)
    return _replicated(xv, cos, sin, positions, inv_freq)


def _past_table(inv_freq, attention_factor):
    """The op's trailing (inv_freq, attention_factor), or nothing: attention_factor is read
    only with inv_freq, so torch.compile never makes a graph input of its default."""
    return () if inv_freq is None else (inv_freq, attention_factor)


def _check_mrope_freq(mrope_section, inv_freq):
    if mrope_section is not None and inv_freq is not None:
        raise ValueError("inv_freq (rows past the table) is not supported with mrope_section: "
                         "build the table with enough rows")


def _check_packed_args(layout, positions, cu_seqlens, seqlen_offsets, mrope_section=None):
    """cu_seqlens and seqlen_offsets (one of them given) against the other arguments, before
    x's shape is checked: a [tokens, heads, head_dim] x passed with cu_seqlens and the
    default layout hears about the layout, not about its rank."""
    if cu_seqlens is None:
        if seqlen_offsets is not None:
            raise ValueError("seqlen_offsets shifts the sequences of cu_seqlens: pass "
                             "cu_seqlens too, or add the offsets to positions yourself")
        return
    if layout != "thd":
        raise ValueError("cu_seqlens describes a packed batch: pass layout='thd' with x as "
                         f"[tokens, heads, head_dim], got layout={layout!r}")
    if positions is not None:
        raise ValueError("pass either positions or cu_seqlens, not both: cu_seqlens gives "
                         "every token its position (seqlen_offsets shifts each sequence)")
    if mrope_section is not None:
        raise ValueError("cu_seqlens is not supported with mrope_section: multimodal RoPE "
                         "takes its [3, batch, seq] positions as positions")


def _from_op_view(y: torch.Tensor, layout: str) -> torch.Tensor:
    return y.transpose(1, 2) if layout == "bhsd" else y


def apply_rope(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: Optional[torch.Tensor] = None,
    *,
    interleaved: bool = False,
    layout: str = "bshd",
    inplace: bool = False,
    mrope_section: Optional[Sequence[int]] = None,
    mrope_interleaved: bool = False,
    inv_freq: Optional[torch.Tensor] = None,
    attention_factor: float = 1.0,
    cu_seqlens: Optional[torch.Tensor] = None,
    seqlen_offsets: Union[torch.Tensor, int, None] = None,
) -> torch.Tensor:
    """Rotate x by the angles whose cosines and sines are `cos` and `sin`.

    Args:
        x: the vectors, ``[batch, seq, heads, head_dim]`` (layout "bshd"),
            ``[batch, heads, seq, head_dim]`` ("bhsd") or ``[tokens, heads, head_dim]``
            ("thd", packed sequences; `positions` required). Any strides: q or k
            sliced out of a fused qkv projection works without a copy.
        cos, sin: ``[P, r/2]`` indexed by `positions` (see :func:`cos_sin_table`), or
            one row per token, ``[batch, seq, r/2]`` / ``[seq, r/2]``. ``r = 2 * cos.size(-1)``
            dimensions are rotated; ``x[..., r:]`` passes through. float32, float64 or x's dtype.
        positions: int32/int64 ``[batch, seq]``, ``[seq]`` or ``[tokens]`` (thd). None means
            token s sits at position s.
        interleaved: False pairs ``(x[i], x[i + r/2])`` (Hugging Face Llama, GPT-NeoX);
            True pairs ``(x[2i], x[2i+1])`` (GPT-J, Meta's original Llama).
        layout: "bshd", "bhsd" or "thd".
        inplace: rotate x in place and return it (no output allocation; not differentiable).
        mrope_section: multimodal RoPE (Qwen2-VL): ``[t, h, w]`` pair counts adding up to r/2;
            positions are then ``[3, batch, seq]`` and cos/sin one ``[P, r/2]`` table.
        mrope_interleaved: Qwen3-VL's T H W T H W ... assignment instead of Qwen2-VL's chunks.
        inv_freq, attention_factor: with positions and a ``[P, r/2]`` table, a position in
            ``[P, 2**31)`` gets the row ``cos_sin_table(inv_freq, ..., attention_factor)``
            would hold, computed in the kernel (float64 inv_freq of :func:`rope_frequencies`),
            instead of an error (CPU) or NaN (CUDA).
        cu_seqlens: for a packed batch (``layout="thd"``), instead of positions: int32/int64
            ``[num_seqs + 1]``, the cumulative sequence lengths as flash-attn's varlen
            functions take them (0, then each sequence's end; equal neighbours are empty
            sequences; the last entry is the token count), on x's device. Each sequence counts
            its positions from 0. They are derived with torch ops on the device, without a host
            sync (and without a graph break under torch.compile). A cu_seqlens of the wrong
            shape, dtype or device raises ValueError. Its values are checked (ValueError) on
            the CPU outside torch.compile only: on CUDA reading them would need a device sync,
            and under torch.compile a graph break. Unchecked, a cu_seqlens that breaks the
            rules makes every position -1 and reads nothing outside cu_seqlens; the op treats
            -1 as any position outside the table (ValueError on the CPU, NaN on CUDA).
        seqlen_offsets: with cu_seqlens, the position of each sequence's first token (a prompt
            already in the KV cache): an int for all, or int32/int64 ``[num_seqs]``; token j
            of sequence i then sits at ``seqlen_offsets[i] + j``. flash-attn's name for it.

    Returns:
        The rotated tensor, x's dtype, shape and device. Math is float32 (float64 for float64 x).

    Example (a packed batch of three documents of 5, 0 and 7 tokens)::

        cu_seqlens = torch.tensor([0, 5, 5, 12], dtype=torch.int32)
        x = rope_ext.apply_rope(x, cos, sin, layout="thd", cu_seqlens=cu_seqlens)  # x: [12, h, d]
    """
    if cu_seqlens is not None or seqlen_offsets is not None:  # a packed batch's sequences
        _check_packed_args(layout, positions, cu_seqlens, seqlen_offsets, mrope_section)
    xv = _op_view(x, layout, "x")
    if cu_seqlens is not None:
        positions = positions_for(cu_seqlens, xv.shape[0], xv.device, seqlen_offsets, "x")
    _check_mrope_freq(mrope_section, inv_freq)
    if mrope_section is not None:
        cos, sin = mrope_cos_sin(cos, sin, positions, mrope_section, mrope_interleaved)
        positions = None
    cos, sin, positions, inv_freq = _distributed_args(xv, cos, sin, positions, inv_freq)
    if inplace:
        ops.apply_(xv, cos, sin, positions, interleaved, False,
                   *_past_table(inv_freq, attention_factor))
        return x
    return _from_op_view(ops.apply(xv, cos, sin, positions, interleaved, False,
                                   *_past_table(inv_freq, attention_factor)), layout)


def apply_rope_qk(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: Optional[torch.Tensor] = None,
    *,
    interleaved: bool = False,
    layout: str = "bshd",
    inplace: bool = False,
    mrope_section: Optional[Sequence[int]] = None,
    mrope_interleaved: bool = False,
    inv_freq: Optional[torch.Tensor] = None,
    attention_factor: float = 1.0,
    cu_seqlens: Optional[torch.Tensor] = None,
    seqlen_offsets: Union[torch.Tensor, int, None] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k together, in one kernel pass; see :func:`apply_rope` for the arguments.

    q and k share the token dimensions and the dtype; their head counts may differ
    (grouped-query attention) and so may their head_dim, as long as both hold r. A packed
    batch (``layout="thd"``) may pass ``cu_seqlens=`` (and ``seqlen_offsets=``) instead of
    positions, as for :func:`apply_rope`.
    """
    if (layout == "bshd" and mrope_section is None and not inplace and type(q) is torch.Tensor
            and type(k) is torch.Tensor and q.dim() == 4 and k.dim() == 4
            and cu_seqlens is None and seqlen_offsets is None):
        # The common call, straight to the op: per call, Python costs more than the kernel.
        if inv_freq is None:
            return ops.apply_qk(q, k, cos, sin, positions, interleaved)
        return ops.apply_qk(q, k, cos, sin, positions, interleaved, False, inv_freq,
                            attention_factor)
    if cu_seqlens is not None or seqlen_offsets is not None:  # a packed batch's sequences
        _check_packed_args(layout, positions, cu_seqlens, seqlen_offsets, mrope_section)
    qv = _op_view(q, layout, "q")
    kv = _op_view(k, layout, "k")
    if cu_seqlens is not None:
        positions = positions_for(cu_seqlens, qv.shape[0], qv.device, seqlen_offsets, "q")
    _check_mrope_freq(mrope_section, inv_freq)
    if mrope_section is not None:
        cos, sin = mrope_cos_sin(cos, sin, positions, mrope_section, mrope_interleaved)
        positions = None
    cos, sin, positions, inv_freq = _distributed_args(qv, cos, sin, positions, inv_freq)
    if inplace:
        ops.apply_qk_(qv, kv, cos, sin, positions, interleaved, False,
                      *_past_table(inv_freq, attention_factor))
        return q, k
    qo, ko = ops.apply_qk(qv, kv, cos, sin, positions, interleaved, False,
                          *_past_table(inv_freq, attention_factor))
    return _from_op_view(qo, layout), _from_op_view(ko, layout)


def rms_norm_rope_qk(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: Optional[torch.Tensor] = None,
    *,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    eps: float = 1e-6,
    across_heads: bool = False,
    weight_offset: float = 0.0,
    interleaved: bool = False,
    layout: str = "bshd",
    inplace: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    seqlen_offsets: Union[torch.Tensor, int, None] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """RMS-normalize q and k, scale them, and rotate them, in one pass (Qwen3, OLMo 2, Gemma 3).

    ``q_out = rope(rms_norm(q) * (q_weight + weight_offset))`` and the same for k, where
    ``rms_norm(x) = x / sqrt(mean(x**2) + eps)``: one read and one write of q and k instead
    of a norm pass and a rotation pass. All arithmetic is float32 (float64 for float64
    inputs) with one rounding at the store. Differentiable in q, k, q_weight and k_weight.

    Args:
        q, k, cos, sin, positions, interleaved, layout: as for :func:`apply_rope_qk`
            (q and k must have the same head_dim; head counts may differ).
        q_weight, k_weight: the norms' weights, float32 or q's dtype: ``[head_dim]`` (the
            mean runs over each head: Qwen3, Gemma 3), or ``[heads * head_dim]`` with
            ``across_heads=True`` (the mean runs over all heads of a token: OLMo 2).
        eps: added to the mean square (> 0); the model's ``rms_norm_eps``.
        across_heads: normalize over heads * head_dim of each token instead of each head.
        weight_offset: added to the weights: 1.0 for Gemma's ``x * (1 + weight)``.
        inplace: write the results into q and k and return them (inference: not differentiable).
        cu_seqlens, seqlen_offsets: a packed batch's sequences (``layout="thd"``) instead of
            positions, as for :func:`apply_rope`.

    Returns:
        ``(q_out, k_out)``, with q's and k's dtypes, shapes and devices.

    Example (Qwen3 attention, q/k/v projections viewed as ``[batch, seq, heads, head_dim]``)::

        q, k = rope_ext.rms_norm_rope_qk(q, k, cos, sin, positions,
                                         q_weight=attn.q_norm.weight, k_weight=attn.k_norm.weight,
                                         eps=config.rms_norm_eps)
    """
    if cu_seqlens is not None or seqlen_offsets is not None:  # a packed batch's sequences
        _check_packed_args(layout, positions, cu_seqlens, seqlen_offsets)
    qv = _op_view(q, layout, "q")
    kv = _op_view(k, layout, "k")
    if cu_seqlens is not None:
        positions = positions_for(cu_seqlens, qv.shape[0], qv.device, seqlen_offsets, "q")
    if _is_dtensor(qv):
        cos, sin, positions, _ = _distributed_args(qv, cos, sin, positions)
        q_weight, k_weight = _replicated(qv, q_weight, k_weight)
    if inplace:
        ops.rms_norm_rope_qk_(qv, kv, cos, sin, positions, q_weight, k_weight, eps, across_heads,
                              weight_offset, interleaved)
        return q, k
    qo, ko, _, _ = ops.rms_norm_rope_qk(qv, kv, cos, sin, positions, q_weight, k_weight, eps,
                                        across_heads, weight_offset, interleaved)
    return _from_op_view(qo, layout), _from_op_view(ko, layout)
