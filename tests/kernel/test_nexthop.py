# SPDX-License-Identifier: Apache-2.0
"""Per-peer routes through nexthop objects (kernel/nexthop.py), in fresh namespaces, read back with iproute2:
the route names the object whose id is a function of its destination and looks like Flannel's otherwise; a
Flannel-style plain route is taken over; a peer's delete removes object and route; an object deleted by hand is
recovered by the reconcile; ``FASTFLANNEL_NEXTHOP_OBJECTS=0`` programs plain routes and still removes the objects
of an earlier run."""
from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv4Network

from fakes import FakeManager, added, hostgw_lease, ipn, netns_marks, removed, rig  # noqa: F401

from fastflannel.backend.hostgw import HostGwBackend
from fastflannel.config import parse_config
from fastflannel.kernel import nexthop, nlbatch
from fastflannel.kernel.iface import ExternalInterface
from fastflannel.kernel.netlink import Netlink

CONFIG = parse_config('{"Network": "100.96.0.0/16", "Backend": {"Type": "host-gw"}}')
PEER_B = hostgw_lease("100.96.2.0/24", "10.168.0.3")
PEER_C = hostgw_lease("100.96.3.0/24", "10.168.0.4")


def _routes(ns: str) -> dict:
    return {r["dst"]: r for r in json.loads(ipn(ns, "-j", "-4", "route", "show") or "[]")
            if r["dst"].startswith("100.96.")}


def _nexthops(ns: str) -> dict:
    return {n["id"]: n for n in json.loads(ipn(ns, "-j", "nexthop", "show") or "[]")}


def _hostgw(ns: str, nl: Netlink):
    info = nl.link_info("eth0")
    ext = ExternalInterface("eth0", info.index, IPv4Address("10.168.0.2"), IPv4Address("10.168.0.2"), info.mtu)
    return HostGwBackend(FakeManager(), ext, nl).register_network(CONFIG)


@netns_marks
def test_peer_routes_name_their_nexthop_object(rig):
    ns = rig.host("h", "10.168.0.2/24")
    ipn(ns, "route", "replace", "100.96.3.0/24", "via", "10.168.0.4", "dev", "eth0")  # as Flannel left it
    with Netlink(netns=ns) as nl:
        net = _hostgw(ns, nl)
        net.handle_events(added(PEER_B, PEER_C))
        routes, nhs = _routes(ns), _nexthops(ns)
        for lease in (PEER_B, PEER_C):
            r = routes[str(lease.subnet)]
            want = nexthop.nexthop_id(lease.subnet)
            assert r["nhid"] == want and r["gateway"] == str(lease.attrs.public_ip) and r["dev"] == "eth0", r
            assert nhs[want]["gateway"] == str(lease.attrs.public_ip) and nhs[want]["dev"] == "eth0", nhs
        assert len(ipn(ns, "-4", "route", "show", "100.96.3.0/24").splitlines()) == 1  # taken over, not doubled

        # drift: an object deleted by hand takes its route with it; the reconcile puts both back
        ipn(ns, "nexthop", "del", "id", str(nexthop.nexthop_id(PEER_B.subnet)))
        assert "100.96.2.0/24" not in _routes(ns)
        net.reconcile({PEER_B.subnet: PEER_B, PEER_C.subnet: PEER_C})
        assert _routes(ns)["100.96.2.0/24"]["nhid"] == nexthop.nexthop_id(PEER_B.subnet)

        # a stale route through an object (a peer that vanished while we were down) is removed with its object
        stale = hostgw_lease("100.96.7.0/24", "10.168.0.7")
        net.handle_events(added(stale))
        net.reconcile({PEER_B.subnet: PEER_B, PEER_C.subnet: PEER_C})
        assert "100.96.7.0/24" not in _routes(ns) and nexthop.nexthop_id(stale.subnet) not in _nexthops(ns)

        net.handle_events(removed(PEER_B, PEER_C))
        assert _routes(ns) == {} and _nexthops(ns) == {}


@netns_marks
def test_switched_off_programs_plain_routes_and_removes_earlier_objects(rig, monkeypatch):
    ns = rig.host("h", "10.168.0.2/24")
    with Netlink(netns=ns) as nl:
        _hostgw(ns, nl).handle_events(added(PEER_B))
    assert "nhid" in _routes(ns)["100.96.2.0/24"]
    monkeypatch.setenv(nexthop.ENV, "0")
    with Netlink(netns=ns) as nl:
        net = _hostgw(ns, nl)
        net.handle_events(added(PEER_C))
        assert "nhid" not in _routes(ns)["100.96.3.0/24"]
        net.handle_events(removed(PEER_B, PEER_C))  # B went in through an object, C plain: both go
        assert _routes(ns) == {} and _nexthops(ns) == {}


@netns_marks
def test_unreachable_gateway_fails_only_its_peer(rig):
    ns = rig.host("h", "10.168.0.2/24")
    with Netlink(netns=ns) as nl:
        eth0 = nl.link_index("eth0")
        errors = nl.batch([nlbatch.route_replace(IPv4Network("100.96.2.0/24"), IPv4Address("10.168.0.3"), eth0),
                           nlbatch.route_replace(IPv4Network("100.96.5.0/24"), IPv4Address("192.0.2.5"), eth0),
                           nlbatch.route_replace(IPv4Network("100.96.3.0/24"), IPv4Address("10.168.0.4"), eth0)])
        assert errors[0] is None and errors[2] is None
        assert str(errors[1]).startswith("route 100.96.5.0/24 via 192.0.2.5 dev eth0: Network is unreachable"), errors
        assert set(_routes(ns)) == {"100.96.2.0/24", "100.96.3.0/24"}
