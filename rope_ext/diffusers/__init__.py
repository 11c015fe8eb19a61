"""The diffusers drop-in: diffusion transformers' RoPE (and QK-norm + RoPE) on rope_ext's ops.

    import rope_ext.diffusers
    rope_ext.diffusers.patch()            # every family, or patch("flux"), patch(["wan", "ltx"])
    pipe = FluxPipeline.from_pretrained(...)   # RoPE runs through torch.ops.rope
    rope_ext.diffusers.report()           # what was patched, fused, left alone (and why)
    rope_ext.diffusers.unpatch()          # diffusers' own functions back

    with rope_ext.diffusers.patched("wan"):   # the context manager
        ...

What gets replaced, and how each model reaches it (read in diffusers 0.42.1):

- ``diffusers.models.embeddings.apply_rotary_emb``, the shared function (real tables
  interleaved or half-split, complex tables, ``sequence_dim``). Processors that import it
  inside their ``__call__`` (HunyuanVideo, Cosmos, CogView4, CogVideoX's processor in
  ``attention_processor``, ...) look it up on that module at call time; modules that import
  it at the top (Flux, Flux 2, Lumina 2, ...) hold their own binding, which is replaced too.
  Modules that import it after the patch bind rope_ext's function themselves.
- model-specific module functions, which the processors call by their global name:
  LTX-Video's ``apply_rotary_emb``, Qwen-Image's ``apply_rotary_emb_qwen``, HiDream's
  ``apply_rope``.
- Wan's rotation is a function nested in ``WanAttnProcessor.__call__`` (and in its copies:
  SkyReels-V2, ChronoEdit, Wan-Animate, SANA-Video): the processor class's ``__call__`` is
  replaced by diffusers' own code with that one nested definition swapped for rope_ext's.
- Fused QK-RMSNorm + RoPE (``fuse=True``, the default): the processors that normalize q and
  k right before RoPE (Flux and Chroma, Wan and its copies, Qwen-Image) get a ``__call__``
  that does both in one ``rope_ext.rms_norm_rope_qk`` call per stream, forward and backward.
  A call in which the norm modules carry hooks (or are not the verified class) runs the
  processor unfused, which calls them; ``report().fallbacks`` says so.

Verification: every function or ``__call__`` is compared, as a syntax tree (the runtime
object's own source), with the form rope_ext reproduces before it is replaced; the fused
processors are also run on a tiny random instance against the unfused ones (outputs and
gradients). Code that differs is left alone: ``patch()`` warns and ``report()`` gives the
reason; a family asked for by name raises RuntimeError instead and leaves nothing of that
call patched.

The replacements take exactly the originals' arguments and return the same values within
the rounding of x's dtype (functions.py's docstring has the bound); inputs the op cannot take
run diffusers' own code. Strided q/k (slices of a fused projection, the text or image part
of a joint sequence) are read in place.

diffusers is imported by :func:`patch` / :func:`unpatch` (and by a fallback that needs
diffusers' function), never when this module loads.
"""

import ast
import contextlib
import importlib
import inspect
import sys
import threading
import warnings
from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple, Union

from rope_ext import _source
from rope_ext.diffusers import _fused, _rewrite, functions
from rope_ext.diffusers.functions import (apply_rotary_emb, apply_rotary_emb_qwen,
                                          hidream_apply_rope, ltx_apply_rotary_emb,
                                          wan_apply_rotary_emb)

__all__ = ["apply_rotary_emb", "apply_rotary_emb_qwen", "ltx_apply_rotary_emb",
           "hidream_apply_rope", "wan_apply_rotary_emb", "patch", "unpatch", "patched",
           "is_patched", "report", "FAMILIES", "PatchResult", "Report"]

_EMB = "diffusers.models.embeddings"
_EMB_KEY = f"{_EMB}.apply_rotary_emb"
_T = "diffusers.models.transformers."


# ---------------------------------------------------------------------------------------------
# The families


class _Target(NamedTuple):
    kind: str  # "binding" | "local" | "function" | "nested" | "fused"
    module: str  # the module that holds it
    attr: str = ""  # the function ("function") or processor class ("nested", "fused")
    form: str = ""  # the form ("function") or fused spec ("fused")


def _binding(module):
    return _Target("binding", module, "apply_rotary_emb")


def _local(module):
    return _Target("local", module, "apply_rotary_emb")


def _nested(module, cls):
    return _Target("nested", module, cls, "wan_nested")


def _fused_t(module, cls, spec):
    return _Target("fused", module, cls, spec)


