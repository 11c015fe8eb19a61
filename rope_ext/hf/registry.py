"""Discovery of transformers' RoPE functions, and the registry of what rope_ext.hf replaced.

Discovery reads, without importing anything, the source files of transformers' modeling
modules (``transformers/models/<dir>/modeling_*.py``) and keeps those that define a
module-level function whose name speaks of RoPE (``apply_rotary_pos_emb``,
``apply_rotary_emb``, ``apply_rotary_pos_emb_vision``, ...). A discovered module is checked
(forms.verify) and patched when it is imported: now if it already is, else by an import hook
when transformers imports it.

The attention code calls these functions by their global name at call time, so replacing
the module attribute reroutes every layer, eager or under torch.compile (which reads the
global when it traces). transformers' ``@use_kernel_forward_from_hub`` and
``@use_kernelized_func`` decorators keep the objects they saw at import; without the
``kernels`` package they are no-ops, and with it the forward still looks the global up.
"""

import ast
import importlib.util
import os
import re
import sys
from typing import Dict, List, Optional, Tuple

from rope_ext._source import calls_by_name, function_key, module_tree, top_level_functions
from rope_ext.hf import forms

# A module-level def of a RoPE function (not its helpers such as rotate_half).
_ROPE_DEF = re.compile(r"^def (\w*(?:rotary|rope)\w*)\s*\(", re.MULTILINE)
_HELPER_NAMES = frozenset(h for f in forms.FORMS for h in f.helpers)

originals: Dict[Tuple[str, str], object] = {}  # (module, function) -> the object we replaced
patched_forms: Dict[Tuple[str, str], str] = {}  # (module, function) -> the form's name
left_alone: Dict[str, str] = {}  # "module" or "module.function" or class -> why
pending: set = set()  # discovered module names not imported yet, patched on import
_checked: Dict[str, Tuple[Dict[str, forms.Form], Dict[str, str]]] = {}  # module -> verify()
_discovered: Optional[Tuple[str, ...]] = None


def discovered() -> Tuple[str, ...]:
    """The transformers modeling modules whose source defines a RoPE function (read once per
    process, nothing imported)."""
    global _discovered
    if _discovered is None:
        # find_spec of the top-level package reads its location without importing it
        spec = importlib.util.find_spec("transformers")
        roots = [os.path.join(p, "models") for p in (spec.submodule_search_locations or [])
                 ] if spec is not None else []
        found = []
        for root in (r for r in roots if os.path.isdir(r)):
            for d in sorted(os.listdir(root)):
                folder = os.path.join(root, d)
                if not os.path.isdir(folder) or d.startswith(("_", ".")) or d == "deprecated":
                    continue
                for f in sorted(os.listdir(folder)):
                    if not (f.startswith("modeling_") and f.endswith(".py")):
                        continue
                    with open(os.path.join(folder, f), encoding="utf-8") as fh:
                        if _ROPE_DEF.search(fh.read()):
                            found.append(f"transformers.models.{d}.{f[:-3]}")
        _discovered = tuple(found)
    return _discovered


def verify(tree: ast.Module) -> Tuple[Dict[str, forms.Form], Dict[str, str]]:
    """(function name -> the form it has, function name -> why it is left alone) for each
    module-level RoPE function of a modeling module's syntax tree."""
    defs = top_level_functions(tree)
    matched, left = {}, {}
    for name, fn in defs.items():
        if not _ROPE_DEF.match(f"def {name}(") or name in _HELPER_NAMES:
            continue
        key = function_key(fn)
        candidates = [f for f in forms.FORMS if f.function == name and key in forms.FORM_KEYS[f.name]]
        if not candidates:
            left[name] = "its code is none of the verified forms"
            continue
        form, why = candidates[0], None
        for helper, sources in form.helpers.items():
            h = defs.get(helper)
            if h is None or function_key(h) not in forms.HELPER_KEYS[sources]:
                why = f"its {helper} is not the one the form {form.name!r} calls"
        calls = calls_by_name(tree, name)
        if why is None and not calls:
            why = "nothing in the module calls it by its global name"
        elif why is None and any(_unusual_call(c, fn) for c in calls):
            why = "it is called with arguments the replacement does not take"
        if why is None:
            matched[name] = form
        else:
            left[name] = why
    return matched, left


