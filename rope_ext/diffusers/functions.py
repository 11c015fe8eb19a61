"""diffusers' RoPE functions on rope_ext's op: same signatures, same meanings.

Each function here stands in for one function of diffusers 0.42 (read in 0.42.1) and is what
:func:`rope_ext.diffusers.patch` installs in its place. Each turns diffusers' tables into the
op's per-token, per-pair tables as views (no copy) and rotates with one op call:

- diffusers' real tables are ``[S, D]`` with each pair's value written twice: in place
  (``[c0, c0, c1, c1, ...]``, ``repeat_interleave_real=True``) for the interleaved pairing,
  as halves (``[c0 .. c_{D/2-1}]`` twice) for the half-split one. The op's table is
  ``cos[..., 0::2]`` or ``cos[..., :D/2]`` of them (math.md section 16.1). The other copy is
  not read: a table whose two copies differ (which no diffusers model builds) gives another
  answer, as in rope_ext.hf.
- complex tables (``torch.polar``) are ``(freqs.real, freqs.imag)``, read through
  ``torch.view_as_real`` without a copy.

Numerics: diffusers computes ``x.float() * cos + x_rot.float() * sin`` (float32, or float64
when the table is float64) and rounds to x's dtype; the op computes in float32 (float64 for
float64 x) and rounds once. Within float32 the two differ by a few units of 2**-24 of the
pair's norm; for bf16/fp16 x both round once from float32, so they agree within one unit of
x's rounding (math.md section 16.3, "Rotations").

An input the op cannot take (a table that needs a gradient, shapes that only diffusers'
broadcasting gives a meaning to, a complex x, ...) runs diffusers' own function instead:
each fallback below says why. Nothing here imports diffusers until such a fallback needs
diffusers' function.
"""

import importlib
from typing import Dict, Tuple

import torch

from rope_ext.functional import apply_rope, apply_rope_qk

__all__ = ["apply_rotary_emb", "apply_rotary_emb_qwen", "ltx_apply_rotary_emb",
           "hidream_apply_rope", "wan_apply_rotary_emb"]

_EMBEDDINGS = "diffusers.models.embeddings"
_LTX = "diffusers.models.transformers.transformer_ltx"
_QWEN = "diffusers.models.transformers.transformer_qwenimage"
_HIDREAM = "diffusers.models.transformers.transformer_hidream_image"

# "module.attr" -> the diffusers function patch() replaced (the fallbacks call it)
ORIGINALS: Dict[str, object] = {}


def _original(module: str, attr: str, ours):
    """diffusers' own function: the one patch() replaced, else the module's attribute."""
    fn = ORIGINALS.get(f"{module}.{attr}")
    if fn is None:
        fn = getattr(importlib.import_module(module), attr)
        if fn is ours:  # patched by someone else's copy of our state: cannot happen normally
            raise RuntimeError(f"rope_ext.diffusers: {module}.{attr} is patched but its "
                               f"original was not kept")
    return fn


# ---------------------------------------------------------------------------------------------
# Checks shared by the functions (all on host metadata: no device sync)


def _is_real_float(t) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point()


def _needs_table_grad(*tables) -> bool:
    # The op's tables get no gradient; diffusers' arithmetic would give them one.
    return torch.is_grad_enabled() and any(t.requires_grad for t in tables)


def _table_dtype(c: torch.Tensor, s: torch.Tensor, x: torch.Tensor):
    """The op reads float32, float64 or x's dtype tables; diffusers promotes any other table
    dtype to float32 against x.float(), which widening the table does exactly."""
    if c.dtype in (torch.float32, torch.float64) or c.dtype == x.dtype:
        return c, s
    return c.float(), s.float()


def _on_device(c: torch.Tensor, s: torch.Tensor, x: torch.Tensor):
    # diffusers moves the table to x's device (cos.to(x.device)); so do we.
    if c.device != x.device:
        return c.to(x.device), s.to(x.device)
    return c, s


def _rows(c: torch.Tensor, s: torch.Tensor, seq):
    """One row broadcast over all tokens (diffusers' broadcasting) as a stride-0 view."""
    if c.shape[-2] != seq:
        shape = (*c.shape[:-2], seq, c.shape[-1])
        return c.expand(shape), s.expand(shape)
    return c, s


def _pair_tables(cos: torch.Tensor, sin: torch.Tensor, interleaved: bool):
    """The op's per-pair views of diffusers' doubled real tables ``[..., D]``."""
    if interleaved:
        return cos[..., 0::2], sin[..., 0::2]
    half = cos.shape[-1] // 2
    return cos[..., :half], sin[..., :half]


