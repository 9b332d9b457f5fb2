# SPDX-License-Identifier: Apache-2.0
"""Build the import graph of a package with ``ast`` and check the layout rules of docs/design.md against it.

Used by ``tests/unit/test_architecture.py``; also a script: ``python tests/helpers/architecture.py`` prints the
graph's violations (exit 1) or "ok". Nothing is imported: sources are parsed, so the check runs without root,
without the extension and without the outside libraries installed.

An import is an edge from the importing module to the imported one, whatever the place: module level, inside a
function (``kind="function"``), under ``if TYPE_CHECKING:`` (``kind="typing"``), or a lazy import by name
(``importlib.import_module("...")`` or a ``"package.module:Name"`` string, ``kind="lazy"``: the backend registry).
Every kind counts for the layer and library rules; type-only imports do not count for cycles, since they never
run (a back-reference annotation is not a load-order tie).
"""
from __future__ import annotations

import ast
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

SOURCE_SUFFIXES = (".py", ".pyx", ".pxi", ".pxd", ".h")  # hand-written sources; generated .c is not counted
MAX_LINES = 600

# The product's layers, bottom to top, and what each may import (itself always). A module's layer is that of the
# longest matching dotted prefix below. The lab may import the product; nothing in the product imports the lab.
LAYER_OF: dict[str, str] = {
    "fastflannel": "base",  # the package itself (__version__)
    "fastflannel.errors": "base",
    "fastflannel.ip": "base",
    "fastflannel.config": "base",
    "fastflannel.lease": "base",
    "fastflannel.retry": "base",
    "fastflannel.kernel": "kernel",
    "fastflannel.datapath": "datapath",
    "fastflannel.subnet": "subnet",
    "fastflannel.service": "service",
    "fastflannel.backend": "backend",
    "fastflannel.cni": "cni",
    "fastflannel.options": "daemon",
    "fastflannel.daemon": "daemon",
    "fastflannel.cli": "cli",
    "fastflannel.__main__": "cli",
    "fastflannel.dockeropts": "cli",
    "fastflannel.lab": "lab",
}
PRODUCT_LAYERS = ("base", "kernel", "datapath", "subnet", "service", "backend", "cni", "daemon", "cli")
MAY_IMPORT: dict[str, set[str]] = {
    "base": set(),
    "kernel": {"base"},
    "datapath": {"base"},
    "subnet": {"base"},
    "service": {"base", "datapath"},  # metrics read the data path's counter contract
    "backend": {"base", "kernel", "datapath", "subnet"},
    "cni": {"base"},
    "daemon": {"base", "kernel", "datapath", "subnet", "service", "backend"},
    "cli": {"base", "kernel", "datapath", "subnet", "service", "backend", "cni", "daemon"},
    "lab": set(PRODUCT_LAYERS),
}

# Every outside (non-stdlib) library and the one module allowed to import it. A new library needs an owner here.
LIBRARY_OWNERS: dict[str, str] = {
    "etcd3gw": "fastflannel.subnet.etcd",
    "requests": "fastflannel.subnet.etcd",  # etcd3gw's transport (TLS adapter, connection errors)
    "urllib3": "fastflannel.subnet.etcd",
    "pyroute2": "fastflannel.kernel.netlink",
    "nftables": "fastflannel.kernel.nftables",
    "prometheus_client": "fastflannel.service.metrics",
    "cryptography": "fastflannel.backend.wgkey",  # X25519 for the wireguard backend's keys
    "matplotlib": "fastflannel.lab.benchout",  # optional: the bench's plot
}
# Compiled modules of the package (no .py source) and their one importer.
EXTENSION_OWNERS: dict[str, str] = {
    "fastflannel.datapath._fastpath": "fastflannel.datapath.fastpath",
}

# Files allowed over MAX_LINES, each with its reason. Keep this short; an entry whose file shrank fails the check.
SIZE_EXCEPTIONS: dict[str, str] = {
}

_LAZY_TARGET = re.compile(r"^([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+):[A-Za-z_]\w*$")


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    target: str  # imported module (the longest known module the import names, else the name as written)
    line: int
    kind: str  # "module" | "function" | "typing" | "lazy"


