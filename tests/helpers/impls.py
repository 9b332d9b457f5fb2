# SPDX-License-Identifier: Apache-2.0
"""The fast path's two implementations for parametrized tests: the Cython extension (when built and not disabled
by FASTFLANNEL_NO_EXTENSIONS) and the pure-Python twin."""
from __future__ import annotations

import os
from typing import Tuple

import pytest

from fastflannel.datapath import fastpath


def _have_cython() -> Tuple[bool, str]:
    if os.environ.get("FASTFLANNEL_NO_EXTENSIONS", "") not in ("", "0"):
        return False, "FASTFLANNEL_NO_EXTENSIONS is set"
    try:
        fastpath.implementation_module("cython")
    except ImportError as e:
        return False, f"Cython extension not built ({e}); run: make compile"
    return True, ""


HAVE_CYTHON, NO_CYTHON_REASON = _have_cython()
needs_cython = pytest.mark.skipif(not HAVE_CYTHON, reason=NO_CYTHON_REASON or "-")
IMPLS = [pytest.param("cython", marks=needs_cython), "python"]
