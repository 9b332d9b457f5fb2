# SPDX-License-Identifier: Apache-2.0
"""Collect bench/bench_*.py as test modules and print a packets-per-second summary with Cython/Python ratios.

Run: ``.venv/bin/python -m pytest bench/ --benchmark-only -q`` (or name a file). Benchmarks assert nothing
about speed (design rule 11); the summary at the end is for people and for docs/fastpath.md.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Tuple

import pytest

# (benchmark group, implementation) -> packets per second, filled by the pps fixture
RESULTS: Dict[Tuple[str, str], float] = {}


def pytest_collect_file(parent: pytest.Collector, file_path: Path) -> Optional[pytest.Module]:
    # bench_*.py is not in python_files; a file named on the command line is collected by pytest itself
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def cython_unavailable() -> Optional[str]:
    from fastflannel.datapath import fastpath

    try:
        fastpath.implementation_module("cython")
    except ImportError as e:
        return f"Cython extension not built ({e}); run: .venv/bin/python setup.py build_ext --inplace"
    return None


IMPLS = [pytest.param("cython", marks=pytest.mark.skipif(bool(cython_unavailable()),
                                                         reason=cython_unavailable() or "-")), "python"]


@pytest.fixture
def pps():  # type: ignore[no-untyped-def]
    """Return record(group, impl, packets, seconds): store packets/s for the summary and the JSON extra_info."""

    def record(group: str, impl: str, packets: int, seconds: float) -> float:
        value = packets / seconds
        RESULTS[(group, impl)] = value
        return value

    return record


def pytest_terminal_summary(terminalreporter, exitstatus, config):  # type: ignore[no-untyped-def]
    if not RESULTS:
        return
    tr = terminalreporter
    tr.section("fast path packets per second")
    groups = sorted({g for g, _ in RESULTS})
    tr.write_line(f"{'benchmark':<44} {'cython pps':>14} {'python pps':>14} {'ratio':>8}")
    for g in groups:
        c = RESULTS.get((g, "cython"))
        p = RESULTS.get((g, "python"))
        ratio = f"{c / p:8.1f}" if c and p else f"{'-':>8}"
        tr.write_line(f"{g:<44} {c or 0:>14,.0f} {p or 0:>14,.0f} {ratio}")
