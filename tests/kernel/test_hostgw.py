# SPDX-License-Identifier: Apache-2.0
"""host-gw backend: NAT check, lease attrs, per-peer routes in a fresh namespace, reconcile, interop ping."""
from __future__ import annotations

import logging
from ipaddress import IPv4Address, IPv4Network

import pytest
from fakes import (FakeManager, FakeNetlink, Rig, added, ext_iface, flannel_routes, hostgw_lease, ipn, netns_marks,
                   nsexec, removed, rig, vxlan_lease)  # noqa: F401

from fastflannel.backend import get_backend
from fastflannel.errors import BackendError
from fastflannel.backend.hostgw import NAT_ERROR, HostGwBackend
from fastflannel.config import parse_config
from fastflannel.kernel.iface import ExternalInterface
from fastflannel.kernel.netlink import Netlink, Route

CONFIG = parse_config('{"Network": "100.96.0.0/16", "Backend": {"Type": "host-gw"}}')
PEER_B = hostgw_lease("100.96.2.0/24", "10.168.0.3")
PEER_C = hostgw_lease("100.96.3.0/24", "10.168.0.4")


def test_registry_and_nat_check():
    assert get_backend("host-gw") is HostGwBackend
    with pytest.raises(BackendError) as e:
        HostGwBackend(FakeManager(), ext_iface(public="203.0.113.9"), FakeNetlink())
    assert str(e.value) == NAT_ERROR


def test_lease_attrs_and_mtu():
    mgr = FakeManager()
    net = HostGwBackend(mgr, ext_iface(mtu=9001), FakeNetlink(), previous_lease=None).register_network(CONFIG)
    assert mgr.acquired[0].to_json() == '{"PublicIP":"10.168.0.2","PublicIPv6":null,"BackendType":"host-gw"}'
    assert net.mtu == 9001 and net.lease.subnet == IPv4Network("100.96.1.0/24")
    assert net.reconcile_interval == 10.0


def test_routes_with_fake_netlink_skip_foreign_leases():
    nl = FakeNetlink()
    net = HostGwBackend(FakeManager(), ext_iface(), nl).register_network(CONFIG)
    net.handle_events(added(PEER_B, vxlan_lease("100.96.9.0/24", "10.168.0.9", "0a:58:00:00:00:09")))
    assert nl.route_table == {IPv4Network("100.96.2.0/24"): (IPv4Address("10.168.0.3"), 2, False)}
    net.handle_events(removed(PEER_B))
    assert nl.route_table == {}


def _ext(ns: str, nl: Netlink, ip: str = "10.168.0.2") -> ExternalInterface:
    info = nl.link_info("eth0")
    return ExternalInterface("eth0", info.index, IPv4Address(ip), IPv4Address(ip), info.mtu)


def _flannel_routes(ns: str) -> list:
    return [line.strip() for line in flannel_routes(ns, "-4").splitlines() if line.startswith("100.96.")]


@netns_marks
def test_kernel_routes_idempotent_reconcile(rig):
    ns = rig.host("h", "10.168.0.2/24")
    with Netlink(netns=ns) as nl:
        ext = _ext(ns, nl)
        net = HostGwBackend(FakeManager(), ext, nl).register_network(CONFIG)
        net.handle_events(added(PEER_B, PEER_C))
        first = _flannel_routes(ns)
        assert first == [
            "100.96.2.0/24 via 10.168.0.3 dev eth0", "100.96.3.0/24 via 10.168.0.4 dev eth0"]
        got = {r.dst: r for r in nl.routes(oif=ext.index) if r.gateway}
        assert got[IPv4Network("100.96.2.0/24")].same_path(Route(IPv4Network("100.96.2.0/24"),
                                                                   IPv4Address("10.168.0.3"), ext.index))
        net.handle_events(added(PEER_B, PEER_C))  # idempotent
        assert _flannel_routes(ns) == first

        # drift: a route deleted by hand and one pointed elsewhere are recovered; a stale one is removed
        ipn(ns, "route", "del", "100.96.2.0/24")
        ipn(ns, "route", "replace", "100.96.3.0/24", "via", "10.168.0.77", "dev", "eth0")
        ipn(ns, "route", "replace", "100.96.7.0/24", "via", "10.168.0.7", "dev", "eth0")
        ipn(ns, "route", "replace", "192.0.2.0/24", "via", "10.168.0.7", "dev", "eth0")  # outside Network: kept
        net.reconcile({PEER_B.subnet: PEER_B, PEER_C.subnet: PEER_C})
        assert _flannel_routes(ns) == first
        assert "192.0.2.0/24 via 10.168.0.7" in ipn(ns, "route", "show")

        net.handle_events(removed(PEER_B))
        assert _flannel_routes(ns) == ["100.96.3.0/24 via 10.168.0.4 dev eth0"]


@netns_marks
def test_kernel_unreachable_gateway_is_logged_not_raised(rig, caplog):
    ns = rig.host("h", "10.168.0.2/24")
    with Netlink(netns=ns) as nl:
        net = HostGwBackend(FakeManager(), _ext(ns, nl), nl).register_network(CONFIG)
        far = hostgw_lease("100.96.5.0/24", "192.0.2.5")  # not on-link: the kernel refuses (flannel #598)
        net.handle_events(added(far, PEER_B))
        assert "100.96.5.0/24 via 192.0.2.5 dev eth0: Network is unreachable" in caplog.text
        assert len(_flannel_routes(ns)) == 1

        # the reconcile retries it every pass, but says so once per failure state, not once per pass
        caplog.set_level(logging.DEBUG, logger="fastflannel")
        caplog.clear()
        leases = {far.subnet: far, PEER_B.subnet: PEER_B}
        for _ in range(4):
            net.reconcile(leases)
        failed = [r for r in caplog.records if "route_recover_failed" in r.getMessage()]
        assert len(failed) == 4 and [r.levelname for r in failed] == ["ERROR", "DEBUG", "DEBUG", "DEBUG"], failed
        # reachable now (an on-link gateway): recovered; failing again later is a new failure state, logged again
        ipn(ns, "route", "replace", "192.0.2.0/24", "dev", "eth0")
        net.reconcile(leases)
        assert "100.96.5.0/24" in " ".join(_flannel_routes(ns))
        ipn(ns, "route", "del", "100.96.5.0/24")
        ipn(ns, "route", "del", "192.0.2.0/24", "dev", "eth0")
        caplog.clear()
        net.reconcile(leases)
        assert [r.levelname for r in caplog.records if "route_recover_failed" in r.getMessage()] == ["ERROR"]


@netns_marks
def test_interop_ping_with_iproute2_configured_peer(rig):
    a, b = rig.pair("10.168.0.2/24", "10.168.0.3/24")
    Rig.pod_bridge(a, "100.96.1.1/24")
    Rig.pod_bridge(b, "100.96.2.1/24")
    # side B: exactly what flanneld's host-gw programs, with plain iproute2
    ipn(b, "route", "replace", "100.96.1.0/24", "via", "10.168.0.2", "dev", "eth0")
    with Netlink(netns=a) as nl:
        net = HostGwBackend(FakeManager("100.96.1.0/24"), _ext(a, nl), nl).register_network(CONFIG)
        net.handle_events(added(PEER_B))
    nsexec(a, "ping", "-c", "1", "-W", "2", "-I", "100.96.1.1", "100.96.2.1")
    nsexec(b, "ping", "-c", "1", "-W", "2", "-I", "100.96.2.1", "100.96.1.1")
