"""The forms of transformers' RoPE functions that rope_ext reproduces, and their replacements.

Each modeling module of transformers carries its own copy of its RoPE function. A copy is
replaced only when its syntax tree is one of the forms below (docstrings, decorators, names
and annotations aside, rope_ext._source) and so are the helpers it calls by name
(``rotate_half`` and the like): the same source can mean another rotation with another
helper. Each form's replacement has the original's signature and meaning, computes in
float32 (float64 for float64 inputs) and rounds once (docs/math.md section 13.5 bounds the
difference from transformers' several roundings), and reads strided q/k in place.
"""

from typing import Callable, Dict, NamedTuple, Tuple

import torch

from rope_ext._source import source_key
from rope_ext.functional import apply_rope, apply_rope_qk

# ---------------------------------------------------------------------------------------------
# The helpers the forms call by name


ROTATE_HALF_SPLIT = (
    """
    def rotate_half(x):
        x1 = x[..., : x.shape[-1] // 2]
        x2 = x[..., x.shape[-1] // 2 :]
        return torch.cat((-x2, x1), dim=-1)
    """,
)
ROTATE_ADJACENT_PAIRS = (
    """
    def rotate_half(x):
        x1 = x[..., 0::2]
        x2 = x[..., 1::2]
        return torch.stack((-x2, x1), dim=-1).flatten(-2)
    """,
    """
    def rotate_half(x):
        x1 = x[..., ::2]
        x2 = x[..., 1::2]
        rot_x = torch.stack([-x2, x1], dim=-1).flatten(-2)
        return rot_x
    """,
)
ROTATE_EVERY_TWO = (
    """
    def rotate_every_two(x):
        x1 = x[:, :, :, ::2]
        x2 = x[:, :, :, 1::2]
        x = torch.stack((-x2, x1), dim=-1)
        return x.flatten(-2)
    """,
)
GPT_OSS_ROTATE = (
    """
    def _apply_rotary_emb(x, cos, sin):
        first_half, second_half = torch.chunk(x, 2, dim=-1)
        first_ = first_half * cos - second_half * sin
        second_ = second_half * cos + first_half * sin
        return torch.cat((first_, second_), dim=-1)
    """,
)


# ---------------------------------------------------------------------------------------------
# Checking the tables transformers hands the function


def _describe(t) -> str:
    return f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else f"a {type(t).__name__}"


def _float_tensors(**tensors) -> None:
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def _heads_axis(unsqueeze_dim) -> int:
    if type(unsqueeze_dim) is not int or unsqueeze_dim not in (1, 2, -3, -2):
        raise ValueError(f"unsqueeze_dim must be 1 (q/k are [batch, heads, seq, head_dim]) or 2 "
                         f"(q/k are [batch, seq, heads, head_dim]), got {unsqueeze_dim!r}")
    return unsqueeze_dim % 4  # -3 -> 1, -2 -> 2


