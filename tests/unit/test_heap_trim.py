# SPDX-License-Identifier: Apache-2.0
"""The daemon's heap trim (daemon.trim_heap, issue 14): its period switch, and that it gives freed heap pages
back to the kernel, which glibc alone keeps when a live allocation sits above them."""
from __future__ import annotations

import os

import pytest

from fastflannel.daemon import HEAP_TRIM_S, StartupError, heap_trim_period, trim_heap
from fastflannel.lab.soak import proc_sample


def _rss_kib() -> int:
    return int(proc_sample(os.getpid())["rss_kb"])  # the soak's /proc reader


def test_period_switch(monkeypatch):
    monkeypatch.delenv("FASTFLANNEL_HEAP_TRIM_S", raising=False)
    assert heap_trim_period() == HEAP_TRIM_S == 60.0
    monkeypatch.setenv("FASTFLANNEL_HEAP_TRIM_S", "0")
    assert heap_trim_period() == 0.0
    for bad in ("soon", "-5"):
        monkeypatch.setenv("FASTFLANNEL_HEAP_TRIM_S", bad)
        with pytest.raises(StartupError, match="FASTFLANNEL_HEAP_TRIM_S"):
            heap_trim_period()


def test_trim_returns_freed_pages_that_glibc_keeps():
    # 64 MiB in 4 KiB blocks (malloc, not pymalloc's arenas), then one small block above them: freeing the big ones
    # leaves free chunks below a live one, which free() never returns to the kernel by itself
    blocks = [bytearray(4096) for _ in range(16384)]
    for b in blocks:
        b[0] = 1  # touch: resident
    pin = bytearray(4096)
    del blocks
    before = _rss_kib()
    assert trim_heap() is True  # glibc: pages were released
    after = _rss_kib()
    assert before - after > 32 * 1024, (before, after)
    del pin  # kept alive until here: it is what holds the freed pages below the top of the heap
