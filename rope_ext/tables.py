"""Inverse frequencies and cos/sin tables, computed in float64 and rounded once."""

import math
from typing import Optional, Tuple

import torch

from rope_ext import scaling as _scaling


def rope_frequencies(rotary_dim: int, base: float = 10000.0,
                     scaling: Optional[dict] = None) -> Tuple[torch.Tensor, float]:
    """Inverse frequencies ``theta_i = base ** (-2i / rotary_dim)`` and the attention factor.

    Args:
        rotary_dim: r, the number of rotated dimensions per head (even).
        base: rope_theta.
        scaling: None or a Hugging Face style dict, ``{"rope_type": ..., ...}`` (key
            "type" is accepted for "rope_type"), with transformers' key names and defaults.

    Returns:
        ``(inv_freq, attention_factor)``: inv_freq is a float64 CPU tensor ``[r/2]``
        (transformers' float32 vector is this one rounded); attention_factor is a float
        that :func:`cos_sin_table` folds into the table.
    """
    _scaling.check_dim_base(rotary_dim, base)
    return _scaling.frequencies(rotary_dim, float(base), scaling)


def cos_sin_table(inv_freq: torch.Tensor, max_positions: int, attention_factor: float = 1.0, *,
                  dtype: torch.dtype = torch.float32,
                  device: Optional[torch.device] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The table ``cos[m, i] = A cos(m theta_i)``, ``sin[m, i] = A sin(m theta_i)`` for m < max_positions.

    Angles and their cos/sin are computed in float64 and rounded once to `dtype`, so
    the table is exact to float32 at any position below 2**31 (transformers forms the
    angle in float32, off by up to 0.05 rad at position 1e6).

    Returns:
        ``(cos, sin)``, each ``[max_positions, r/2]``, contiguous, on `device`
        (default: inv_freq's device).
    """
    if not isinstance(inv_freq, torch.Tensor) or not inv_freq.is_floating_point():
        raise TypeError(f"inv_freq must be a floating-point tensor, got "
                        f"{inv_freq.dtype if isinstance(inv_freq, torch.Tensor) else inv_freq!r}")
    if inv_freq.dim() != 1:
        raise ValueError(f"inv_freq must be 1-D [rotary_dim/2], got shape {tuple(inv_freq.shape)}")
    if isinstance(max_positions, bool) or not isinstance(max_positions, int):
        raise TypeError(f"max_positions must be an int, got {type(max_positions).__name__}")
    if not 0 <= max_positions <= 2**31:
        raise ValueError(f"max_positions must lie in [0, 2**31], got {max_positions}")
    if isinstance(attention_factor, bool) or not isinstance(attention_factor, (int, float)):
        raise TypeError(f"attention_factor must be a number, got {type(attention_factor).__name__}")
    if not math.isfinite(attention_factor) or attention_factor <= 0:
        raise ValueError(f"attention_factor must be a positive finite number, got "
                         f"{attention_factor!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    device = inv_freq.device if device is None else torch.device(device)
    inv = inv_freq.to(device=device, dtype=torch.float64)
    pos = torch.arange(max_positions, device=device, dtype=torch.float64)
    angle = torch.outer(pos, inv)
    cos = torch.cos(angle)
    sin = torch.sin(angle)
    if attention_factor != 1.0:
        cos.mul_(attention_factor)
        sin.mul_(attention_factor)
    return cos.to(dtype), sin.to(dtype)
