"""The import structure of the ``edgellm`` package, read from the source (AST), never by importing it.

Three contracts, each failing with a list of what breaks it:

* no import cycle between modules. Imports at module level and imports inside functions both count
  (a function-level import only defers the cycle to the first call); imports under
  ``if TYPE_CHECKING:`` do not, as they never run.
* no ``from edgellm.x import _name``: a leading-underscore name is private to its module.
* layers: a module imports only from its own layer or lower ones (``LAYERS`` below, lowest first).
  Same-layer imports are allowed; ``TYPE_CHECKING`` imports are exempt (annotations only).

Edges are the imports written in the source: ``from edgellm.a import b`` is an edge to the module
``edgellm.a.b`` where that is a module, else to ``edgellm.a``. The implicit import of a parent
package's ``__init__`` is not an edge.
"""

from __future__ import annotations

import ast
import functools
from dataclasses import dataclass
from pathlib import Path

import pytest

# -------------------------------------------------------------------------------------------------
# The layers, lowest first. A name is the first component under edgellm/ (a subpackage or a
# top-level module); "edgellm" is the package root (its __init__.py). Every component must appear.
# -------------------------------------------------------------------------------------------------
LAYERS: list[tuple[str, ...]] = [
    ("errors", "util", "config", "dtypes", "heap"),     # foundations: no engine code
    ("kernels", "quant", "kv"),                         # numeric formats, native kernels, KV storage
    ("loading", "tokenizer", "layers", "models"),       # files -> weights, text -> ids, the forward pass
    ("sampling", "grammar"),                            # grammar: constrained decoding (token masks)
    ("runtime",),                                       # engine, scheduler, sessions
    ("llm",),                                           # the single-sequence public API
    ("serve", "bench", "roofline", "quality"),          # applications built on the engine
    ("cli", "commands", "__main__", "edgellm"),         # the command line and the package root
]

PACKAGE = "edgellm"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE

MODULE, FUNCTION, TYPE_ONLY = "module-level", "function-level", "TYPE_CHECKING"


@dataclass(frozen=True)
class Import:
    source: str          # importing module
    target: str          # imported module
    names: tuple[str, ...]
    kind: str            # MODULE, FUNCTION or TYPE_ONLY
    line: int

    def where(self) -> str:
        return f"{self.source}:{self.line} ({self.kind})"