_FLUX = (_binding(_T + "transformer_flux"),
         _fused_t(_T + "transformer_flux", "FluxAttnProcessor", "flux"))

# family -> what rope_ext replaces for it (diffusers 0.42.1). "binding": the module binds
# embeddings.apply_rotary_emb at import; "local": its processors import it inside __call__
# (served by replacing the embeddings function); "function": a module function of its own;
# "nested": the function nested in a processor's __call__; "fused": the norm + RoPE processor.
_FAMILY_TARGETS: Dict[str, Tuple[_Target, ...]] = {
    "flux": _FLUX,
    "chroma": _FLUX,  # Chroma's blocks are FluxAttention with FluxAttnProcessor
    "flux2": (_binding(_T + "transformer_flux2"),),
    "flux3": (_binding(_T + "transformer_flux3"),),
    "wan": (_nested(_T + "transformer_wan", "WanAttnProcessor"),
            _fused_t(_T + "transformer_wan", "WanAttnProcessor", "wan")),
    "chronoedit": (_nested(_T + "transformer_chronoedit", "WanAttnProcessor"),
                   _fused_t(_T + "transformer_chronoedit", "WanAttnProcessor", "wan")),
    "wan_animate": (_nested(_T + "transformer_wan_animate", "WanAttnProcessor"),
                    _fused_t(_T + "transformer_wan_animate", "WanAttnProcessor", "wan")),
    "skyreels_v2": (_nested(_T + "transformer_skyreels_v2", "SkyReelsV2AttnProcessor"),),
    "sana_video": (_nested(_T + "transformer_sana_video", "SanaLinearAttnProcessor3_0"),),
    "hunyuan_video": (_local(_T + "transformer_hunyuan_video"),),
    "hunyuan_video15": (_local(_T + "transformer_hunyuan_video15"),),
    "hunyuanimage": (_local(_T + "transformer_hunyuanimage"),),
    "cogvideox": (_local("diffusers.models.attention_processor"),),
    "cosmos": (_local(_T + "transformer_cosmos"),),
    "cogview4": (_local(_T + "transformer_cogview4"),),
    "easyanimate": (_local(_T + "transformer_easyanimate"),),
    "glm_image": (_local(_T + "transformer_glm_image"),),
    "omnigen": (_local(_T + "transformer_omnigen"),),
    "lumina2": (_binding(_T + "transformer_lumina2"),),
    "krea2": (_binding(_T + "transformer_krea2"),),
    "longcat_image": (_binding(_T + "transformer_longcat_image"),),
    "ovis_image": (_binding(_T + "transformer_ovis_image"),),
    "bria": (_binding(_T + "transformer_bria"),),
    "bria_fibo": (_binding(_T + "transformer_bria_fibo"),),
    "ace_step": (_binding(_T + "ace_step_transformer"),),
    "motif_video": (_binding(_T + "transformer_motif_video"),),
    "ltx": (_Target("function", _T + "transformer_ltx", "apply_rotary_emb", "ltx"),),
    "qwenimage": (_Target("function", _T + "transformer_qwenimage", "apply_rotary_emb_qwen",
                          "qwen"),
                  _fused_t(_T + "transformer_qwenimage", "QwenDoubleStreamAttnProcessor2_0",
                           "qwenimage")),
    "hidream": (_Target("function", _T + "transformer_hidream_image", "apply_rope",
                        "hidream"),),
}

#: family name -> what rope_ext.diffusers replaces for it (read-only description).
FAMILIES: Dict[str, str] = {
    fam: "; ".join(
        {"binding": f"{t.module}.apply_rotary_emb (diffusers.models.embeddings', bound at "
                    f"import)",
         "local": f"{_EMB}.apply_rotary_emb (imported by {t.module}'s processors at call "
                  f"time)",
         "function": f"{t.module}.{t.attr}",
         "nested": f"{t.module}.{t.attr}.__call__ (its nested apply_rotary_emb)",
         "fused": f"{t.module}.{t.attr}.__call__ (fused QK-RMSNorm + RoPE)"}[t.kind]
        for t in targets)
    for fam, targets in _FAMILY_TARGETS.items()}

