"""The Hugging Face drop-in: transformers' ``apply_rotary_pos_emb`` on rope_ext's fused op.

    import rope_ext.hf
    rope_ext.hf.patch()                  # every supported family, or patch("llama"), patch(["qwen2", "phi3"])
    model = AutoModelForCausalLM.from_pretrained(...)   # runs RoPE through torch.ops.rope.apply_qk
    rope_ext.hf.unpatch()                # transformers' own functions back

    with rope_ext.hf.patched("llama"):   # the context manager: unpatches what it patched
        ...

:func:`apply_rotary_pos_emb` can also be called directly wherever transformers' function of that
name is called: same arguments, same values within the rounding of x's dtype.

transformers is imported only by :func:`patch` / :func:`unpatch`, never when this module loads.

How the patch works (checked against transformers 5.18): each modeling module defines its own
``apply_rotary_pos_emb`` at module level, and the attention ``forward`` calls it by that global
name at call time (``query_states, key_states = apply_rotary_pos_emb(query_states, key_states,
cos, sin)``), so replacing the module attribute reroutes every attention layer, eager or under
torch.compile (which reads the global when it traces). The function's
``@use_kernel_forward_from_hub("rotary_pos_emb")`` decorator and the attention class's
``@use_kernelized_func(apply_rotary_pos_emb)`` are no-ops unless the ``kernels`` package is
installed; with it, ``kernelize`` works on the objects the decorators saw at import, while the
forward still looks the global up, so a patched module uses rope_ext either way.

Before replacing anything, :func:`patch` reads the module's source and checks that its
``apply_rotary_pos_emb`` (and ``rotate_half``) is one of the forms whose meaning this function
reproduces exactly, so a transformers release that changes the math is refused rather than
silently given a different rotation. ``patch()`` with no argument reads only the modules
already imported; the others are patched (and checked) by an import hook when transformers
imports them.

For Qwen3, OLMo 2 and Gemma 3 (``FUSED_MODEL_TYPES``) the attention class's ``forward`` is
replaced too, by one that does q_norm/k_norm and RoPE in one ``rope_ext.rms_norm_rope_qk``
call; a tiny random instance checks it against transformers' forward before the first
replacement (see :func:`patch`).
"""

import ast
import contextlib
import importlib
import inspect
import threading
import warnings
from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch

import rope_ext
from rope_ext.functional import apply_rope_qk

__all__ = ["apply_rotary_pos_emb", "patch", "unpatch", "patched", "is_patched", "report",
           "SUPPORTED_MODEL_TYPES", "FUSED_MODEL_TYPES", "PatchResult", "Report"]


# ---------------------------------------------------------------------------------------------
# The function


def _describe(t) -> str:
    return f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else f"a {type(t).__name__}"


