"""Every public function of the package is typed: each public top-level function and each public method
of a public class (name without a leading underscore; dunders count as private) annotates all its
parameters (but `self`/`cls`) and its return. Read with `ast`, so nothing is imported. `mypy` (configured
in pyproject.toml, run by `.ci/run`) checks that the annotations are right; this checks that they are there,
so a new module cannot slip out of the strict list unnoticed."""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ldmtool"

# Folders whose public functions may still lack annotations (none now; a folder named here must also be out of
# the strict mypy list in pyproject.toml, with a TODO).
NOT_YET_TYPED: tuple[str, ...] = ()


def _is_public(name: str) -> bool:
    return not name.startswith("_")


def _is_staticmethod(node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    return any(isinstance(d, ast.Name) and d.id == "staticmethod" for d in node.decorator_list)


def _missing(node: ast.FunctionDef | ast.AsyncFunctionDef, *, is_method: bool) -> list[str]:
    """The parameters (and 'return') of a function that have no annotation."""
    args = node.args
    params = [*args.posonlyargs, *args.args]
    if is_method and params and not _is_staticmethod(node) and params[0].arg in ("self", "cls"):
        params = params[1:]
    params += [*args.kwonlyargs, *(a for a in (args.vararg, args.kwarg) if a is not None)]
    missing = [p.arg for p in params if p.annotation is None]
    return missing + (["return"] if node.returns is None else [])


def _public_functions(body: list[ast.stmt], prefix: str = "", is_method: bool = False
                      ) -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef, bool]]:
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _is_public(node.name):
            yield prefix + node.name, node, is_method
        elif isinstance(node, ast.ClassDef) and _is_public(node.name):
            yield from _public_functions(node.body, f"{prefix}{node.name}.", is_method=True)
        elif isinstance(node, ast.If):  # e.g. definitions that depend on the Python version
            yield from _public_functions(node.body + node.orelse, prefix, is_method)


def untyped_public_functions() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(ROOT).as_posix()
        if relative.startswith(NOT_YET_TYPED):
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        for name, node, is_method in _public_functions(tree.body):
            missing = _missing(node, is_method=is_method)
            if missing:
                found.append(f"{relative}:{node.lineno} {name}: no annotation for {', '.join(missing)}")
    return found


def test_every_public_function_is_typed():
    assert untyped_public_functions() == []


def test_the_check_sees_missing_annotations():
    tree = ast.parse("def f(a, b: int) -> int: ...\n"
                     "class C:\n"
                     "    def m(self, x: int): ...\n"
                     "    @staticmethod\n"
                     "    def s(self) -> None: ...\n"
                     "    def _private(self, y): ...\n"
                     "    def __init__(self, z): ...\n"
                     "def g(*args, **kwargs) -> None: ...\n")
    found = {name: _missing(node, is_method=is_method) for name, node, is_method in _public_functions(tree.body)}
    assert found == {"f": ["a"], "C.m": ["return"], "C.s": ["self"], "g": ["args", "kwargs"]}


def test_the_allow_list_names_folders_that_exist():
    for folder in NOT_YET_TYPED:
        assert (ROOT / folder).is_dir(), folder
