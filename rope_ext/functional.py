"""The functional API: rotate q and/or k given a cos/sin table."""

from typing import Optional, Sequence, Tuple

import torch

from rope_ext._ops import ops
from rope_ext.mrope import mrope_cos_sin

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

    Returns:
        The rotated tensor, x's dtype, shape and device. Math is float32 (float64 for float64 x).
    """
    xv = _op_view(x, layout, "x")
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
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k together, in one kernel pass; see :func:`apply_rope` for the arguments.

    q and k share the token dimensions and the dtype; their head counts may differ
    (grouped-query attention) and so may their head_dim, as long as both hold r.
    """
    if (layout == "bshd" and mrope_section is None and not inplace and type(q) is torch.Tensor
            and type(k) is torch.Tensor and q.dim() == 4 and k.dim() == 4):
        # The common call, straight to the op: per call, Python costs more than the kernel.
        if inv_freq is None:
            return ops.apply_qk(q, k, cos, sin, positions, interleaved)
        return ops.apply_qk(q, k, cos, sin, positions, interleaved, False, inv_freq,
                            attention_factor)
    qv = _op_view(q, layout, "q")
    kv = _op_view(k, layout, "k")
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

    Returns:
        ``(q_out, k_out)``, with q's and k's dtypes, shapes and devices.

    Example (Qwen3 attention, q/k/v projections viewed as ``[batch, seq, heads, head_dim]``)::

        q, k = rope_ext.rms_norm_rope_qk(q, k, cos, sin, positions,
                                         q_weight=attn.q_norm.weight, k_weight=attn.k_norm.weight,
                                         eps=config.rms_norm_eps)
    """
    qv = _op_view(q, layout, "q")
    kv = _op_view(k, layout, "k")
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
