# SPDX-License-Identifier: Apache-2.0
"""Enter a test's own network namespace from the test thread (setns(2)), and run ``ip -n`` in it."""
from __future__ import annotations

import ctypes
import os
import subprocess
from contextlib import contextmanager
from typing import Iterator

CLONE_NEWNET = 0x40000000


@contextmanager
def in_netns(name: str) -> Iterator[None]:
    """Run the body with this thread in network namespace ``name``; always return to the original one."""
    libc = ctypes.CDLL(None, use_errno=True)
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(target, CLONE_NEWNET) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"setns into {name}: {os.strerror(e)}")
        try:
            yield
        finally:
            if libc.setns(own, CLONE_NEWNET) != 0:  # pragma: no cover - would leave the thread stranded
                os._exit(70)
    finally:
        os.close(target)
        os.close(own)


def ip(ns: str, *args: str) -> None:
    subprocess.run(["ip", "-n", ns, *args], check=True, capture_output=True, timeout=10)