def _complex_tables(freqs: torch.Tensor):
    """(real, imag) of a complex table as strided views (no copy), or None."""
    if not isinstance(freqs, torch.Tensor) or not freqs.is_complex() or freqs.is_conj():
        return None  # a lazily conjugated tensor has no real view
    ri = torch.view_as_real(freqs)
    return ri[..., 0], ri[..., 1]


def _real_pair(freqs_cis):
    if not isinstance(freqs_cis, (tuple, list)) or len(freqs_cis) != 2:
        return None
    cos, sin = freqs_cis
    if not (_is_real_float(cos) and _is_real_float(sin)) or cos.shape != sin.shape \
            or cos.dtype != sin.dtype:
        return None
    return cos, sin


def _x4(x) -> bool:
    return (isinstance(x, torch.Tensor) and x.is_floating_point() and x.dim() == 4
            and x.shape[-1] % 2 == 0)


# ---------------------------------------------------------------------------------------------
# diffusers.models.embeddings.apply_rotary_emb


def apply_rotary_emb(x: torch.Tensor, freqs_cis, use_real: bool = True,
                     use_real_unbind_dim: int = -1, sequence_dim: int = 2) -> torch.Tensor:
    """Rotate x as ``diffusers.models.embeddings.apply_rotary_emb`` does, in one op call.

    A drop-in for that function (diffusers 0.42): same signature, same values within the
    rounding of x's dtype (module docstring). Flux, Flux 2, HunyuanVideo, CogVideoX, Cosmos,
    CogView4, Lumina 2 and others call it.

    Args:
        x: queries or keys, ``[B, H, S, D]`` (``sequence_dim=2``) or ``[B, S, H, D]``
            (``sequence_dim=1``); any strides (a slice of the text tokens or of a fused
            projection is read in place).
        freqs_cis: with ``use_real=True`` a pair ``(cos, sin)``, each ``[S, D]`` (or
            ``[1, D]``, one row for every token) as diffusers builds them, each pair's value
            written twice; with ``use_real=False`` a complex ``[B or 1, S, D/2]`` table (x then
            ``[B, S, H, D]``; ``sequence_dim`` is not read, as in diffusers).
        use_real: real tables (True) or complex ones (False).
        use_real_unbind_dim: -1 pairs ``(x[2i], x[2i+1])`` (the default: Flux, HunyuanVideo,
            CogVideoX), -2 pairs ``(x[i], x[i + D/2])`` (Cosmos, CogView4, Stable Audio).
            The complex form pairs adjacent elements.
        sequence_dim: 1 or 2, the axis of x that holds the tokens.

    Returns:
        The rotated x, a new tensor of x's dtype and shape; differentiable in x.

    Anything the op cannot take runs diffusers' own function: a table that requires grad (the
    op gives tables none), tables of another rank or size than ``[S, D]`` (diffusers' own
    broadcasting decides what those mean), a complex or odd-sized x, and invalid
    ``sequence_dim`` / ``use_real_unbind_dim`` (diffusers raises its ValueError).
    """
    if use_real:
        pair = _real_pair(freqs_cis)
        if (pair is not None and _x4(x) and sequence_dim in (1, 2)
                and use_real_unbind_dim in (-1, -2)):
            cos, sin = pair
            seq = x.shape[sequence_dim]
            if (cos.dim() == 2 and cos.shape[-1] == x.shape[-1]
                    and (cos.shape[0] == seq or cos.shape[0] == 1)
                    and not _needs_table_grad(cos, sin)):
                interleaved = use_real_unbind_dim == -1
                c, s = _pair_tables(cos, sin, interleaved)
                c, s = _rows(*_on_device(c, s, x), seq)
                c, s = _table_dtype(c, s, x)
                return apply_rope(x, c, s, interleaved=interleaved,
                                  layout="bshd" if sequence_dim == 1 else "bhsd")
    elif _x4(x):
        tables = _complex_tables(freqs_cis)
        if tables is not None and _complex_fits(x, freqs_cis, 3):
            c, s = _rows(*_on_device(*tables, x), x.shape[1])
            if not _needs_table_grad(freqs_cis):
                return apply_rope(x, *_table_dtype(c, s, x), interleaved=True)
    return _original(_EMBEDDINGS, "apply_rotary_emb", apply_rotary_emb)(
        x, freqs_cis, use_real, use_real_unbind_dim, sequence_dim)


