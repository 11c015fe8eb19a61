"""Inverse frequencies and attention factor per Hugging Face rope_type (docs/math.md section 9).

Each rope_type is one function ``f(r, base, cfg) -> (inv_freq, attention_factor)`` in the
registry ``_TYPES``; ``cfg`` is the scaling dict with transformers' key names and defaults.
All arithmetic is float64; transformers computes the same formulas in float32, so its
vectors equal ours rounded to float32, up to the few ulps its own float32 steps lose.

For "proportional" the rotary dim is the whole head: its table has head_dim / 2 pairs, of
which only the first partial_rotary_factor rotate (the others have frequency 0).

Two types change with the sequence length at run time. For those, the static table is the
one transformers builds at init (dynamic: the default frequencies; longrope: the short
factors), and :func:`dynamic_inv_freq` / :func:`longrope_inv_freq` give the others.
"""

import math
from typing import Optional, Tuple

import torch


def default_inv_freq(rotary_dim: int, base: float) -> torch.Tensor:
    """``theta_i = base ** (-2i / rotary_dim)`` for i < rotary_dim / 2, float64."""
    exponent = torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim
    return base ** (-exponent)


# ---------------------------------------------------------------------------------------------
# Reading the scaling dict
# ---------------------------------------------------------------------------------------------


def _number(cfg: dict, key: str, rope_type: str, default=None, positive=True) -> float:
    """cfg[key] as a float; a missing (or None) key takes `default`, and is an error without one."""
    value = cfg.get(key)
    if value is None:
        value = default
    if value is None:
        raise ValueError(f"scaling[{key!r}] is required for rope_type {rope_type!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"scaling[{key!r}] must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"scaling[{key!r}] must be a finite number, got {value!r}")
    if positive and not value > 0:
        raise ValueError(f"scaling[{key!r}] must be positive, got {value!r}")
    return float(value)


def _optional(cfg: dict, key: str, rope_type: str, positive=True) -> Optional[float]:
    """cfg[key] checked like :func:`_number`, or None when absent (transformers' ``.get``)."""
    return None if cfg.get(key) is None else _number(cfg, key, rope_type, positive=positive)


def _factor_or_ratio(cfg: dict, rope_type: str) -> Optional[float]:
    """``factor``, or when absent ``max_position_embeddings / original_max_position_embeddings``.

    transformers falls back to the ratio of the config's two lengths; our dict carries no
    config, so the longer length may be given as the extra key "max_position_embeddings".
    None when neither is there.
    """
    if cfg.get("factor") is None and cfg.get("max_position_embeddings") is not None:
        return (_number(cfg, "max_position_embeddings", rope_type)
                / _number(cfg, "original_max_position_embeddings", rope_type))
    return _optional(cfg, "factor", rope_type)


def _factor_list(cfg: dict, key: str, r: int) -> torch.Tensor:
    """A longrope per-pair factor list (r/2 positive finite numbers) as a float64 tensor."""
    values = cfg.get(key)
    if values is None:
        raise ValueError(f"scaling[{key!r}] is required for rope_type 'longrope'")
    if not isinstance(values, (list, tuple)) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise ValueError(f"scaling[{key!r}] must be a list of numbers, got {values!r}")
    if len(values) != r // 2:
        raise ValueError(f"scaling[{key!r}] must hold rotary_dim / 2 = {r // 2} numbers (one per "
                         f"rotated pair), got {len(values)}")
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"scaling[{key!r}] must hold positive finite numbers, got {values!r}")
    return torch.tensor(values, dtype=torch.float64)


def _mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction ``0.1 * mscale * ln(factor) + 1`` (1 when not stretching)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


# ---------------------------------------------------------------------------------------------
# One function per rope_type: f(r, base, cfg) -> (inv_freq float64 [r/2], attention_factor)
# ---------------------------------------------------------------------------------------------