# Families whose code means something else (diffusers 0.42.1): the reason, for patch(name)
# (ValueError) and for report() after patch() (left alone, by the module that holds it).
_NOT_SUPPORTED_MODULES = {
    "ltx2": _T + "transformer_ltx2",
    "allegro": _T + "transformer_allegro",
    "z_image": _T + "transformer_z_image",
    "ernie_image": _T + "transformer_ernie_image",
    "bria_fibo2": _T + "transformer_bria_fibo2",
    "mochi": "diffusers.models.attention_processor.MochiAttnProcessor2_0",
}
_NOT_SUPPORTED = {
    "ltx2": "split/interleaved rotations with float64 options (apply_split_rotary_emb), "
            "not verified",
    "allegro": "half-split tables per axis gathered by position (apply_rotary_emb_allegro)",
    "z_image": "its own complex rotation nested in the processor, under an autocast block",
    "ernie_image": "a half-split rotation computing cos/sin from angles inside the function",
    "bria_fibo2": "its own complex rotation nested in the processor, not verified",
    "mochi": "its own rotation nested in MochiAttnProcessor2_0 (float32 pairs, cos/sin of "
             "half width), not verified",
    "hunyuandit": "served by diffusers.models.embeddings.apply_rotary_emb: patch('cogvideox') "
                  "or patch() reaches attention_processor's processors",
}

# form name -> (its source, rope_ext's function)
_FORMS = {
    "embeddings": (functions.EMBEDDINGS_FORM, apply_rotary_emb),
    "qwen": (functions.QWEN_FORM, apply_rotary_emb_qwen),
    "ltx": (functions.LTX_FORM, ltx_apply_rotary_emb),
    "hidream": (functions.HIDREAM_FORM, hidream_apply_rope),
    "wan_nested": (functions.WAN_NESTED_FORM, wan_apply_rotary_emb),
}
_FORM_KEYS = {name: _source.source_key(src) for name, (src, _) in _FORMS.items()}
_OURS = {fn for _, fn in _FORMS.values()}


# ---------------------------------------------------------------------------------------------
# State (under _lock)

_lock = threading.RLock()


class _Function(NamedTuple):
    owner: object  # the module
    attr: str
    original: object
    ours: object


class _Call:
    """A processor class's ``__call__``: diffusers' original, and rope_ext's versions."""

    def __init__(self, cls, original):
        self.cls, self.original = cls, original
        self.rope = None  # the original with its nested rotation swapped
        self.fused = None  # the fused __call__ (over rope or original)
        self.fused_spec = None

    def current(self):
        return self.fused or self.rope or self.original

    def install(self) -> None:
        self.cls.__call__ = self.current()


_functions: Dict[str, _Function] = {}  # "module.attr" -> the replaced module function
_calls: Dict[str, _Call] = {}  # "module.Class.__call__" -> its versions
_routed: Dict[str, str] = {}  # module -> family: its processors import embeddings' function
_left_alone: Dict[str, str] = {}
_verified: Dict[str, Tuple[object, Optional[str]]] = {}  # key -> (object checked, reason)


def _call_key(module: str, cls: str) -> str:
    return f"{module}.{cls}.__call__"


def _fused_name(module: str, cls: str) -> str:
    return f"{module}.{cls}"


# ---------------------------------------------------------------------------------------------
# Verification


def _form_reason(fn, form: str, what: str) -> Optional[str]:
    """None if function object fn has the form; else why not."""
    if not inspect.isfunction(fn):
        return f"its {what} is not a plain Python function ({type(fn).__name__})"
    try:
        tree = _rewrite._method_tree(fn)
    except (OSError, TypeError, SyntaxError) as e:
        return f"the source of its {what} could not be read to check it ({e})"
    if _source.function_key(tree) != _FORM_KEYS.get(form, _source.source_key(form)):
        return f"its {what} is not the verified form (diffusers changed it?)"
    return None


def _same(a, b) -> bool:
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(x is y for x, y in zip(a, b))
    return a is b


def _cached(key: str, obj, check) -> Optional[str]:
    """check()'s verdict on obj, reused while key names the same object(s)."""
    hit = _verified.get(key)
    if hit is not None and _same(hit[0], obj):
        return hit[1]
    reason = check()
    _verified[key] = (obj, reason)
    return reason


def _module_tree(mod):
    try:
        return _source.module_tree(mod), None
    except (OSError, TypeError, SyntaxError) as e:
        return None, f"its source could not be read to check it ({e})"


def _emb_original():
    """diffusers' embeddings.apply_rotary_emb (the one we replaced, or the current one)."""
    emb = sys.modules[_EMB]
    current = emb.apply_rotary_emb
    return functions.ORIGINALS.get(_EMB_KEY, current) if current is apply_rotary_emb else current


def _imports_embeddings_fn(node: ast.ImportFrom) -> bool:
    mod = node.module or ""
    from_embeddings = (node.level >= 1 and mod in ("embeddings", "models.embeddings")) \
        or mod == _EMB
    return from_embeddings and any(a.name == "apply_rotary_emb" and a.asname is None
                                   for a in node.names)


