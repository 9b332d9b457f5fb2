# SPDX-License-Identifier: Apache-2.0
"""Around every data-path test, when the extension was built by ``make debug`` (FASTFLANNEL_DEBUG=1): no C buffer
leaked (allocations == releases once the test's objects are collected) and no checked invariant failed. In the
release build the extension counts nothing and this fixture only yields."""
from __future__ import annotations

import gc
from typing import Iterator

import pytest
from impls import HAVE_CYTHON


def _counters() -> dict:
    from fastflannel.datapath import fastpath

    return fastpath.implementation_module("cython").debug_counters()


DEBUG_BUILD = HAVE_CYTHON and _counters()["debug"]


@pytest.fixture(autouse=True)
def _no_c_leaks() -> Iterator[None]:
    if not DEBUG_BUILD:
        yield
        return
    gc.collect()
    before = _counters()
    yield
    gc.collect()
    after = _counters()
    assert after["live"] == before["live"], (f"the test leaked {after['live'] - before['live']} C buffers of the "
                                             f"fast path (allocations {before['allocs']} -> {after['allocs']}, "
                                             f"releases {before['frees']} -> {after['frees']})")
    assert after["check_failures"] == before["check_failures"], "a debug-build invariant of the fast path failed"
