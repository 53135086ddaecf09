"""The package's import structure (docs/architecture.md): no import cycles, and imports only go
down the layer order data -> patterns -> Layout -> kernels -> nn -> models -> bench / cli."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "spattn"

#: lowest first; a module may import from its own layer or one to its left
LAYERS = [
    (
        "spattn._checks",
        "spattn._heads",
        "spattn.registry",
        "spattn.layout",
        "spattn.selection",
        "spattn.kvcache",
        "spattn._compiled",
        "spattn.data",
    ),
    ("spattn.patterns",),
    ("spattn.kernels",),
    ("spattn.functional",),
    ("spattn.approx",),
    ("spattn.nn",),
    ("spattn.models",),
    ("spattn.integrations", "spattn.distributed"),
    ("spattn.bench",),
    ("spattn.cli", "spattn.__main__"),
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(name: str, path: Path):
    """``(target module, at module level)`` for every import of a spattn module in ``path``."""
    tree = ast.parse(path.read_text())
    top_level = set(map(id, tree.body))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        at_top = id(node) in top_level
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").split(".")[0] == "spattn":
                target = node.module
            else:
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                yield (sub if sub in MODULES else target), at_top
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "spattn":
                    yield alias.name, at_top


EDGES = [(src, dst, top) for src, path in MODULES.items() for dst, top in _imports(src, path) if dst != src]


def _layer(module: str):
    for rank, layer in enumerate(LAYERS):
        if any(module == root or module.startswith(root + ".") for root in layer):
            return rank
    return None


def test_every_module_has_a_layer():
    unplaced = sorted(m for m in MODULES if m != "spattn" and _layer(m) is None)
    assert not unplaced, f"place these modules in LAYERS (and docs/architecture.md): {unplaced}"


def test_imports_only_go_down_the_layers():
    upward = sorted({(a, b) for a, b, _ in EDGES if a != "spattn" and b != "spattn" and _layer(b) > _layer(a)})
    assert not upward, f"a lower layer imports a higher one: {upward}"


def test_no_import_cycles():
    """Module-level and function-level (lazy) imports alike: a lazy import only hides a cycle."""
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for a, b, _ in EDGES:
        if b in graph and a != "spattn":  # the package __init__ re-exports everything by design
            graph[a].add(b)
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt]
                pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_the_checks_see_imports():
    """Guard against a parser that finds nothing (the tests above would then pass vacuously)."""
    assert ("spattn.functional", "spattn.layout", True) in EDGES
    assert any(a.startswith("spattn.patterns.") and b == "spattn.patterns.base" for a, b, _ in EDGES)


def _private_or_base(module: str) -> bool:
    leaf = module.rpartition(".")[2]
    return leaf.startswith("_") or leaf == "base"


@pytest.mark.parametrize("folder", ["spattn.patterns"])
def test_sibling_modules_do_not_import_each_other(folder):
    """A module of ``folder`` imports only ``base``, the folder's private ``_*.py`` helpers and lower
    layers -- never a sibling (shared helpers belong in one private module)."""
    siblings = {m for m in MODULES if m.rpartition(".")[0] == folder}
    assert len(siblings) > 3
    bad = sorted(
        {
            (a, b)
            for a, b, _ in EDGES
            if a in siblings and b in siblings and not _private_or_base(a) and not _private_or_base(b)
        }
    )
    assert not bad, f"sibling modules of {folder} import each other (move the shared code to a private module): {bad}"


def test_the_sibling_check_sees_relative_imports(tmp_path):
    """The check above resolves ``from .x import y`` and ``from . import x`` to the sibling module."""
    assert ("spattn.patterns.static", "spattn.patterns._tiles", True) in EDGES
    tree_src = "from .static import Window\nfrom . import topk\ndef f():\n    from .seer import SeerGate\n"
    path = tmp_path / "probe.py"
    path.write_text(tree_src)
    found = {dst for dst, _ in _imports("spattn.patterns.probe", path)}
    assert {"spattn.patterns.static", "spattn.patterns.topk", "spattn.patterns.seer"} <= found


def test_pattern_references_are_independent_oracles():
    """The brute-force references under ``spattn/patterns/reference/`` import nothing of spattn outside
    that folder: an oracle built on the code it checks would check nothing."""
    root = "spattn.patterns.reference"
    refs = {m for m in MODULES if m == root or m.startswith(root + ".")}
    assert len(refs) > 3
    bad = sorted({(a, b) for a, b, _ in EDGES if a in refs and b.split(".")[0] == "spattn" and b not in refs})
    assert not bad, f"a pattern reference imports package code: {bad}"


#: the kinds of selection (spattn.selection.Selection and the four types that meet it)
SELECTION_TYPES = {"Selection", "Layout", "TokenSelection", "PageSelection", "ClusterSelection"}

#: where an isinstance on a selection type is the design: the dispatch table (which kernel runs which kind)
ISINSTANCE_ON_SELECTIONS_ALLOWED = {"spattn.functional"}


def _names_a_selection_type(node: ast.AST) -> bool:
    if isinstance(node, ast.Tuple):
        return any(_names_a_selection_type(e) for e in node.elts)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):  # isinstance(x, A | B)
        return _names_a_selection_type(node.left) or _names_a_selection_type(node.right)
    name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None
    return name in SELECTION_TYPES


def _isinstance_on_selections(source: str) -> list[int]:
    """Lines of ``isinstance(x, T)`` / ``issubclass(x, T)`` calls whose ``T`` names a selection type."""
    return [
        node.lineno
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in ("isinstance", "issubclass")
        and len(node.args) == 2
        and _names_a_selection_type(node.args[1])
    ]


def test_isinstance_on_selection_types_only_in_the_dispatch_table():
    """Per-kind behaviour goes through the Selection protocol (``kind``, ``within_window``, ``to_layout``)
    or the dispatch table (``kernel_for``, ``backends_for``, ``is_selection``): a new kind of selection
    then touches one place."""
    found = {
        f"{name} line {line}"
        for name, path in MODULES.items()
        if name not in ISINSTANCE_ON_SELECTIONS_ALLOWED
        for line in _isinstance_on_selections(path.read_text())
    }
    assert not found, f"isinstance on a selection type outside spattn.functional's dispatch table: {sorted(found)}"


def test_the_selection_isinstance_check_sees_every_spelling():
    """Guard: the check finds bare names, attributes, tuples and unions (and nothing else)."""
    source = (
        "isinstance(a, Layout)\n"
        "isinstance(a, (int, sel.TokenSelection))\n"
        "isinstance(a, PageSelection | ClusterSelection)\n"
        "issubclass(t, Selection)\n"
        "isinstance(a, (int, str))\n"
    )
    assert _isinstance_on_selections(source) == [1, 2, 3, 4]
