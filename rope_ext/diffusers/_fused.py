"""Fused QK-RMSNorm + RoPE attention processors for diffusers (Flux, Wan, Qwen-Image).

These processors RMS-normalize q and k right before RoPE. Each fused ``__call__`` below is
the processor's own ``__call__`` (diffusers 0.42.1, whose syntax tree patch() compares with
the form kept here) with the norms and the rotation done by one
``rope_ext.rms_norm_rope_qk`` call per stream, and everything else as diffusers wrote it
(helpers such as ``dispatch_attention_fn`` are looked up in diffusers' module at call time).

- Flux (``FluxAttnProcessor``, also Chroma's): ``torch.nn.RMSNorm(head_dim)`` per head;
  the text stream has its own norms (``norm_added_q``/``norm_added_k``) and the rows
  ``[0, txt)`` of the table, the image stream ``norm_q``/``norm_k`` and the rows after.
  diffusers concatenates the normalized streams and rotates the whole; rotating each stream
  with its rows and concatenating gives the same tensor.
- Wan (``WanAttnProcessor``, also ChronoEdit's and Wan-Animate's copies):
  ``torch.nn.RMSNorm(heads * head_dim)`` over each token's whole projection (the op's
  ``across_heads=True``), self-attention only (the cross-attention has no RoPE).
- Qwen-Image (``QwenDoubleStreamAttnProcessor2_0``): diffusers' ``RMSNorm(head_dim)`` per
  head on each stream, complex tables per stream.

What may be fused, checked on every call from host metadata only:
- the norm modules would run nothing but their verified forward: no module hook (forward
  pre-hook, forward hook, backward pre-hook, full backward hook), no global module hook, no
  ``forward`` set on the instance (diffusers' own hooks: group offloading, layerwise
  casting, ...), and a class whose forward the patch-time probe verified; otherwise the call
  runs the processor as it was before fusing (which calls the modules), and
  ``report().fallbacks`` names the reason;
- the math matches: a norm pair with one eps (not None: torch's dtype-dependent default is
  left to torch), no bias, and weights the op takes. ``torch.nn.RMSNorm`` returns x's dtype
  whatever its weight's (float32 or x's dtype are fused); diffusers' ``RMSNorm`` returns
  the weight's dtype when it is fp16/bf16 and float32 for a float32 weight, so it is fused
  only when the weight has x's dtype (or is None: then a float32 ones weight stands in for
  it, which the op multiplies exactly). Otherwise that call normalizes with the modules and
  rotates with the op, as diffusers' code would.
Rounding: diffusers' norm rounds to x's dtype (twice for diffusers' RMSNorm with a bf16
weight: after the normalization and after the weight) and its rotation once more; the
fused op rounds once from float32. The results agree within a few units of x's rounding.
"""

from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch

import rope_ext
from rope_ext._hooks import skipped_by_standing_in
from rope_ext.functional import apply_rope
from rope_ext.diffusers.functions import (_complex_tables, _needs_table_grad, _real_pair)

# fused processor class name -> the norm forwards its probe verified
norm_forwards: Dict[str, Tuple[object, ...]] = {}
# fused processor class name -> why some call ran unfused (the first reason seen)
fallbacks: Dict[str, str] = {}


class ProbeError(RuntimeError):
    """The probe's fused call could not take the fused path."""


def _note(name: str, why: str) -> None:
    # dict.setdefault is atomic under the GIL, and torch.compile traces it (a lock it cannot)
    fallbacks.setdefault(name, why)


def _hooks_reason(norms, name: str) -> Optional[str]:
    """Why calling these norm modules would run more than their verified forward, or None."""
    return skipped_by_standing_in(norms, norm_forwards.get(name, ()))


def _tables_float(c: torch.Tensor, s: torch.Tensor, device):
    """The op reads float32/float64 tables with any x; a half-precision table widens
    exactly (diffusers' arithmetic promotes it to float32 too)."""
    if c.device != device:
        c, s = c.to(device), s.to(device)
    if c.dtype not in (torch.float32, torch.float64):
        c, s = c.float(), s.float()
    return c, s


# ---------------------------------------------------------------------------------------------
# The norm modules' math


def _torch_rms_forward():
    return torch.nn.RMSNorm.forward


def _diffusers_rms_forward():
    from diffusers.models.normalization import RMSNorm

    return RMSNorm.forward


