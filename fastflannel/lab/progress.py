# SPDX-License-Identifier: Apache-2.0
"""``Progress``: numbered progress lines with elapsed time, shared by the demo and the bench."""
from __future__ import annotations

import sys
import time


class Progress:
    """Print numbered progress lines with elapsed time (plain text: works in logs and terminals)."""

    def __init__(self, out=sys.stdout) -> None:
        self.t0 = time.monotonic()
        self.out = out

    def __call__(self, msg: str) -> None:
        print(f"[{time.monotonic() - self.t0:5.1f}s] {msg}", file=self.out, flush=True)