def _complex_fits(x: torch.Tensor, freqs: torch.Tensor, rank: int) -> bool:
    """Whether a complex table gives each token of x ``[B, S, H, D]`` one row under diffusers'
    broadcasting: ``[B or 1, S or 1, D/2]`` for embeddings' ``freqs.unsqueeze(2)`` (rank 3),
    ``[S or 1, D/2]`` for Qwen-Image's ``freqs.unsqueeze(1)`` (rank 2). Other ranks line the
    table up against other axes of x; diffusers' own broadcasting decides what they mean."""
    if freqs.dim() != rank or freqs.shape[-1] * 2 != x.shape[-1]:
        return False
    seq = x.shape[1]
    if not (freqs.shape[-2] == seq or freqs.shape[-2] == 1):
        return False
    return rank == 2 or freqs.shape[0] == x.shape[0] or freqs.shape[0] == 1


# ---------------------------------------------------------------------------------------------
# Qwen-Image: transformer_qwenimage.apply_rotary_emb_qwen


def apply_rotary_emb_qwen(x: torch.Tensor, freqs_cis, use_real: bool = True,
                          use_real_unbind_dim: int = -1) -> torch.Tensor:
    """Rotate x as Qwen-Image's ``apply_rotary_emb_qwen`` does (diffusers 0.42), in one op call.

    Qwen-Image's copy of :func:`apply_rotary_emb` differs in how the tables broadcast: the
    real form puts the tokens on axis 2 (x ``[B, H, S, D]``, tables ``[S, D]``), the complex
    form (what Qwen-Image calls) on axis 1 (x ``[B, S, H, D]``, a complex ``[S, D/2]`` table,
    ``freqs.unsqueeze(1)``). Same values within the rounding of x's dtype; differentiable in
    x. Anything else (a complex table with a batch axis, which Qwen's broadcasting would
    line up against the heads, tables that need a gradient, ...) runs Qwen-Image's function.
    """
    if use_real:
        return _qwen_real(x, freqs_cis, use_real_unbind_dim)
    if _x4(x):
        tables = _complex_tables(freqs_cis)
        if (tables is not None and _complex_fits(x, freqs_cis, 2)
                and not _needs_table_grad(freqs_cis)):
            c, s = _rows(*_on_device(*tables, x), x.shape[1])
            return apply_rope(x, *_table_dtype(c, s, x), interleaved=True)
    return _original(_QWEN, "apply_rotary_emb_qwen", apply_rotary_emb_qwen)(
        x, freqs_cis, use_real, use_real_unbind_dim)


def _qwen_real(x, freqs_cis, use_real_unbind_dim):
    pair = _real_pair(freqs_cis)
    if pair is not None and _x4(x) and use_real_unbind_dim in (-1, -2):
        cos, sin = pair
        seq = x.shape[2]
        if (cos.dim() == 2 and cos.shape[-1] == x.shape[-1]
                and (cos.shape[0] == seq or cos.shape[0] == 1)
                and not _needs_table_grad(cos, sin)):
            interleaved = use_real_unbind_dim == -1
            c, s = _rows(*_on_device(*_pair_tables(cos, sin, interleaved), x), seq)
            return apply_rope(x, *_table_dtype(c, s, x), interleaved=interleaved, layout="bhsd")
    return _original(_QWEN, "apply_rotary_emb_qwen", apply_rotary_emb_qwen)(
        x, freqs_cis, True, use_real_unbind_dim)


# ---------------------------------------------------------------------------------------------
# LTX-Video: transformer_ltx.apply_rotary_emb


def ltx_apply_rotary_emb(x: torch.Tensor, freqs) -> torch.Tensor:
    """Rotate x as LTX-Video's ``apply_rotary_emb`` (diffusers 0.42,
    ``transformer_ltx.apply_rotary_emb``) does, in one op call.

    LTX rotates the whole projection before it is split into heads: x is ``[B, S, C]``
    (C = heads * head_dim), ``freqs = (cos, sin)`` each ``[B or 1, S, C]`` (or ``[S, C]``),
    pairs ``(x[2i], x[2i+1])``. The op takes x as one head of C
    (``x.unflatten(-1, (1, C))``, a view) with the tables' ``[..., 0::2]`` views. Same values
    within the rounding of x's dtype; differentiable in x. Other shapes, and tables that
    need a gradient, run LTX's own function.
    """
    pair = _real_pair(freqs)
    if pair is not None and isinstance(x, torch.Tensor) and x.is_floating_point() \
            and x.dim() == 3 and x.shape[-1] % 2 == 0:
        cos, sin = pair
        seq, width = x.shape[1], x.shape[2]
        fits = cos.shape[-1] == width and cos.shape[-2] == seq and (
            cos.dim() == 2 or (cos.dim() == 3 and (cos.shape[0] == x.shape[0]
                                                   or cos.shape[0] == 1)))
        if fits and not _needs_table_grad(cos, sin):
            c, s = _on_device(cos[..., 0::2], sin[..., 0::2], x)
            out = apply_rope(x.unflatten(-1, (1, width)), *_table_dtype(c, s, x),
                             interleaved=True)
            return out.flatten(-2)
    return _original(_LTX, "apply_rotary_emb", ltx_apply_rotary_emb)(x, freqs)