def _norm_weight(norm, x: torch.Tensor, dim: int):
    """(weight for the op, None) or (None, why this norm cannot be fused for x)."""
    forward = type(norm).forward
    w = norm.weight
    if forward is _torch_rms_forward():
        if tuple(norm.normalized_shape) != (dim,):
            return None, f"its RMSNorm normalizes over {tuple(norm.normalized_shape)}"
        if w is not None and w.dtype != torch.float32 and w.dtype != x.dtype:
            return None, f"a norm weight is {w.dtype} for {x.dtype} inputs"
    else:  # diffusers' RMSNorm (the probe verified no other class)
        if getattr(norm, "bias", None) is not None:
            return None, "a norm has a bias"
        if w is not None and w.dtype != x.dtype:
            # its result would be the weight's dtype (float32 for a float32 weight)
            return None, f"a norm weight is {w.dtype} for {x.dtype} inputs"
        if x.device.type == "npu":  # diffusers runs torch_npu's kernel there
            return None, "inputs on an NPU"
    if w is None:
        return torch.ones(dim, dtype=torch.float32, device=x.device), None
    if tuple(w.shape) != (dim,):
        return None, f"a norm weight has shape {tuple(w.shape)}, not ({dim},)"
    return w, None


def _norm_rope(q, k, cos, sin, nq, nk, across_heads: bool, name: str, force: bool):
    """q and k normalized by nq/nk and rotated (interleaved pairs): one fused op call when
    the math matches (module docstring), else the modules then the op's rotation."""
    dq = q.shape[-2] * q.shape[-1] if across_heads else q.shape[-1]
    dk = k.shape[-2] * k.shape[-1] if across_heads else k.shape[-1]
    why = wq = wk = None
    if nq.eps is None or nq.eps != nk.eps:
        why = "its q and k norms have different (or default) eps"
    elif q.dtype != k.dtype:
        why = "q and k have different dtypes"
    else:
        wq, why = _norm_weight(nq, q, dq)
        if why is None:
            wk, why = _norm_weight(nk, k, dk)
    if why is None:
        return rope_ext.rms_norm_rope_qk(q, k, cos, sin, q_weight=wq, k_weight=wk, eps=nq.eps,
                                         across_heads=across_heads, interleaved=True)
    if force:
        raise ProbeError(why)
    _note(name, why)
    if across_heads:
        qn = nq(q.flatten(-2)).unflatten(-1, q.shape[-2:])
        kn = nk(k.flatten(-2)).unflatten(-1, k.shape[-2:])
    else:
        qn, kn = nq(q), nk(k)
    return apply_rope(qn, cos, sin, interleaved=True), apply_rope(kn, cos, sin, interleaved=True)


def probe_norm(norm, dim: int) -> Optional[str]:
    """None if the module computes ``x * rsqrt(mean(x^2) + eps) * weight`` over its last
    dimension (of size dim), with eps read from ``norm.eps``; else why not."""
    w = getattr(norm, "weight", None)
    if not hasattr(norm, "eps") or (w is not None and tuple(w.shape) != (dim,)):
        return f"its {type(norm).__name__} has no eps or no [{dim}] weight"
    if type(norm).forward not in (_torch_rms_forward(), _diffusers_rms_forward()):
        return f"its {type(norm).__name__} is not torch's or diffusers' RMSNorm"
    g = torch.Generator().manual_seed(0)
    eps = 0.25  # large, with small inputs: a norm that ignores or misnames eps is caught
    x = 0.1 * torch.randn(3, dim, generator=g)
    saved = norm.eps
    try:
        with torch.no_grad():
            if w is not None:
                w.copy_(torch.randn(dim, generator=g))
            norm.eps = eps
            got = norm(x)
    finally:
        norm.eps = saved
    xd = x.double()
    want = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps)
    if w is not None:
        want = want * w.double()
    if got.shape != want.shape or not torch.allclose(got.double(), want, rtol=1e-5, atol=1e-6):
        return (f"its {type(norm).__name__} does not compute x * rsqrt(mean(x^2) + eps) * "
                f"weight over its last dimension")
    return None


# ---------------------------------------------------------------------------------------------
# Flux