def _default(r: int, base: float, cfg: dict) -> Tuple[torch.Tensor, float]:
    return default_inv_freq(r, base), 1.0


def _linear(r: int, base: float, cfg: dict) -> Tuple[torch.Tensor, float]:
    """Position interpolation: dividing every frequency by factor divides every position by it."""
    factor = _number(cfg, "factor", "linear")
    return default_inv_freq(r, base) / factor, 1.0


def _dynamic(r: int, base: float, cfg: dict) -> Tuple[torch.Tensor, float]:
    """Dynamic NTK at init: the sequence length is max_position_embeddings, where base' = base.

    Longer sequences take :func:`dynamic_inv_freq`.
    """
    _number(cfg, "factor", "dynamic")
    if r < 4:
        # base' raises to the power r / (r - 2): transformers divides by zero here too.
        raise ValueError(f"rope_type 'dynamic' needs rotary_dim >= 4, got {r}")
    return default_inv_freq(r, base), 1.0


def _yarn(r: int, base: float, cfg: dict) -> Tuple[torch.Tensor, float]:
    """YaRN (arXiv 2309.00071): extrapolate fast pairs, interpolate slow ones, ramp between."""
    factor = _factor_or_ratio(cfg, "yarn")
    if factor is None:
        raise ValueError("scaling['factor'] is required for rope_type 'yarn' (or give "
                         "scaling['max_position_embeddings'] to use its ratio to "
                         "scaling['original_max_position_embeddings'])")
    orig = _number(cfg, "original_max_position_embeddings", "yarn")

    attention_factor = _optional(cfg, "attention_factor", "yarn")
    if attention_factor is None:
        mscale = _optional(cfg, "mscale", "yarn", positive=False)
        mscale_all_dim = _optional(cfg, "mscale_all_dim", "yarn", positive=False)
        # transformers tests truthiness: a lone mscale (or a zero) is ignored.
        if mscale and mscale_all_dim:
            attention_factor = _mscale(factor, mscale) / _mscale(factor, mscale_all_dim)
        else:
            attention_factor = _mscale(factor)
        if not (math.isfinite(attention_factor) and attention_factor > 0):
            raise ValueError(f"scaling['mscale'] and scaling['mscale_all_dim'] give the attention "
                             f"factor {attention_factor!r}; it must be positive and finite")

    # "value or default", as transformers reads them: 0 also means the default.
    beta_fast = _number(cfg, "beta_fast", "yarn") if cfg.get("beta_fast") else 32.0
    beta_slow = _number(cfg, "beta_slow", "yarn") if cfg.get("beta_slow") else 1.0
    if beta_fast < beta_slow:
        raise ValueError(f"scaling['beta_fast'] ({beta_fast}) must not be below "
                         f"scaling['beta_slow'] ({beta_slow})")
    truncate = cfg.get("truncate", True)
    if not isinstance(truncate, bool):
        raise ValueError(f"scaling['truncate'] must be a bool, got {truncate!r}")

    def correction_dim(turns: float) -> float:
        # The (fractional) pair index whose wavelength is orig / turns.
        return r * math.log(orig / (turns * 2 * math.pi)) / (2 * math.log(base))

    lo, hi = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, r - 1)
    if lo == hi:
        hi += 0.001  # as transformers: keeps the ramp's denominator non-zero
    pair = torch.arange(r // 2, dtype=torch.float64)
    ramp = ((pair - lo) / (hi - lo)).clamp(0, 1)  # 0: keep theta_i, 1: theta_i / factor
    theta = default_inv_freq(r, base)
    return theta * (1 - ramp) + (theta / factor) * ramp, float(attention_factor)


def _longrope_attention_factor(cfg: dict) -> float:
    """``attention_factor``, else ``sqrt(1 + ln f / ln L0)`` (1 for f <= 1); f as for yarn."""
    factor = _factor_or_ratio(cfg, "longrope")
    orig = _number(cfg, "original_max_position_embeddings", "longrope")
    attention_factor = _optional(cfg, "attention_factor", "longrope")
    if attention_factor is not None:
        return attention_factor
    # transformers always has config.max_position_embeddings for the ratio; a dict with
    # neither it nor factor says nothing about extension: f = 1.
    if factor is None or factor <= 1:
        return 1.0
    if orig <= 1:
        raise ValueError(f"scaling['original_max_position_embeddings'] must exceed 1 to derive "
                         f"the attention factor from ln(original_max_position_embeddings), got "
                         f"{orig!r}")
    return math.sqrt(1 + math.log(factor) / math.log(orig))


def _longrope_freq(r: int, base: float, cfg: dict, long: bool) -> torch.Tensor:
    """``theta_i / ext_i`` with ext the long or the short per-pair factor list."""
    short = _factor_list(cfg, "short_factor", r)
    long_ = _factor_list(cfg, "long_factor", r)
    _number(cfg, "original_max_position_embeddings", "longrope")
    return default_inv_freq(r, base) / (long_ if long else short)


def _longrope(r: int, base: float, cfg: dict) -> Tuple[torch.Tensor, float]:
    """LongRoPE (Phi-3): per-pair factors; the static table is the short one (sequences up to
    original_max_position_embeddings), :func:`longrope_inv_freq` gives the long one.

    The attention factor is fixed at init from factor and applies to both tables.
    """
    inv_freq = _longrope_freq(r, base, cfg, long=False)
    return inv_freq, _longrope_attention_factor(cfg)


def _llama3(r: int, base: float, cfg: dict) -> Tuple[torch.Tensor, float]:
    """Llama 3.1: keep short wavelengths, divide long ones by factor, blend in between."""
    factor = _number(cfg, "factor", "llama3")
    low = _number(cfg, "low_freq_factor", "llama3")
    high = _number(cfg, "high_freq_factor", "llama3")
    orig = _number(cfg, "original_max_position_embeddings", "llama3")
    if low >= high:
        # Equal factors make the blend 0/0; transformers only warns.
        raise ValueError(f"scaling['low_freq_factor'] ({low}) must be below "
                         f"scaling['high_freq_factor'] ({high})")
    theta = default_inv_freq(r, base)
    wavelen = 2 * math.pi / theta
    smooth = (orig / wavelen - low) / (high - low)  # 0 at wavelen = orig/low, 1 at orig/high
    blended = (1 - smooth) * theta / factor + smooth * theta
    out = torch.where(wavelen > orig / low, theta / factor, blended)
    out = torch.where(wavelen < orig / high, theta, out)
    return out, 1.0


def _proportional(r: int, base: float, cfg: dict) -> Tuple[torch.Tensor, float]:
    """Proportional RoPE (Gemma 4's full-attention layers): r is the whole head here.

    The first ``n = int(partial_rotary_factor * r // 2)`` pairs rotate at
    ``base ** (-2i / r)`` (exponents over the whole head, not over 2n), the other pairs have
    frequency 0 (cos 1, sin 0: they pass through), and all are divided by ``factor``.
    """
    fraction = _number(cfg, "partial_rotary_factor", "proportional", default=1.0, positive=False)
    if not 0 <= fraction <= 1:
        raise ValueError(f"scaling['partial_rotary_factor'] must lie in [0, 1] for rope_type "
                         f"'proportional' (the fraction of the head's pairs that rotate), got "
                         f"{fraction!r}")
    factor = _number(cfg, "factor", "proportional", default=1.0)
    # transformers' own rounding (floor of the float product), so that a fraction that does
    # not split the head evenly rotates the same number of pairs.
    rotated = int(fraction * r // 2)
    inv_freq = torch.zeros(r // 2, dtype=torch.float64)
    exponent = torch.arange(0, 2 * rotated, 2, dtype=torch.float64) / r
    inv_freq[:rotated] = base ** (-exponent)
    return inv_freq / factor, 1.0


_TYPES = {"default": _default, "linear": _linear, "dynamic": _dynamic, "yarn": _yarn,
          "longrope": _longrope, "llama3": _llama3, "proportional": _proportional}


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------


def rope_type_of(scaling: Optional[dict]) -> str:
    """The dict's rope_type ("type" is the legacy key), "default" for None."""
    if scaling is None:
        return "default"
    if not isinstance(scaling, dict):
        raise TypeError(f"scaling must be a dict or None, got {type(scaling).__name__}")
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if not isinstance(rope_type, str) or rope_type not in _TYPES:
        raise ValueError(f"unknown rope_type {rope_type!r} in scaling; expected one of "
                         f"{sorted(_TYPES)}")
    return rope_type


def frequencies(r: int, base: float, scaling: Optional[dict]) -> Tuple[torch.Tensor, float]:
    """``(inv_freq, attention_factor)`` for a checked rotary dim r and base (see tables.py)."""
    rope_type = rope_type_of(scaling)
    return _TYPES[rope_type](r, base, scaling or {})


def check_dim_base(rotary_dim, base) -> None:
    if isinstance(rotary_dim, bool) or not isinstance(rotary_dim, int):
        raise TypeError(f"rotary_dim must be an int, got {type(rotary_dim).__name__}")
    if rotary_dim <= 0 or rotary_dim % 2:
        raise ValueError(f"rotary_dim must be a positive even number, got {rotary_dim}")
    if isinstance(base, bool) or not isinstance(base, (int, float)):
        raise TypeError(f"base must be a number, got {type(base).__name__}")
    if not math.isfinite(base) or base <= 1.0:
        raise ValueError(f"base must be a finite number greater than 1, got {base!r}")


def _positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def dynamic_inv_freq(rotary_dim: int, base: float, factor: float, max_position_embeddings: int,
                     seq_len: int) -> torch.Tensor:
    """Dynamic NTK frequencies for a sequence of `seq_len` positions (float64 ``[r/2]``).

    ``base' = base * (factor * s / L - (factor - 1)) ** (r / (r - 2))`` with
    ``L = max_position_embeddings`` and ``s = max(seq_len, L)``, so sequences up to L get
    the default frequencies. transformers passes ``max(position_ids) + 1`` as seq_len.
    """
    check_dim_base(rotary_dim, base)
    if rotary_dim < 4:
        raise ValueError(f"rotary_dim must be at least 4 for dynamic NTK (base' is raised to "
                         f"r / (r - 2)), got {rotary_dim}")
    factor = _positive("factor", factor)
    length = _positive("max_position_embeddings", max_position_embeddings)
    if isinstance(seq_len, bool) or not isinstance(seq_len, (int, float)):
        raise TypeError(f"seq_len must be a number, got {type(seq_len).__name__}")
    if not (math.isfinite(seq_len) and seq_len >= 0):
        raise ValueError(f"seq_len must be a non-negative finite number, got {seq_len!r}")
    s = max(float(seq_len), length)
    r = rotary_dim
    new_base = base * (factor * s / length - (factor - 1)) ** (r / (r - 2))
    return default_inv_freq(r, new_base)


def longrope_inv_freq(rotary_dim: int, base: float, cfg: dict, long: bool) -> torch.Tensor:
    """LongRoPE frequencies from the long factors (`long`) or the short ones (float64 ``[r/2]``).

    transformers switches to the long table when ``max(position_ids) + 1`` exceeds
    ``cfg["original_max_position_embeddings"]``. The attention factor does not change:
    take it from :func:`rope_ext.rope_frequencies`.
    """
    check_dim_base(rotary_dim, base)
    if rope_type_of(cfg) != "longrope":
        raise ValueError(f"scaling must have rope_type 'longrope', got {rope_type_of(cfg)!r}")
    return _longrope_freq(rotary_dim, float(base), cfg, bool(long))