def _binds_at_top(node) -> bool:
    """Whether a module-level statement binds the name apply_rotary_emb."""
    name = "apply_rotary_emb"
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return node.name == name
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return any((a.asname or a.name) == name for a in node.names)
    if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return any(isinstance(n, ast.Name) and n.id == name for t in targets for n in ast.walk(t))
    return False


def _check_local(mod) -> Optional[str]:
    """None if every call of apply_rotary_emb in mod resolves at call time to
    diffusers.models.embeddings.apply_rotary_emb (imported inside the function)."""
    tree, why = _module_tree(mod)
    if why:
        return why
    if "apply_rotary_emb" in mod.__dict__ or any(_binds_at_top(n) for n in tree.body):
        return "it binds apply_rotary_emb at module level (not the function-local import)"
    funcs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    calling = [f for f in funcs if any(
        c for c in _source.calls_by_name(f, "apply_rotary_emb"))]
    if not calling:
        return "it does not call apply_rotary_emb"
    routed = 0
    for f in calling:
        imports = [n for n in ast.walk(f) if isinstance(n, ast.ImportFrom)
                   and any((a.asname or a.name) == "apply_rotary_emb" for a in n.names)]
        nested = [n for n in ast.walk(f) if n is not f and isinstance(n, ast.FunctionDef)
                  and n.name == "apply_rotary_emb"]
        if imports and not nested and all(_imports_embeddings_fn(n) for n in imports):
            routed += 1
        elif not nested:  # a nested function of its own (Mochi's) is simply not ours
            return (f"its {f.name} calls an apply_rotary_emb that is not imported from "
                    f"diffusers.models.embeddings")
    if not routed:
        return "none of its functions imports diffusers.models.embeddings.apply_rotary_emb"
    return None


def _check_binding(mod) -> Optional[str]:
    if getattr(mod, "apply_rotary_emb", None) is not _emb_original():
        return "its apply_rotary_emb is not diffusers.models.embeddings'"
    tree, why = _module_tree(mod)
    if why:
        return why
    if not _source.calls_by_name(tree, "apply_rotary_emb"):
        return "it does not call apply_rotary_emb by its global name"
    return None


def _check_function(mod, attr: str, form: str) -> Optional[str]:
    why = _form_reason(getattr(mod, attr, None), _FORMS[form][0], attr)
    if why:
        return why
    tree, why = _module_tree(mod)
    if why:
        return why
    if not _source.calls_by_name(tree, attr):
        return f"it does not call {attr} by its global name"
    return None


# ---------------------------------------------------------------------------------------------
# Patching


class PatchResult(list):
    """What a :func:`patch` call did: the list of names now routed to rope_ext (module
    functions like ``"diffusers.models.transformers.transformer_flux.apply_rotary_emb"``,
    processor calls like ``"...transformer_wan.WanAttnProcessor.__call__"``, and modules
    whose processors reach the replaced embeddings function, by module name).

    ``fused`` lists the processor classes that run the fused QK-norm + RoPE ``__call__``
    after the call; ``newly_patched`` / ``newly_fused`` those this call replaced;
    ``skipped`` maps a name to why it was left alone.
    """

    def __init__(self, names, newly, skipped, fused=(), newly_fused=()):
        super().__init__(names)
        self.newly_patched = tuple(newly)
        self.skipped = dict(skipped)
        self.fused = tuple(fused)
        self.newly_fused = tuple(newly_fused)


class Report(NamedTuple):
    """What rope_ext.diffusers has done to diffusers (:func:`report`).

    patched: names routed to rope_ext now (see :class:`PatchResult`), including modules
        imported after the patch that bound the replaced embeddings function.
    fused: processor classes whose ``__call__`` is the fused QK-norm + RoPE one now.
    left_alone: name -> why patch() left it as diffusers wrote it.
    fallbacks: fused processor class -> why some call ran unfused (a hook on a norm module,
        a global module hook, another norm class, a dtype or eps the op does not take).
    """
    patched: Tuple[str, ...]
    fused: Tuple[str, ...]
    left_alone: Dict[str, str]
    fallbacks: Dict[str, str]


class _Acc:
    def __init__(self, named: bool):
        self.named = named
        self.names, self.newly, self.skipped = [], [], {}
        self.fused, self.newly_fused = [], []

    def ok(self, name: str, new: bool) -> None:
        if name not in self.names:
            self.names.append(name)
        if new and name not in self.newly:
            self.newly.append(name)