def _pair_table(xs, cos, sin, heads_axis: int, table: str):
    """transformers' cos/sin as rope_ext's per-token table ``[batch or 1, seq, r/2]`` (views,
    no copy) and r, after checking them against the tensors xs (4-D, heads at heads_axis).

    table: how the r/2 angles sit in cos's last dimension: "halves" (``cat(freqs, freqs)``,
    Llama: the first half is read), "repeated" (``repeat_interleave(freqs, 2)``, Cohere: the
    even entries are read), "pairs" (``freqs`` once, [.., r/2]: GPT-J, gpt-oss)."""
    dims = "[batch, heads, seq, head_dim]" if heads_axis == 1 else "[batch, seq, heads, head_dim]"
    seq_axis = 3 - heads_axis
    for name, t in xs.items():
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D {dims}, got {_describe(t)}")
    if cos.shape != sin.shape:
        raise ValueError(f"cos and sin must have the same shape, got cos {tuple(cos.shape)} and "
                         f"sin {tuple(sin.shape)}")
    if cos.dtype != sin.dtype:
        raise TypeError(f"cos and sin must have the same dtype, got cos {cos.dtype} and "
                        f"sin {sin.dtype}")
    if cos.dim() != 3:
        raise ValueError(f"cos and sin must be 3-D [batch, seq, rotary_dim] as transformers' "
                         f"rotary embedding returns them (use [1, seq, rotary_dim] for one table "
                         f"shared by the batch), got shape {tuple(cos.shape)}")
    first = next(iter(xs.values()))
    batch, seq = first.shape[0], first.shape[seq_axis]
    for name, t in xs.items():
        if t.shape[0] != batch or t.shape[seq_axis] != seq:
            raise ValueError(f"q and k must share batch and seq ({dims}), got "
                             + ", ".join(f"{n} {tuple(x.shape)}" for n, x in xs.items()))
    width = cos.shape[-1]
    rotary_dim = 2 * width if table == "pairs" else width
    if rotary_dim == 0 or rotary_dim % 2:
        raise ValueError(f"cos/sin's last dimension (rotary_dim, both halves of the angles) must "
                         f"be a positive even number, got {width}")
    for name, t in xs.items():
        if rotary_dim > t.shape[-1]:
            raise ValueError(f"cos/sin's rotary_dim = {rotary_dim} must not exceed head_dim "
                             f"({name} {t.shape[-1]})")
    if cos.shape[0] != 1 and cos.shape[0] != batch:  # (no `in`: symbolic shapes)
        raise ValueError(f"cos/sin's batch dimension must be 1 or q's batch {batch}, got "
                         f"shape {tuple(cos.shape)}")
    if cos.shape[1] != 1 and cos.shape[1] != seq:
        raise ValueError(f"cos/sin's seq dimension must be q's seq {seq} (or 1), got shape "
                         f"{tuple(cos.shape)} for {dims} inputs")
    pairs = rotary_dim // 2
    if table == "halves":  # transformers' second half is a copy of the first
        c, s = cos[..., :pairs], sin[..., :pairs]
    elif table == "repeated":
        c, s = cos[..., 0::2], sin[..., 0::2]
    else:
        c, s = cos, sin
    if c.shape[1] != seq:  # one position for every token: a stride-0 view
        c, s = c.expand(c.shape[0], seq, pairs), s.expand(s.shape[0], seq, pairs)
    return c, s


