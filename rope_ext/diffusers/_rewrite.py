"""A processor's ``__call__`` with the RoPE function nested in it swapped for rope_ext's.

Wan's attention processor (and its copies in SkyReels-V2, ChronoEdit, Wan-Animate and
SANA-Video) defines its ``apply_rotary_emb`` inside ``__call__``, so there is no module
attribute to replace: the function object is made anew on every call. What can be replaced
is the processor class's ``__call__``. Rather than a hand-written copy of each processor
(five copies that would each have to track diffusers), the replacement is the processor's
own code with one statement changed: the nested ``def apply_rotary_emb(...)`` becomes
``apply_rotary_emb = <rope_ext's function>``. Everything else runs exactly as diffusers
wrote it, with the module's globals looked up at call time as before.

The nested definition must be the verified form (compared as a syntax tree), its name
must be used only as a called function, and ``__call__`` must not need the class cell
(``super()``/``__class__``), which a function compiled outside its class would lack.
"""

import ast
import copy
import inspect
import textwrap
from typing import Optional, Tuple

from rope_ext import _source

_REPLACEMENT = "__rope_ext_replacement__"
_MAKER = "__rope_ext_make__"


def _method_tree(fn) -> ast.FunctionDef:
    """The syntax tree of a method's own source (the runtime object's: a monkeypatched
    method is read as what it is now, not as the file says)."""
    lines, first = inspect.getsourcelines(fn)
    (node,) = ast.parse(textwrap.dedent("".join(lines))).body
    if not isinstance(node, ast.FunctionDef):
        raise SyntaxError("not a plain function definition")
    ast.increment_lineno(node, first - 1)  # tracebacks name the file's own lines
    return node


def check_nested(fn, nested_name: str, form_key: str) -> Tuple[Optional[str], object]:
    """(None, the method's tree) if ``fn`` defines exactly one nested ``nested_name`` of the
    form ``form_key`` (a rope_ext._source key) and uses the name only to call it; else
    (why not, None)."""
    try:
        tree = _method_tree(fn)
    except (OSError, TypeError, SyntaxError) as e:
        return f"its source could not be read to check it ({type(e).__name__}: {e})", None
    defs = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == nested_name]
    if len(defs) != 1:
        return (f"it defines {len(defs)} nested {nested_name} functions (one of the verified "
                f"form expected)"), None
    if _source.function_key(defs[0]) != form_key:
        return f"its nested {nested_name} is not the verified form (diffusers changed it?)", None
    if defs[0].decorator_list:
        return f"its nested {nested_name} is decorated", None
    names = [n for n in ast.walk(tree) if isinstance(n, ast.Name) and n.id == nested_name]
    called = {id(c.func) for c in _source.calls_by_name(tree, nested_name)}
    if not called or any(id(n) not in called for n in names):
        return f"it uses the name {nested_name} other than to call it", None
    if any(isinstance(n, ast.Name) and n.id in ("super", "__class__", _REPLACEMENT, _MAKER)
           for n in ast.walk(tree)):
        return "it refers to super(), __class__ or a name rope_ext reserves", None
    return None, tree


def rewrite_nested(fn, tree: ast.FunctionDef, nested_name: str, replacement):
    """A new function: ``fn``'s code (``tree``, from :func:`check_nested`) with the nested
    definition of ``nested_name`` replaced by ``nested_name = replacement``; its globals are
    fn's module globals, so every other name resolves as in fn."""
    tree = copy.deepcopy(tree)
    for parent in ast.walk(tree):
        for field in ("body", "orelse", "finalbody"):
            stmts = getattr(parent, field, None)
            if not isinstance(stmts, list):
                continue
            for i, stmt in enumerate(stmts):
                if isinstance(stmt, ast.FunctionDef) and stmt.name == nested_name:
                    stmts[i] = ast.copy_location(ast.Assign(
                        targets=[ast.Name(nested_name, ast.Store())],
                        value=ast.Name(_REPLACEMENT, ast.Load())), stmt)
        for handler in getattr(parent, "handlers", []) or []:
            for i, stmt in enumerate(handler.body):
                if isinstance(stmt, ast.FunctionDef) and stmt.name == nested_name:
                    raise ValueError("nested definition inside an except clause")
    tree.decorator_list = []
    # Annotations are dropped: they would be evaluated again at definition time, and only
    # the parameter names matter to callers (diffusers reads them with inspect.signature).
    for a in (tree.args.posonlyargs + tree.args.args + tree.args.kwonlyargs
              + [tree.args.vararg, tree.args.kwarg]):
        if a is not None:
            a.annotation = None
    tree.returns = None
    # def __rope_ext_make__(replacement): <fn's def>; return <fn>: the replacement reaches
    # the rewritten body as a closure variable, never as a name in diffusers' module.
    module = ast.parse(f"def {_MAKER}({_REPLACEMENT}):\n    pass\n")
    module.body[0].body = [tree, ast.Return(ast.Name(tree.name, ast.Load()))]
    ast.fix_missing_locations(module)
    filename = inspect.getsourcefile(fn) or "<rope_ext.diffusers>"
    code = compile(module, filename, "exec")
    scope = {}
    exec(code, fn.__globals__, scope)  # noqa: S102 (diffusers' own code, one statement swapped)
    new = scope[_MAKER](replacement)
    new.__qualname__ = fn.__qualname__
    new.__module__ = fn.__module__
    new.__doc__ = fn.__doc__
    return new
