# SPDX-License-Identifier: Apache-2.0
"""Build the one Cython extension, fastflannel.datapath._fastpath.

Knobs (uvloop's recipe):
- ``FASTFLANNEL_NO_EXTENSIONS=1``: build nothing; the pure-Python twin is used at run time.
- ``FASTFLANNEL_OPT_CFLAGS``: optimisation flags (default ``-O2``).
- ``FASTFLANNEL_DEBUG=1``: compile with the debug switch (counters checked by tests) and line numbers.
Cython warnings are errors. Before cythonize, ``includes/contract.pxd`` is generated from ``contract.py`` (the one
source of the data path's counters, commands, roles, verdicts and constants; rewritten only when it changed).
"""
import glob
import importlib.util
import os
import shlex

from setuptools import Extension, setup

NO_EXTENSIONS = os.environ.get("FASTFLANNEL_NO_EXTENSIONS", "") not in ("", "0")
DEBUG = os.environ.get("FASTFLANNEL_DEBUG", "") not in ("", "0")
CFLAGS = shlex.split(os.environ.get("FASTFLANNEL_OPT_CFLAGS", "-O2"))
CFLAGS += ["-Wall", "-Wno-unused-function", "-fno-strict-aliasing"]


DATAPATH = "fastflannel/datapath"


def write_contract_pxd():
    """Write includes/contract.pxd from contract.c_declarations() (contract.py is loaded by path: nothing of the
    package is imported, so this works before the package is installed)."""
    spec = importlib.util.spec_from_file_location("_ff_contract", os.path.join(DATAPATH, "contract.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    text = mod.c_declarations()
    path = os.path.join(DATAPATH, "includes", "contract.pxd")
    try:
        with open(path) as f:
            if f.read() == text:
                return
    except FileNotFoundError:
        pass
    with open(path, "w") as f:
        f.write(text)


def extensions():
    if NO_EXTENSIONS:
        return []
    write_contract_pxd()
    from Cython.Build import cythonize
    from Cython.Compiler import Options

    Options.warning_errors = True
    macros = [("FASTFLANNEL_DEBUG", "1" if DEBUG else "0")]
    ext = Extension(
        "fastflannel.datapath._fastpath",
        [f"{DATAPATH}/_fastpath.pyx"],
        extra_compile_args=CFLAGS + (["-g", "-O0"] if DEBUG else []),
        define_macros=macros,
        include_dirs=[f"{DATAPATH}/includes"],  # fastpath.h
        # the included parts, the .pxd files (contract.pxd generated above) and the C header
        depends=sorted(glob.glob(f"{DATAPATH}/parts/*.pxi") + glob.glob(f"{DATAPATH}/*.pxd")
                       + glob.glob(f"{DATAPATH}/includes/*.pxd") + glob.glob(f"{DATAPATH}/includes/*.h")),
    )
    return cythonize(
        [ext],
        compiler_directives={
            "language_level": "3",
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
            "embedsignature": True,
        },
        emit_linenums=DEBUG,
    )


setup(ext_modules=extensions())
