# SPDX-License-Identifier: Apache-2.0
"""FASTFLANNEL_REQUIRE_TIERS=1 turns every skip into an error naming what is missing (a pytest run in a subprocess
with this suite's conftest and a planted module of skips)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]

PLANTED = '''
import pytest
from tiers import needs_tool

@pytest.mark.ext
def test_marked_tier():
    pass

def test_skip_call():
    pytest.skip("needs sockperf (Debian package sockperf)")

@needs_tool("no-such-tool-ff", "no-such-package")
def test_missing_tool():
    pass

@pytest.mark.xfail(reason="known", strict=True)
def test_xfail_is_not_a_skip():
    assert False

def test_plain():
    pass
'''
PLANTED_MODULE_SKIP = 'import pytest\npytest.importorskip("no_such_module_ff")\n\ndef test_never():\n    pass\n'


def _run(tmp_path: Path, require: bool, module: str) -> subprocess.CompletedProcess[str]:
    d = tmp_path / "suite"
    d.mkdir(exist_ok=True)
    shutil.copy(TESTS / "conftest.py", d / "conftest.py")
    (d / "test_planted.py").write_text(module)
    # the ext tier probe fails by request in the child: a tier skip that happens on any machine
    env = {**os.environ, "PYTHONPATH": str(TESTS / "helpers"), "FASTFLANNEL_NO_EXTENSIONS": "1"}
    env.pop("FASTFLANNEL_REQUIRE_TIERS", None)
    env.pop("CI", None)  # with CI set pytest prints the summary lines untruncated: keep the child's output the same
    if require:
        env["FASTFLANNEL_REQUIRE_TIERS"] = "1"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "-o", "addopts=",
                           "-W", "ignore::pytest.PytestUnknownMarkWarning", str(d)],
                          cwd=d, env=env, capture_output=True, text=True, timeout=120)


def test_without_the_switch_skips_stay_skips(tmp_path: Path) -> None:
    r = _run(tmp_path, False, PLANTED)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 passed, 3 skipped, 1 xfailed" in r.stdout, r.stdout
    r = _run(tmp_path, False, PLANTED_MODULE_SKIP)
    assert r.returncode == 5 and "1 skipped" in r.stdout, r.stdout + r.stderr  # 5: no test collected


def test_with_the_switch_every_skip_is_an_error_naming_what_is_missing(tmp_path: Path) -> None:
    r = _run(tmp_path, True, PLANTED)
    out = r.stdout
    assert r.returncode == 1, out + r.stderr
    assert out.strip().splitlines()[-1].startswith("1 failed, 1 passed, 1 xfailed, 2 errors"), out  # none skipped
    assert "FASTFLANNEL_NO_EXTENSIONS is set: the tests of the compiled extension do not run" in out, out
    assert "needs sockperf (Debian package sockperf)" in out, out
    assert "needs no-such-tool-ff (Debian package no-such-package" in out, out
    summary = [line.split(" - ")[0] for line in out.splitlines()
               if line.startswith(("ERROR test_planted.py::", "FAILED test_planted.py::"))]
    assert sorted(summary) == ["ERROR test_planted.py::test_marked_tier", "ERROR test_planted.py::test_missing_tool",
                               "FAILED test_planted.py::test_skip_call"], out
    # each of the three is the switch's error (the section of each test starts with it), not some other failure
    sections = out.split("\n____")
    for name in ("test_marked_tier", "test_missing_tool", "test_skip_call"):
        own = [s for s in sections if f" {name} " in s.split("\n", 1)[0]]
        assert own and "FASTFLANNEL_REQUIRE_TIERS=1: skipped, and every tier must run here" in own[0], (name, out)


def test_with_the_switch_a_module_level_skip_is_a_collection_error(tmp_path: Path) -> None:
    r = _run(tmp_path, True, PLANTED_MODULE_SKIP)
    assert r.returncode == 2, r.stdout + r.stderr  # pytest: interrupted by a collection error
    assert "ERROR collecting test_planted.py" in r.stdout, r.stdout
    assert "FASTFLANNEL_REQUIRE_TIERS=1: skipped, and every tier must run here: could not import " \
           "'no_such_module_ff'" in r.stdout, r.stdout
