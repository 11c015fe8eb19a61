"""The Hugging Face drop-in: transformers' ``apply_rotary_pos_emb`` on rope_ext's fused op.

    import rope_ext.hf
    rope_ext.hf.patch()                  # every supported family, or patch("llama"), patch(["qwen2", "phi3"])
    model = AutoModelForCausalLM.from_pretrained(...)   # runs RoPE through torch.ops.rope.apply_qk
    rope_ext.hf.unpatch()                # transformers' own functions back

    with rope_ext.hf.patched("llama"):   # or `with rope_ext.hf.patch("llama"):`
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
silently given a different rotation.
"""

import ast
import contextlib
import importlib
import inspect
import threading
import warnings
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch

from rope_ext.functional import apply_rope_qk

__all__ = ["apply_rotary_pos_emb", "patch", "unpatch", "patched", "is_patched",
           "SUPPORTED_MODEL_TYPES", "PatchResult"]


# ---------------------------------------------------------------------------------------------
# The function


def _describe(t) -> str:
    return f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else f"a {type(t).__name__}"


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

    half = rotary_dim // 2
    c = cos[..., :half]  # views: transformers' second half is a copy of the first
    s = sin[..., :half]
    if c.shape[1] != seq:  # one position for every token: a stride-0 view
        c = c.expand(c.shape[0], seq, half)
        s = s.expand(s.shape[0], seq, half)

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
    "olmo2": "casts the result back to q's dtype (differs when the table's dtype is wider)",
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


def _resolve(model_type) -> List[str]:
    if model_type is None:
        return list(SUPPORTED_MODEL_TYPES)
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
        if fam not in SUPPORTED_MODEL_TYPES:
            why = _NOT_SUPPORTED.get(fam)
            detail = (f"its apply_rotary_pos_emb means something else: {why}" if why else
                      "not a model_type rope_ext.hf knows")
            raise ValueError(f"model_type {n!r} is not supported ({detail}); supported: "
                             f"{', '.join(sorted(SUPPORTED_MODEL_TYPES))}")
        if fam not in families:
            families.append(fam)
    return families


class PatchResult(list):
    """The modules whose ``apply_rotary_pos_emb`` is rope_ext's after a :func:`patch` call
    (names like ``"transformers.models.llama.modeling_llama"``).

    ``newly_patched`` lists those this call replaced (the others were patched already);
    ``skipped`` maps a module to why it was left alone (only with ``model_type=None``).
    Usable as a context manager: leaving the ``with`` block unpatches ``newly_patched``.
    """

    def __init__(self, modules, newly_patched, skipped):
        super().__init__(modules)
        self.newly_patched = tuple(newly_patched)
        self.skipped = dict(skipped)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        _unpatch_modules(self.newly_patched)
        return False


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
    function means something else: GPT-J/CodeGen, Cohere, GLM (interleaved pairing), OLMo/OLMo-2,
    ESM, ModernBERT (float32 math or casts), Gemma-3n/Gemma-4 (one tensor per call), the
    multimodal-RoPE VL models, DeepSeek-V2 (complex). See ``SUPPORTED_MODEL_TYPES``.

    Args:
        model_type: None (every supported type present in the installed transformers), one
            config.model_type string, or a list of them. An unsupported or unknown one raises
            ValueError naming it.

    Returns:
        A :class:`PatchResult`: the list of patched module names. Patching twice is harmless
        (the true original is kept for :func:`unpatch`). Before replacing, the installed source
        is checked to hold the expected function; a module that fails the check is refused
        (RuntimeError for a type asked for by name; skipped with a warning for None).

    Use as ``with rope_ext.hf.patch("llama"): ...`` (or :func:`patched`) to undo on exit.
    """
    families = _resolve(model_type)
    modules, newly, skipped = [], [], {}
    with _lock:
        for fam in families:
            mod_name = _module_name(fam)
            try:
                mod = importlib.import_module(mod_name)
            except ImportError as e:
                if model_type is None:
                    skipped[mod_name] = f"not importable in this transformers ({e})"
                    continue
                raise RuntimeError(f"model_type {fam!r}: {mod_name} cannot be imported ({e})") from e
            current = getattr(mod, "apply_rotary_pos_emb", None)
            if current is apply_rotary_pos_emb:
                modules.append(mod_name)
                continue
            reason = _check_module(mod, SUPPORTED_MODEL_TYPES[fam])
            if reason is not None:
                import transformers

                msg = (f"rope_ext.hf: not patching model_type {fam!r} ({mod_name}) of "
                       f"transformers {transformers.__version__}: {reason}")
                if model_type is None:
                    warnings.warn(msg, RuntimeWarning, stacklevel=2)
                    skipped[mod_name] = reason
                    continue
                raise RuntimeError(msg)
            _originals[mod_name] = current
            mod.apply_rotary_pos_emb = apply_rotary_pos_emb
            modules.append(mod_name)
            newly.append(mod_name)
    return PatchResult(modules, newly, skipped)


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
    """Undo :func:`patch`: put back the exact function objects it replaced.

    Args:
        model_type: None (everything patched) or the types to restore, as for :func:`patch`.

    Returns:
        The names of the modules restored (empty if nothing was patched).
    """
    if model_type is None:
        with _lock:
            names = list(_originals)
    else:
        names = [_module_name(f) for f in _resolve(model_type)]
    return _unpatch_modules(names)


def is_patched(model_type: str) -> bool:
    """Whether ``model_type``'s module currently calls rope_ext (False if it is not imported)."""
    import sys

    (fam,) = _resolve(model_type)
    mod = sys.modules.get(_module_name(fam))
    return mod is not None and getattr(mod, "apply_rotary_pos_emb", None) is apply_rotary_pos_emb


@contextlib.contextmanager
def patched(model_type: Union[None, str, Sequence[str]] = None):
    """Context manager: :func:`patch` on entry, and on exit unpatch what this entry patched
    (types that were already patched stay patched). Yields the :class:`PatchResult`."""
    result = patch(model_type)
    try:
        yield result
    finally:
        _unpatch_modules(result.newly_patched)
