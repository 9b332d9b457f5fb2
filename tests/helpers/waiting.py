# SPDX-License-Identifier: Apache-2.0
"""Helpers shared by the end-to-end tests (real daemons on testbed hosts)."""
from __future__ import annotations

import time


def wait_for(pred, timeout=20.0, interval=0.2, what="condition"):
    """Poll ``pred`` until it returns a truthy value (returned); AssertionError with the last value on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}; last value {v!r}")
        time.sleep(interval)