class _Refused(Exception):
    pass


def _refuse(fam: str, name: str, reason: str, acc: _Acc, what: str = "patching") -> None:
    import diffusers

    _left_alone[name] = reason
    msg = (f"rope_ext.diffusers: not {what} {name} (family {fam!r}) of diffusers "
           f"{diffusers.__version__}: {reason}")
    if acc.named:
        raise _Refused(msg)
    warnings.warn(msg, RuntimeWarning, stacklevel=4)
    acc.skipped[name] = reason


def _install_function(key: str, mod, attr: str, ours, acc: _Acc) -> None:
    current = getattr(mod, attr)
    if current is ours:
        acc.ok(key, False)
        return
    _functions[key] = _Function(mod, attr, current, ours)
    functions.ORIGINALS[key] = current  # the verified original: what fallbacks call
    setattr(mod, attr, ours)
    _left_alone.pop(key, None)
    acc.ok(key, True)


def _ensure_embeddings(fam: str, acc: _Acc) -> Optional[str]:
    """Patch diffusers.models.embeddings.apply_rotary_emb (None), or why not."""
    emb = importlib.import_module(_EMB)
    current = getattr(emb, "apply_rotary_emb", None)
    if current is apply_rotary_emb:
        acc.ok(_EMB_KEY, False)
        return None
    why = _cached(_EMB_KEY, current, lambda: _form_reason(current, functions.EMBEDDINGS_FORM,
                                                          "apply_rotary_emb"))
    if why:
        _left_alone[_EMB_KEY] = why
        return why
    _install_function(_EMB_KEY, emb, "apply_rotary_emb", apply_rotary_emb, acc)
    return None


def _patch_target(fam: str, t: _Target, fuse: bool, acc: _Acc) -> None:
    mod = sys.modules[t.module]
    if t.kind in ("binding", "local"):
        key = f"{t.module}.apply_rotary_emb" if t.kind == "binding" else t.module
        why = _ensure_embeddings(fam, acc)
        if why:
            _refuse(fam, key, f"{_EMB_KEY} is not the verified form: {why}", acc)
            return
        if t.kind == "local":
            why = _cached(key, mod, lambda: _check_local(mod))
            if why:
                _refuse(fam, key, why, acc)
                return
            new = t.module not in _routed
            _routed[t.module] = fam
            _left_alone.pop(key, None)
            acc.ok(key, new)
            return
        if getattr(mod, "apply_rotary_emb", None) is apply_rotary_emb:
            acc.ok(key, False)
            return
        why = _cached(key, (mod, getattr(mod, "apply_rotary_emb", None)),
                      lambda: _check_binding(mod))
        if why:
            _refuse(fam, key, why, acc)
            return
        _install_function(key, mod, "apply_rotary_emb", apply_rotary_emb, acc)
    elif t.kind == "function":
        key = f"{t.module}.{t.attr}"
        ours = _FORMS[t.form][1]
        if getattr(mod, t.attr, None) is ours:
            acc.ok(key, False)
            return
        current = getattr(mod, t.attr, None)
        why = _cached(key, current, lambda: _check_function(mod, t.attr, t.form))
        if why:
            _refuse(fam, key, why, acc)
            return
        _install_function(key, mod, t.attr, ours, acc)
    elif t.kind == "nested":
        _patch_nested(fam, t, mod, acc)
    elif t.kind == "fused" and fuse:
        _patch_fused(fam, t, mod, acc)


def _class_call(t: _Target, mod) -> Tuple[Optional[_Call], Optional[str]]:
    key = _call_key(t.module, t.attr)
    rec = _calls.get(key)
    cls = getattr(mod, t.attr, None)
    if rec is not None and rec.cls is cls and cls.__dict__.get("__call__") is rec.current():
        return rec, None
    if not isinstance(cls, type) or "__call__" not in cls.__dict__:
        return None, f"it has no class {t.attr} with its own __call__"
    return _Call(cls, cls.__dict__["__call__"]), None