def _table_from_hf(cos: torch.Tensor, sin: torch.Tensor, seq: int
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """transformers' cos/sin ``[batch or 1, seq or 1, r]`` (the r/2 angles written twice) as
    rope_ext's one-row-per-token table ``[batch or 1, seq, r/2]``: views, no copy."""
    pairs = cos.shape[-1] // 2
    c = cos[..., :pairs]  # views: transformers' second half is a copy of the first
    s = sin[..., :pairs]
    if c.shape[1] != seq:  # one position for every token: a stride-0 view
        c = c.expand(c.shape[0], seq, pairs)
        s = s.expand(s.shape[0], seq, pairs)
    return c, s


def apply_rotary_pos_emb(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         position_ids=None, unsqueeze_dim: int = 1
                         ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k as transformers' Llama ``apply_rotary_pos_emb`` does, in one fused op call.

    A drop-in for the function of that name in ``transformers.models.llama.modeling_llama`` (and
    its copies in the families :func:`patch` supports): same signature, same meaning, the same
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
            transformers' partial-rotary copies (GPT-NeoX, Phi-3). The second half is not read:
            tables whose halves differ (not made by transformers) give a different answer.
            cos/sin get no gradient (transformers builds them under no_grad).
        position_ids: accepted and ignored, as in transformers (deprecated there: cos/sin are
            already gathered per token). For callers of transformers 5.x's signature
            ``(q, k, cos, sin, unsqueeze_dim=1)`` that pass unsqueeze_dim positionally, a
            Python int here is taken as unsqueeze_dim.
        unsqueeze_dim: 1 or 2 (or the same axes counted from the end of 4-D: -3, -2), the axis
            of q/k that holds the heads.

    Returns:
        ``(q_embed, k_embed)``, new tensors in q/k's layout and in the dtype transformers'
        arithmetic would give (``torch.promote_types`` of q's and cos's dtypes; x's dtype when
        the tables were cast to it, as transformers' models do). Differentiable in q and k.
    """
    if position_ids is not None and not isinstance(position_ids, torch.Tensor):
        if type(position_ids) is int and unsqueeze_dim == 1:
            unsqueeze_dim = position_ids  # a 5-argument positional call of the 5.x signature
        else:
            raise TypeError(f"position_ids is ignored (deprecated in transformers) and must be a "
                            f"tensor or None, got {type(position_ids).__name__}; pass "
                            f"unsqueeze_dim as a keyword")
    if type(unsqueeze_dim) is not int or unsqueeze_dim not in (1, 2, -3, -2):
        raise ValueError(f"unsqueeze_dim must be 1 (q/k are [batch, heads, seq, head_dim]) or 2 "
                         f"(q/k are [batch, seq, heads, head_dim]), got {unsqueeze_dim!r}")
    heads_axis = unsqueeze_dim % 4  # -3 -> 1, -2 -> 2
    layout = "bhsd" if heads_axis == 1 else "bshd"
    seq_axis = 2 if heads_axis == 1 else 1
    dims = "[batch, heads, seq, head_dim]" if heads_axis == 1 else "[batch, seq, heads, head_dim]"

    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    for name, t in (("q", q), ("k", k)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D {dims} for unsqueeze_dim={unsqueeze_dim}, got "
                             f"{_describe(t)}")
    if q.dtype != k.dtype:
        raise TypeError(f"q and k must have the same dtype, got q {q.dtype} and k {k.dtype}")
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
    batch, seq = q.shape[0], q.shape[seq_axis]
    if k.shape[0] != batch or k.shape[seq_axis] != seq:
        raise ValueError(f"q and k must share batch and seq ({dims}), got q {tuple(q.shape)} and "
                         f"k {tuple(k.shape)}")
    rotary_dim = cos.shape[-1]
    if rotary_dim == 0 or rotary_dim % 2:
        raise ValueError(f"cos/sin's last dimension (rotary_dim, both halves of the angles) must "
                         f"be a positive even number, got {rotary_dim}")
    if rotary_dim > q.shape[-1] or rotary_dim > k.shape[-1]:
        raise ValueError(f"cos/sin's last dimension (rotary_dim = {rotary_dim}) must not exceed "
                         f"head_dim (q {q.shape[-1]}, k {k.shape[-1]})")
    if cos.shape[0] != 1 and cos.shape[0] != batch:  # (no `in`: symbolic shapes)
        raise ValueError(f"cos/sin's batch dimension must be 1 or q's batch {batch}, got "
                         f"shape {tuple(cos.shape)}")
    if cos.shape[1] != 1 and cos.shape[1] != seq:
        raise ValueError(f"cos/sin's seq dimension must be q's seq {seq} (or 1), got shape "
                         f"{tuple(cos.shape)} for q {tuple(q.shape)} with "
                         f"unsqueeze_dim={unsqueeze_dim}")

    c, s = _table_from_hf(cos, sin, seq)

    # transformers computes q * cos in the promoted dtype; do the same.
    out_dtype = torch.promote_types(q.dtype, cos.dtype)
    if q.dtype != out_dtype:
        q = q.to(out_dtype)
        k = k.to(out_dtype)
    if c.dtype != out_dtype and c.dtype not in (torch.float32, torch.float64):
        c = c.to(out_dtype)
        s = s.to(out_dtype)
    return apply_rope_qk(q, k, c, s, layout=layout)


# ---------------------------------------------------------------------------------------------
# Which transformers modules hold a function of exactly this meaning

# The forms of transformers' function that ours reproduces (read in transformers 5.18 and
# compared as ASTs, docstring and decorators aside). "full" is Llama's; the "partial" forms
# rotate cos.shape[-1] leading dimensions and pass the rest through, which ours does too.
_FORMS = {
    "full": """
def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    q_embed = (q * cos) + (rotate_half(q) * sin)
    k_embed = (k * cos) + (rotate_half(k) * sin)
    return q_embed, k_embed
""",
    "partial (GPT-NeoX)": """
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
""",
    "partial (Phi-3)": """
def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    rotary_dim = cos.shape[-1]
    q_rot, q_pass = q[..., :rotary_dim], q[..., rotary_dim:]
    k_rot, k_pass = k[..., :rotary_dim], k[..., rotary_dim:]
    q_embed = torch.cat([(q_rot * cos) + (rotate_half(q_rot) * sin), q_pass], dim=-1)
    k_embed = torch.cat([(k_rot * cos) + (rotate_half(k_rot) * sin), k_pass], dim=-1)
    return q_embed, k_embed
""",
    "partial (Nemotron)": """
def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    rot_dim = cos.shape[-1]
    q, q_pass = q[..., :rot_dim], q[..., rot_dim:]
    k, k_pass = k[..., :rot_dim], k[..., rot_dim:]
    q_embed = (q * cos) + (rotate_half(q) * sin)
    k_embed = (k * cos) + (rotate_half(k) * sin)
    return torch.cat((q_embed, q_pass), dim=-1), torch.cat((k_embed, k_pass), dim=-1)
""",
}
_ROTATE_HALF = """
def rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)
"""

# model_type (transformers' config.model_type; the module is transformers.models.<name>.modeling_<name>)
# -> the form its function has in transformers 5.18. Each is exercised by tests/test_hf_dropin.py
# on a tiny random model. Families that slice the rotary part in the attention before the call
# (Phi, StableLM, Persimmon) have the full form: cos.shape[-1] equals the sliced head_dim there.
SUPPORTED_MODEL_TYPES: Dict[str, str] = {
    "llama": "full", "mistral": "full", "mixtral": "full",
    "qwen2": "full", "qwen2_moe": "full", "qwen3": "full", "qwen3_moe": "full",
    "gemma": "full", "gemma2": "full", "gemma3": "full",
    "granite": "full", "granitemoe": "full", "starcoder2": "full", "olmoe": "full",
    "smollm3": "full", "falcon": "full",
    "phi": "full", "stablelm": "full", "persimmon": "full",
    "phi3": "partial (Phi-3)", "gpt_neox": "partial (GPT-NeoX)",
    "nemotron": "partial (Nemotron)",
}
# config.model_type values whose code lives in another family's module.
_ALIASES = {"gemma3_text": "gemma3"}
# Families users will ask about whose function means something else (transformers 5.18).
_NOT_SUPPORTED = {
    "gptj": "interleaved pairing with a [sin | cos] table gathered by position (different signature)",
    "codegen": "interleaved pairing with a [sin | cos] table gathered by position (different signature)",
    "cohere": "interleaved pairing (rotate_half on even/odd elements) computed in float32",
    "cohere2": "interleaved pairing (rotate_half on even/odd elements) computed in float32",
    "glm": "interleaved pairing inside the rotary part (cos/sin repeat_interleave)",
    "glm4": "interleaved pairing inside the rotary part (cos/sin repeat_interleave)",
    "olmo": "casts the result back to q's dtype (differs when the table's dtype is wider)",
    "esm": "rotates in float32 and casts back",
    "modernbert": "rotates in float32 and casts back",
    "gemma3n": "one tensor per call: apply_rotary_pos_emb(x, cos, sin, unsqueeze_dim)",
    "gemma4": "one tensor per call: apply_rotary_pos_emb(x, cos, sin, unsqueeze_dim)",
    "gpt_oss": "a different rotation code path (_apply_rotary_emb), not verified",
    "deepseek_v2": "complex-number interleaved rotation",
    "qwen2_vl": "multimodal rotary (apply_multimodal_rotary_pos_emb) in the text model",
    "qwen2_5_vl": "multimodal rotary (apply_multimodal_rotary_pos_emb) in the text model",
    "qwen3_vl": "multimodal rotary (interleaved MRoPE) in the text model",
}

_lock = threading.RLock()
_originals: Dict[str, object] = {}  # module name -> the object we replaced
_verified: Dict[str, Optional[str]] = {}  # module name -> None if verified, else the reason


def _canon(src: str) -> str:
    fn = ast.parse(src).body[0]
    return _fn_key(fn)


def _fn_key(fn) -> str:
    body = [n for n in fn.body
            if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)
                    and isinstance(n.value.value, str))]
    return ast.dump(fn.args) + "|" + "".join(ast.dump(n) for n in body)


_FORM_KEYS = {_canon(src): name for name, src in _FORMS.items()}
_ROTATE_HALF_KEY = _canon(_ROTATE_HALF)


def _check_module(mod, expected_form: str) -> Optional[str]:
    """None if mod's apply_rotary_pos_emb has the expected meaning and is called by its global
    name with at most 4 positional arguments; else why not."""
    name = mod.__name__
    if name in _verified:
        return _verified[name]
    try:
        tree = ast.parse(inspect.getsource(mod))
    except (OSError, TypeError, SyntaxError) as e:
        reason = f"its source could not be read to check it ({e})"
    else:
        defs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
        fn = defs.get("apply_rotary_pos_emb")
        rh = defs.get("rotate_half")
        calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)
                 and isinstance(n.func, ast.Name) and n.func.id == "apply_rotary_pos_emb"]
        if fn is None:
            reason = "it defines no module-level apply_rotary_pos_emb"
        elif _FORM_KEYS.get(_fn_key(fn)) != expected_form:
            found = _FORM_KEYS.get(_fn_key(fn), "an unknown form")
            reason = (f"its apply_rotary_pos_emb is {found}, not the expected {expected_form} "
                      f"form (transformers changed it?)")
        elif rh is None or _fn_key(rh) != _ROTATE_HALF_KEY:
            reason = "its rotate_half is not the half-split one"
        elif not calls:
            reason = "its attention does not call apply_rotary_pos_emb by its global name"
        elif any(len(c.args) > 4 or any(kw.arg != "unsqueeze_dim" for kw in c.keywords)
                 for c in calls):
            reason = "it calls apply_rotary_pos_emb with arguments this drop-in does not expect"
        else:
            reason = None
    _verified[name] = reason
    return reason


def _module_name(family: str) -> str:
    return f"transformers.models.{family}.modeling_{family}"


def _all_families() -> List[str]:
    return list(SUPPORTED_MODEL_TYPES) + [f for f in FUSED_MODEL_TYPES
                                          if f not in SUPPORTED_MODEL_TYPES]


def _resolve(model_type) -> List[str]:
    if model_type is None:
        return _all_families()
    names = [model_type] if isinstance(model_type, str) else model_type
    try:
        names = list(names)
    except TypeError:
        raise TypeError(f"model_type must be None, a string or a list of strings, got "
                        f"{type(model_type).__name__}") from None
    families = []
    for n in names:
        if not isinstance(n, str):
            raise TypeError(f"model_type must be None, a string or a list of strings, got an "
                            f"element {n!r}")
        fam = _ALIASES.get(n, n)
        if fam not in SUPPORTED_MODEL_TYPES and fam not in FUSED_MODEL_TYPES:
            why = _NOT_SUPPORTED.get(fam)
            detail = (f"its apply_rotary_pos_emb means something else: {why}" if why else
                      "not a model_type rope_ext.hf knows")
            raise ValueError(f"model_type {n!r} is not supported ({detail}); supported: "
                             f"{', '.join(sorted(_all_families()))}")
        if fam not in families:
            families.append(fam)
    return families


# ---------------------------------------------------------------------------------------------
# The fused QK-RMSNorm + RoPE attention forward (Qwen3, OLMo 2, Gemma 3)


class _FusedSpec(NamedTuple):
    """What differs between the attention forwards that normalize q and k before RoPE.

    transformers 5.18's ``Qwen3Attention``, ``Olmo2Attention`` and ``Gemma3Attention`` project
    q/k/v, RMS-normalize q and k with ``q_norm``/``k_norm``, rotate them with the module's
    ``apply_rotary_pos_emb``, then do the same thing (cache update, the attention function from
    ``ALL_ATTENTION_FUNCTIONS``, ``o_proj``). Where the norm sits is the only difference in the
    first half, and for the math only one thing about it matters: whether it normalizes each
    head (over head_dim) or each token (over heads * head_dim).
    """
    cls_name: str  # the attention class in transformers.models.<family>.modeling_<family>
    config_name: str  # its config class there (the patch-time probe builds a tiny one)
    norm_on: str  # where transformers applies q_norm/k_norm (documentation only)
    across_heads: bool  # False: over head_dim (weights [head_dim]); True: over heads*head_dim
    weight_offset: float  # 1.0: Gemma's x * (1 + weight)
    eps_attr: str  # the RMSNorm module's epsilon attribute
    sliding_window: bool  # whether the forward passes sliding_window=self.sliding_window
    probe_config: Dict[str, object]  # family-specific settings of the probe's tiny config


FUSED_MODEL_TYPES: Dict[str, _FusedSpec] = {
    "qwen3": _FusedSpec(
        "Qwen3Attention", "Qwen3Config", "each head, on the [b, s, h, d] view of the projection",
        False, 0.0, "variance_epsilon", True,
        dict(use_sliding_window=True, sliding_window=4, max_window_layers=0,
             layer_types=["sliding_attention"])),
    "olmo2": _FusedSpec(
        "Olmo2Attention", "Olmo2Config", "each token, on the flat projection [b, s, h*d]",
        True, 0.0, "variance_epsilon", False, {}),
    "gemma3": _FusedSpec(
        "Gemma3Attention", "Gemma3TextConfig", "each head, on [b, h, s, d] after the transpose",
        False, 1.0, "eps", True,
        # softcapping on: transformers 5.18's Gemma 3 does not pass it to the attention
        # function, and the probe checks that the fused forward does exactly the same.
        dict(sliding_window=4, layer_types=["sliding_attention"], attn_logit_softcapping=30.0,
             query_pre_attn_scalar=8)),
}
_PROBE_CONFIG = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                     intermediate_size=32, num_hidden_layers=1, vocab_size=32,
                     max_position_embeddings=64, rms_norm_eps=1e-6, attention_dropout=0.25,
                     attention_bias=True, attn_implementation="eager", pad_token_id=None,
                     bos_token_id=None, eos_token_id=None)

_fused_originals: Dict[str, Tuple[type, object]] = {}  # class name -> (class, its own forward)
_fused_verified: Dict[str, Optional[str]] = {}  # class name -> None if verified, else why not
# class name -> the forward function of the norm class the probe verified (q_norm's and k_norm's
# class are the same one in every fused family)
_fused_norm_forwards: Dict[str, object] = {}
# class name -> why a call of its fused forward ran transformers' own forward instead (the
# first reason seen; see _hooks_or_other_norms)
_fallbacks: Dict[str, str] = {}


def _class_name(mod, spec: _FusedSpec) -> str:
    return f"{mod.__name__}.{spec.cls_name}"


def _fused_op():
    """rope_ext.rms_norm_rope_qk, looked up on the package at call time (None if this build
    of rope_ext does not have it)."""
    return getattr(rope_ext, "rms_norm_rope_qk", None)


# torch's global module hooks (one dict object each, filled and emptied in place)
_GLOBAL_HOOKS = tuple(getattr(torch.nn.modules.module, name) for name in (
    "_global_forward_pre_hooks", "_global_forward_hooks", "_global_backward_pre_hooks",
    "_global_backward_hooks"))


def _norm_not_fusable(norm, verified_forward) -> Optional[str]:
    """None if calling ``norm`` would run exactly its verified forward and nothing else; else
    what would run besides (a hook) or instead (another class or forward)."""
    if (norm._forward_pre_hooks or norm._forward_hooks or norm._backward_pre_hooks
            or norm._backward_hooks):
        return "a hook is registered on its q_norm or k_norm module"
    if type(norm).forward is not verified_forward or "forward" in norm.__dict__:
        return f"its {type(norm).__name__} is not the norm class verified at patch time"
    return None


def _hooks_or_other_norms(self, name: str) -> Optional[str]:
    """Why the fused forward must not stand in for q_norm/k_norm in this call, or None.

    The fused op computes the norms without calling the norm modules, so anything a call of
    those modules would run besides their verified forward (module hooks: tensor parallel's
    gradient all-reduce, PEFT, logging; global module hooks; a norm swapped for another class)
    would be skipped: then transformers' own forward runs for the call, which calls them.
    Without hooks this costs a few attribute reads per attention call (guards under
    torch.compile)."""
    verified = _fused_norm_forwards.get(name)
    why = _norm_not_fusable(self.q_norm, verified) or _norm_not_fusable(self.k_norm, verified)
    if why is None and any(_GLOBAL_HOOKS):
        why = "a global module hook is registered (torch.nn.modules.module)"
    if why is not None and name not in _fallbacks:
        _fallbacks[name] = why
    return why


def _fused_attention_forward(self, spec: _FusedSpec, mod, name, original, hidden_states,
                             position_embeddings, attention_mask, past_key_values, kwargs,
                             honour_hooks=True):
    q_eps = getattr(self.q_norm, spec.eps_attr)
    if (q_eps != getattr(self.k_norm, spec.eps_attr)  # one eps per op call: not this layer
            or (honour_hooks and _hooks_or_other_norms(self, name))):
        return original(self, hidden_states, position_embeddings, attention_mask,
                        past_key_values, **kwargs)
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)

    # [b, s, h, d] views of the projections: the op reads them in place (layout "bshd").
    query_states = self.q_proj(hidden_states).view(hidden_shape)
    key_states = self.k_proj(hidden_states).view(hidden_shape)
    value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

    cos, sin = position_embeddings
    c, s = _table_from_hf(cos, sin, query_states.shape[1])
    if c.dtype != query_states.dtype and c.dtype not in (torch.float32, torch.float64):
        c, s = c.float(), s.float()  # exact widening (transformers casts its table to x's dtype)
    query_states, key_states = rope_ext.rms_norm_rope_qk(
        query_states, key_states, c, s, q_weight=self.q_norm.weight, k_weight=self.k_norm.weight,
        eps=q_eps, across_heads=spec.across_heads, weight_offset=spec.weight_offset,
        layout="bshd")
    query_states = query_states.transpose(1, 2)
    key_states = key_states.transpose(1, 2)

    # From here on, transformers' forward verbatim.
    if past_key_values is not None:
        key_states, value_states = past_key_values.update(key_states, value_states,
                                                          self.layer_idx)

    attention_interface = mod.ALL_ATTENTION_FUNCTIONS.get_interface(
        self.config._attn_implementation, mod.eager_attention_forward)
    if spec.sliding_window:
        kwargs = {"sliding_window": self.sliding_window, **kwargs}
    attn_output, attn_weights = attention_interface(
        self,
        query_states,
        key_states,
        value_states,
        attention_mask,
        dropout=0.0 if not self.training else self.attention_dropout,
        scaling=self.scaling,
        **kwargs,
    )
    attn_output = attn_output.reshape(*input_shape, -1).contiguous()
    attn_output = self.o_proj(attn_output)
    return attn_output, attn_weights


def _make_fused_forward(spec: _FusedSpec, mod, original, honour_hooks=True):
    """The fused forward of spec.cls_name. honour_hooks=False (the patch-time probe only):
    always the fused path, whatever hooks or norm classes the instance has."""
    name = _class_name(mod, spec)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None,
                past_key_values=None, **kwargs):
        return _fused_attention_forward(self, spec, mod, name, original, hidden_states,
                                        position_embeddings, attention_mask, past_key_values,
                                        kwargs, honour_hooks)

    forward.__qualname__ = f"{spec.cls_name}.forward"
    forward.__module__ = __name__
    forward.__doc__ = (f"rope_ext.hf's fused forward of {spec.cls_name}: q_norm/k_norm and RoPE "
                       f"in one rope_ext.rms_norm_rope_qk call, the rest as transformers' own.")
    forward._rope_ext_fused = True
    forward._rope_ext_original = original
    return forward


def _is_fused(forward) -> bool:
    return getattr(forward, "_rope_ext_fused", False) is True


def _probe_norm(norm, spec: _FusedSpec, dim: int) -> Optional[str]:
    """Whether the RMSNorm module computes x * rsqrt(mean(x^2) + eps) * (weight + offset) over
    its last dimension (of size dim), with eps read from spec.eps_attr."""
    if not hasattr(norm, spec.eps_attr):
        return f"its {type(norm).__name__} has no {spec.eps_attr!r} attribute"
    w = getattr(norm, "weight", None)
    if not isinstance(w, torch.Tensor) or tuple(w.shape) != (dim,):
        return (f"its {type(norm).__name__}.weight is not a [{dim}] tensor "
                f"({'across heads' if spec.across_heads else 'per head'} expected)")
    g = torch.Generator().manual_seed(0)
    eps = 0.25  # large, with small inputs: a norm that ignores or misnames eps is caught
    x = 0.1 * torch.randn(3, dim, generator=g)
    with torch.no_grad():
        w.copy_(torch.randn(dim, generator=g))
        setattr(norm, spec.eps_attr, eps)
        got = norm(x)
    xd = x.double()
    want = (xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps)
            * (w.double() + spec.weight_offset))
    if got.shape != want.shape or not torch.allclose(got.double(), want, rtol=1e-5, atol=1e-6):
        return (f"its {type(norm).__name__} does not compute x * rsqrt(mean(x^2) + "
                f"{spec.eps_attr}) * ({'1 + ' if spec.weight_offset else ''}weight) over "
                f"{'heads * head_dim' if spec.across_heads else 'head_dim'}")
    return None


def _probe_fused(mod, spec: _FusedSpec) -> Tuple[Optional[str], object]:
    """(None, the norm class's forward) if the fused forward does what transformers' forward
    of spec.cls_name does, on a tiny random instance (eval and train): the same q/k/v, mask
    and keyword arguments reach the attention function, and the same output comes back;
    else (why not, None)."""
    why = _probe_fused_forward(mod, spec)
    return (why, None) if isinstance(why, str) else (None, why)


def _probe_fused_forward(mod, spec: _FusedSpec):
    """_probe_fused's work: why not (a str), or the verified norm class's forward."""
    cls = getattr(mod, spec.cls_name, None)
    if not isinstance(cls, type) or not callable(cls.__dict__.get("forward")):
        return f"it has no class {spec.cls_name} with its own forward"
    original = cls.__dict__["forward"]
    if _is_fused(original):
        original = original._rope_ext_original
    cfg_cls = getattr(mod, spec.config_name, None)
    if cfg_cls is None:
        return f"it has no {spec.config_name}"
    try:
        cfg = cfg_cls(**{**_PROBE_CONFIG, **spec.probe_config})
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            attn = cls(cfg, layer_idx=0)
    except Exception as e:  # noqa: BLE001 (any failure means: not the class we know)
        return f"a tiny {spec.cls_name} could not be built ({type(e).__name__}: {e})"
    missing = [a for a in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm",
                           "head_dim", "scaling", "attention_dropout", "layer_idx", "config")
               + (("sliding_window",) if spec.sliding_window else ()) if not hasattr(attn, a)]
    if missing:
        return f"its {spec.cls_name} has no {', '.join(missing)}"
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    d = attn.head_dim
    if type(attn.q_norm) is not type(attn.k_norm):
        return "its q_norm and k_norm are of different classes"
    for norm, h in ((attn.q_norm, heads), (attn.k_norm, kv_heads)):
        why = _probe_norm(norm, spec, h * d if spec.across_heads else d)
        if why:
            return why
    for norm in (attn.q_norm, attn.k_norm):
        setattr(norm, spec.eps_attr, 1e-6)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in attn.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() > 1 else 1.0))
    batch, seq = 2, 5
    hidden = torch.randn(batch, seq, cfg.hidden_size, generator=g)
    angles = torch.rand(batch, seq, d // 2, generator=g) * 6.0
    emb = torch.cat((angles, angles), dim=-1)
    position_embeddings = (emb.cos(), emb.sin())
    mask = torch.zeros(batch, 1, seq, seq).masked_fill(
        torch.ones(seq, seq, dtype=torch.bool).triu(1), float("-inf"))

    records = []
    real_eager = mod.eager_attention_forward
    me = threading.get_ident()

    def recorder(module, query, key, value, attention_mask, **kw):
        if module is attn and threading.get_ident() == me:
            records.append((query.detach().clone(), key.detach().clone(),
                            value.detach().clone(), attention_mask, dict(kw)))
        return real_eager(module, query, key, value, attention_mask, **kw)

    fused = _make_fused_forward(spec, mod, original, honour_hooks=False)
    mod.eager_attention_forward = recorder
    try:
        outs = []
        for training in (False, True):
            attn.train(training)
            with torch.no_grad():
                for fwd in (original, fused):
                    outs.append(fwd(attn, hidden, position_embeddings, mask))
    except Exception as e:  # noqa: BLE001
        return f"the probe forward failed ({type(e).__name__}: {e})"
    finally:
        mod.eager_attention_forward = real_eager
    if len(records) != 4:
        return (f"its {spec.cls_name}.forward does not call the module's attention function "
                f"once per call")
    for i in (0, 2):
        (qa, ka, va, ma, kwa), (qb, kb, vb, mb, kwb) = records[i], records[i + 1]
        if kwa != kwb:
            return (f"its {spec.cls_name}.forward passes the attention function the keyword "
                    f"arguments {kwa}, the fused forward {kwb}")
        if ma is not mb:
            return f"its {spec.cls_name}.forward changes the attention mask"
        for name, a, b in (("query", qa, qb), ("key", ka, kb), ("value", va, vb)):
            if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-4, atol=1e-5):
                return (f"its {spec.cls_name}.forward gives the attention function a different "
                        f"{name} than q_norm/k_norm + RoPE as rope_ext computes them")
    (oa, _), (ob, _) = outs[0], outs[1]  # outputs; the attention weights are not compared
    if oa.shape != ob.shape or not torch.allclose(oa, ob, rtol=1e-4, atol=1e-5):
        return f"its {spec.cls_name}.forward returns a different output than the fused forward"
    return type(attn.q_norm).forward


def _check_fused(mod, spec: _FusedSpec) -> Optional[str]:
    name = _class_name(mod, spec)
    if name not in _fused_verified:
        _fused_verified[name], norm_forward = _probe_fused(mod, spec)
        if norm_forward is not None:
            _fused_norm_forwards[name] = norm_forward
    return _fused_verified[name]


def _patch_fused(mod, spec: _FusedSpec) -> Tuple[bool, Optional[str]]:
    """Replace spec.cls_name's forward (under _lock): (newly replaced, None), or (False, why
    not)."""
    cls = getattr(mod, spec.cls_name, None)
    current = cls.__dict__.get("forward") if isinstance(cls, type) else None
    if current is not None and _is_fused(current):
        return False, None
    if _fused_op() is None:
        return False, "this build of rope_ext has no rms_norm_rope_qk"
    reason = _check_fused(mod, spec)
    if reason is not None:
        return False, reason
    name = _class_name(mod, spec)
    _fused_originals[name] = (cls, current)
    cls.forward = _make_fused_forward(spec, mod, current)
    return True, None


def _unpatch_fused(names: Iterable[str]) -> List[str]:
    restored = []
    with _lock:
        for name in names:
            if name not in _fused_originals:
                continue
            cls, original = _fused_originals.pop(name)
            _fallbacks.pop(name, None)
            if _is_fused(cls.__dict__.get("forward")):  # only what is still ours
                cls.forward = original
                restored.append(name)
    return restored


class PatchResult(list):
    """What a :func:`patch` call did: the list of modules whose ``apply_rotary_pos_emb`` is
    rope_ext's after it (names like ``"transformers.models.llama.modeling_llama"``).

    ``fused`` lists the attention classes whose ``forward`` is the fused QK-norm + RoPE one
    after the call (names like ``"transformers.models.qwen3.modeling_qwen3.Qwen3Attention"``).
    ``newly_patched`` / ``newly_fused`` list those this call replaced (the others were patched
    already); ``skipped`` maps a module or class to why it was left alone; ``pending`` lists
    the modules not imported yet that ``patch()`` (no argument) will patch when they are.
    A plain result: use :func:`patched` for a ``with`` block.
    """

    def __init__(self, modules, newly_patched, skipped, fused=(), newly_fused=(), pending=()):
        super().__init__(modules)
        self.newly_patched = tuple(newly_patched)
        self.skipped = dict(skipped)
        self.fused = tuple(fused)
        self.newly_fused = tuple(newly_fused)
        self.pending = tuple(pending)


def _undo(modules, classes) -> List[str]:
    return _unpatch_modules(modules) + _unpatch_fused(classes)


def _refuse(fam: str, reason: str, model_type, skipped, key: str,
            what: str = "patching") -> None:
    import transformers

    msg = (f"rope_ext.hf: not {what} model_type {fam!r} ({key}) of transformers "
           f"{transformers.__version__}: {reason}")
    if model_type is None:
        warnings.warn(msg, RuntimeWarning, stacklevel=4)
        skipped[key] = reason
        return
    raise RuntimeError(msg)


def patch(model_type: Union[None, str, Sequence[str]] = None) -> PatchResult:
    """Make transformers' models run RoPE through rope_ext.

    Replaces the module attribute ``apply_rotary_pos_emb`` of
    ``transformers.models.<type>.modeling_<type>`` by :func:`apply_rotary_pos_emb`. Models built
    before or after the call are both affected (the attention looks the name up at call time).

    Supported model types (transformers 5.18; each one's function was read and has the
    Llama meaning): llama, mistral, mixtral, qwen2, qwen2_moe, qwen3, qwen3_moe, gemma, gemma2,
    gemma3 (also "gemma3_text"), granite, granitemoe, starcoder2, olmoe, smollm3, falcon, phi,
    stablelm, persimmon (these three slice the rotary part before the call), and the
    partial-rotary forms phi3, gpt_neox, nemotron (the function itself rotates
    ``cos.shape[-1]`` leading dimensions and passes the rest through). Not patched, because their
    function means something else: GPT-J/CodeGen, Cohere, GLM (interleaved pairing), OLMo,
    ESM, ModernBERT (float32 math or casts), Gemma-3n/Gemma-4 (one tensor per call), the
    multimodal-RoPE VL models, DeepSeek-V2 (complex). See ``SUPPORTED_MODEL_TYPES``.

    QK-norm families (``FUSED_MODEL_TYPES``: qwen3, olmo2, gemma3): the attention class's
    ``forward`` is also replaced by one that RMS-normalizes and rotates q and k in a single
    ``rope_ext.rms_norm_rope_qk`` call on the ``[b, s, h, d]`` views of the projections
    (Qwen3 and Gemma 3 normalize each head, Gemma 3 with ``x * (1 + weight)``; OLMo 2 each
    token over all heads), then does what transformers' forward does (cache update, the
    attention function of ``config._attn_implementation``, ``o_proj``). q and k come out in
    the projections' dtype, rounded once from float32. OLMo 2's own ``apply_rotary_pos_emb``
    (it casts back to q's dtype) is not replaced; its forward is. Before the first
    replacement, a tiny random instance of the class is run through transformers' forward
    and the fused one: the norm modules must compute what the op computes, and the attention
    function must receive the same q/k/v, mask and keyword arguments (sliding_window, and
    Gemma 3's softcapping, which 5.18 does not pass), or the class is refused. Without
    ``rope_ext.rms_norm_rope_qk`` in this build, the forwards stay transformers' (noted in
    ``skipped``; patch("olmo2") then raises, as nothing else would change).

    Args:
        model_type: None (every supported type: those whose modeling module is already
            imported now, the others by an import hook when transformers imports them, so
            nothing is imported or read here), one config.model_type string, or a list of
            them (imported now). An unsupported or unknown one raises ValueError naming it.

    Returns:
        A :class:`PatchResult`: the list of patched module names, and the fused classes.
        Patching twice is harmless (the true originals are kept for :func:`unpatch`). Before
        replacing, the installed code is checked; a module or class that fails the check is
        refused (RuntimeError for a type asked for by name, and nothing this call did stays
        patched; skipped with a warning for None).

    For a ``with`` block, use :func:`patched`.
    """
    import sys

    families = _resolve(model_type)
    if model_type is not None:  # imported before taking _lock, which the import hook takes
        for fam in families:
            mod_name = _module_name(fam)
            try:
                importlib.import_module(mod_name)
            except ImportError as e:
                raise RuntimeError(f"model_type {fam!r}: {mod_name} cannot be imported "
                                   f"({e})") from e
    acc = _Acc()
    with _lock:
        try:
            for fam in families:
                mod_name = _module_name(fam)
                mod = sys.modules.get(mod_name)
                if mod is None:  # not imported: patched by the import hook when it is
                    _pending.add(fam)
                    acc.pending.append(mod_name)
                    continue
                _patch_family(fam, mod, model_type, acc)
            if acc.pending:
                _install_import_hook()
        except BaseException:
            _undo(acc.newly, acc.newly_fused)
            raise
        _record(acc)
    return PatchResult(acc.modules, acc.newly, acc.skipped, acc.fused, acc.newly_fused,
                       acc.pending)


# module or class name -> why patch() left it alone (as its last look at it found it)
_left_alone: Dict[str, str] = {}


def _record(acc: "_Acc") -> None:
    """Keeps what a patch (or the import hook) left alone for report() (under _lock)."""
    for name in acc.modules + acc.fused:
        _left_alone.pop(name, None)
    _left_alone.update(acc.skipped)


class Report(NamedTuple):
    """What rope_ext.hf has done to transformers (:func:`report`).

    patched: modules whose ``apply_rotary_pos_emb`` is rope_ext's now.
    fused: attention classes whose ``forward`` is the fused QK-norm + RoPE one now.
    left_alone: module or class name -> why patch() left it as transformers wrote it.
    fallbacks: fused attention class -> why some call of its forward ran transformers' own
        forward instead of the fused op (a hook on q_norm/k_norm, a global module hook, or a
        norm module of another class: the fused op would have skipped them). Those calls were
        exactly transformers'; calls without the reason stay fused.
    pending: modules not imported yet that will be patched when transformers imports them.
    """
    patched: Tuple[str, ...]
    fused: Tuple[str, ...]
    left_alone: Dict[str, str]
    fallbacks: Dict[str, str]
    pending: Tuple[str, ...]


def report() -> Report:
    """What is patched and fused now, what was left alone and why, and which fused attention
    classes fell back to transformers' forward for hooks (see :class:`Report`)."""
    import sys

    with _lock:
        patched = tuple(n for n in _originals if getattr(sys.modules.get(n), "apply_rotary_pos_emb",
                                                         None) is apply_rotary_pos_emb)
        fused = tuple(n for n, (cls, _) in _fused_originals.items()
                      if _is_fused(cls.__dict__.get("forward")))
        return Report(patched, fused, dict(_left_alone), dict(_fallbacks),
                      tuple(_module_name(f) for f in sorted(_pending)))


class _Acc:
    def __init__(self):
        self.modules, self.newly, self.skipped = [], [], {}
        self.fused, self.newly_fused, self.pending = [], [], []


def _patch_family(fam: str, mod, model_type, acc: _Acc) -> None:
    """Patch one imported modeling module (under _lock), recording what happened in acc."""
    mod_name = mod.__name__
    if fam in SUPPORTED_MODEL_TYPES:
        current = getattr(mod, "apply_rotary_pos_emb", None)
        if current is apply_rotary_pos_emb:
            acc.modules.append(mod_name)
        else:
            reason = _check_module(mod, SUPPORTED_MODEL_TYPES[fam])
            if reason is not None:
                _refuse(fam, reason, model_type, acc.skipped, mod_name)
            else:
                _originals[mod_name] = current
                mod.apply_rotary_pos_emb = apply_rotary_pos_emb
                acc.modules.append(mod_name)
                acc.newly.append(mod_name)
    spec = FUSED_MODEL_TYPES.get(fam)
    if spec is not None:
        cls_name = _class_name(mod, spec)
        replaced, reason = _patch_fused(mod, spec)
        if reason is None:
            acc.fused.append(cls_name)
            if replaced:
                acc.newly_fused.append(cls_name)
        elif _fused_op() is None:
            acc.skipped[cls_name] = reason
            if model_type is not None and fam not in SUPPORTED_MODEL_TYPES:
                raise RuntimeError(f"rope_ext.hf: model_type {fam!r} needs "
                                   f"rope_ext.rms_norm_rope_qk: {reason}")
        else:
            _refuse(fam, reason, model_type, acc.skipped, cls_name, "fusing QK-norm + RoPE of")


# patch() with no argument: families whose module was not imported yet, patched on import.
_pending = set()


class _PatchingLoader:
    """Wraps a modeling module's loader: runs it, then patches the module (under _lock)."""

    def __init__(self, loader, fam):
        self._loader, self._fam = loader, fam

    def __getattr__(self, name):  # get_source, get_code, ...: the real loader's
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        with _lock:
            if self._fam in _pending:
                _pending.discard(self._fam)
                acc = _Acc()
                _patch_family(self._fam, module, None, acc)
                _record(acc)
            if not _pending:
                _remove_import_hook()


class _PatchOnImport:
    """A sys.meta_path finder that hands the pending modeling modules a _PatchingLoader."""

    def find_spec(self, name, path=None, target=None):
        if not name.startswith("transformers.models."):
            return None
        fam = next((f for f in list(_pending) if _module_name(f) == name), None)
        if fam is None:
            return None
        import sys

        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _PatchingLoader(spec.loader, fam)
                return spec
        return None


_hook = _PatchOnImport()


def _install_import_hook() -> None:
    import sys

    if _hook not in sys.meta_path:
        sys.meta_path.insert(0, _hook)


def _remove_import_hook() -> None:
    import sys

    if _hook in sys.meta_path:
        sys.meta_path.remove(_hook)


def _unpatch_modules(mod_names: Iterable[str]) -> List[str]:
    import sys

    restored = []
    with _lock:
        for mod_name in mod_names:
            if mod_name not in _originals:
                continue
            original = _originals.pop(mod_name)
            mod = sys.modules.get(mod_name)
            # Restore only what is still ours: if someone replaced it after us, leave theirs.
            if mod is not None and getattr(mod, "apply_rotary_pos_emb", None) is apply_rotary_pos_emb:
                mod.apply_rotary_pos_emb = original
                restored.append(mod_name)
    return restored


def unpatch(model_type: Union[None, str, Sequence[str]] = None) -> List[str]:
    """Undo :func:`patch`: put back the exact function objects it replaced (each module's
    ``apply_rotary_pos_emb`` and each fused attention class's ``forward``).

    Args:
        model_type: None (everything patched) or the types to restore, as for :func:`patch`.

    Returns:
        The names of the modules and attention classes restored (empty if nothing was
        patched).
    """
    with _lock:
        if model_type is None:
            names, classes = list(_originals), list(_fused_originals)
            _pending.clear()
        else:
            fams = _resolve(model_type)
            names = [_module_name(f) for f in fams]
            classes = [f"{_module_name(f)}.{FUSED_MODEL_TYPES[f].cls_name}" for f in fams
                       if f in FUSED_MODEL_TYPES]
            _pending.difference_update(fams)
        if not _pending:
            _remove_import_hook()
        return _undo(names, classes)


def is_patched(model_type: str) -> bool:
    """Whether ``model_type``'s module calls rope_ext: its ``apply_rotary_pos_emb`` is
    rope_ext's or its attention class runs the fused QK-norm + RoPE forward (False if the
    module is not imported)."""
    import sys

    (fam,) = _resolve(model_type)
    mod = sys.modules.get(_module_name(fam))
    if mod is None:
        return False
    if getattr(mod, "apply_rotary_pos_emb", None) is apply_rotary_pos_emb:
        return True
    spec = FUSED_MODEL_TYPES.get(fam)
    cls = getattr(mod, spec.cls_name, None) if spec is not None else None
    return isinstance(cls, type) and _is_fused(cls.__dict__.get("forward"))


@contextlib.contextmanager
def patched(model_type: Union[None, str, Sequence[str]] = None):
    """Context manager: :func:`patch` on entry, and on exit unpatch what this entry patched
    (types that were already patched stay patched). Yields the :class:`PatchResult`."""
    with _lock:
        before = set(_pending)
        result = patch(model_type)
        added = set(_pending) - before
    try:
        yield result
    finally:
        with _lock:
            # what this entry patched, including pending modules imported inside the block
            done = [n for n in (_module_name(f) for f in added) if n in _originals]
            done_cls = [c for c in _fused_originals
                        if any(c.startswith(_module_name(f) + ".") for f in added)]
            _pending.difference_update(added)
            if not _pending:
                _remove_import_hook()
            _undo(list(result.newly_patched) + done, list(result.newly_fused) + done_cls)
