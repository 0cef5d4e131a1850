"""The package's shape: no import cycle among ldmtool's modules, layers imported in one direction, no module
over 500 lines, and docs/ARCHITECTURE.md naming only modules that exist. Imports are read with `ast`; only
those that run when a module is imported count."""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ldmtool"
MAX_LINES = 500
TOO_LONG_FOR_NOW: set[str] = set()  # modules being split; empty when every one is under MAX_LINES


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_time_imports(body: list[ast.stmt]):
    """Import statements run when the module is imported: not inside functions (lazy imports keep the CLI
    free of torch) nor under `if TYPE_CHECKING:`; class bodies, `try` and other `if`s do run."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            yield from _import_time_imports(node.orelse)
        else:
            for field in ("body", "orelse", "finalbody", "handlers"):
                yield from _import_time_imports(getattr(node, field, []))


def _targets(node: ast.stmt, module: str, is_package: bool, modules: dict[str, Path]) -> set[str]:
    """The ldmtool modules an import statement loads (a `from pkg import name` loads `pkg.name` when that
    is a module, else `pkg`)."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name in modules}
    assert isinstance(node, ast.ImportFrom)
    base = node.module or ""
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        anchor = package[: len(package) - node.level + 1]
        base = ".".join(anchor + ([base] if base else []))
    found = {f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in modules}
    if len(found) < len(node.names) and base in modules:
        found.add(base)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"
        graph[name] = set().union(*(_targets(node, name, is_package, modules)
                                    for node in _import_time_imports(tree.body))) - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle as [a, b, ..., a], or [] when the graph has none (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return []


def test_find_cycle_finds_a_cycle_and_only_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_import_graph_sees_module_level_imports_only():
    graph = import_graph()
    assert "ldmtool.errors" in graph["ldmtool.tiling.vae"]  # a plain module-level import
    assert "ldmtool.train.common" in graph["ldmtool.train.diffusion"]  # `from ldmtool.train import common`
    assert not any(target.startswith("ldmtool.checkpoints") for target in graph["ldmtool"])  # lazy, in a function


def test_no_import_cycle_among_ldmtool_modules():
    cycle = find_cycle(import_graph())
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_no_module_over_500_lines():
    too_long = {}
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(ROOT).as_posix()
        lines = len(path.read_text().splitlines())
        if lines > MAX_LINES and relative not in TOO_LONG_FOR_NOW:
            too_long[relative] = lines
    assert not too_long, f"modules over {MAX_LINES} lines: {too_long}"


def test_architecture_doc_names_only_modules_that_exist():
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    # Files in backquotes: from the repository root when they start with ldmtool/ or tests/, else inside
    # ldmtool/ (`io/writer.py`); placeholders such as `cli/<task>.py` are skipped.
    paths = {p if p.startswith(("ldmtool/", "tests/")) else f"ldmtool/{p}"
             for p in re.findall(r"`([\w/]+\.py)`", text)}
    dotted = set(re.findall(r"\bldmtool(?:\.\w+)+", text))
    assert len(paths) > 20 and dotted, "the document should name modules by path and by dotted name"
    missing = {p for p in paths if not (ROOT / p).is_file()}
    missing |= {name for name in dotted if name not in _modules() and _attribute_owner(name) is None}
    assert not missing, f"docs/ARCHITECTURE.md names modules that do not exist: {sorted(missing)}"


def _attribute_owner(dotted: str):
    """`ldmtool.x.y.name` names `name` in module `ldmtool.x.y`: the module, if it defines or imports it."""
    module, _, name = dotted.rpartition(".")
    path = _modules().get(module)
    if path is None:
        return None
    return path if re.search(rf"\b{re.escape(name)}\b", path.read_text()) else None


# docs/ARCHITECTURE.md's layers from the bottom up: at import time a module imports only its own layer or
# layers before it here (imports inside functions are free to reach further).
# The package root (its version; the API it exposes is imported lazily) sits with errors at the bottom.
LAYERS = [("ldmtool", "errors"), ("io",), ("nets",), ("families",), ("runtime",), ("diffusion",), ("checkpoints",),
          ("tiling",), ("addons",), ("options",), ("pipelines",), ("cli",), ("train",), ("__main__",)]


def _layer(module: str) -> int:
    name = module.split(".")[1] if "." in module else module
    for index, names in enumerate(LAYERS):
        if name in names:
            return index
    raise AssertionError(f"{module}: its package is in no layer; add it to LAYERS and docs/ARCHITECTURE.md")


def test_layers_import_only_layers_below_them():
    upward = sorted(f"{module} -> {target}" for module, targets in import_graph().items()
                    for target in targets if _layer(target) > _layer(module))
    assert not upward, "imports against the layer order of docs/ARCHITECTURE.md: " + ", ".join(upward)
