"""The Hugging Face drop-in: transformers' RoPE functions on rope_ext's ops.

    import rope_ext.hf
    rope_ext.hf.patch()                  # every model type whose RoPE code is a verified form
    model = AutoModelForCausalLM.from_pretrained(...)   # runs RoPE through rope_ext's ops
    print(rope_ext.hf.report())          # what is patched, fused and left alone, and why
    rope_ext.hf.unpatch()                # transformers' own functions back

    with rope_ext.hf.patched("llama"):   # the context manager: unpatches what it patched
        ...

Nothing is patched from a fixed list: :func:`patch` reads the source of every transformers
modeling module that defines a RoPE function (registry.discovered) and replaces each
function whose syntax tree is one of the forms rope_ext reproduces (forms.FORMS, checked
with the helpers it calls), so a transformers release that changes the math is left alone
rather than given a different rotation. Where an attention class RMS-normalizes q and k
right before RoPE and rope_ext verified it (fused.FUSED_MODEL_TYPES), its forward runs both
in one ``rope_ext.rms_norm_rope_qk`` call, honouring every hook of the norm modules.

transformers is imported only by :func:`patch` / :func:`unpatch` / :func:`report`, never
when this package loads. :func:`apply_rotary_pos_emb` can also be called directly wherever
transformers' Llama function of that name is called.
"""

import contextlib
import importlib
import sys
from typing import Dict, List, NamedTuple, Sequence, Tuple, Union

from rope_ext.hf import fused, registry
from rope_ext.hf.forms import FORMS, Form, apply_rotary_pos_emb
from rope_ext.hf.fused import FUSED_MODEL_TYPES, _lock

__all__ = ["apply_rotary_pos_emb", "patch", "unpatch", "patched", "is_patched", "report",
           "FORMS", "Form", "FUSED_MODEL_TYPES", "PatchResult", "Report"]

ModelTypes = Union[None, str, Sequence[str]]


class PatchResult(list):
    """What one :func:`patch` call did: the list of modules with a function that is rope_ext's
    after it (names like ``"transformers.models.llama.modeling_llama"``).

    ``fused`` lists the attention classes whose ``forward`` is the fused QK-norm + RoPE one
    after the call (``"transformers.models.qwen3.modeling_qwen3.Qwen3Attention"``);
    ``newly_patched`` / ``newly_fused`` those this call replaced (the others were already);
    ``skipped`` maps a module, function (``"module.function"``) or class to why it was left
    alone; ``pending`` lists the discovered modules not imported yet, patched when they are.
    A plain result: use :func:`patched` for a ``with`` block.
    """

    def __init__(self, modules, newly_patched, skipped, fused=(), newly_fused=(), pending=()):
        super().__init__(modules)
        self.newly_patched = tuple(newly_patched)
        self.skipped = dict(skipped)
        self.fused = tuple(fused)
        self.newly_fused = tuple(newly_fused)
        self.pending = tuple(pending)


class Report(NamedTuple):
    """What rope_ext.hf has done to transformers (:func:`report`).

    discovered: the modeling modules whose source defines a RoPE function.
    patched: module -> {function -> the verified form it had}, for the functions that are
        rope_ext's now.
    fused: attention classes whose ``forward`` is the fused QK-norm + RoPE one now.
    left_alone: ``"module.function"`` (or a module, or a class) -> why patch() left it as
        transformers wrote it.
    fallbacks: fused attention class -> why some call of its forward ran transformers' own
        forward instead of the fused op (a hook on q_norm/k_norm, a global module hook, or a
        norm module of another class, which the fused op would have skipped). Those calls were
        exactly transformers'; calls without the reason stay fused.
    pending: discovered modules not imported yet that will be patched when they are.
    """
    discovered: Tuple[str, ...]
    patched: Dict[str, Dict[str, str]]
    fused: Tuple[str, ...]
    left_alone: Dict[str, str]
    fallbacks: Dict[str, str]
    pending: Tuple[str, ...]


class _Acc:
    def __init__(self):
        self.modules, self.newly, self.skipped = [], [], {}
        self.fused, self.newly_fused, self.pending = [], [], []


def _module_name(model_type: str) -> str:
    """The modeling module of a config.model_type (``"gemma3_text"`` ->
    ``"transformers.models.gemma3.modeling_gemma3"``)."""
    from transformers.models.auto.configuration_auto import model_type_to_module_name

    folder = model_type_to_module_name(model_type)
    return f"transformers.models.{folder}.modeling_{folder.rsplit('.', 1)[-1]}"