def _unusual_call(call: ast.Call, fn: ast.FunctionDef) -> bool:
    """Whether a call passes anything but the function's own parameters, by position or by
    name (each replacement takes the same parameter names: tests/test_hf_forms.py)."""
    params = [a.arg for a in fn.args.args]
    return (len(call.args) > len(params) or any(isinstance(a, ast.Starred) for a in call.args)
            or any(kw.arg not in params for kw in call.keywords))


def check(mod) -> Tuple[Dict[str, forms.Form], Dict[str, str]]:
    """verify() of an imported module, once per process."""
    name = mod.__name__
    if name not in _checked:
        try:
            tree = module_tree(mod)
        except (OSError, TypeError, SyntaxError) as e:
            _checked[name] = ({}, {"": f"its source could not be read to check it ({e})"})
        else:
            _checked[name] = verify(tree)
    return _checked[name]


def patch_module(mod) -> Tuple[List[str], Dict[str, str]]:
    """Replace each verified RoPE function of an imported module (under _lock): (the
    functions replaced now, function -> why left alone)."""
    matched, left = check(mod)
    newly = []
    for fn_name, form in matched.items():
        key = (mod.__name__, fn_name)
        if getattr(mod, fn_name, None) is form.replacement:
            continue
        originals[key] = getattr(mod, fn_name)
        patched_forms[key] = form.name
        setattr(mod, fn_name, form.replacement)
        newly.append(fn_name)
    for fn_name, why in left.items():
        left_alone[f"{mod.__name__}.{fn_name}".rstrip(".")] = why
    return newly, left


def unpatch_module(mod_name: str) -> List[str]:
    """Put back the functions replaced in one module (under _lock): the names restored. An
    object someone else installed after us is left alone."""
    restored = []
    for key in [k for k in originals if k[0] == mod_name]:
        original = originals.pop(key)
        form_name = patched_forms.pop(key)
        mod = sys.modules.get(mod_name)
        replacement = next(f.replacement for f in forms.FORMS if f.name == form_name)
        if mod is not None and getattr(mod, key[1], None) is replacement:
            setattr(mod, key[1], original)
            restored.append(key[1])
    return restored


def patched_functions(mod_name: str) -> Dict[str, str]:
    """function -> form name, for the functions of mod_name that are rope_ext's now."""
    mod = sys.modules.get(mod_name)
    out = {}
    for (m, fn), form_name in patched_forms.items():
        if m == mod_name and mod is not None:
            replacement = next(f.replacement for f in forms.FORMS if f.name == form_name)
            if getattr(mod, fn, None) is replacement:
                out[fn] = form_name
    return out


# ---------------------------------------------------------------------------------------------
# The import hook: discovered modules imported after patch() are patched as they load


class _PatchingLoader:
    """Wraps a modeling module's loader: runs it, then lets ``on_import`` patch the module."""

    def __init__(self, loader, on_import):
        self._loader, self._on_import = loader, on_import

    def __getattr__(self, name):  # get_source, get_code, ...: the real loader's
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        self._on_import(module)


class _PatchOnImport:
    """A sys.meta_path finder that hands the pending modeling modules a _PatchingLoader."""

    def __init__(self):
        self.on_import = None

    def find_spec(self, name, path=None, target=None):
        if name not in pending:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _PatchingLoader(spec.loader, self.on_import)
                return spec
        return None


hook = _PatchOnImport()


def install_import_hook(on_import) -> None:
    hook.on_import = on_import
    if hook not in sys.meta_path:
        sys.meta_path.insert(0, hook)


def remove_import_hook() -> None:
    if hook in sys.meta_path:
        sys.meta_path.remove(hook)
