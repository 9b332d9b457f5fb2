# SPDX-License-Identifier: Apache-2.0
"""host-gw backend: route each remote pod subnet to its host's PublicIP (flannel ``pkg/backend/hostgw``).

Design notes
------------
Per remote host exactly one kernel object is programmed: ``ip route replace <subnet> via <PublicIP> dev <ext>``
in the main table. No device, no encapsulation, MTU = external interface MTU. The gateway must be on-link
(hosts share an L2 segment), so the backend refuses to start when PublicIP is not the interface address (a NAT
address cannot be a next hop): Flannel's exact error text is kept.

Order and failure handling: events are applied in the order the store produced them; a failed route is logged
and the loop goes on; the periodic ``reconcile`` (every ``ROUTE_CHECK_INTERVAL_S``) re-adds missing or changed
routes ("Route recovered") and removes stale ones inside the Network (see ``route_network``). Leases whose
BackendType is not "host-gw" are skipped with a warning.

Scale: one FIB entry per peer; a batch of events is one pipelined netlink batch; a reconcile is one raw route
dump plus one batch of repairs (docs/scale.md).
"""
from __future__ import annotations

import logging
from typing import Optional

from fastflannel.errors import BackendError
from fastflannel.backend.dualstack import DualStackNetwork
from fastflannel.backend.route_network import RouteNetwork, direct_route
from fastflannel.config import NetworkConfig
from fastflannel.kernel.iface import ExternalInterface
from fastflannel.lease import Lease, LeaseAttrs, project

log = logging.getLogger("fastflannel.backend.hostgw")

BACKEND_TYPE = "host-gw"
NAT_ERROR = (
    "your PublicIP differs from interface IP, meaning that probably you're on a NAT, "
    "which is not supported by host-gw backend"
)


class HostGwNetwork(RouteNetwork):
    backend_type = BACKEND_TYPE

    def route_for(self, lease: Lease, quiet: bool = False):
        if lease.attrs.backend_type != BACKEND_TYPE:
            if not quiet:
                log.warning("event=lease_skipped subnet=%s backend_type=%r reason=\"not a host-gw lease\"",
                            lease.subnet, lease.attrs.backend_type)
            return None
        return direct_route(lease, self.ext)


class HostGwBackend:
    """Constructed by the daemon as ``HostGwBackend(manager, ext_iface, netlink, previous_lease=...)``."""

    def __init__(self, manager, ext_iface: ExternalInterface, netlink, previous_lease: Optional[Lease] = None):
        if ext_iface.ext_addr != ext_iface.iface_addr:
            raise BackendError(NAT_ERROR)
        self.manager = manager
        self.ext = ext_iface
        self.netlink = netlink

    def register_network(self, config: NetworkConfig):
        """Acquire the lease (BackendType "host-gw", no BackendData; PublicIPv6 with EnableIPv6); routes come with
        the events. Dual stack: one HostGwNetwork per family (IPv6 routes ``<subnet6> via <PublicIPv6>``)."""
        if config.enable_ipv6 and self.ext.ext_addr6 != self.ext.iface_addr6:
            raise BackendError(NAT_ERROR + " (PublicIPv6 differs from the interface's IPv6 address)")
        attrs = LeaseAttrs(public_ip=self.ext.ext_addr, backend_type=BACKEND_TYPE,
                           public_ipv6=self.ext.ext_addr6 if config.enable_ipv6 else None)
        lease = self.manager.acquire_lease(attrs)
        v4 = HostGwNetwork(lease, self.ext.mtu, self.ext, self.netlink, config.network)
        lease6 = project(lease, 6) if config.enable_ipv6 else None
        if lease6 is None:
            return v4
        return DualStackNetwork(lease, {
            4: v4, 6: HostGwNetwork(lease6, self.ext.mtu, self.ext, self.netlink, config.ipv6_network)})