# ---------------------------------------------------------------------------------------------
# HiDream-I1: transformer_hidream_image.apply_rope


def hidream_apply_rope(xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k as HiDream-I1's ``apply_rope`` (diffusers 0.42) does, in one op call.

    HiDream's table is a 2 x 2 rotation matrix per pair, ``freqs_cis [B, S, 1, D/2, 2, 2] =
    [[cos, -sin], [sin, cos]]`` (its ``rope()``), applied to adjacent pairs of q and k
    ``[B, S, H, D]``. The op reads ``cos = freqs_cis[..., 0, 0]`` and
    ``sin = freqs_cis[..., 1, 0]`` (strided views); the other two entries are not read, so a
    matrix that is not a rotation (which HiDream never builds) gives another answer. Same
    values within the rounding of q's dtype; differentiable in q and k. Other shapes, q and
    k of different dtypes, and tables that need a gradient run HiDream's function.
    """
    f = freqs_cis
    if (_x4(xq) and _x4(xk) and xq.dtype == xk.dtype and _is_real_float(f) and f.dim() == 6
            and f.shape[2] == 1 and f.shape[-1] == 2 and f.shape[-2] == 2
            and 2 * f.shape[-3] == xq.shape[-1] and xk.shape[-1] == xq.shape[-1]
            and xk.shape[0] == xq.shape[0] and xk.shape[1] == xq.shape[1]
            and f.shape[1] == xq.shape[1] and (f.shape[0] == xq.shape[0] or f.shape[0] == 1)
            and not _needs_table_grad(f)):
        c, s = _on_device(f[:, :, 0, :, 0, 0], f[:, :, 0, :, 1, 0], xq)
        return apply_rope_qk(xq, xk, *_table_dtype(c, s, xq), interleaved=True)
    return _original(_HIDREAM, "apply_rope", hidream_apply_rope)(xq, xk, freqs_cis)


# ---------------------------------------------------------------------------------------------
# Wan (and its copies): the function nested in WanAttnProcessor.__call__


def _wan_eager(hidden_states, freqs_cos, freqs_sin):
    # Wan's nested function as diffusers 0.42 writes it (WAN_NESTED_FORM below): the inputs
    # the op cannot take run this.
    x1, x2 = hidden_states.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(hidden_states)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(hidden_states)


def _wan_tables(x, freqs_cos, freqs_sin):
    """The op's tables for Wan's ``[B or 1, S, 1, D]`` (or ``[S, D]``) tables, or None."""
    if not (_x4(x) and _is_real_float(freqs_cos) and _is_real_float(freqs_sin)
            and freqs_cos.shape == freqs_sin.shape and freqs_cos.dtype == freqs_sin.dtype
            and freqs_cos.shape[-1] == x.shape[-1]):
        return None
    seq = x.shape[1]
    if freqs_cos.dim() == 4 and freqs_cos.shape[2] == 1 and freqs_cos.shape[1] == seq and (
            freqs_cos.shape[0] == x.shape[0] or freqs_cos.shape[0] == 1):
        c, s = freqs_cos[:, :, 0, 0::2], freqs_sin[:, :, 0, 1::2]
    elif freqs_cos.dim() == 2 and freqs_cos.shape[0] == seq:
        c, s = freqs_cos[:, 0::2], freqs_sin[:, 1::2]
    else:
        return None
    if _needs_table_grad(freqs_cos, freqs_sin):
        return None
    return _table_dtype(*_on_device(c, s, x), x)


def wan_apply_rotary_emb(hidden_states: torch.Tensor, freqs_cos: torch.Tensor,
                         freqs_sin: torch.Tensor) -> torch.Tensor:
    """Rotate x as the ``apply_rotary_emb`` nested in Wan's ``WanAttnProcessor.__call__``
    (diffusers 0.42; SkyReels-V2, ChronoEdit, Wan-Animate and SANA-Video hold the same) does,
    in one op call.

    x is ``[B, S, H, D]``, the tables ``[1, S, 1, D]`` (``WanRotaryPosEmbed``; float64 unless
    an MPS backend exists). Wan reads cosines at the even and sines at the odd positions
    (``freqs_cos[..., 0::2]``, ``freqs_sin[..., 1::2]``) and pairs ``(x[2i], x[2i+1])``;
    the op reads the same two views, so the meaning is the same for any table. Same values
    within the rounding of x's dtype; differentiable in x. Other shapes, and tables that need
    a gradient, run Wan's arithmetic (a copy of its nested function).
    """
    tables = _wan_tables(hidden_states, freqs_cos, freqs_sin)
    if tables is None:
        return _wan_eager(hidden_states, freqs_cos, freqs_sin)
    return apply_rope(hidden_states, *tables, interleaved=True)


# ---------------------------------------------------------------------------------------------
# The forms these functions reproduce (diffusers 0.42.1, compared as syntax trees by
# rope_ext._source: docstrings, decorators and annotations aside)

EMBEDDINGS_FORM = """
def apply_rotary_emb(x, freqs_cis, use_real=True, use_real_unbind_dim=-1, sequence_dim=2):
    if use_real:
        cos, sin = freqs_cis
        if sequence_dim == 2:
            cos = cos[None, None, :, :]
            sin = sin[None, None, :, :]
        elif sequence_dim == 1:
            cos = cos[None, :, None, :]
            sin = sin[None, :, None, :]
        else:
            raise ValueError(f'`sequence_dim={sequence_dim}` but should be 1 or 2.')
        cos, sin = (cos.to(x.device), sin.to(x.device))
        if use_real_unbind_dim == -1:
            x_real, x_imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
            x_rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)
        elif use_real_unbind_dim == -2:
            x_real, x_imag = x.reshape(*x.shape[:-1], 2, -1).unbind(-2)
            x_rotated = torch.cat([-x_imag, x_real], dim=-1)
        else:
            raise ValueError(f'`use_real_unbind_dim={use_real_unbind_dim}` but should be -1 or -2.')
        out = (x.float() * cos + x_rotated.float() * sin).to(x.dtype)
        return out
    else:
        x_rotated = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        freqs_cis = freqs_cis.unsqueeze(2)
        x_out = torch.view_as_real(x_rotated * freqs_cis).flatten(3)
        return x_out.type_as(x)