def _patch_nested(fam: str, t: _Target, mod, acc: _Acc) -> None:
    key = _call_key(t.module, t.attr)
    rec, why = _class_call(t, mod)
    if rec is not None and rec.rope is not None:
        acc.ok(key, False)
        return

    def check():
        reason, tree = _rewrite.check_nested(rec.original, "apply_rotary_emb",
                                             _FORM_KEYS[t.form])
        check.tree = tree
        return reason

    check.tree = None
    if why is None:
        why = _cached(key, rec.original, check)
    if why is None and check.tree is None:  # verified before: parse again to rewrite
        why, check.tree = _rewrite.check_nested(rec.original, "apply_rotary_emb",
                                                _FORM_KEYS[t.form])
    if why is None:
        try:
            rope = _rewrite.rewrite_nested(rec.original, check.tree, "apply_rotary_emb",
                                           _FORMS[t.form][1])
        except (SyntaxError, ValueError, TypeError) as e:
            why = f"its __call__ could not be rebuilt ({type(e).__name__}: {e})"
    if why:
        _refuse(fam, key, why, acc)
        return
    rec.rope = rope
    if rec.fused is not None:  # the fused call's unfused path now rotates with rope_ext too
        rec.fused = _make_fused(rec, t, mod)
    _calls[key] = rec
    rec.install()
    _left_alone.pop(key, None)
    acc.ok(key, True)


def _make_fused(rec: _Call, t: _Target, mod):
    spec = _fused.SPECS[t.form]
    name = _fused_name(t.module, t.attr)
    fn = spec.make(mod, rec.rope or rec.original, name)
    fn.__qualname__ = rec.original.__qualname__
    fn.__module__ = __name__
    fn.__doc__ = (f"rope_ext.diffusers' fused {t.attr}.__call__: the q/k norms and RoPE in one "
                  f"rope_ext.rms_norm_rope_qk call per stream, the rest as diffusers' own.")
    fn._rope_ext_fused = True
    return fn


def _check_fused(t: _Target, mod, rec: _Call) -> Optional[str]:
    spec = _fused.SPECS[t.form]
    why = _form_reason(rec.original, spec.form, f"{t.attr}.__call__")
    if why:
        return why
    attr, form = spec.depends
    if attr:
        dep = getattr(mod, attr, None)
        if dep is not _FORMS[form][1]:
            original = _emb_original() if form == "embeddings" else dep
            if dep is not original or _form_reason(dep, _FORMS[form][0], attr):
                return f"the {attr} its __call__ calls is not the verified form"
    why, forwards = _fused.probe(spec, mod, rec.cls, rec.rope or rec.original,
                                 _fused_name(t.module, t.attr))
    if why is None:
        _fused.norm_forwards[_fused_name(t.module, t.attr)] = forwards
    return why


def _patch_fused(fam: str, t: _Target, mod, acc: _Acc) -> None:
    name = _fused_name(t.module, t.attr)
    key = _call_key(t.module, t.attr)
    rec, why = _class_call(t, mod)
    if rec is not None and rec.fused is not None:
        acc.fused.append(name)
        return
    if why is None:
        why = _cached(name, (rec.original, rec.rope), lambda: _check_fused(t, mod, rec))
        # the probe ran with this inner; a cached verdict for another inner is re-checked
        if why is None and name not in _fused.norm_forwards:
            why = _check_fused(t, mod, rec)
    if why:
        _refuse(fam, name, why, acc, "fusing QK-norm + RoPE of")
        return
    rec.fused_spec = t.form
    rec.fused = _make_fused(rec, t, mod)
    _calls[key] = rec
    rec.install()
    _left_alone.pop(name, None)
    acc.fused.append(name)
    acc.newly_fused.append(name)


def _discover(acc: _Acc) -> None:
    """Every other imported diffusers module that bound embeddings' function at import."""
    original = _emb_original()
    for name, mod in list(sys.modules.items()):
        if (name.startswith("diffusers.") and mod is not None and name != _EMB
                and getattr(mod, "apply_rotary_emb", None) is original):
            key = f"{name}.apply_rotary_emb"
            if key in _left_alone:
                continue
            why = _cached(key, (mod, original), lambda: _check_binding(mod))
            if why:
                continue  # a module that only imports it: nothing of ours to reach
            _install_function(key, mod, "apply_rotary_emb", apply_rotary_emb, acc)


def _resolve(families) -> List[str]:
    if families is None:
        return list(_FAMILY_TARGETS)
    names = [families] if isinstance(families, str) else families
    try:
        names = list(names)
    except TypeError:
        raise TypeError(f"families must be None, a string or a list of strings, got "
                        f"{type(families).__name__}") from None
    out = []
    for n in names:
        if not isinstance(n, str):
            raise TypeError(f"families must be None, a string or a list of strings, got an "
                            f"element {n!r}")
        if n not in _FAMILY_TARGETS:
            why = _NOT_SUPPORTED.get(n)
            detail = f"not supported: {why}" if why else "not a family rope_ext.diffusers knows"
            raise ValueError(f"family {n!r} is {detail}; known: "
                             f"{', '.join(sorted(_FAMILY_TARGETS))}")
        if n not in out:
            out.append(n)
    return out


