# SPDX-License-Identifier: Apache-2.0
"""The external interface: which host interface and address carry the overlay (flannel ``ExternalInterface``)."""
from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address


@dataclass(frozen=True)
class ExternalInterface:
    """The chosen interface. ``iface_addr`` is the interface's own IPv4; ``ext_addr`` is what the lease
    advertises as PublicIP (``--public-ip`` or ``iface_addr``)."""

    name: str
    index: int
    iface_addr: IPv4Address
    ext_addr: IPv4Address
    mtu: int
