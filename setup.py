# SPDX-License-Identifier: Apache-2.0
"""Build the one Cython extension, fastflannel.datapath._fastpath.

Knobs (uvloop's recipe):
- ``FASTFLANNEL_NO_EXTENSIONS=1``: build nothing; the pure-Python twin is used at run time.
- ``FASTFLANNEL_OPT_CFLAGS``: optimisation flags (default ``-O2``).
- ``FASTFLANNEL_DEBUG=1``: compile with the debug switch (counters checked by tests) and line numbers.
Cython warnings are errors.
"""
import os
import shlex

from setuptools import Extension, setup

NO_EXTENSIONS = os.environ.get("FASTFLANNEL_NO_EXTENSIONS", "") not in ("", "0")
DEBUG = os.environ.get("FASTFLANNEL_DEBUG", "") not in ("", "0")
CFLAGS = shlex.split(os.environ.get("FASTFLANNEL_OPT_CFLAGS", "-O2"))
CFLAGS += ["-Wall", "-Wno-unused-function", "-fno-strict-aliasing"]


def extensions():
    if NO_EXTENSIONS:
        return []
    from Cython.Build import cythonize
    from Cython.Compiler import Options

    Options.warning_errors = True
    macros = [("FASTFLANNEL_DEBUG", "1" if DEBUG else "0")]
    ext = Extension(
        "fastflannel.datapath._fastpath",
        ["fastflannel/datapath/_fastpath.pyx"],
        extra_compile_args=CFLAGS + (["-g", "-O0"] if DEBUG else []),
        define_macros=macros,
        include_dirs=["fastflannel/datapath/includes"],  # fastpath.h
        depends=["fastflannel/datapath/_fastpath.pxd", "fastflannel/datapath/includes/system.pxd", "fastflannel/datapath/includes/fastpath.pxd",
                 "fastflannel/datapath/includes/fastpath.h"],
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