@dataclass
class Graph:
    package: str
    root: Path  # the package's directory
    files: dict[str, Path] = field(default_factory=dict)  # module -> source file (.py), packages as __init__.py
    imports: list[Import] = field(default_factory=list)

    def edges(self, *, runtime_only: bool = False) -> dict[str, set[str]]:
        """Return module -> set of package modules it imports (type-only imports left out if ``runtime_only``)."""
        out: dict[str, set[str]] = {m: set() for m in self.files}
        for imp in self.imports:
            if imp.target in self.files and imp.target != imp.source and not (runtime_only and imp.kind == "typing"):
                out[imp.source].add(imp.target)
        return out


def module_name(path: Path, pkg_root: Path, package: str) -> str:
    rel = path.relative_to(pkg_root).with_suffix("")
    parts = [package, *rel.parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def build_graph(pkg_root: Path, package: str | None = None) -> Graph:
    """Parse every ``.py`` under ``pkg_root`` (the package directory) and collect its imports."""
    package = package or pkg_root.name
    g = Graph(package, pkg_root)
    for path in sorted(pkg_root.rglob("*.py")):
        g.files[module_name(path, pkg_root, package)] = path
    compiled = {module_name(p, pkg_root, package) for p in pkg_root.rglob("*.pyx")}
    known = set(g.files) | compiled
    for mod, path in g.files.items():
        g.imports.extend(_imports(mod, path, known))
    return g


def _imports(mod: str, path: Path, known: set[str]) -> list[Import]:
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    out: list[Import] = []

    def resolve(node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        base = mod.split(".") if is_pkg else mod.split(".")[:-1]
        if node.level > 1:
            base = base[: len(base) - (node.level - 1)]
        return ".".join(base + ([node.module] if node.module else []))

    def visit(node: ast.AST, kind: str) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            kind = "typing" if kind == "typing" else "function"
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, "typing")
            for child in node.orelse:
                visit(child, kind)
            return
        if isinstance(node, ast.Import):
            for a in node.names:
                out.append(Import(mod, _longest_known(a.name, known), node.lineno, kind))
        elif isinstance(node, ast.ImportFrom):
            base = resolve(node)
            if base == "__future__":
                return
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.append(Import(mod, sub if sub in known else _longest_known(base, known), node.lineno, kind))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            m = _LAZY_TARGET.match(node.value)
            if m and m.group(1).split(".")[0] == mod.split(".")[0]:
                out.append(Import(mod, _longest_known(m.group(1), known), node.lineno, "lazy"))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            out.append(Import(mod, _longest_known(node.args[0].value, known), node.lineno, "lazy"))
        for child in ast.iter_child_nodes(node):
            visit(child, kind)

    visit(tree, "module")
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _longest_known(name: str, known: set[str]) -> str:
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        cand = ".".join(parts[:i])
        if cand in known:
            return cand
    return name


# ------------------------------------------------------------------------------------------------------------------
# checks: each returns a list of human-readable violations (empty: the rule holds)


def find_cycles(edges: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Return one concrete cycle ``[a, b, ..., a]`` per strongly connected component of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    sccs: list[list[str]] = []
    counter = 0

    def strongconnect(v: str) -> None:  # Tarjan; the package graph is small, recursion depth is fine
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                strongconnect(w)
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
            if len(comp) > 1 or v in edges.get(v, ()):
                sccs.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            strongconnect(v)
    return [_cycle_in(comp, edges) for comp in sorted(sccs)]


def _cycle_in(comp: list[str], edges: Mapping[str, Iterable[str]]) -> list[str]:
    """Return a shortest cycle through ``comp[0]`` inside the component (breadth-first)."""
    members, start = set(comp), comp[0]
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(edges.get(v, ())):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [*reversed(path), start]
                if w in members and w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return comp  # unreachable for a real SCC


def layer_of(module: str) -> str | None:
    """Return the layer of the longest listed prefix of ``module`` (the bare package name matches only itself)."""
    parts = module.split(".")
    for i in range(len(parts), 1, -1):
        layer = LAYER_OF.get(".".join(parts[:i]))
        if layer is not None:
            return layer
    return LAYER_OF.get(module)


def cycle_violations(g: Graph) -> list[str]:
    return ["import cycle: " + " -> ".join(c) for c in find_cycles(g.edges(runtime_only=True))]


def layer_violations(g: Graph) -> list[str]:
    out: list[str] = []
    for mod in sorted(g.files):
        if layer_of(mod) is None:
            out.append(f"{mod}: no layer; add it to LAYER_OF in tests/helpers/architecture.py and a line to "
                       "docs/design.md")
    for imp in g.imports:
        if imp.target not in g.files and imp.target not in EXTENSION_OWNERS:
            continue
        src, dst = layer_of(imp.source), layer_of(imp.target)
        if src is None or dst is None or src == dst:
            continue
        if dst == "lab":
            out.append(f"{imp.source}:{imp.line}: the product imports the lab ({imp.target})")
        elif dst not in MAY_IMPORT[src]:
            out.append(f"{imp.source}:{imp.line}: upward import {src} -> {dst} ({imp.target}); {src} may import "
                       f"only {sorted(MAY_IMPORT[src]) or 'nothing of the package'}")
    return out


def library_violations(g: Graph) -> list[str]:
    out = []
    std = set(sys.stdlib_module_names) | {"__future__"}
    for imp in g.imports:
        top = imp.target.split(".")[0]
        if imp.target in EXTENSION_OWNERS or any(imp.target.startswith(e + ".") for e in EXTENSION_OWNERS):
            ext = imp.target if imp.target in EXTENSION_OWNERS else next(
                e for e in EXTENSION_OWNERS if imp.target.startswith(e + "."))
            if imp.source != EXTENSION_OWNERS[ext]:
                out.append(f"{imp.source}:{imp.line}: imports the extension {ext}; only {EXTENSION_OWNERS[ext]} may")
            continue
        if top in std or top == g.package:
            continue
        owner = LIBRARY_OWNERS.get(top)
        if owner is None:
            out.append(f"{imp.source}:{imp.line}: outside library {top!r} has no owning module; give it exactly one "
                       "in LIBRARY_OWNERS (tests/helpers/architecture.py) and import it only there")
        elif imp.source != owner:
            out.append(f"{imp.source}:{imp.line}: imports {top}; only {owner} may (the rest get its objects "
                       "through constructors)")
    return out


def line_counts(pkg_root: Path) -> dict[Path, int]:
    return {p: len(p.read_text(errors="replace").splitlines())
            for p in sorted(pkg_root.rglob("*")) if p.is_file() and p.suffix in SOURCE_SUFFIXES}


def size_violations(pkg_root: Path, exceptions: Mapping[str, str], limit: int = MAX_LINES) -> list[str]:
    """Files over ``limit`` lines not in ``exceptions`` (path relative to ``pkg_root``'s parent -> reason), and
    exceptions that no longer apply (the file shrank or went: drop it from the list)."""
    out = []
    counts = {p.relative_to(pkg_root.parent).as_posix(): n for p, n in line_counts(pkg_root).items()}
    for rel, n in counts.items():
        if n > limit and rel not in exceptions:
            out.append(f"{rel}: {n} lines, over the {limit}-line rule; split it by concern")
    for rel in exceptions:
        if counts.get(rel, 0) <= limit:
            out.append(f"{rel}: listed as an exception to the {limit}-line rule but has {counts.get(rel, 0)} lines; "
                       "remove it from the list")
    return out


def all_violations(pkg_root: Path, size_exceptions: Mapping[str, str] = SIZE_EXCEPTIONS) -> list[str]:
    g = build_graph(pkg_root)
    found = (cycle_violations(g) + layer_violations(g) + library_violations(g)
             + size_violations(pkg_root, size_exceptions))
    return list(dict.fromkeys(found))


if __name__ == "__main__":
    root = Path(__file__).resolve().parents[2] / "fastflannel"
    problems = all_violations(root)
    print("\n".join(problems) or "ok")
    sys.exit(1 if problems else 0)
