"""No import circles among the modules of abi/, abi/engine/ and gateway/ (docs/ARCHITECTURE.md, Layers).

Every import counts: module level, inside a function, and under ``if TYPE_CHECKING:`` — a
type-only import of a module above is still an upward arrow; such a type is a Protocol in the
lower module instead. Read from the source with ast, so nothing is imported.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("abi", "gateway")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules ``name`` imports anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            # `from . import crossing` imports a module; `from .x import Name` imports x
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    # A package's __init__ re-exporting its submodules is not an arrow back up from them.
    return {n: {t for t in _imports(n, p, known) if not n.startswith(t + ".")}
            for n, p in mods.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_reader_sees_a_circle():
    """The check itself: a made-up circle a -> b -> c -> a is found, a line is not."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_has_the_known_arrows():
    """The graph is read, not empty: arrows the layering is built on are in it."""
    g = _graph()
    assert "abi.seam" in g["abi.api"] and "abi.filter_host" in g["abi.api"]   # deferred import
    assert "abi.context" in g["abi.chain"] and "abi.filter" in g["abi.chain"]
    assert "abi.engine.crossing" in g["abi.engine.instance"]                  # `from . import crossing`
    assert {"gateway.admin", "gateway.reload"} <= g["gateway.server"]


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_circles(package):
    circles = [c for c in _cycles(_graph()) if c[0].split(".")[0] == package]
    assert circles == [], f"import circles in {package}/: {circles}"


def test_abi_seam_is_the_bottom():
    """abi/seam.py imports nothing of abi/, so every abi module may take its types from it."""
    assert _graph()["abi.seam"] == set()


def test_gateway_imports_only_abi_api():
    g = _graph()
    reached = {t for n, ts in g.items() if n.startswith("gateway.") for t in ts if t.startswith("abi")}
    assert reached == {"abi.api"}