def table_from_hf(cos: torch.Tensor, sin: torch.Tensor, seq: int
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """transformers' cos/sin ``[batch or 1, seq or 1, r]`` (the r/2 angles written twice) as
    rope_ext's one-row-per-token table ``[batch or 1, seq, r/2]``: views, no copy."""
    pairs = cos.shape[-1] // 2
    c, s = cos[..., :pairs], sin[..., :pairs]
    if c.shape[1] != seq:
        c, s = c.expand(c.shape[0], seq, pairs), s.expand(s.shape[0], seq, pairs)
    return c, s


def _rotate(xs: Dict[str, torch.Tensor], cos, sin, heads_axis: int, *, table: str,
            interleaved: bool, dtype: str):
    """The rotation of one or two tensors as a transformers form computes it.

    dtype: "promote" (the result in ``promote_types(x, cos)``, as ``x * cos`` gives) or
    "input" (each result in its input's dtype: the forms that cast back)."""
    _float_tensors(**xs, cos=cos, sin=sin)
    c, s = _pair_table(xs, cos, sin, heads_axis, table)
    layout = "bhsd" if heads_axis == 1 else "bshd"
    tensors = list(xs.values())
    if len(tensors) == 2 and tensors[0].dtype != tensors[1].dtype:
        names = list(xs)
        raise TypeError(f"{names[0]} and {names[1]} must have the same dtype, got "
                        f"{tensors[0].dtype} and {tensors[1].dtype}")
    if dtype == "promote":
        out_dtype = torch.promote_types(tensors[0].dtype, cos.dtype)
        tensors = [t if t.dtype == out_dtype else t.to(out_dtype) for t in tensors]
        if c.dtype != out_dtype and c.dtype not in (torch.float32, torch.float64):
            c, s = c.to(out_dtype), s.to(out_dtype)
    elif c.dtype not in (torch.float32, torch.float64) and c.dtype != tensors[0].dtype:
        c, s = c.float(), s.float()  # an exact widening; the op computes in float32
    if len(tensors) == 1:
        return apply_rope(tensors[0], c, s, interleaved=interleaved, layout=layout)
    return apply_rope_qk(tensors[0], tensors[1], c, s, interleaved=interleaved, layout=layout)


# ---------------------------------------------------------------------------------------------
# The replacements: one per meaning


def _unsqueeze_dim_of(position_ids, unsqueeze_dim):
    """transformers 5.x's (q, k, cos, sin, unsqueeze_dim) called positionally passes
    unsqueeze_dim where older copies have position_ids."""
    if position_ids is not None and not isinstance(position_ids, torch.Tensor):
        if type(position_ids) is int and unsqueeze_dim == 1:
            return position_ids
        raise TypeError(f"position_ids is ignored (deprecated in transformers) and must be a "
                        f"tensor or None, got {type(position_ids).__name__}; pass "
                        f"unsqueeze_dim as a keyword")
    return unsqueeze_dim


def apply_rotary_pos_emb(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         position_ids=None, unsqueeze_dim: int = 1
                         ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k as transformers' Llama ``apply_rotary_pos_emb`` does, in one fused op call.

    A drop-in for the function of that name in ``transformers.models.llama.modeling_llama`` (and
    its copies, the partial-rotary ones included): same signature, same meaning, the same
    values within the rounding of the inputs' dtype (rope_ext rounds once, from float32 math;
    transformers' eager code rounds after each of its three elementwise ops).

    Args:
        q, k: queries and keys, ``[batch, heads, seq, head_dim]`` when ``unsqueeze_dim=1`` (the
            layout transformers' attention uses) or ``[batch, seq, heads, head_dim]`` when
            ``unsqueeze_dim=2``. Any strides (slices of a fused qkv projection work without a
            copy); q and k may have different head counts (grouped-query attention).
        cos, sin: the tables transformers' rotary embedding module returns,
            ``[batch, seq, rotary_dim]`` (or ``[1, seq, rotary_dim]``, broadcast over the batch;
            ``seq`` may be 1 to broadcast one position over all tokens), with the r/2 angles
            written twice (``cat(freqs, freqs)``) and the attention scaling already multiplied
            in. Only the first half is read: that is rope_ext's table. ``rotary_dim`` may be
            smaller than head_dim: then ``q[..., rotary_dim:]`` passes through unchanged, as in
            transformers' partial-rotary copies (GPT-NeoX, Phi-3). cos/sin get no gradient
            (transformers builds them under no_grad).
        position_ids: accepted and ignored, as in transformers (deprecated there: cos/sin are
            already gathered per token). A Python int here is taken as unsqueeze_dim (a
            positional call of the 5.x signature ``(q, k, cos, sin, unsqueeze_dim)``).
        unsqueeze_dim: 1 or 2 (or -3, -2), the axis of q/k that holds the heads.

    Returns:
        ``(q_embed, k_embed)``, new tensors in q/k's layout and in the dtype transformers'
        arithmetic would give (``torch.promote_types`` of q's and cos's dtypes). Differentiable
        in q and k.
    """
    axis = _heads_axis(_unsqueeze_dim_of(position_ids, unsqueeze_dim))
    return _rotate({"q": q, "k": k}, cos, sin, axis, table="halves", interleaved=False,
                   dtype="promote")


def apply_rotary_pos_emb_cast_back(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
    """:func:`apply_rotary_pos_emb` for the copies that return q's and k's own dtypes (OLMo's
    cast back, ESM's and ModernBERT's float32 math)."""
    axis = _heads_axis(_unsqueeze_dim_of(position_ids, unsqueeze_dim))
    return _rotate({"q": q, "k": k}, cos, sin, axis, table="halves", interleaved=False,
                   dtype="input")


def apply_rotary_pos_emb_one(x, cos, sin, unsqueeze_dim=1):
    """Gemma 3n's and Gemma 4's one-tensor ``apply_rotary_pos_emb(x, cos, sin, unsqueeze_dim)``
    (half-split pairs, result in ``promote_types(x, cos)``)."""
    return _rotate({"x": x}, cos, sin, _heads_axis(unsqueeze_dim), table="halves",
                   interleaved=False, dtype="promote")


def apply_rotary_pos_emb_adjacent(q, k, cos, sin, unsqueeze_dim=1):
    """GLM's and Helium's form: adjacent pairs ``(x[2i], x[2i+1])`` at the first half's angles
    (``repeat_interleave`` of the halves table), rotary_dim = cos.shape[-1] leading dims, the
    rest passed through; result in ``promote_types(q, cos)``."""
    return _rotate({"q": q, "k": k}, cos, sin, _heads_axis(unsqueeze_dim), table="halves",
                   interleaved=True, dtype="promote")


def apply_rotary_pos_emb_adjacent_cast_back(q, k, cos, sin, unsqueeze_dim=1):
    """ERNIE 4.5's form: GLM's adjacent pairs over the whole head, float32, cast back to q's
    dtype."""
    return _rotate({"q": q, "k": k}, cos, sin, _heads_axis(unsqueeze_dim), table="halves",
                   interleaved=True, dtype="input")


def apply_rotary_pos_emb_cohere(q, k, cos, sin, unsqueeze_dim=1):
    """Cohere's form: adjacent pairs with a ``repeat_interleave``-d table, float32, cast back
    to q's dtype."""
    return _rotate({"q": q, "k": k}, cos, sin, _heads_axis(unsqueeze_dim), table="repeated",
                   interleaved=True, dtype="input")


def apply_rotary_pos_emb_gpt_oss(q, k, cos, sin, unsqueeze_dim=1):
    """gpt-oss's form: half-split pairs with a table of r/2 angles (``[batch, seq, r/2]``);
    result in ``promote_types(q, cos)``."""
    return _rotate({"q": q, "k": k}, cos, sin, _heads_axis(unsqueeze_dim), table="pairs",
                   interleaved=False, dtype="promote")


def apply_rotary_pos_emb_gptj(tensor, sin, cos):
    """GPT-J's and CodeGen's ``apply_rotary_pos_emb(tensor, sin, cos)``: adjacent pairs of a
    ``[batch, seq, heads, rotary_dim]`` tensor, sin/cos ``[batch, seq, rotary_dim / 2]``
    (note the order); result in ``promote_types(tensor, cos)``."""
    return _rotate({"tensor": tensor}, cos, sin, 2, table="pairs", interleaved=True,
                   dtype="promote")


def apply_rotary_pos_emb_interleave(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
    """DeepSeek-V3's ``apply_rotary_pos_emb_interleave``: adjacent pairs in, the rotated pairs
    written half-split out (``cat([x1 c - x2 s, x2 c + x1 s])``), at the halves table's
    angles. The de-interleaving copy transformers makes is made here too, then one
    half-split rotation."""
    axis = _heads_axis(_unsqueeze_dim_of(position_ids, unsqueeze_dim))
    _float_tensors(q=q, k=k, cos=cos, sin=sin)
    q = torch.cat((q[..., 0::2], q[..., 1::2]), dim=-1)
    k = torch.cat((k[..., 0::2], k[..., 1::2]), dim=-1)
    return _rotate({"q": q, "k": k}, cos, sin, axis, table="halves", interleaved=False,
                   dtype="promote")


def _complex_table(freqs_cis):
    if not isinstance(freqs_cis, torch.Tensor) or not freqs_cis.is_complex():
        raise TypeError(f"freqs_cis must be a complex tensor, got "
                        f"{getattr(freqs_cis, 'dtype', type(freqs_cis).__name__)}")
    if freqs_cis.dim() != 3:
        raise ValueError(f"freqs_cis must be 3-D [batch, seq, rotary_dim / 2], got "
                         f"{_describe(freqs_cis)}")
    return freqs_cis.real, freqs_cis.imag  # strided views


def apply_rotary_emb_complex_bshd(xq, xk, freqs_cis):
    """Llama 4's ``apply_rotary_emb(xq, xk, freqs_cis)``: ``[batch, seq, heads, head_dim]`` q/k
    as complex adjacent pairs times ``freqs_cis[:, :, None, :]``, in float32, cast back."""
    cos, sin = _complex_table(freqs_cis)
    return _rotate({"xq": xq, "xk": xk}, cos, sin, 2, table="pairs", interleaved=True,
                   dtype="input")


def apply_rotary_emb_complex_bhsd(xq, xk, freqs_cis):
    """DeepSeek-V2's ``apply_rotary_emb(xq, xk, freqs_cis)``: ``[batch, heads, seq, head_dim]``
    q/k as complex adjacent pairs times ``freqs_cis.unsqueeze(1)``, in float32, cast back."""
    cos, sin = _complex_table(freqs_cis)
    return _rotate({"xq": xq, "xk": xk}, cos, sin, 1, table="pairs", interleaved=True,
                   dtype="input")


def apply_rotary_pos_emb_vision(q, k, cos, sin):
    """The vision towers' ``apply_rotary_pos_emb_vision(q, k, cos, sin)`` (Qwen2-VL and its
    kin): q/k ``[tokens, heads, head_dim]``, cos/sin ``[tokens, head_dim]`` (halves), float32,
    each result cast back to its input's dtype."""
    _float_tensors(q=q, k=k, cos=cos, sin=sin)
    for name, t in (("q", q), ("k", k)):
        if t.dim() != 3:
            raise ValueError(f"{name} must be 3-D [tokens, heads, head_dim], got {_describe(t)}")
    if cos.dim() != 2:
        raise ValueError(f"cos and sin must be 2-D [tokens, head_dim], got {_describe(cos)}")
    q_out, k_out = _rotate({"q": q[None], "k": k[None]}, cos[None], sin[None], 2,
                           table="halves", interleaved=False, dtype="input")
    return q_out[0], k_out[0]


# ---------------------------------------------------------------------------------------------
# The forms


class Form(NamedTuple):
    """One verified form: the function of that name with one of these sources, calling these
    helpers with one of their sources, is replaced by ``replacement``, which takes the same
    parameters (names and order) with the same meaning."""
    name: str  # what the form is, for the report
    function: str  # the function's name in the modeling module
    sources: Tuple[str, ...]
    helpers: Dict[str, Tuple[str, ...]]  # helper name -> its accepted sources
    replacement: Callable


FORMS: Tuple[Form, ...] = (
    Form("half-split q/k (Llama)", "apply_rotary_pos_emb", ("""
        def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
            cos = cos.unsqueeze(unsqueeze_dim)
            sin = sin.unsqueeze(unsqueeze_dim)
            q_embed = (q * cos) + (rotate_half(q) * sin)
            k_embed = (k * cos) + (rotate_half(k) * sin)
            return q_embed, k_embed
        """,), {"rotate_half": ROTATE_HALF_SPLIT}, apply_rotary_pos_emb),
    Form("half-split q/k, partial rotary (GPT-NeoX, Phi-3, Nemotron, Qwen3-Next)",
         "apply_rotary_pos_emb", ("""
        def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
            cos = cos.unsqueeze(unsqueeze_dim)
            sin = sin.unsqueeze(unsqueeze_dim)
            rotary_dim = cos.shape[-1]
            q_rot, q_pass = q[..., :rotary_dim], q[..., rotary_dim:]
            k_rot, k_pass = k[..., :rotary_dim], k[..., rotary_dim:]
            q_embed = (q_rot * cos) + (rotate_half(q_rot) * sin)
            k_embed = (k_rot * cos) + (rotate_half(k_rot) * sin)
            q_embed = torch.cat([q_embed, q_pass], dim=-1)
            k_embed = torch.cat([k_embed, k_pass], dim=-1)
            return q_embed, k_embed
        """, """
        def apply_rotary_pos_emb(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
            cos = cos.unsqueeze(unsqueeze_dim)
            sin = sin.unsqueeze(unsqueeze_dim)
            rotary_dim = cos.shape[-1]
            q_rot, q_pass = q[..., :rotary_dim], q[..., rotary_dim:]
            k_rot, k_pass = k[..., :rotary_dim], k[..., rotary_dim:]
            q_embed = (q_rot * cos) + (rotate_half(q_rot) * sin)
            k_embed = (k_rot * cos) + (rotate_half(k_rot) * sin)
            q_embed = torch.cat([q_embed, q_pass], dim=-1)
            k_embed = torch.cat([k_embed, k_pass], dim=-1)
            return q_embed, k_embed
        """, """
        def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
            cos = cos.unsqueeze(unsqueeze_dim)
            sin = sin.unsqueeze(unsqueeze_dim)
            rotary_dim = cos.shape[-1]
            q_rot, q_pass = q[..., :rotary_dim], q[..., rotary_dim:]
            k_rot, k_pass = k[..., :rotary_dim], k[..., rotary_dim:]
            q_embed = torch.cat([(q_rot * cos) + (rotate_half(q_rot) * sin), q_pass], dim=-1)
            k_embed = torch.cat([(k_rot * cos) + (rotate_half(k_rot) * sin), k_pass], dim=-1)
            return q_embed, k_embed
        """, """
        def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
            cos = cos.unsqueeze(unsqueeze_dim)
            sin = sin.unsqueeze(unsqueeze_dim)
            rot_dim = cos.shape[-1]
            q, q_pass = q[..., :rot_dim], q[..., rot_dim:]
            k, k_pass = k[..., :rot_dim], k[..., rot_dim:]
            q_embed = (q * cos) + (rotate_half(q) * sin)
            k_embed = (k * cos) + (rotate_half(k) * sin)
            return torch.cat((q_embed, q_pass), dim=-1), torch.cat((k_embed, k_pass), dim=-1)
        """), {"rotate_half": ROTATE_HALF_SPLIT}, apply_rotary_pos_emb),
    Form("half-split q/k, cast back to q's and k's dtypes (OLMo 2, OLMo 3)",
         "apply_rotary_pos_emb", ("""
        def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
            q_type, k_type = q.dtype, k.dtype
            cos = cos.unsqueeze(unsqueeze_dim)
            sin = sin.unsqueeze(unsqueeze_dim)
            q_embed = (q * cos) + (rotate_half(q) * sin)
            k_embed = (k * cos) + (rotate_half(k) * sin)
            return q_embed.to(q_type), k_embed.to(k_type)
        """, """
        def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
            original_dtype = q.dtype
            cos = cos.unsqueeze(unsqueeze_dim)
            sin = sin.unsqueeze(unsqueeze_dim)
            q_embed = (q.float() * cos) + (rotate_half(q.float()) * sin)
            k_embed = (k.float() * cos) + (rotate_half(k.float()) * sin)
            return q_embed.to(original_dtype), k_embed.to(original_dtype)
        """, """
        def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
            origin_dtype = q.dtype
            q, k = q.float(), k.float()
            cos = cos.unsqueeze(unsqueeze_dim).float()
            sin = sin.unsqueeze(unsqueeze_dim).float()
            q_embed = (q * cos) + (rotate_half(q) * sin)
            k_embed = (k * cos) + (rotate_half(k) * sin)
            return q_embed.to(origin_dtype), k_embed.to(origin_dtype)
        """), {"rotate_half": ROTATE_HALF_SPLIT}, apply_rotary_pos_emb_cast_back),
    Form("one tensor per call, half-split (Gemma 3n, Gemma 4)", "apply_rotary_pos_emb", ("""
        def apply_rotary_pos_emb(x, cos, sin, unsqueeze_dim=1):
            cos = cos.unsqueeze(unsqueeze_dim)
            sin = sin.unsqueeze(unsqueeze_dim)
            return (x * cos) + (rotate_half(x) * sin)
        """,), {"rotate_half": ROTATE_HALF_SPLIT}, apply_rotary_pos_emb_one),
    Form("adjacent pairs, halves table, partial rotary (GLM, GLM-4, Helium)",
         "apply_rotary_pos_emb", ("""
        def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
            cos = cos.unsqueeze(unsqueeze_dim)
            sin = sin.unsqueeze(unsqueeze_dim)
            cos = cos[..., : cos.shape[-1] // 2].repeat_interleave(2, dim=-1)
            sin = sin[..., : sin.shape[-1] // 2].repeat_interleave(2, dim=-1)
            rotary_dim = cos.shape[-1]
            q_rot, q_pass = q[..., :rotary_dim], q[..., rotary_dim:]
            k_rot, k_pass = k[..., :rotary_dim], k[..., rotary_dim:]
            q_embed = (q_rot * cos) + (rotate_half(q_rot) * sin)
            k_embed = (k_rot * cos) + (rotate_half(k_rot) * sin)
            q_embed = torch.cat([q_embed, q_pass], dim=-1)
            k_embed = torch.cat([k_embed, k_pass], dim=-1)
            return q_embed, k_embed
        """, """
        def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
            cos = cos.unsqueeze(unsqueeze_dim)
            sin = sin.unsqueeze(unsqueeze_dim)
            cos = cos[..., : cos.shape[-1] // 2].repeat_interleave(2, dim=-1)
            sin = sin[..., : sin.shape[-1] // 2].repeat_interleave(2, dim=-1)
            q_embed = (q * cos) + (rotate_half(q) * sin)
            k_embed = (k * cos) + (rotate_half(k) * sin)
            return q_embed, k_embed
        """), {"rotate_half": ROTATE_ADJACENT_PAIRS}, apply_rotary_pos_emb_adjacent),
    Form("adjacent pairs, halves table, float32, cast back (ERNIE 4.5)",
         "apply_rotary_pos_emb", ("""
        def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
            original_dtype = q.dtype
            cos = cos.unsqueeze(unsqueeze_dim)
            sin = sin.unsqueeze(unsqueeze_dim)
            cos = cos[..., : cos.shape[-1] // 2].repeat_interleave(2, dim=-1)
            sin = sin[..., : sin.shape[-1] // 2].repeat_interleave(2, dim=-1)
            q_embed = (q.float() * cos) + (rotate_half(q).float() * sin)
            k_embed = (k.float() * cos) + (rotate_half(k).float() * sin)
            return q_embed.to(original_dtype), k_embed.to(original_dtype)
        """,), {"rotate_half": ROTATE_ADJACENT_PAIRS}, apply_rotary_pos_emb_adjacent_cast_back),
    Form("adjacent pairs, repeated table, float32, cast back (Cohere)",
         "apply_rotary_pos_emb", ("""
        def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
            dtype = q.dtype
            q = q.float()
            k = k.float()
            cos = cos.unsqueeze(unsqueeze_dim)
            sin = sin.unsqueeze(unsqueeze_dim)
            q_embed = (q * cos) + (rotate_half(q) * sin)
            k_embed = (k * cos) + (rotate_half(k) * sin)
            return q_embed.to(dtype=dtype), k_embed.to(dtype=dtype)
        """,), {"rotate_half": ROTATE_ADJACENT_PAIRS}, apply_rotary_pos_emb_cohere),
    Form("adjacent pairs in, half-split out (DeepSeek-V3 interleave)",
         "apply_rotary_pos_emb_interleave", ("""
        def apply_rotary_pos_emb_interleave(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
            cos = cos[..., : cos.shape[-1] // 2].unsqueeze(unsqueeze_dim)
            sin = sin[..., : sin.shape[-1] // 2].unsqueeze(unsqueeze_dim)
            q1, q2 = q[..., 0::2], q[..., 1::2]
            k1, k2 = k[..., 0::2], k[..., 1::2]
            q_embed = torch.cat([q1 * cos - q2 * sin, q2 * cos + q1 * sin], dim=-1)
            k_embed = torch.cat([k1 * cos - k2 * sin, k2 * cos + k1 * sin], dim=-1)
            return q_embed, k_embed
        """,), {}, apply_rotary_pos_emb_interleave),
    Form("half-split, r/2-angle table (gpt-oss)", "apply_rotary_pos_emb", ("""
        def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
            cos = cos.unsqueeze(unsqueeze_dim)
            sin = sin.unsqueeze(unsqueeze_dim)
            q_embed = _apply_rotary_emb(q, cos, sin)
            k_embed = _apply_rotary_emb(k, cos, sin)
            return q_embed, k_embed
        """,), {"_apply_rotary_emb": GPT_OSS_ROTATE}, apply_rotary_pos_emb_gpt_oss),
    Form("adjacent pairs of one tensor, (tensor, sin, cos) (GPT-J, CodeGen)",
         "apply_rotary_pos_emb", ("""
        def apply_rotary_pos_emb(tensor, sin, cos):
            sin = torch.repeat_interleave(sin[:, :, None, :], 2, 3)
            cos = torch.repeat_interleave(cos[:, :, None, :], 2, 3)
            return (tensor * cos) + (rotate_every_two(tensor) * sin)
        """,), {"rotate_every_two": ROTATE_EVERY_TWO}, apply_rotary_pos_emb_gptj),
    Form("complex adjacent pairs, [b, s, h, d] (Llama 4)", "apply_rotary_emb", ("""
        def apply_rotary_emb(xq, xk, freqs_cis):
            xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
            xk_ = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
            xq_out = torch.view_as_real(xq_ * freqs_cis[:, :, None, :]).flatten(3)
            xk_out = torch.view_as_real(xk_ * freqs_cis[:, :, None, :]).flatten(3)
            return xq_out.type_as(xq), xk_out.type_as(xk)
        """,), {}, apply_rotary_emb_complex_bshd),
    Form("complex adjacent pairs, [b, h, s, d] (DeepSeek-V2)", "apply_rotary_emb", ("""
        def apply_rotary_emb(xq, xk, freqs_cis):
            xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
            xk_ = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
            freqs_cis = freqs_cis.unsqueeze(1).to(xq_.device)
            xq_out = torch.view_as_real(xq_ * freqs_cis).flatten(3).type_as(xq)
            xk_out = torch.view_as_real(xk_ * freqs_cis).flatten(3).type_as(xk)
            return xq_out, xk_out
        """,), {}, apply_rotary_emb_complex_bhsd),
    Form("vision towers, [tokens, heads, d], float32, cast back (Qwen2-VL and kin)",
         "apply_rotary_pos_emb_vision", ("""
        def apply_rotary_pos_emb_vision(q, k, cos, sin):
            orig_q_dtype = q.dtype
            orig_k_dtype = k.dtype
            q, k = q.float(), k.float()
            cos, sin = cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()
            q_embed = (q * cos) + (rotate_half(q) * sin)
            k_embed = (k * cos) + (rotate_half(k) * sin)
            q_embed = q_embed.to(orig_q_dtype)
            k_embed = k_embed.to(orig_k_dtype)
            return q_embed, k_embed
        """,), {"rotate_half": ROTATE_HALF_SPLIT}, apply_rotary_pos_emb_vision),
)

# source keys, computed once
FORM_KEYS = {form.name: frozenset(source_key(s) for s in form.sources) for form in FORMS}
HELPER_KEYS = {srcs: frozenset(source_key(s) for s in srcs)
               for srcs in (ROTATE_HALF_SPLIT, ROTATE_ADJACENT_PAIRS, ROTATE_EVERY_TWO,
                            GPT_OSS_ROTATE)}
