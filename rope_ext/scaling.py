"""Inverse frequencies and attention factor for each Hugging Face rope_type (SPEC.md section 3).

All arithmetic is float64; transformers computes the same formulas in float32, so
its vectors equal ours rounded to float32.
"""

from typing import Optional, Tuple

import torch


def default_inv_freq(rotary_dim: int, base: float) -> torch.Tensor:
    exponent = torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim
    return base ** (-exponent)


def _default(r: int, base: float, cfg: dict) -> Tuple[torch.Tensor, float]:
    return default_inv_freq(r, base), 1.0


def _linear(r: int, base: float, cfg: dict) -> Tuple[torch.Tensor, float]:
    factor = _number(cfg, "factor", "linear")
    return default_inv_freq(r, base) / factor, 1.0


_TYPES = {"default": _default, "linear": _linear}


def _number(cfg: dict, key: str, rope_type: str, default=None, positive=True) -> float:
    value = cfg.get(key, default)
    if value is None:
        raise ValueError(f"scaling[{key!r}] is required for rope_type {rope_type!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"scaling[{key!r}] must be a number, got {value!r}")
    if positive and not value > 0:
        raise ValueError(f"scaling[{key!r}] must be positive, got {value!r}")
    return float(value)


def rope_type_of(scaling: Optional[dict]) -> str:
    if scaling is None:
        return "default"
    if not isinstance(scaling, dict):
        raise TypeError(f"scaling must be a dict or None, got {type(scaling).__name__}")
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in _TYPES:
        raise ValueError(f"unknown rope_type {rope_type!r} in scaling; expected one of "
                         f"{sorted(_TYPES)}")
    return rope_type


def frequencies(r: int, base: float, scaling: Optional[dict]) -> Tuple[torch.Tensor, float]:
    rope_type = rope_type_of(scaling)
    return _TYPES[rope_type](r, base, scaling or {})