# diffusers 0.42.1's __call__s, compared as syntax trees (formatting, comments, docstrings,
# annotations aside).
FLUX_FORM = """
def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
             image_rotary_emb=None):
    query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
        attn, hidden_states, encoder_hidden_states)
    query = query.unflatten(-1, (-1, attn.head_dim))
    key = key.unflatten(-1, (-1, attn.head_dim))
    value = value.unflatten(-1, (-1, attn.head_dim))
    query = attn.norm_q(query)
    key = attn.norm_k(key)
    if attn.added_kv_proj_dim is not None:
        encoder_query = encoder_query.unflatten(-1, (-1, attn.head_dim))
        encoder_key = encoder_key.unflatten(-1, (-1, attn.head_dim))
        encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
        encoder_query = attn.norm_added_q(encoder_query)
        encoder_key = attn.norm_added_k(encoder_key)
        query = torch.cat([encoder_query, query], dim=1)
        key = torch.cat([encoder_key, key], dim=1)
        value = torch.cat([encoder_value, value], dim=1)
    if image_rotary_emb is not None:
        query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
        key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
    hidden_states = dispatch_attention_fn(query, key, value, attn_mask=attention_mask,
                                          backend=self._attention_backend,
                                          parallel_config=self._parallel_config)
    hidden_states = hidden_states.flatten(2, 3)
    hidden_states = hidden_states.to(query.dtype)
    if encoder_hidden_states is not None:
        encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
            [encoder_hidden_states.shape[1],
             hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1)
        hidden_states = attn.to_out[0](hidden_states.contiguous())
        hidden_states = attn.to_out[1](hidden_states)
        encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
        return (hidden_states, encoder_hidden_states)
    else:
        return hidden_states
"""


def _flux_tables(attn, hidden_states, encoder_hidden_states, image_rotary_emb):
    """Flux's ``(cos, sin)`` ``[txt + img, head_dim]`` as the op's per-pair views, or None
    when this call does not rotate or its tables are not that."""
    pair = _real_pair(image_rotary_emb)
    if pair is None:
        return None
    cos, sin = pair
    seq = hidden_states.shape[1]
    if attn.added_kv_proj_dim is not None:
        if encoder_hidden_states is None:
            return None
        seq = seq + encoder_hidden_states.shape[1]
    d = attn.head_dim
    if cos.dim() != 2 or cos.shape[0] != seq or cos.shape[1] != d or d % 2 \
            or _needs_table_grad(cos, sin):
        return None
    return _tables_float(cos[:, 0::2], sin[:, 0::2], hidden_states.device)