def _resolve(model_types) -> List[Tuple[str, str]]:
    """(model_type, module name) for each requested type; ValueError for an unknown one."""
    names = [model_types] if isinstance(model_types, str) else model_types
    try:
        names = list(names)
    except TypeError:
        raise TypeError(f"model_types must be None, a string or a list of strings, got "
                        f"{type(model_types).__name__}") from None
    out = []
    for n in names:
        if not isinstance(n, str):
            raise TypeError(f"model_types must be None, a string or a list of strings, got an "
                            f"element {n!r}")
        mod_name = _module_name(n)
        if mod_name not in registry.discovered():
            raise ValueError(f"model_type {n!r} is not a transformers model type with a RoPE "
                             f"function ({mod_name} defines none or does not exist)")
        out.append((n, mod_name))
    return out


def _patch_one(mod, acc: _Acc) -> None:
    """Patch one imported modeling module (under _lock), recording what happened in acc."""
    mod_name = mod.__name__
    newly, left = registry.patch_module(mod)
    if registry.patched_functions(mod_name):
        acc.modules.append(mod_name)
        if newly:
            acc.newly.append(mod_name)
    for fn_name, why in left.items():
        acc.skipped[f"{mod_name}.{fn_name}".rstrip(".")] = why
    spec = FUSED_MODEL_TYPES.get(mod_name.split(".")[2])
    if spec is not None:
        cls_name = fused._class_name(mod, spec)
        replaced, reason = fused._patch_fused(mod, spec)
        if reason is None:
            acc.fused.append(cls_name)
            registry.left_alone.pop(cls_name, None)
            if replaced:
                acc.newly_fused.append(cls_name)
        else:
            acc.skipped[cls_name] = reason
            registry.left_alone[cls_name] = reason


def _on_import(module) -> None:
    with _lock:
        if module.__name__ in registry.pending:
            registry.pending.discard(module.__name__)
            _patch_one(module, _Acc())
        if not registry.pending:
            registry.remove_import_hook()


def _refuse_what_failed(model_type: str, mod_name: str, acc: _Acc, nothing: bool) -> None:
    """For a type asked for by name: RuntimeError when nothing of its module could be patched,
    or when its QK-norm attention, which rope_ext knows, failed the probe (transformers changed
    it); a missing fused op or a function with no verified form beside a patched one is only
    reported."""
    import transformers

    reasons = {k: v for k, v in acc.skipped.items() if k.startswith(mod_name + ".")}
    spec = FUSED_MODEL_TYPES.get(mod_name.split(".")[2])
    cls_name = f"{mod_name}.{spec.cls_name}" if spec is not None else None
    failed_fusion = cls_name in reasons and fused._fused_op() is not None
    if nothing or failed_fusion:
        shown = {cls_name: reasons[cls_name]} if failed_fusion else reasons
        raise RuntimeError(
            f"rope_ext.hf: not patching model_type {model_type!r} ({mod_name}) of transformers "
            f"{transformers.__version__}: "
            + "; ".join(f"{k.rsplit('.', 1)[-1]}: {v}" for k, v in shown.items()))


def _undo(modules, classes) -> List[str]:
    restored = []
    for m in modules:
        if registry.unpatch_module(m):
            restored.append(m)
    return restored + fused._unpatch_fused(classes)


