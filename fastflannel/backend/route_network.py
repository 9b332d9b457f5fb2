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
import time
from ipaddress import IPv4Network
from typing import Dict, Iterable, List, Optional

from fastflannel.errors import BackendError
from fastflannel.backend.peerlog import log_peers_summary, peer_log_level
from fastflannel.kernel import nlbatch
from fastflannel.kernel.iface import ExternalInterface
from fastflannel.lease import Event, EventType, Lease
from fastflannel.retry import EntryFailures

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
    failures: Optional[EntryFailures] = None,
) -> List[str]:
    """Make the main table hold exactly ``desired`` among gateway routes via ``oifs`` inside ``network``.
    The address family is ``own_subnet``'s (IPv6 for the IPv6 half of a dual-stack network).

    Returns a list of human-readable changes (for logs and tests). Errors on single routes are logged and
    the pass continues; with ``failures`` (the caller's, kept across passes) a route that keeps failing the same
    way is logged at ERROR once, then at DEBUG every pass, until it works or is no longer wanted."""
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
    fixes = []  # (kind, route, op): one pipelined batch (kernel/nlbatch.py)
    for dst, want in desired.items():
        have = current.get(dst, [])
        if not any(want.same_path(h) for h in have):
            fixes.append(("recovered", want, _replace_op(want)))
    if remove_stale and network is not None:
        for dst, have in current.items():
            if dst in desired or dst == own_subnet or not dst.subnet_of(network):
                continue
            for h in have:
                if h.gateway is not None and h.oif in oifs:
                    fixes.append(("removed stale", h, nlbatch.route_del(h.dst, h.gateway, h.oif)))
    if failures is not None:
        failures.retain((kind, route.dst) for kind, route, _ in fixes)
    if not fixes:
        return changes
    try:
        results = netlink.batch([op for _, _, op in fixes])
    except BackendError as e:
        results = [e] * len(fixes)
    level = peer_log_level(len(fixes))
    for (kind, route, _), err in zip(fixes, results):
        recovered = kind == "recovered"
        if err is not None:
            event = "route_recover_failed" if recovered else "route_stale_remove_failed"
            new = failures is None or failures.is_new((kind, route.dst), err)
            log.log(logging.ERROR if new else logging.DEBUG, "event=%s route=%s error=%s%s", event, route, err,
                    "" if new else " repeated=true")
            continue
        if failures is not None:
            failures.ok((kind, route.dst))
        changes.append(f"{kind} {route}")
        if log.isEnabledFor(level):
            if recovered:
                log.log(level, "event=route_recovered msg=\"Route recovered\" route=%s", route)
            else:
                log.log(level, "event=route_stale_removed route=%s", route)
    if level != logging.INFO:
        log.info("event=routes_synced changes=%d failed=%d", len(changes), len(fixes) - len(changes))
    return changes


def _replace_op(route) -> "nlbatch.Op":
    return nlbatch.route_replace(route.dst, route.gateway, route.oif, route.onlink)


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
        self._failures = EntryFailures()  # routes the reconcile keeps failing on: logged once per state

    def route_for(self, lease: Lease, quiet: bool = False):
        """Return the route for ``lease``, or None (with a warning unless ``quiet``) if it is not ours to route."""
        raise NotImplementedError

    def handle_events(self, events: List[Event]) -> None:
        """Program the batch's routes pipelined (one netlink batch; the last event per subnet wins)."""
        self._synced = True
        t0 = time.monotonic()
        last: Dict[IPv4Network, Event] = {}
        for ev in events:
            last.pop(ev.lease.subnet, None)
            last[ev.lease.subnet] = ev
        work = []
        for ev in last.values():
            route = self.route_for(ev.lease)
            if route is None:
                continue
            added = ev.type is EventType.ADDED
            work.append((ev, route, _replace_op(route) if added else nlbatch.route_del(route.dst, route.gateway,
                                                                                        route.oif)))
        if not work:
            return
        try:
            results = self.netlink.batch([op for _, _, op in work])
        except BackendError as e:
            results = [e] * len(work)
        level = peer_log_level(len(events))
        n = {True: 0, False: 0}
        for (ev, route, _), err in zip(work, results):
            added = ev.type is EventType.ADDED
            if err is not None:
                log.error("event=route_failed type=%s subnet=%s error=%s", ev.type.value, ev.lease.subnet, err)
                continue
            n[added] += 1
            if not log.isEnabledFor(level):
                continue
            if added:
                log.log(level, "event=peer_added subnet=%s public_ip=%s route=%s",
                        ev.lease.subnet, ev.lease.attrs.public_ip, route)
            else:
                log.log(level, "event=peer_removed subnet=%s public_ip=%s", ev.lease.subnet, ev.lease.attrs.public_ip)
        log_peers_summary(log, self.backend_type, len(events), n[True], n[False], len(work) - n[True] - n[False],
                          time.monotonic() - t0)

    def reconcile(self, leases: Dict[IPv4Network, Lease]) -> None:
        desired = {}
        for lease in leases.values():
            r = self.route_for(lease, quiet=True)
            if r is not None:
                desired[r.dst] = r
        sync_routes(self.netlink, desired, [self.ext.index], self.network, self.lease.subnet, self._synced,
                    self._failures)

    def close(self) -> None:
        """Nothing to release: routes stay in place for a seamless restart."""