def make_flux(mod, inner, name: str, force: bool = False):
    """The fused ``FluxAttnProcessor.__call__`` (see FLUX_FORM for diffusers' own)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None):
        tables = _flux_tables(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        dual = attn.added_kv_proj_dim is not None
        if tables is None and force:
            raise ProbeError("the tables were not taken")
        why = None
        if tables is not None and not force:
            why = _hooks_reason((attn.norm_q, attn.norm_k)
                                + ((attn.norm_added_q, attn.norm_added_k) if dual else ()), name)
        if tables is None or why is not None:
            if why is not None:
                _note(name, why)
            return inner(self, attn, hidden_states, encoder_hidden_states, attention_mask,
                         image_rotary_emb)
        cos, sin = tables
        query, key, value, encoder_query, encoder_key, encoder_value = \
            mod._get_qkv_projections(attn, hidden_states, encoder_hidden_states)

        query = query.unflatten(-1, (-1, attn.head_dim))
        key = key.unflatten(-1, (-1, attn.head_dim))
        value = value.unflatten(-1, (-1, attn.head_dim))

        if dual:
            encoder_query = encoder_query.unflatten(-1, (-1, attn.head_dim))
            encoder_key = encoder_key.unflatten(-1, (-1, attn.head_dim))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
            txt = encoder_query.shape[1]
            # Each stream with its own norms and its rows of the table; concatenated after,
            # which is the tensor diffusers rotates after concatenating.
            encoder_query, encoder_key = _norm_rope(
                encoder_query, encoder_key, cos[:txt], sin[:txt], attn.norm_added_q,
                attn.norm_added_k, False, name, force)
            query, key = _norm_rope(query, key, cos[txt:], sin[txt:], attn.norm_q, attn.norm_k,
                                    False, name, force)
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
        else:
            query, key = _norm_rope(query, key, cos, sin, attn.norm_q, attn.norm_k, False, name,
                                    force)

        # From here on, diffusers' __call__ verbatim.
        hidden_states = mod.dispatch_attention_fn(
            query,
            key,
            value,
            attn_mask=attention_mask,
            backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1],
                 hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1
            )
            hidden_states = attn.to_out[0](hidden_states.contiguous())
            hidden_states = attn.to_out[1](hidden_states)
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())

            return hidden_states, encoder_hidden_states
        else:
            return hidden_states

    return __call__


def _interleaved_table(seq: int, d: int, g: torch.Generator, dtype=torch.float32):
    """A random rotation table in diffusers' repeat-interleaved form, ``[seq, d]``."""
    angles = torch.rand(seq, d // 2, generator=g, dtype=torch.float64) * 6.0
    return (angles.cos().repeat_interleave(2, -1).to(dtype),
            angles.sin().repeat_interleave(2, -1).to(dtype))


def flux_cases(mod, cls) -> List[tuple]:
    """Tiny FluxAttention instances (a double-stream and a single-stream block's) and the
    arguments of one call of each: (attn, args)."""
    g = torch.Generator().manual_seed(2)
    cases = []
    for dual in (True, False):
        attn = mod.FluxAttention(query_dim=16, heads=2, dim_head=8,
                                 added_kv_proj_dim=16 if dual else None, out_dim=16,
                                 context_pre_only=False if dual else None, bias=True, eps=1e-6,
                                 pre_only=not dual, processor=cls())
        hidden = torch.randn(2, 5, 16, generator=g)
        enc = torch.randn(2, 3, 16, generator=g) if dual else None
        table = _interleaved_table(8 if dual else 5, 8, g)
        cases.append((attn, (hidden, enc, None, table)))
    return cases


# ---------------------------------------------------------------------------------------------
# Wan


WAN_FORM = """
def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
             rotary_emb=None):
    encoder_hidden_states_img = None
    if attn.add_k_proj is not None:
        image_context_length = encoder_hidden_states.shape[1] - 512
        encoder_hidden_states_img = encoder_hidden_states[:, :image_context_length]
        encoder_hidden_states = encoder_hidden_states[:, image_context_length:]
    query, key, value = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
    query = attn.norm_q(query)
    key = attn.norm_k(key)
    query = query.unflatten(2, (attn.heads, -1))
    key = key.unflatten(2, (attn.heads, -1))
    value = value.unflatten(2, (attn.heads, -1))
    if rotary_emb is not None:

        def apply_rotary_emb(hidden_states: torch.Tensor, freqs_cos: torch.Tensor,
                             freqs_sin: torch.Tensor):
            x1, x2 = hidden_states.unflatten(-1, (-1, 2)).unbind(-1)
            cos = freqs_cos[..., 0::2]
            sin = freqs_sin[..., 1::2]
            out = torch.empty_like(hidden_states)
            out[..., 0::2] = x1 * cos - x2 * sin
            out[..., 1::2] = x1 * sin + x2 * cos
            return out.type_as(hidden_states)
        query = apply_rotary_emb(query, *rotary_emb)
        key = apply_rotary_emb(key, *rotary_emb)
    hidden_states_img = None
    if encoder_hidden_states_img is not None:
        key_img, value_img = _get_added_kv_projections(attn, encoder_hidden_states_img)
        key_img = attn.norm_added_k(key_img)
        key_img = key_img.unflatten(2, (attn.heads, -1))
        value_img = value_img.unflatten(2, (attn.heads, -1))
        hidden_states_img = dispatch_attention_fn(query, key_img, value_img, attn_mask=None,
                                                  dropout_p=0.0, is_causal=False,
                                                  backend=self._attention_backend,
                                                  parallel_config=None)
        hidden_states_img = hidden_states_img.flatten(2, 3)
        hidden_states_img = hidden_states_img.type_as(query)
    hidden_states = dispatch_attention_fn(
        query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
        backend=self._attention_backend,
        parallel_config=self._parallel_config if encoder_hidden_states is None else None)
    hidden_states = hidden_states.flatten(2, 3)
    hidden_states = hidden_states.type_as(query)
    if hidden_states_img is not None:
        hidden_states = hidden_states + hidden_states_img
    hidden_states = attn.to_out[0](hidden_states)
    hidden_states = attn.to_out[1](hidden_states)
    return hidden_states
"""


def _wan_tables(attn, hidden_states, rotary_emb):
    """Wan's ``(freqs_cos, freqs_sin)`` ``[1 or B, S, 1, head_dim]`` as the op's views
    (cosines at even, sines at odd positions, as Wan's function reads them), or None."""
    if not isinstance(rotary_emb, (tuple, list)) or len(rotary_emb) != 2:
        return None
    fc, fs = rotary_emb
    if not (isinstance(fc, torch.Tensor) and isinstance(fs, torch.Tensor)
            and fc.is_floating_point() and fc.dtype == fs.dtype and fc.shape == fs.shape):
        return None
    b, s, inner = hidden_states.shape[0], hidden_states.shape[1], hidden_states.shape[-1]
    if fc.dim() != 4 or fc.shape[1] != s or fc.shape[2] != 1 \
            or not (fc.shape[0] == b or fc.shape[0] == 1) or _needs_table_grad(fc, fs):
        return None
    d = fc.shape[-1]
    if d % 2 or d * attn.heads != attn.inner_dim:
        return None
    return _tables_float(fc[:, :, 0, 0::2], fs[:, :, 0, 1::2], hidden_states.device)


def make_wan(mod, inner, name: str, force: bool = False):
    """The fused ``WanAttnProcessor.__call__`` (see WAN_FORM for diffusers' own). Only the
    self-attention call (no encoder states, no image keys, tables given) is fused; it is the
    one with RoPE."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 rotary_emb=None):
        tables = None
        if rotary_emb is not None and encoder_hidden_states is None and attn.add_k_proj is None:
            tables = _wan_tables(attn, hidden_states, rotary_emb)
        if tables is None and force:
            raise ProbeError("the tables were not taken")
        why = None if tables is None or force else _hooks_reason((attn.norm_q, attn.norm_k), name)
        if tables is None or why is not None:
            if why is not None:
                _note(name, why)
            return inner(self, attn, hidden_states, encoder_hidden_states, attention_mask,
                         rotary_emb)
        cos, sin = tables
        # With no encoder states and no image keys, diffusers' __call__ is: projections,
        # norms over each token's heads, unflatten, RoPE, attention, output projection.
        query, key, value = mod._get_qkv_projections(attn, hidden_states, None)

        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))

        query, key = _norm_rope(query, key, cos, sin, attn.norm_q, attn.norm_k, True, name,
                                force)

        hidden_states = mod.dispatch_attention_fn(
            query,
            key,
            value,
            attn_mask=attention_mask,
            dropout_p=0.0,
            is_causal=False,
            backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.type_as(query)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        return hidden_states

    return __call__


def wan_cases(mod, cls) -> List[tuple]:
    """A tiny WanAttention (self-attention) and the arguments of one call."""
    g = torch.Generator().manual_seed(3)
    attn = mod.WanAttention(dim=16, heads=2, dim_head=8, eps=1e-6, processor=cls())
    hidden = torch.randn(2, 6, 16, generator=g)
    fc, fs = _interleaved_table(6, 8, g, torch.float64)
    return [(attn, (hidden, None, None, (fc[None, :, None], fs[None, :, None])))]


# ---------------------------------------------------------------------------------------------
# Qwen-Image


QWEN_FORM = """
def __call__(self, attn, hidden_states, encoder_hidden_states=None,
             encoder_hidden_states_mask=None, attention_mask=None, image_rotary_emb=None):
    if encoder_hidden_states is None:
        raise ValueError('QwenDoubleStreamAttnProcessor2_0 requires encoder_hidden_states '
                         '(text stream)')
    if attention_mask is not None:
        raise ValueError('QwenDoubleStreamAttnProcessor2_0 does not accept an external '
                         'attention_mask. Pass encoder_hidden_states_mask to let the '
                         'processor build the joint mask.')
    if encoder_hidden_states_mask is not None:
        seq_img = hidden_states.shape[1]
        image_mask = torch.ones((hidden_states.shape[0], seq_img), dtype=torch.bool,
                                device=hidden_states.device)
        attention_mask = torch.cat([encoder_hidden_states_mask, image_mask], dim=1)
        attention_mask = attention_mask[:, None, None, :]
    seq_txt = encoder_hidden_states.shape[1]
    img_query = attn.to_q(hidden_states)
    img_key = attn.to_k(hidden_states)
    img_value = attn.to_v(hidden_states)
    txt_query = attn.add_q_proj(encoder_hidden_states)
    txt_key = attn.add_k_proj(encoder_hidden_states)
    txt_value = attn.add_v_proj(encoder_hidden_states)
    head_dim = attn.inner_dim // attn.heads
    img_query = img_query.unflatten(-1, (-1, head_dim))
    img_key = img_key.unflatten(-1, (-1, head_dim))
    img_value = img_value.unflatten(-1, (-1, head_dim))
    txt_query = txt_query.unflatten(-1, (-1, head_dim))
    txt_key = txt_key.unflatten(-1, (-1, head_dim))
    txt_value = txt_value.unflatten(-1, (-1, head_dim))
    if attn.norm_q is not None:
        img_query = attn.norm_q(img_query)
    if attn.norm_k is not None:
        img_key = attn.norm_k(img_key)
    if attn.norm_added_q is not None:
        txt_query = attn.norm_added_q(txt_query)
    if attn.norm_added_k is not None:
        txt_key = attn.norm_added_k(txt_key)
    if image_rotary_emb is not None:
        img_freqs, txt_freqs = image_rotary_emb
        img_query = apply_rotary_emb_qwen(img_query, img_freqs, use_real=False)
        img_key = apply_rotary_emb_qwen(img_key, img_freqs, use_real=False)
        txt_query = apply_rotary_emb_qwen(txt_query, txt_freqs, use_real=False)
        txt_key = apply_rotary_emb_qwen(txt_key, txt_freqs, use_real=False)
    joint_query = torch.cat([txt_query, img_query], dim=1)
    joint_key = torch.cat([txt_key, img_key], dim=1)
    joint_value = torch.cat([txt_value, img_value], dim=1)
    joint_hidden_states = dispatch_attention_fn(joint_query, joint_key, joint_value,
                                                attn_mask=attention_mask, dropout_p=0.0,
                                                is_causal=False, backend=self._attention_backend,
                                                parallel_config=self._parallel_config)
    joint_hidden_states = joint_hidden_states.flatten(2, 3)
    joint_hidden_states = joint_hidden_states.to(joint_query.dtype)
    txt_attn_output = joint_hidden_states[:, :seq_txt, :]
    img_attn_output = joint_hidden_states[:, seq_txt:, :]
    img_attn_output = attn.to_out[0](img_attn_output.contiguous())
    if len(attn.to_out) > 1:
        img_attn_output = attn.to_out[1](img_attn_output)
    txt_attn_output = attn.to_add_out(txt_attn_output.contiguous())
    return (img_attn_output, txt_attn_output)
"""


def _qwen_stream_table(freqs, seq: int, head_dim: int, device):
    """A Qwen stream's complex ``[seq, head_dim/2]`` table as (real, imag) views, or None."""
    tables = _complex_tables(freqs)
    if tables is None or freqs.dim() != 2 or freqs.shape[0] != seq \
            or 2 * freqs.shape[1] != head_dim or _needs_table_grad(freqs):
        return None
    return _tables_float(*tables, device)


def make_qwen(mod, inner, name: str, force: bool = False):
    """The fused ``QwenDoubleStreamAttnProcessor2_0.__call__`` (see QWEN_FORM)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None,
                 encoder_hidden_states_mask=None, attention_mask=None, image_rotary_emb=None):
        norms = (attn.norm_q, attn.norm_k, attn.norm_added_q, attn.norm_added_k)
        img = txt = None
        if (encoder_hidden_states is not None and attention_mask is None
                and image_rotary_emb is not None and all(n is not None for n in norms)
                and isinstance(image_rotary_emb, (tuple, list)) and len(image_rotary_emb) == 2):
            head_dim = attn.inner_dim // attn.heads
            img = _qwen_stream_table(image_rotary_emb[0], hidden_states.shape[1], head_dim,
                                     hidden_states.device)
            txt = _qwen_stream_table(image_rotary_emb[1], encoder_hidden_states.shape[1],
                                     head_dim, hidden_states.device)
        if (img is None or txt is None) and force:
            raise ProbeError("the tables were not taken")
        why = None if img is None or txt is None or force else _hooks_reason(norms, name)
        if img is None or txt is None or why is not None:
            if why is not None:
                _note(name, why)
            return inner(self, attn, hidden_states, encoder_hidden_states,
                         encoder_hidden_states_mask, attention_mask, image_rotary_emb)

        # diffusers' __call__ verbatim, but for the norms and RoPE of each stream.
        if encoder_hidden_states_mask is not None:
            seq_img = hidden_states.shape[1]
            image_mask = torch.ones((hidden_states.shape[0], seq_img), dtype=torch.bool,
                                    device=hidden_states.device)
            attention_mask = torch.cat([encoder_hidden_states_mask, image_mask], dim=1)
            attention_mask = attention_mask[:, None, None, :]

        seq_txt = encoder_hidden_states.shape[1]

        img_query = attn.to_q(hidden_states)
        img_key = attn.to_k(hidden_states)
        img_value = attn.to_v(hidden_states)

        txt_query = attn.add_q_proj(encoder_hidden_states)
        txt_key = attn.add_k_proj(encoder_hidden_states)
        txt_value = attn.add_v_proj(encoder_hidden_states)

        head_dim = attn.inner_dim // attn.heads
        img_query = img_query.unflatten(-1, (-1, head_dim))
        img_key = img_key.unflatten(-1, (-1, head_dim))
        img_value = img_value.unflatten(-1, (-1, head_dim))

        txt_query = txt_query.unflatten(-1, (-1, head_dim))
        txt_key = txt_key.unflatten(-1, (-1, head_dim))
        txt_value = txt_value.unflatten(-1, (-1, head_dim))

        img_query, img_key = _norm_rope(img_query, img_key, *img, attn.norm_q, attn.norm_k,
                                        False, name, force)
        txt_query, txt_key = _norm_rope(txt_query, txt_key, *txt, attn.norm_added_q,
                                        attn.norm_added_k, False, name, force)

        joint_query = torch.cat([txt_query, img_query], dim=1)
        joint_key = torch.cat([txt_key, img_key], dim=1)
        joint_value = torch.cat([txt_value, img_value], dim=1)

        joint_hidden_states = mod.dispatch_attention_fn(
            joint_query,
            joint_key,
            joint_value,
            attn_mask=attention_mask,
            dropout_p=0.0,
            is_causal=False,
            backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )

        joint_hidden_states = joint_hidden_states.flatten(2, 3)
        joint_hidden_states = joint_hidden_states.to(joint_query.dtype)

        txt_attn_output = joint_hidden_states[:, :seq_txt, :]
        img_attn_output = joint_hidden_states[:, seq_txt:, :]

        img_attn_output = attn.to_out[0](img_attn_output.contiguous())
        if len(attn.to_out) > 1:
            img_attn_output = attn.to_out[1](img_attn_output)

        txt_attn_output = attn.to_add_out(txt_attn_output.contiguous())

        return img_attn_output, txt_attn_output

    return __call__


def qwen_cases(mod, cls) -> List[tuple]:
    """A tiny joint attention of Qwen-Image's blocks (diffusers' Attention with the
    processor, qk_norm="rms_norm") and one call's arguments, without and with a text mask."""
    from diffusers.models.attention_processor import Attention

    g = torch.Generator().manual_seed(4)
    attn = Attention(query_dim=16, cross_attention_dim=None, added_kv_proj_dim=16, dim_head=8,
                     heads=2, out_dim=16, context_pre_only=False, bias=True, processor=cls(),
                     qk_norm="rms_norm", eps=1e-6)
    hidden = torch.randn(2, 5, 16, generator=g)
    enc = torch.randn(2, 3, 16, generator=g)
    angles_img = torch.rand(5, 4, generator=g, dtype=torch.float64) * 6.0
    angles_txt = torch.rand(3, 4, generator=g, dtype=torch.float64) * 6.0
    freqs = (torch.polar(torch.ones_like(angles_img), angles_img).to(torch.complex64),
             torch.polar(torch.ones_like(angles_txt), angles_txt).to(torch.complex64))
    mask = torch.tensor([[True, True, False], [True, True, True]])
    return [(attn, (hidden, enc, None, None, freqs)), (attn, (hidden, enc, mask, None, freqs))]