def patch(families: Union[None, str, Sequence[str]] = None, *, fuse: bool = True
          ) -> PatchResult:
    """Route diffusers' RoPE (and, with ``fuse``, QK-norm + RoPE) to rope_ext's ops.

    Args:
        families: None (every family in :data:`FAMILIES`, whose modules are imported now; a
            module that cannot be imported is left alone with a warning), one family name,
            or a list of them. An unknown name raises ValueError.
        fuse: also replace the attention processors that normalize q and k right before
            RoPE (Flux/Chroma, Wan and its copies, Qwen-Image) by the fused ones.

    Returns:
        A :class:`PatchResult`. Patching twice is harmless (the true originals are kept for
        :func:`unpatch`). Models built before or after the call are both affected: every
        replaced object is looked up at call time (a module global, or the processor class's
        ``__call__``).

    Before replacing anything the installed code is checked (module docstring). With
    ``families=None`` what fails the check is left alone with a RuntimeWarning and
    recorded in :func:`report`; a family asked for by name raises RuntimeError instead,
    and nothing this call replaced stays replaced.

    With ``families=None`` every other imported diffusers module that bound the embeddings
    function at import is patched too, and modules imported later bind rope_ext's function.
    """
    fams = _resolve(families)
    acc = _Acc(named=families is not None)
    modules = []
    for fam in fams:
        for t in _FAMILY_TARGETS[fam]:
            if t.module in modules:
                continue
            try:
                importlib.import_module(t.module)
                modules.append(t.module)
            except Exception as e:  # noqa: BLE001 (optional dependencies of one model)
                if acc.named:
                    raise RuntimeError(f"rope_ext.diffusers: family {fam!r}: {t.module} cannot "
                                       f"be imported ({type(e).__name__}: {e})") from e
                _left_alone[t.module] = f"cannot be imported ({type(e).__name__}: {e})"
                acc.skipped[t.module] = _left_alone[t.module]
    with _lock:
        try:
            for fam in fams:
                for t in _FAMILY_TARGETS[fam]:
                    if t.module in modules:
                        _patch_target(fam, t, fuse, acc)
            if families is None:
                if _EMB_KEY in acc.names:
                    _discover(acc)
                for fam, where in _NOT_SUPPORTED_MODULES.items():
                    _left_alone.setdefault(where, _NOT_SUPPORTED[fam])
        except _Refused as e:
            _undo(acc.newly, acc.newly_fused)
            raise RuntimeError(str(e)) from None
        except BaseException:
            _undo(acc.newly, acc.newly_fused)
            raise
    return PatchResult(acc.names, acc.newly, acc.skipped, acc.fused, acc.newly_fused)


# ---------------------------------------------------------------------------------------------
# Undoing


def _restore_function(key: str) -> bool:
    rec = _functions.pop(key, None)
    if rec is None:
        return False
    if getattr(rec.owner, rec.attr, None) is rec.ours:  # only what is still ours
        setattr(rec.owner, rec.attr, rec.original)
        return True
    return False


def _restore_bindings() -> List[str]:
    """With the embeddings function restored: every module that still binds rope_ext's
    (patched bindings, and modules imported after the patch that bound it themselves)."""
    restored = []
    original = functions.ORIGINALS.get(_EMB_KEY)
    for name, mod in list(sys.modules.items()):
        key = f"{name}.apply_rotary_emb"
        if name.startswith("diffusers.") and mod is not None \
                and getattr(mod, "apply_rotary_emb", None) is apply_rotary_emb:
            rec = _functions.pop(key, None)
            back = rec.original if rec is not None else original
            if back is not None:
                mod.apply_rotary_emb = back
                restored.append(key)
    return restored


def _restore_call(key: str, rope: bool, fused: bool) -> List[str]:
    rec = _calls.get(key)
    if rec is None:
        return []
    out = []
    ours = rec.cls.__dict__.get("__call__") is rec.current()
    name = key[: -len(".__call__")]
    if fused and rec.fused is not None:
        rec.fused = None
        _fused.fallbacks.pop(name, None)
        out.append(name)
    if rope and rec.rope is not None:
        rec.rope = None
        out.append(key)
    if rec.fused is not None:  # still fused: over diffusers' own __call__ now
        module, _, cls = name.rpartition(".")
        rec.fused = _make_fused(rec, _Target("fused", module, cls, rec.fused_spec),
                                sys.modules[module])
    if ours:  # only what is still ours
        rec.install()
    if rec.rope is None and rec.fused is None:
        _calls.pop(key)
    return out


