# SPDX-License-Identifier: Apache-2.0
"""Route-per-peer programming shared by host-gw and vxlan DirectRouting (flannel ``pkg/backend/route_network.go``).

Design notes
------------
A "direct" route sends a remote host's whole pod subnet to that host's PublicIP over the external interface:
``<subnet> via <PublicIP> dev <ext>`` (an ordinary gateway route, not onlink, so the peer must be L2-adjacent;
otherwise the kernel answers "Network is unreachable"). One route per remote host, nothing else: no device,
no neighbour or FDB entries, no encapsulation, so it scales with the kernel's FIB (an LPM trie; thousands of
/24s are cheap).

``sync_routes`` is the reconcile step both backends use: it reads the main table once, re-adds every desired
route that is missing or differs (Flannel's "Route recovered"), and - unlike Flannel, which only re-adds - it
deletes routes inside the flannel Network that point at a gateway on one of our devices but belong to no known
lease (stale routes of hosts that vanished while we were down, flannel issue #2554). Our own subnet is never
touched.
"""
from __future__ import annotations

import logging
from ipaddress import IPv4Network
from typing import Dict, Iterable, List, Optional

from fastflannel.errors import BackendError
from fastflannel.kernel.iface import ExternalInterface
from fastflannel.lease import Event, EventType, Lease

log = logging.getLogger("fastflannel.backend.route")

ROUTE_CHECK_INTERVAL_S = 10.0  # seconds between reconcile passes (flannel's routeCheckRetries, really a period)


def direct_route(lease: Lease, ext: ExternalInterface):
    """Return the host-gw style route for ``lease``: ``<subnet> via <PublicIP> dev <ext>``."""
    from fastflannel.kernel.netlink import Route

    return Route(dst=lease.subnet, gateway=lease.attrs.public_ip, oif=ext.index)


def install_route(netlink, route) -> None:
    """``ip route replace`` ``route`` (replace also fixes a route with the same dst but another gw/dev)."""
    netlink.route_replace(route.dst, gateway=route.gateway, oif=route.oif, onlink=route.onlink)


def sync_routes(
    netlink,
    desired: Dict[IPv4Network, object],
    oifs: Iterable[int],
    network: Optional[IPv4Network],
    own_subnet: IPv4Network,
    remove_stale: bool,
) -> List[str]:
    """Make the main table hold exactly ``desired`` among gateway routes via ``oifs`` inside ``network``.
    The address family is ``own_subnet``'s (IPv6 for the IPv6 half of a dual-stack network).

    Returns a list of human-readable changes (for logs and tests). Errors on single routes are logged and
    the pass continues."""
    oifs = set(oifs)
    current: Dict[IPv4Network, list] = {}
    if own_subnet.version == 6:  # the IPv6 half of a dual-stack network (lease.project): its own table dump
        from fastflannel.kernel.netlink import AF_INET6

        dump = netlink.routes(family=AF_INET6)
    else:
        dump = netlink.routes()
    for r in dump:
        if r.oif in oifs or r.dst in desired:
            current.setdefault(r.dst, []).append(r)
    changes: List[str] = []
    for dst, want in desired.items():
        have = current.get(dst, [])
        if any(want.same_path(h) for h in have):
            continue
        try:
            install_route(netlink, want)
            changes.append(f"recovered {want}")
            log.info("event=route_recovered msg=\"Route recovered\" route=%s", want)
        except BackendError as e:
            log.error("event=route_recover_failed route=%s error=%s", want, e)
    if remove_stale and network is not None:
        for dst, have in current.items():
            if dst in desired or dst == own_subnet or not dst.subnet_of(network):
                continue
            for h in have:
                if h.gateway is None or h.oif not in oifs:
                    continue
                try:
                    netlink.route_del(h.dst, gateway=h.gateway, oif=h.oif)
                    changes.append(f"removed stale {h}")
                    log.info("event=route_stale_removed route=%s", h)
                except BackendError as e:
                    log.error("event=route_stale_remove_failed route=%s error=%s", h, e)
    return changes


class RouteNetwork:
    """A Network whose only per-peer state is one route (host-gw). Subclasses supply ``route_for``."""

    backend_type = ""
    reconcile_interval = ROUTE_CHECK_INTERVAL_S

    def __init__(self, lease: Lease, mtu: int, ext: ExternalInterface, netlink, network: Optional[IPv4Network]):
        self.lease = lease
        self.mtu = mtu
        self.ext = ext
        self.netlink = netlink
        self.network = network
        self._synced = False  # set by the first event batch; stale removal waits for it

    def route_for(self, lease: Lease, quiet: bool = False):
        """Return the route for ``lease``, or None (with a warning unless ``quiet``) if it is not ours to route."""
        raise NotImplementedError

    def handle_events(self, events: List[Event]) -> None:
        self._synced = True
        for ev in events:
            route = self.route_for(ev.lease)
            if route is None:
                continue
            try:
                if ev.type is EventType.ADDED:
                    install_route(self.netlink, route)
                    log.info("event=peer_added subnet=%s public_ip=%s route=%s",
                             ev.lease.subnet, ev.lease.attrs.public_ip, route)
                else:
                    self.netlink.route_del(route.dst, gateway=route.gateway, oif=route.oif)
                    log.info("event=peer_removed subnet=%s public_ip=%s", ev.lease.subnet, ev.lease.attrs.public_ip)
            except BackendError as e:
                log.error("event=route_failed type=%s subnet=%s error=%s", ev.type.value, ev.lease.subnet, e)

    def reconcile(self, leases: Dict[IPv4Network, Lease]) -> None:
        desired = {}
        for lease in leases.values():
            r = self.route_for(lease, quiet=True)
            if r is not None:
                desired[r.dst] = r
        sync_routes(self.netlink, desired, [self.ext.index], self.network, self.lease.subnet, self._synced)

    def close(self) -> None:
        """Nothing to release: routes stay in place for a seamless restart."""

