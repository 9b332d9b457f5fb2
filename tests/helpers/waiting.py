# SPDX-License-Identifier: Apache-2.0
"""The suite's one ``wait_for``: poll a condition until it holds, or fail the test saying what never happened."""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

FIRST_INTERVAL_S = 0.01


def wait_for(pred: Callable[[], T], timeout: float = 20.0, interval: float = 0.2, what: str = "condition") -> T:
    """Poll ``pred`` until it returns a truthy value, and return that value.

    The poll interval starts at 10 ms and doubles up to ``interval``, so a condition that is nearly true costs no
    wait and a slow one (an ``etcdctl`` or ``ip`` call per poll) does not load the machine. ``timeout`` is a liveness
    bound, not a speed goal: make it generous. On timeout raise AssertionError naming ``what`` and the last value.
    """
    deadline = time.monotonic() + timeout
    step = min(FIRST_INTERVAL_S, interval)
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}; last value {v!r}")
        time.sleep(step)
        step = min(step * 2, interval)
