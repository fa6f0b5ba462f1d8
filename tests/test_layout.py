"""The package's imports run one way: no import circle between modules of clip_glofnd/, no `_private` name taken from
another module, no module over ~500 lines without a reason in its opening lines.

Read from the source with `ast` (every import, also those inside functions and under TYPE_CHECKING: a lazy import is
still a dependency), so the test needs no import of the package and sees what a reader sees.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "clip_glofnd"
MAX_LINES = 500
REASON = "longer than"                    # an opening docstring saying why a module is "longer than ~500 lines"


def module_name(path: Path) -> str:
    return path.stem if path.name != "__init__.py" else "__init__"


def imports(tree: ast.AST) -> tuple[set[str], set[tuple[str, str]]]:
    """(package modules this module imports, (module, private name) pairs it takes from them): `from clip_glofnd.m
    import name`, `from clip_glofnd import m`, `import clip_glofnd.m`, and `alias._name` on an imported module."""
    modules: set[str] = set()
    private: set[tuple[str, str]] = set()
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "clip_glofnd":
                for alias in node.names:
                    modules.add(alias.name)
                    aliases[alias.asname or alias.name] = alias.name
            elif node.module.startswith("clip_glofnd."):
                source = node.module.split(".")[1]
                modules.add(source)
                private.update((source, a.name) for a in node.names if a.name.startswith("_"))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("clip_glofnd."):
                    modules.add(alias.name.split(".")[1])
                    if alias.asname:
                        aliases[alias.asname] = alias.name.split(".")[1]
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            private.add((aliases[node.value.id], node.attr))
    return modules, private


def graph() -> dict[str, tuple[set[str], set[tuple[str, str]]]]:
    out = {}
    for path in sorted(PACKAGE.glob("*.py")):
        mods, private = imports(ast.parse(path.read_text()))
        out[module_name(path)] = ({m for m in mods if m != module_name(path)}, private)
    return out


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_on_a_known_graph() -> None:
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a", "e"}, "e": {"d"}, "f": set()}
    assert sorted(cycles(edges)) == [["a", "b", "c"], ["d", "e"]]
    tree = ast.parse("from clip_glofnd import step as s\nfrom clip_glofnd.data import Batch, _seed\nimport "
                     "clip_glofnd.glofnd as g\nx = s._undo(g._private)")
    mods, private = imports(tree)
    assert mods == {"step", "data", "glofnd"}
    assert private == {("data", "_seed"), ("step", "_undo"), ("glofnd", "_private")}


def test_no_import_circle_in_the_package() -> None:
    found = cycles({name: mods for name, (mods, _) in graph().items()})
    assert not found, "import circles: " + "; ".join(" <-> ".join(c) for c in found)


def test_no_private_name_crosses_a_module_boundary() -> None:
    taken = sorted(f"{name} takes {source}.{attr}" for name, (_, private) in graph().items()
                   for source, attr in private)
    assert not taken, taken


def test_modules_stay_short_or_say_why() -> None:
    long = []
    for path in sorted(PACKAGE.glob("*.py")):
        text = path.read_text()
        doc = ast.get_docstring(ast.parse(text)) or ""
        if len(text.splitlines()) > MAX_LINES and REASON not in doc:
            long.append(f"{path.name} ({len(text.splitlines())} lines)")
    assert not long, long
