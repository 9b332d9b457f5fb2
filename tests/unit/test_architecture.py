# SPDX-License-Identifier: Apache-2.0
"""Hold the package to the layout rules of docs/design.md: no import cycle, the product never imports the lab, no
upward import between layers, one importer per outside library, no source file over ~600 lines, every module
named in docs/design.md.

The graph is built from the sources with ``ast`` (tests/helpers/architecture.py), module-level and function-level
imports alike. The second half plants each kind of violation in a synthetic package, so every check is shown to fail.
"""
from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import architecture as arch
import pytest

REPO = Path(__file__).resolve().parents[2]
PKG = REPO / "fastflannel"


@pytest.fixture(scope="module")
def graph() -> arch.Graph:
    return arch.build_graph(PKG)


def test_the_graph_sees_module_function_and_lazy_imports(graph: arch.Graph) -> None:
    # Guards the checks below against a graph that silently misses edges.
    edges = graph.edges()
    assert "fastflannel.kernel.linkevents" in edges["fastflannel.backend.vxlan"]
    assert "fastflannel.kernel.netlink" in edges["fastflannel.backend.route_network"]  # a function-level import
    assert "fastflannel.daemon" in edges["fastflannel.cli"]  # a function-level import
    assert {"fastflannel.backend.vxlan", "fastflannel.backend.udp"} <= edges["fastflannel.backend"]  # by name
    assert any(i.target == "fastflannel.datapath._fastpath" for i in graph.imports)  # the compiled module
    assert any(i.target == "pyroute2" for i in graph.imports)


def test_no_import_cycle(graph: arch.Graph) -> None:
    assert arch.cycle_violations(graph) == []


def test_product_never_imports_lab_and_layers_only_import_downward(graph: arch.Graph) -> None:
    assert arch.layer_violations(graph) == []


def test_each_outside_library_has_one_importer(graph: arch.Graph) -> None:
    assert arch.library_violations(graph) == []


def test_no_source_file_over_the_line_limit() -> None:
    assert arch.size_violations(PKG, arch.SIZE_EXCEPTIONS) == []


def _documented_files() -> list[str]:
    """Every source of the package a newcomer must find in docs/design.md (empty package markers left out)."""
    out = []
    for p in sorted(PKG.rglob("*")):
        if not p.is_file() or p.suffix not in (".py", ".pyx", ".pxi", ".pxd"):
            continue
        if p.name == "__init__.py":
            body = ast.parse(p.read_text()).body
            if all(isinstance(n, ast.Expr) and isinstance(getattr(n, "value", None), ast.Constant) for n in body):
                continue  # docstring only
        out.append(p.relative_to(PKG).as_posix())
    return out


def test_design_doc_names_every_module() -> None:
    design = (REPO / "docs" / "design.md").read_text()
    missing = [rel for rel in _documented_files() if rel not in design]
    assert missing == [], f"docs/design.md's module list lacks {missing}: add one line for each"


# ------------------------------------------------------------------------------------------------------------------
# the checks can fail: a synthetic package with each violation planted


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "fastflannel"
    for rel, text in {"__init__.py": "", **files}.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    for d in {p.parent for p in root.rglob("*.py")}:
        (d / "__init__.py").touch()
    return root


def test_find_cycles_on_a_synthetic_graph() -> None:
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}, "f": {"d"}}
    assert arch.find_cycles(edges) == [["a", "b", "c", "a"], ["e", "e"]]
    assert arch.find_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_a_planted_cycle_through_a_function_level_import_fails(tmp_path: Path) -> None:
    root = _package(tmp_path, {
        "config.py": "from fastflannel import lease\n",
        "lease.py": "def f():\n    from fastflannel.config import X\n",
    })
    assert arch.cycle_violations(arch.build_graph(root)) == [
        "import cycle: fastflannel.config -> fastflannel.lease -> fastflannel.config"]


def test_a_type_only_back_reference_is_not_a_cycle(tmp_path: Path) -> None:
    root = _package(tmp_path, {
        "lab/world.py": "from fastflannel.lab.hosts import Host\n",
        "lab/hosts.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from fastflannel.lab.world import W\n",
    })
    assert arch.cycle_violations(arch.build_graph(root)) == []