"""

QWEN_FORM = """
def apply_rotary_emb_qwen(x, freqs_cis, use_real=True, use_real_unbind_dim=-1):
    if use_real:
        cos, sin = freqs_cis
        cos = cos[None, None]
        sin = sin[None, None]
        cos, sin = (cos.to(x.device), sin.to(x.device))
        if use_real_unbind_dim == -1:
            x_real, x_imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
            x_rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(3)
        elif use_real_unbind_dim == -2:
            x_real, x_imag = x.reshape(*x.shape[:-1], 2, -1).unbind(-2)
            x_rotated = torch.cat([-x_imag, x_real], dim=-1)
        else:
            raise ValueError(f'`use_real_unbind_dim={use_real_unbind_dim}` but should be -1 or -2.')
        out = (x.float() * cos + x_rotated.float() * sin).to(x.dtype)
        return out
    else:
        x_rotated = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        freqs_cis = freqs_cis.unsqueeze(1)
        x_out = torch.view_as_real(x_rotated * freqs_cis).flatten(3)
        return x_out.type_as(x)
"""

LTX_FORM = """
def apply_rotary_emb(x, freqs):
    cos, sin = freqs
    x_real, x_imag = x.unflatten(2, (-1, 2)).unbind(-1)
    x_rotated = torch.stack([-x_imag, x_real], dim=-1).flatten(2)
    out = (x.float() * cos + x_rotated.float() * sin).to(x.dtype)
    return out
"""

HIDREAM_FORM = """
def apply_rope(xq, xk, freqs_cis):
    xq_ = xq.float().reshape(*xq.shape[:-1], -1, 1, 2)
    xk_ = xk.float().reshape(*xk.shape[:-1], -1, 1, 2)
    xq_out = freqs_cis[..., 0] * xq_[..., 0] + freqs_cis[..., 1] * xq_[..., 1]
    xk_out = freqs_cis[..., 0] * xk_[..., 0] + freqs_cis[..., 1] * xk_[..., 1]
    return (xq_out.reshape(*xq.shape).type_as(xq), xk_out.reshape(*xk.shape).type_as(xk))
"""

WAN_NESTED_FORM = """
def apply_rotary_emb(hidden_states, freqs_cos, freqs_sin):
    x1, x2 = hidden_states.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(hidden_states)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(hidden_states)
"""