def patch(model_types: ModelTypes = None) -> PatchResult:
    """Make transformers' models run RoPE (and, where verified, q/k-norm + RoPE) through
    rope_ext.

    Each discovered modeling module's RoPE functions are checked against the verified forms
    (``FORMS``: half-split q/k and its partial-rotary copies, the copies that cast back or
    compute in float32, one tensor per call (Gemma 3n, Gemma 4), adjacent pairs (GLM, ERNIE,
    Cohere, Helium, GPT-J/CodeGen, DeepSeek-V3's interleave), gpt-oss's, the complex forms
    (Llama 4, DeepSeek-V2) and the vision towers'), each with the helpers it calls; a match is
    replaced by rope_ext's function of the same signature and meaning. Models built before or
    after the call are both affected (the attention looks the name up at call time).
    Anything else is left as it is, with the reason in :func:`report`.

    QK-norm families (``FUSED_MODEL_TYPES``: qwen3, olmo2, gemma3): the attention class's
    ``forward`` is replaced too, by one that RMS-normalizes and rotates q and k in one
    ``rope_ext.rms_norm_rope_qk`` call, after a tiny random instance showed it does what
    transformers' forward does. A call in which a hook is registered on q_norm/k_norm (or a
    global module hook, or the norm is of another class) runs transformers' forward, which
    calls them; ``report().fallbacks`` names those classes.

    Args:
        model_types: None (every discovered module: those imported now, the others by an
            import hook when transformers imports them, so nothing is imported here), or one
            config.model_type string or a list of them (their modules are imported now). A
            type that is not a transformers model type with a RoPE function raises ValueError;
            one whose module has nothing rope_ext verified raises RuntimeError with the
            reasons, and nothing this call did stays patched.

    Returns:
        A :class:`PatchResult`. Patching twice is harmless (the true originals are kept for
        :func:`unpatch`).
    """
    requested = None if model_types is None else _resolve(model_types)
    if requested is not None:  # imported before taking _lock, which the import hook takes
        for t, mod_name in requested:
            try:
                importlib.import_module(mod_name)
            except ImportError as e:
                raise RuntimeError(f"model_type {t!r}: {mod_name} cannot be imported ({e})") from e
    acc = _Acc()
    with _lock:
        try:
            if requested is None:
                for mod_name in registry.discovered():
                    mod = sys.modules.get(mod_name)
                    if mod is None:
                        registry.pending.add(mod_name)
                        acc.pending.append(mod_name)
                    else:
                        _patch_one(mod, acc)
                if acc.pending:
                    registry.install_import_hook(_on_import)
            else:
                for t, mod_name in requested:
                    before = (len(acc.modules), len(acc.fused))
                    _patch_one(sys.modules[mod_name], acc)
                    _refuse_what_failed(t, mod_name, acc,
                                        (len(acc.modules), len(acc.fused)) == before)
        except BaseException:
            _undo(acc.newly, acc.newly_fused)
            raise
    return PatchResult(acc.modules, acc.newly, acc.skipped, acc.fused, acc.newly_fused,
                       acc.pending)


def unpatch(model_types: ModelTypes = None) -> List[str]:
    """Undo :func:`patch`: put back the exact function objects it replaced (each module's
    RoPE functions and each fused attention class's ``forward``).

    Args:
        model_types: None (everything patched, and the import hook dropped) or the types to
            restore, as for :func:`patch`.

    Returns:
        The names of the modules and attention classes restored (empty if nothing was).
    """
    with _lock:
        if model_types is None:
            modules = sorted({m for m, _ in registry.originals})
            classes = list(fused._fused_originals)
            registry.pending.clear()
        else:
            modules = [m for _, m in _resolve(model_types)]
            classes = [c for c in fused._fused_originals
                       if any(c.startswith(m + ".") for m in modules)]
            registry.pending.difference_update(modules)
        if not registry.pending:
            registry.remove_import_hook()
        return _undo(modules, classes)


def is_patched(model_type: str) -> bool:
    """Whether ``model_type``'s module calls rope_ext now: one of its RoPE functions is
    rope_ext's or its attention class runs the fused forward (False if not imported)."""
    ((_, mod_name),) = _resolve(model_type)
    if registry.patched_functions(mod_name):
        return True
    return any(c.startswith(mod_name + ".") for c in _fused_now())


def _fused_now() -> Tuple[str, ...]:
    return tuple(n for n, (cls, _) in fused._fused_originals.items()
                 if fused._is_fused(cls.__dict__.get("forward")))


def report() -> Report:
    """What is patched and fused now, what was left alone and why, and which fused attention
    classes fell back to transformers' forward for hooks (see :class:`Report`)."""
    with _lock:
        modules = sorted({m for m, _ in registry.originals})
        patched_now = {m: registry.patched_functions(m) for m in modules}
        return Report(registry.discovered(), {m: f for m, f in patched_now.items() if f},
                      _fused_now(), dict(registry.left_alone), dict(fused._fallbacks),
                      tuple(sorted(registry.pending)))


@contextlib.contextmanager
def patched(model_types: ModelTypes = None):
    """Context manager: :func:`patch` on entry, and on exit unpatch what this entry patched
    (types that were already patched stay patched). Yields the :class:`PatchResult`."""
    with _lock:
        before = set(registry.pending)
        result = patch(model_types)
        added = set(registry.pending) - before
    try:
        yield result
    finally:
        with _lock:
            # what this entry patched, including pending modules imported inside the block
            done = [m for m in added if any(k[0] == m for k in registry.originals)]
            done_cls = [c for c in fused._fused_originals
                        if any(c.startswith(m + ".") for m in added)]
            registry.pending.difference_update(added)
            if not registry.pending:
                registry.remove_import_hook()
            _undo(list(result.newly_patched) + done, list(result.newly_fused) + done_cls)