def test_planted_product_to_lab_and_upward_imports_fail(tmp_path: Path) -> None:
    root = _package(tmp_path, {
        "daemon.py": "def run():\n    from fastflannel.lab.testbed import Testbed\n",
        "kernel/netlink.py": "from fastflannel.backend import BackendError\n",
        "kernel/iface.py": "from ..daemon import main\n",  # relative, two levels up
        "backend/__init__.py": "REG = {'vxlan': 'fastflannel.backend.vxlan:VxlanBackend'}\n",
        "backend/vxlan.py": "from fastflannel.kernel import netlink\n",  # downward: fine
        "lab/testbed.py": "from fastflannel.daemon import run\n",  # lab -> product: fine
        "newthing.py": "",
    })
    got = arch.layer_violations(arch.build_graph(root))
    assert got == [
        "fastflannel.newthing: no layer; add it to LAYER_OF in tests/helpers/architecture.py and a line to "
        "docs/design.md",
        "fastflannel.daemon:2: the product imports the lab (fastflannel.lab.testbed)",
        "fastflannel.kernel.iface:1: upward import kernel -> daemon (fastflannel.daemon); kernel may import only "
        "['base']",
        "fastflannel.kernel.netlink:1: upward import kernel -> backend (fastflannel.backend); kernel may import only "
        "['base']",
    ]


def test_planted_second_importers_of_libraries_and_the_extension_fail(tmp_path: Path) -> None:
    root = _package(tmp_path, {
        "kernel/netlink.py": "import pyroute2\n",
        "kernel/iface.py": "def f():\n    from pyroute2.netlink import exceptions\n",
        "datapath/_fastpath.pyx": "# compiled\n",
        "datapath/fastpath.py": "from . import _fastpath\n",
        "datapath/twin.py": "from fastflannel.datapath._fastpath import Proxy\n",
        "subnet/etcd.py": "import etcd3gw, json, requests.adapters\n",
        "service/metrics.py": "import yaml\n",
    })
    assert arch.library_violations(arch.build_graph(root)) == [
        "fastflannel.datapath.twin:1: imports the extension fastflannel.datapath._fastpath; only "
        "fastflannel.datapath.fastpath may",
        "fastflannel.kernel.iface:2: imports pyroute2; only fastflannel.kernel.netlink may (the rest get its "
        "objects through constructors)",
        "fastflannel.service.metrics:1: outside library 'yaml' has no owning module; give it exactly one in "
        "LIBRARY_OWNERS (tests/helpers/architecture.py) and import it only there",
    ]


def test_planted_oversized_file_and_a_stale_exception_fail(tmp_path: Path) -> None:
    root = _package(tmp_path, {"big.py": "x = 1\n" * 601, "ok.py": "x = 1\n" * 600, "gen.c": "x\n" * 5000})
    assert arch.size_violations(root, {}) == [
        "fastflannel/big.py: 601 lines, over the 600-line rule; split it by concern"]
    assert arch.size_violations(root, {"fastflannel/big.py": "reason"}) == []
    assert arch.size_violations(root, {"fastflannel/ok.py": "reason", "fastflannel/big.py": "reason"}) == [
        "fastflannel/ok.py: listed as an exception to the 600-line rule but has 600 lines; remove it from the list"]


# ------------------------------------------------------------------------------------------------------------------
# the tests' own rule: what two test modules share lives in tests/helpers


def test_no_test_module_imports_another() -> None:
    tests = REPO / "tests"
    names = {p.stem for p in tests.rglob("test_*.py")}
    offenders = []
    for p in sorted(tests.rglob("test_*.py")):
        for node in ast.walk(ast.parse(p.read_text(), filename=str(p))):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            offenders += [f"{p.relative_to(REPO)}:{node.lineno} imports {m}" for m in mods
                          if m.split(".")[0] in names or m.startswith("tests.")]
    assert offenders == [], "move what they share to tests/helpers: " + "; ".join(offenders)