def module_names(root: Path, package: str) -> dict[str, Path]:
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = (package, *path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
           (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _walk(node: ast.AST, kind: str):
    """(import node, kind) for every import under ``node``; kind as seen from the module's import."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, kind
            continue
        inner = kind
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            yield from _walk_list(child.body, TYPE_ONLY)
            yield from _walk_list(child.orelse, kind)
            continue
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) and kind == MODULE:
            inner = FUNCTION
        yield from _walk(child, inner)


def _walk_list(nodes, kind):
    for n in nodes:
        if isinstance(n, (ast.Import, ast.ImportFrom)):
            yield n, kind
        else:
            yield from _walk(n, kind)


def imports_of(root: Path, package: str) -> tuple[dict[str, Path], list[Import]]:
    mods = module_names(root, package)
    found = []
    for name, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node, kind in _walk(tree, MODULE):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                if mod != package and not mod.startswith(package + "."):
                    continue
                plain = [a.name for a in node.names if f"{mod}.{a.name}" not in mods]
                for a in node.names:
                    if f"{mod}.{a.name}" in mods:
                        found.append(Import(name, f"{mod}.{a.name}", (), kind, node.lineno))
                if plain:
                    found.append(Import(name, mod, tuple(plain), kind, node.lineno))
            else:
                for a in node.names:
                    if a.name == package or a.name.startswith(package + "."):
                        found.append(Import(name, a.name, (), kind, node.lineno))
    return mods, found


def strongly_connected(nodes, edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative); components of more than one module, or a self-import."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for start in nodes:
        if start in index:
            continue
        work = [(start, iter(sorted(edges.get(start, ()))))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(edges.get(w, ())))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1 or v in edges.get(v, ()):
                    out.append(sorted(comp))
    return sorted(out)


def shortest_cycle(start: str, members: set[str], edges: dict[str, set[str]]) -> list[str]:
    """A shortest cycle through ``start`` inside one component (breadth first)."""
    prev, frontier = {start: None}, [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(edges.get(v, ()) & members):
                if w == start:
                    path = [v]
                    while prev[path[-1]] is not None:
                        path.append(prev[path[-1]])
                    return path[::-1] + [start]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return []


def find_cycles(root: Path, package: str) -> list[str]:
    """One report per cycle (strongly connected component): its shortest cycles and their import lines."""
    mods, found = imports_of(root, package)
    edges: dict[str, set[str]] = {}
    lines: dict[tuple[str, str], list[Import]] = {}
    for imp in found:
        if imp.kind != TYPE_ONLY and imp.target in mods:
            edges.setdefault(imp.source, set()).add(imp.target)
            lines.setdefault((imp.source, imp.target), []).append(imp)
    reports = []
    for comp in strongly_connected(mods, edges):
        members, seen, text = set(comp), set(), [f"cycle among {', '.join(comp)}:"]
        for m in comp:
            cyc = shortest_cycle(m, members, edges)
            key = frozenset(zip(cyc, cyc[1:]))
            if not cyc or key in seen:
                continue
            seen.add(key)
            text.append("  " + " -> ".join(cyc))
            for a, b in zip(cyc, cyc[1:]):
                text.extend(f"      {a} -> {b}: {imp.where()}" for imp in lines[(a, b)])
        reports.append("\n".join(text))
    return reports


def find_private_imports(root: Path, package: str) -> list[str]:
    _, found = imports_of(root, package)
    return [f"{imp.where()}: from {imp.target} import {name}"
            for imp in found for name in imp.names if name.startswith("_") and not name.startswith("__")]


def component(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def layer_of() -> dict[str, int]:
    return {name: i for i, names in enumerate(LAYERS) for name in names}


def find_layer_violations(root: Path, package: str) -> list[str]:
    mods, found = imports_of(root, package)
    rank = layer_of()
    out = []
    for imp in found:
        a, b = component(imp.source), component(imp.target)
        if imp.kind == TYPE_ONLY or a not in rank or b not in rank:
            continue
        if rank[b] > rank[a]:
            out.append(f"{imp.where()}: {a} (layer {rank[a]}) imports {imp.target} ({b}, layer {rank[b]})")
    return out


@functools.cache
def _package() -> tuple[dict[str, Path], list[Import]]:
    return imports_of(ROOT, PACKAGE)


# -------------------------------------------------------------------------------------------------
# the contracts on edgellm
# -------------------------------------------------------------------------------------------------
def test_every_component_has_a_layer():
    mods, _ = _package()
    rank = layer_of()
    assert len(rank) == sum(len(names) for names in LAYERS), "a name appears in two layers"
    missing = sorted({component(m) for m in mods} - set(rank))
    assert not missing, f"put these in LAYERS (tests/test_architecture.py): {missing}"


def test_no_import_cycles():
    cycles = find_cycles(ROOT, PACKAGE)
    assert not cycles, f"{len(cycles)} import cycle(s):\n" + "\n".join(cycles)


def test_no_private_names_imported_from_other_modules():
    private = find_private_imports(ROOT, PACKAGE)
    assert not private, "private names imported across modules:\n" + "\n".join(private)


def test_lower_layers_never_import_higher_ones():
    bad = find_layer_violations(ROOT, PACKAGE)
    assert not bad, f"{len(bad)} upward import(s):\n" + "\n".join(bad)


# -------------------------------------------------------------------------------------------------
# the checker itself, on a hand-made package whose answers are known
# -------------------------------------------------------------------------------------------------
def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = root / "pkg" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root / "pkg"


def test_checker_on_a_known_package(tmp_path, monkeypatch):
    """Each contract finds exactly the planted faults, so a clean result on edgellm means something."""
    pkg = _write(tmp_path, {
        "__init__.py": "",
        "errors.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.llm import LLM\n",
        "llm.py": "from pkg.errors import Oops\nfrom pkg.kv.cache import _secret\n",
        "kv/__init__.py": "",
        "kv/cache.py": "def f():\n    from pkg import llm\n",
        "kv/block.py": "from . import cache\nfrom .cache import __version__\n",
        "runtime/__init__.py": "",
        "runtime/a.py": "from pkg.runtime import b\n",
        "runtime/b.py": "import pkg.runtime.a\n",
    })
    mods, found = imports_of(pkg, "pkg")
    assert set(mods) == {"pkg", "pkg.errors", "pkg.llm", "pkg.kv", "pkg.kv.cache", "pkg.kv.block", "pkg.runtime",
                         "pkg.runtime.a", "pkg.runtime.b"}
    assert {(i.source, i.target, i.kind) for i in found} == {
        ("pkg.errors", "pkg.llm", TYPE_ONLY), ("pkg.llm", "pkg.errors", MODULE), ("pkg.llm", "pkg.kv.cache", MODULE),
        ("pkg.kv.cache", "pkg.llm", FUNCTION), ("pkg.kv.block", "pkg.kv.cache", MODULE),
        ("pkg.runtime.a", "pkg.runtime.b", MODULE), ("pkg.runtime.b", "pkg.runtime.a", MODULE)}
    # llm <-> kv.cache through a function-level import counts; errors <-> llm through TYPE_CHECKING does not
    cycles = find_cycles(pkg, "pkg")
    assert [c.splitlines()[0] for c in cycles] == ["cycle among pkg.kv.cache, pkg.llm:",
                                                   "cycle among pkg.runtime.a, pkg.runtime.b:"]
    assert "pkg.kv.cache:2 (function-level)" in cycles[0] and "pkg.llm:2 (module-level)" in cycles[0]
    assert find_private_imports(pkg, "pkg") == ["pkg.llm:2 (module-level): from pkg.kv.cache import _secret"]
    monkeypatch.setitem(globals(), "LAYERS", [("errors",), ("kv", "runtime"), ("llm",)])
    assert find_layer_violations(pkg, "pkg") == [
        "pkg.kv.cache:2 (function-level): kv (layer 1) imports pkg.llm (llm, layer 2)"]


@pytest.mark.parametrize("module,expected", [("edgellm", "edgellm"), ("edgellm.cli", "cli"),
                                             ("edgellm.quant.int4", "quant")])
def test_component_names(module, expected):
    assert component(module) == expected
