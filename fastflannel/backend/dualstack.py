# SPDX-License-Identifier: Apache-2.0
"""One Network per address family behind one Network (dual stack, flannel-compat.md sections 5 and 6).

Flannel's vxlan backend keeps two devices (``flannel.<VNI>`` and ``flannel-v6.<VNI>``) and its host-gw backend two
sets of routes; here each family is an ordinary single-family Network (the same class for both) fed with the
family's projection of every lease (``lease.project``: for IPv6 the subnet, PublicIP and BackendData are the lease's
IPv6 subnet, PublicIPv6 and BackendV6Data). A peer with a v4-only lease projects to nothing for IPv6, so it gets
its IPv4 entries only - as in Flannel, where a lease without an IPv6 subnet has EnableIPv6 false.

``lease`` is the real (dual) lease; ``mtu`` is the IPv4 part's, which is what Flannel writes as FLANNEL_MTU.
"""
from __future__ import annotations

import logging
from typing import Dict, List

from fastflannel.lease import Event, Lease, project

log = logging.getLogger("fastflannel.backend")


class DualStackNetwork:
    def __init__(self, lease: Lease, parts: Dict[int, object]) -> None:
        self.lease = lease
        self.parts = parts  # family (4, 6) -> single-family Network
        self.reconcile_interval = min(p.reconcile_interval for p in parts.values())  # type: ignore[attr-defined]

    @property
    def mtu(self) -> int:
        return self.parts[4].mtu  # type: ignore[attr-defined]

    def handle_events(self, events: List[Event]) -> None:
        for family, net in self.parts.items():
            mine = [Event(e.type, p) for e in events if (p := project(e.lease, family)) is not None]
            net.handle_events(mine)  # type: ignore[attr-defined]  (even empty: the first batch marks it synced)

    def reconcile(self, leases: Dict[object, Lease]) -> None:
        for family, net in self.parts.items():
            want = {p.subnet: p for lease in leases.values() if (p := project(lease, family)) is not None}
            try:
                net.reconcile(want)  # type: ignore[attr-defined]
            except Exception:  # one family's failed pass must not skip the other's
                log.exception("event=reconcile_failed family=ipv%d", family)

    def close(self) -> None:
        for net in self.parts.values():
            net.close()  # type: ignore[attr-defined]
