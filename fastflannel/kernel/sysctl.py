# SPDX-License-Identifier: Apache-2.0
"""Write kernel parameters under ``/proc/sys`` (per-device IPv4/IPv6 switches of the devices we create)."""
from __future__ import annotations

import os
import subprocess
from typing import Optional

from fastflannel.errors import KernelError


def write_sysctl(path: str, value: str, netns: Optional[str] = None) -> None:
    """Write ``value`` to ``/proc/sys/<path>`` (e.g. ``net/ipv6/conf/flannel.1/accept_ra``). Missing files
    (IPv6 disabled) are ignored; any other failure raises KernelError naming the parameter. ``netns`` is only for
    tests and uses ``ip netns exec``."""
    if netns is not None:
        subprocess.run(
            ["ip", "netns", "exec", netns, "tee", f"/proc/sys/{path}"],
            input=value.encode(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False,
        )
        return
    try:
        with open(f"/proc/sys/{path}", "w") as f:
            f.write(value)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise KernelError(f"sysctl {path}={value}", os.strerror(e.errno or 0), e.errno or 0) from e
