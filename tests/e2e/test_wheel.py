# SPDX-License-Identifier: Apache-2.0
"""The wheel users install: ``python -m build`` gives an sdist and a wheel (built from that sdist, so the sdist is
complete), and the wheel installs into a fresh venv on a machine without a compiler and runs. The wheel carries the
compiled module and no Cython or C sources, its metadata the SPDX license expression; the sdist keeps the sources and
``pip install`` of the sdist on a machine with a compiler builds and runs the compiled fast path.

"Without a compiler": the install and the commands run with PATH holding only the new venv's bin and a directory
of shims that fail for gcc, cc, c++, clang and ld, and CC/CXX=/bin/false; pip is told to use binary packages only,
so nothing can be built from source. Dependencies come from the configured package index. The build itself uses
the test venv's setuptools/Cython (``--no-isolation``), which is the CI machine's compiler at work, as it should be.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from fastflannel import __version__

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _run(args, **kw):
    kw.setdefault("timeout", 300)
    p = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kw)
    assert p.returncode == 0, f"{args} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    try:
        import build  # noqa: F401
        import wheel  # noqa: F401  (setuptools < 70 needs it for bdist_wheel)
    except ImportError as e:
        pytest.skip(f"needs the 'build' and 'wheel' packages (pip install -e '.[test]'): {e}")
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("building the wheel needs a C compiler")
    out = tmp_path_factory.mktemp("dist")
    # build from a copy: the build writes egg-info, build/ and the generated C file, none of which belong in the tree
    src = tmp_path_factory.mktemp("src") / "fastflannel"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "*.so", "_fastpath.c", "_fastpath.html",
        ".pytest_cache", ".benchmarks", "bench-results"))
    env = {k: v for k, v in os.environ.items() if k != "FASTFLANNEL_NO_EXTENSIONS"}
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", out, src], env=env, cwd=src, timeout=600)
    sdists = list(out.glob("fastflannel-*.tar.gz"))
    wheels = list(out.glob("fastflannel-*.whl"))
    assert len(sdists) == 1 and len(wheels) == 1, list(out.iterdir())
    return sdists[0], wheels[0]


def test_wheel_contents(built):
    _sdist, whl = built
    names = zipfile.ZipFile(whl).namelist()
    assert any(n.startswith("fastflannel/datapath/_fastpath.") and n.endswith(".so") for n in names), names
    assert "fastflannel/cni/plugin.py" in names and "fastflannel/service/metrics.py" in names
    entry = zipfile.ZipFile(whl).read(f"fastflannel-{__version__}.dist-info/entry_points.txt").decode()
    for script in ("fastflanneld = fastflannel.cli:main", "fastflannel = fastflannel.lab.cli:main",
                   "fastflannel-cni = fastflannel.cni.plugin:main"):
        assert script in entry


SOURCE_SUFFIXES = (".pyx", ".pxd", ".pxi", ".c", ".h")


def test_wheel_has_no_sources_and_an_spdx_license(built):
    _sdist, whl = built
    names = zipfile.ZipFile(whl).namelist()
    assert [n for n in names if n.endswith(SOURCE_SUFFIXES)] == [], names
    assert "fastflannel/datapath/_fastpath.pyi" in names and "fastflannel/py.typed" in names
    meta = zipfile.ZipFile(whl).read(f"fastflannel-{__version__}.dist-info/METADATA").decode()
    assert "License-Expression: Apache-2.0" in meta.splitlines(), meta[:1500]


def test_sdist_has_the_sources(built):
    sdist, _whl = built
    with tarfile.open(sdist) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    want = {"setup.py", "pyproject.toml", "fastflannel/datapath/_fastpath.pyx", "fastflannel/datapath/_fastpath.pxd",
            "fastflannel/datapath/includes/fastpath.h", "fastflannel/datapath/includes/system.pxd",
            "contrib/docker.service.d/fastflannel.conf"}
    want |= {str(p.relative_to(ROOT)) for p in (ROOT / "fastflannel" / "datapath" / "parts").glob("*.pxi")}
    assert want <= names, sorted(want - names)
    assert not [n for n in names if n.endswith(".so")], names


def test_sdist_installs_with_a_compiler(built, tmp_path):
    """``pip install fastflannel-<v>.tar.gz`` on a machine with a compiler: pip builds it (build isolation, the
    build requirements from the configured index) and the installed package runs the compiled fast path."""
    sdist, _whl = built
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FASTFLANNEL_", "VIRTUAL_ENV", "PYTHON"))}
    # -O0: the same build steps at a third of the compile time (the optimised build is the wheel's, above)
    env.update(PATH=f"{venv / 'bin'}:{os.environ.get('PATH', '/usr/bin:/bin')}", PIP_DISABLE_PIP_VERSION_CHECK="1",
               FASTFLANNEL_OPT_CFLAGS="-O0")
    _run([venv / "bin" / "python", "-m", "pip", "install", "-q", sdist], env=env, cwd=tmp_path, timeout=900)
    code = ("import pathlib, fastflannel.datapath.fastpath as f; print(f.implementation_module().IMPLEMENTATION); "
            "d = pathlib.Path(f.__file__).parent; print(sorted(p.name for p in d.rglob('*') "
            "if p.suffix in ('.pyx', '.pxd', '.pxi')))")
    out = _run([venv / "bin" / "python", "-c", code], env=env, cwd=tmp_path).stdout.split("\n")
    assert out[:2] == ["cython", "[]"], out


def test_wheel_installs_and_runs_without_a_compiler(built, tmp_path):
    _sdist, whl = built
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv])
    shims = tmp_path / "no-compiler"
    shims.mkdir()
    for tool in ("gcc", "cc", "c++", "g++", "clang", "ld", "x86_64-linux-gnu-gcc"):
        shim = shims / tool
        shim.write_text("#!/bin/sh\necho \"no compiler on this machine ($0)\" >&2\nexit 1\n")
        shim.chmod(0o755)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("FASTFLANNEL_", "VIRTUAL_ENV", "PYTHON"))}
    env.update(PATH=f"{venv / 'bin'}:{shims}:/usr/bin:/bin", CC="/bin/false", CXX="/bin/false",
               PIP_DISABLE_PIP_VERSION_CHECK="1")
    bindir = venv / "bin"
    _run([bindir / "python", "-m", "pip", "install", "-q", "--only-binary=:all:", whl], env=env, cwd=tmp_path,
         timeout=300)
    p = _run([bindir / "fastflanneld", "--version"], env=env, cwd=tmp_path)
    assert p.stdout.strip() == __version__
    p = _run([bindir / "fastflannel", "demo", "--help"], env=env, cwd=tmp_path)
    assert "usage" in p.stdout.lower()
    p = _run([bindir / "fastflannel-cni", "--version"], env=env, cwd=tmp_path)
    assert p.stdout.startswith("CNI Plugin fastflannel version")
    p = _run([bindir / "fastflannel-cni"], env={**env, "CNI_COMMAND": "VERSION"}, cwd=tmp_path, input="")
    assert '"supportedVersions"' in p.stdout
    # the compiled fast path (not the twin) and the metrics module load from the installed wheel
    code = ("import fastflannel, fastflannel.datapath.fastpath as f, fastflannel.service.metrics as m; "
            "print(fastflannel.__file__); print(f.implementation_module().IMPLEMENTATION); "
            "print(m.Metrics().render()[0])")
    out = _run([bindir / "python", "-c", code], env=env, cwd=tmp_path).stdout.split()
    assert out[0].startswith(str(venv)) and out[1:] == ["cython", "200"], out