# ---------------------------------------------------------------------------------------------
# The registry and the probe


class FusedSpec(NamedTuple):
    """A processor class whose norms-then-RoPE is fused.

    form: the source of diffusers' ``__call__`` the fused one reproduces.
    make: ``(module, inner, name, force) -> __call__``; inner is the ``__call__`` to run for
        a call that is not fused.
    cases: ``(module, cls) -> [(attn, args)]``, tiny instances for the probe.
    across_heads: whether the norms run over each token's heads (documentation).
    depends: (module attribute, form name) the ``__call__`` calls by its global name for the
        RoPE of the unfused path ("" when the form holds its own rotation).
    """
    form: str
    make: Callable
    cases: Callable
    across_heads: bool
    depends: Tuple[str, str]


SPECS: Dict[str, FusedSpec] = {
    "flux": FusedSpec(FLUX_FORM, make_flux, flux_cases, False, ("apply_rotary_emb", "embeddings")),
    "wan": FusedSpec(WAN_FORM, make_wan, wan_cases, True, ("", "")),
    "qwenimage": FusedSpec(QWEN_FORM, make_qwen, qwen_cases, False,
                           ("apply_rotary_emb_qwen", "qwen")),
}


def _outputs(out) -> List[torch.Tensor]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def probe(spec: FusedSpec, mod, cls, inner, name: str):
    """(None, the verified norm forwards) if the fused ``__call__`` gives what ``inner``
    gives on tiny random instances (outputs, and the gradients of the inputs and of every
    norm weight), with eps large enough to matter; else (why not, ()). Runs with autograd on
    whatever mode the caller is in (patch() may be called under no_grad)."""
    with torch.inference_mode(False), torch.enable_grad():
        return _probe(spec, mod, cls, inner, name)