def _undo(names: Iterable[str], fused_names: Iterable[str]) -> List[str]:
    restored = []
    with _lock:
        for name in fused_names:
            restored += _restore_call(f"{name}.__call__", rope=False, fused=True)
        for name in names:
            if name in _functions and name != _EMB_KEY:
                if _restore_function(name):
                    restored.append(name)
            elif name in _calls:
                restored += _restore_call(name, rope=True, fused=False)
            elif name in _routed:
                _routed.pop(name)
                restored.append(name)
        if _EMB_KEY in names or (_EMB_KEY in _functions and not _routed and not any(
                k != _EMB_KEY and _functions[k].ours is apply_rotary_emb for k in _functions)):
            if _restore_function(_EMB_KEY):
                restored.append(_EMB_KEY)
            restored += _restore_bindings()
    return restored


def unpatch(families: Union[None, str, Sequence[str]] = None) -> List[str]:
    """Undo :func:`patch`: put back the exact objects it replaced (module functions and
    processor ``__call__``s; all, or those of the given families). The shared
    ``diffusers.models.embeddings.apply_rotary_emb`` goes back once no patched family needs
    it, together with any module that bound rope_ext's function when imported after the
    patch. An object someone else installed after us is left alone.

    Returns:
        The names restored.
    """
    with _lock:
        if families is None:
            fused = [k[: -len(".__call__")] for k, r in _calls.items() if r.fused is not None]
            names = [k for k in _functions] + [k for k in _calls] + list(_routed)
            names.append(_EMB_KEY)
        else:
            names, fused = [], []
            for fam in _resolve(families):
                for t in _FAMILY_TARGETS[fam]:
                    if t.kind == "binding":
                        names.append(f"{t.module}.apply_rotary_emb")
                    elif t.kind == "local":
                        names.append(t.module)
                    elif t.kind == "function":
                        names.append(f"{t.module}.{t.attr}")
                    elif t.kind == "nested":
                        names.append(_call_key(t.module, t.attr))
                    else:
                        fused.append(_fused_name(t.module, t.attr))
        return _undo(names, fused)


@contextlib.contextmanager
def patched(families: Union[None, str, Sequence[str]] = None, *, fuse: bool = True):
    """Context manager: :func:`patch` on entry, and on exit undo what this entry patched
    (what was patched before it stays). Yields the :class:`PatchResult`."""
    result = patch(families, fuse=fuse)
    try:
        yield result
    finally:
        _undo(result.newly_patched, result.newly_fused)


def is_patched(family: str) -> bool:
    """Whether every RoPE route of ``family`` reaches rope_ext now (False while its modules
    are not imported)."""
    (fam,) = _resolve(family)
    for t in _FAMILY_TARGETS[fam]:
        mod = sys.modules.get(t.module)
        if mod is None:
            return False
        if t.kind == "binding" and getattr(mod, "apply_rotary_emb", None) is not apply_rotary_emb:
            return False
        if t.kind == "local" and (t.module not in _routed or getattr(
                sys.modules.get(_EMB), "apply_rotary_emb", None) is not apply_rotary_emb):
            return False
        if t.kind == "function" and getattr(mod, t.attr, None) is not _FORMS[t.form][1]:
            return False
        if t.kind == "nested":
            rec = _calls.get(_call_key(t.module, t.attr))
            if rec is None or rec.rope is None:
                return False
    return True


def report() -> Report:
    """What is routed to rope_ext now, what is fused, what was left alone and why, and which
    fused processors ran some call unfused (see :class:`Report`)."""
    with _lock:
        names = [k for k, r in _functions.items() if getattr(r.owner, r.attr, None) is r.ours]
        names += [k for k, r in _calls.items() if r.rope is not None
                  and r.cls.__dict__.get("__call__") is r.current()]
        emb = sys.modules.get(_EMB)
        if emb is not None and getattr(emb, "apply_rotary_emb", None) is apply_rotary_emb:
            names += list(_routed)
            names += [f"{n}.apply_rotary_emb" for n, m in list(sys.modules.items())
                      if n.startswith("diffusers.") and m is not None and n != _EMB
                      and getattr(m, "apply_rotary_emb", None) is apply_rotary_emb
                      and f"{n}.apply_rotary_emb" not in _functions]
        fused = tuple(k[: -len(".__call__")] for k, r in _calls.items()
                      if r.fused is not None and r.cls.__dict__.get("__call__") is r.fused)
        return Report(tuple(names), fused, dict(_left_alone), dict(_fused.fallbacks))
