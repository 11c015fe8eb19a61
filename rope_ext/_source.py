"""Reading a library's source to decide whether a drop-in may replace one of its functions.

The drop-ins (rope_ext.hf, rope_ext.diffusers) replace a function only when its code is one
of the forms whose meaning rope_ext reproduces. A form is compared on its syntax tree, with
docstrings, decorators, the function's name and type annotations left out: formatting,
comments and renamed decorators do not matter, a changed expression does.
"""

import ast
import inspect
from typing import Dict, List, Optional


def _strip_annotations(args: ast.arguments) -> ast.arguments:
    args = ast.parse(f"def f({ast.unparse(args)}): pass").body[0].args  # a copy
    for a in args.posonlyargs + args.args + args.kwonlyargs + [args.vararg, args.kwarg]:
        if a is not None:
            a.annotation = None
    return args


def function_key(fn: ast.FunctionDef) -> str:
    """The comparable form of a function definition: its arguments (names and defaults,
    annotations left out) and its body without a docstring."""
    body = [n for n in fn.body
            if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)
                    and isinstance(n.value.value, str))]
    return ast.dump(_strip_annotations(fn.args)) + "|" + "".join(ast.dump(n) for n in body)


def source_key(src: str) -> str:
    """function_key of the one function defined in ``src``."""
    (fn,) = ast.parse(inspect.cleandoc(src)).body
    return function_key(fn)


def module_tree(mod) -> ast.Module:
    """The syntax tree of a module's source (OSError, TypeError or SyntaxError when it cannot
    be read, e.g. a module loaded from bytecode only)."""
    return ast.parse(inspect.getsource(mod))


def top_level_functions(tree: ast.Module) -> Dict[str, ast.FunctionDef]:
    """The module-level function definitions by name (a later definition wins, as at run
    time)."""
    return {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}


def calls_by_name(tree: ast.AST, name: str) -> List[ast.Call]:
    """Every call of the bare global ``name(...)`` in tree."""
    return [n for n in ast.walk(tree)
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == name]


def matching_form(fn: Optional[ast.FunctionDef], forms: Dict[str, str]) -> Optional[str]:
    """The name of the form (name -> source_key) that fn has, or None."""
    if fn is None:
        return None
    key = function_key(fn)
    return next((name for name, k in forms.items() if k == key), None)