def _probe(spec: FusedSpec, mod, cls, inner, name: str):
    fused = spec.make(mod, inner, name, force=True)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            cases = spec.cases(mod, cls)
    except Exception as e:  # noqa: BLE001 (any failure means: not the class we know)
        return f"a tiny instance could not be built ({type(e).__name__}: {e})", ()
    forwards = set()
    g = torch.Generator().manual_seed(5)
    for attn, args in cases:
        norms = [m for n, m in attn.named_modules() if n.startswith("norm_") and m is not None
                 and "norm" in type(m).__name__.lower()]
        for norm in norms:
            why = probe_norm(norm, norm.weight.shape[0] if norm.weight is not None else
                             _norm_dim(norm))
            if why:
                return why, ()
            forwards.add(type(norm).forward)
        with torch.no_grad():
            for p in attn.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() > 1 else 1.0))
            for norm in norms:
                norm.eps = 0.25  # matters at these sizes: a wrong eps would show
        results = []
        try:
            for fn in (inner, fused):
                tensors = [a.clone().requires_grad_() if isinstance(a, torch.Tensor)
                           and a.is_floating_point() else a for a in args]
                outs = _outputs(fn(attn.processor, attn, *tensors))
                weights = [n.weight for n in norms if n.weight is not None]
                leaves = [t for t in tensors if isinstance(t, torch.Tensor) and t.requires_grad]
                loss = sum((o * torch.linspace(-1, 1, o.numel()).view(o.shape)).sum()
                           for o in outs)
                inputs = leaves + weights
                grads = torch.autograd.grad(loss, inputs, allow_unused=True)
                # a weight one side leaves unused has gradient 0 there
                grads = [torch.zeros_like(t) if gr is None else gr for t, gr in zip(inputs, grads)]
                results.append((outs, grads))
        except ProbeError as e:
            return f"the fused path could not run on a tiny instance ({e})", ()
        except Exception as e:  # noqa: BLE001
            return f"the probe call failed ({type(e).__name__}: {e})", ()
        (oa, ga), (ob, gb) = results
        for what, a, b in (("output", oa, ob), ("gradient", ga, gb)):
            if len(a) != len(b) or any(x.shape != y.shape or not torch.allclose(
                    x, y, rtol=1e-4, atol=1e-5) for x, y in zip(a, b)):
                return (f"its {cls.__name__}.__call__ gives a different {what} than the fused "
                        f"norm + RoPE on a tiny instance"), ()
    return None, tuple(forwards)


def _norm_dim(norm) -> int:
    shape = getattr(norm, "normalized_shape", None) or getattr(norm, "dim", None)
    return int(tuple(shape)[-1])
