# SPDX-License-Identifier: Apache-2.0
"""VXLAN backend: Flannel's per-peer entries (neighbour, FDB, onlink route), rollback, reconcile, stable MAC,
DirectRouting, and an interop ping against a peer configured with plain iproute2 the way flanneld does."""
from __future__ import annotations

import logging
import re
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

import flanneld_by_hand as flanneld
import pytest
from fakes import (FakeManager, FakeNetlink, Rig, added, ext_iface, flannel_routes, hostgw_lease, ipn, netns_marks,
                   nsexec, removed, rig, sh, vxlan_lease)  # noqa: F401

from fastflannel.backend import get_backend
from fastflannel.errors import BackendError
from fastflannel.backend.vxlan import VxlanBackend
from fastflannel.backend.vxlan_device import VXLAN_OVERHEAD, random_mac, vxlan_mtu
from fastflannel.config import parse_config
from fastflannel.kernel.iface import ExternalInterface
from fastflannel.lease import Lease, LeaseAttrs
from fastflannel.kernel.netlink import Netlink

CONFIG = parse_config('{"Network": "100.96.0.0/16", "Backend": {"Type": "vxlan"}}')
MAC_B = "0a:58:00:00:00:0b"
MAC_C = "0a:58:00:00:00:0c"
PEER_B = vxlan_lease("100.96.2.0/24", "10.168.0.3", MAC_B)
PEER_C = vxlan_lease("100.96.3.0/24", "10.168.0.4", MAC_C)


def cfg(**backend) -> object:
    import json

    return parse_config(json.dumps({"Network": "100.96.0.0/16", "Backend": {"Type": "vxlan", **backend}}))


# -- pure units (FakeNetlink) ---------------------------------------------------------------------------
def test_mtu_and_mac_helpers():
    assert VXLAN_OVERHEAD == 50
    assert vxlan_mtu(0, 1500) == 1450 and vxlan_mtu(9000, 1500) == 8950
    for _ in range(50):
        first = int(random_mac().split(":")[0], 16)
        assert first & 0x01 == 0 and first & 0x02


def test_registry_lease_attrs_and_device():
    assert get_backend("vxlan") is VxlanBackend
    mgr, nl = FakeManager(), FakeNetlink()
    net = VxlanBackend(mgr, ext_iface(mtu=1500), nl, previous_lease=None).register_network(cfg(VNI=7, Port=4789))
    dev = nl.links["flannel.7"]
    assert dev["vni"] == 7 and dev["port"] == 4789 and dev["learning"] is False and dev["up"]
    assert net.mtu == 1450 and dev["mtu"] == 1450
    assert mgr.acquired[0].to_json() == (
        '{"PublicIP":"10.168.0.2","PublicIPv6":null,"BackendType":"vxlan",'
        f'"BackendData":{{"VNI":7,"VtepMAC":"{dev["mac"]}"}}}}'
    )
    assert nl.addrs["flannel.7"] == {IPv4Interface("100.96.1.0/32")}


def test_bad_options_are_backend_errors():
    with pytest.raises(BackendError, match="Backend.VNI"):
        VxlanBackend(FakeManager(), ext_iface(), FakeNetlink()).register_network(cfg(VNI="1"))
    with pytest.raises(BackendError, match="Backend.DirectRouting"):
        VxlanBackend(FakeManager(), ext_iface(), FakeNetlink()).register_network(cfg(DirectRouting=1))


def test_previous_lease_mac_is_reused():
    prev = vxlan_lease("100.96.1.0/24", "10.168.0.2", "0a:58:aa:bb:cc:dd")
    nl = FakeNetlink()
    VxlanBackend(FakeManager(), ext_iface(), nl, previous_lease=prev).register_network(CONFIG)
    assert nl.links["flannel.1"]["mac"] == "0a:58:aa:bb:cc:dd"
    other_vni = vxlan_lease("100.96.1.0/24", "10.168.0.2", "0a:58:aa:bb:cc:ee", vni=2)
    nl2 = FakeNetlink()
    VxlanBackend(FakeManager(), ext_iface(), nl2, previous_lease=other_vni).register_network(CONFIG)
    assert nl2.links["flannel.1"]["mac"] != "0a:58:aa:bb:cc:ee"


def _fake_net(direct_routing=False, **kw):
    nl = FakeNetlink(**kw)
    net = VxlanBackend(FakeManager(), ext_iface(), nl).register_network(cfg(DirectRouting=direct_routing))
    nl.calls.clear()
    return nl, net


def test_order_neigh_fdb_route_and_skip_foreign():
    nl, net = _fake_net()
    net.handle_events(added(PEER_B, hostgw_lease("100.96.9.0/24", "10.168.0.9")))
    assert [c[0] for c in nl.calls] == ["neigh_replace", "fdb_replace", "route_replace"]
    dev = nl.links["flannel.1"]["index"]
    assert nl.route_table == {IPv4Network("100.96.2.0/24"): (IPv4Address("100.96.2.0"), dev, True)}


@pytest.mark.parametrize("failing, undone, batches", [
    ("fdb_replace", ["neigh_del"], [4, 1, 2]),  # neigh+FDB of B and C; C's route; B's rollback
    ("route_replace", ["fdb_del", "neigh_del"], [4, 2, 2]),  # neigh+FDB; both routes; B's rollback
])
def test_rollback_on_partial_failure(failing, undone, batches, caplog):
    nl, net = _fake_net()
    nl.fail[failing] = BackendError(f"{failing}: boom")
    net.handle_events(added(PEER_B, PEER_C))
    names = [c[0] for c in nl.calls]
    i = names.index(failing)
    assert set(undone) <= set(names[i + 1:])  # B's entries are rolled back after the failure
    dev = nl.links["flannel.1"]["index"]
    assert {ip for (_, ip) in nl.neigh_table} == {IPv4Address("100.96.3.0")}  # C programmed, nothing of B
    assert set(nl.fdb_table) == {(dev, MAC_C)} and set(nl.route_table) == {IPv4Network("100.96.3.0/24")}
    assert "subnet=100.96.2.0/24" in caplog.text and "boom" in caplog.text
    assert nl.batches == batches  # pipelined: one batch per stage, not one request per entry


def test_reconcile_logs_a_repair_that_keeps_failing_once(caplog):
    """A neighbour the kernel refuses every pass: ERROR the first time, DEBUG after; logged again once it has
    worked and fails anew."""
    caplog.set_level(logging.DEBUG, logger="fastflannel")
    nl, net = _fake_net()
    net.handle_events(added(PEER_B))
    leases = {PEER_B.subnet: PEER_B}

    def passes(n: int) -> list:
        caplog.clear()
        for _ in range(n):
            nl.neigh_table.clear()  # drift: the neighbour is gone before every pass
            nl.fail["neigh_replace"] = BackendError("neigh: boom")
            net.reconcile(leases)
        return [r.levelname for r in caplog.records if "vxlan_repair_failed" in r.getMessage()]

    assert passes(3) == ["ERROR", "DEBUG", "DEBUG"]
    net.reconcile(leases)  # no failure injected: repaired
    assert nl.neigh_table
    assert passes(1) == ["ERROR"]


def test_removal_tries_every_entry():
    nl, net = _fake_net()
    net.handle_events(added(PEER_B))
    nl.fail["neigh_del"] = BackendError("neigh: boom")
    net.handle_events(removed(PEER_B))
    assert [c[0] for c in nl.calls[-3:]] == ["neigh_del", "fdb_del", "route_del"]
    assert not nl.fdb_table and not nl.route_table


def test_direct_routing_uses_plain_route_when_on_link():
    nl, net = _fake_net(direct_routing=True, direct={IPv4Address("10.168.0.3")})
    net.handle_events(added(PEER_B, PEER_C))
    assert nl.route_table[IPv4Network("100.96.2.0/24")] == (IPv4Address("10.168.0.3"), 2, False)
    assert nl.route_table[IPv4Network("100.96.3.0/24")][2] is True  # C is behind a router: vxlan
    assert [ip for (_, ip) in nl.neigh_table] == [IPv4Address("100.96.3.0")]


def test_peer_mac_change_drops_old_fdb():
    nl, net = _fake_net()
    net.handle_events(added(PEER_B))
    net.handle_events(added(vxlan_lease("100.96.2.0/24", "10.168.0.3", "0a:58:00:00:00:99")))
    assert [m for (_, m) in nl.fdb_table] == ["0a:58:00:00:00:99"]


# -- kernel tests in fresh namespaces -------------------------------------------------------------------
def _ext(nl: Netlink, ip: str = "10.168.0.2") -> ExternalInterface:
    info = nl.link_info("eth0")
    return ExternalInterface("eth0", info.index, IPv4Address(ip), IPv4Address(ip), info.mtu)


def _state(ns: str) -> str:
    """Everything per-peer, as iproute2 prints it (an independent reader)."""
    return "\n".join([
        ipn(ns, "-d", "link", "show", "flannel.1", check=False),
        ipn(ns, "addr", "show", "dev", "flannel.1", check=False),
        ipn(ns, "neigh", "show", "dev", "flannel.1", check=False),
        sh(["ip", "netns", "exec", ns, "bridge", "fdb", "show", "dev", "flannel.1"], check=False),
        flannel_routes(ns, check=False),
    ])


def _strip_counters(s: str) -> str:
    return re.sub(r"(used|ref|probes) \S+", "", s)


def _assert_flannel_state(nl: Netlink, ext: ExternalInterface, mac: str, peers) -> None:
    info = nl.link_info("flannel.1")
    assert info is not None and info.kind == "vxlan" and info.up and info.mac == mac
    assert info.mtu == ext.mtu - 50
    x = info.vxlan
    assert (x.vni, x.port, x.learning, x.local, x.link, x.gbp, x.l2miss, x.group) == (
        1, 8472, False, ext.iface_addr, ext.index, False, False, None)
    assert [a.address for a in nl.addr_list("flannel.1")] == [IPv4Interface("100.96.1.0/32")]
    neighs = {(n.ip, n.mac, n.state) for n in nl.neighs(info.index)}
    fdbs = {(f.mac, f.dst, f.state, f.flags) for f in nl.fdbs(info.index) if f.dst is not None}
    routes = {(r.dst, r.gateway, r.oif, r.onlink) for r in nl.routes(oif=info.index)}
    assert neighs == {(p.subnet.network_address, p.attrs.vxlan_data()[1], 0x80) for p in peers}
    assert fdbs == {(p.attrs.vxlan_data()[1], p.attrs.public_ip, 0x80, 0x02) for p in peers}
    assert routes == {(p.subnet, p.subnet.network_address, info.index, True) for p in peers}


@netns_marks
def test_kernel_state_matches_flannel(rig):
    ns = rig.host("h", "10.168.0.2/24")
    with Netlink(netns=ns) as nl:
        ext = _ext(nl)
        mgr = FakeManager()
        net = VxlanBackend(mgr, ext, nl, watch_links=False).register_network(CONFIG)
        mac = nl.link_info("flannel.1").mac
        assert mgr.acquired[0].backend_data["VtepMAC"] == mac
        assert nsexec(ns, "cat", "/proc/sys/net/ipv6/conf/flannel.1/accept_ra").strip() == "0"
        net.handle_events(added(PEER_B, PEER_C))
        _assert_flannel_state(nl, ext, mac, [PEER_B, PEER_C])
        text = _state(ns)
        assert "vxlan id 1 local 10.168.0.2 dev eth0 srcport 0 0 dstport 8472 nolearning" in text
        assert "100.96.2.0 lladdr 0a:58:00:00:00:0b PERMANENT" in text
        assert "0a:58:00:00:00:0b dst 10.168.0.3 self permanent" in text
        assert "100.96.2.0/24 via 100.96.2.0 dev flannel.1 onlink" in text

        net.handle_events(added(PEER_B, PEER_C))  # idempotent: nothing changes
        assert _strip_counters(_state(ns)) == _strip_counters(text)

        net.handle_events(removed(PEER_B))
        _assert_flannel_state(nl, ext, mac, [PEER_C])
        assert "100.96.2.0" not in _state(ns) and MAC_B not in _state(ns)


@netns_marks
def test_kernel_reconcile_recreates_deleted_device_with_same_mac(rig):
    ns = rig.host("h", "10.168.0.2/24")
    with Netlink(netns=ns) as nl:
        ext = _ext(nl)
        net = VxlanBackend(FakeManager(), ext, nl, watch_links=False).register_network(CONFIG)
        mac = nl.link_info("flannel.1").mac
        leases = {PEER_B.subnet: PEER_B, PEER_C.subnet: PEER_C}
        net.handle_events(added(PEER_B, PEER_C))
        ipn(ns, "link", "del", "flannel.1")
        assert nl.link_info("flannel.1") is None
        net.reconcile(leases)
        _assert_flannel_state(nl, ext, mac, [PEER_B, PEER_C])
        text = _strip_counters(_state(ns))
        net.reconcile(leases)  # a second pass is a no-op
        assert _strip_counters(_state(ns)) == text


@netns_marks
def test_kernel_reconcile_repairs_drift_and_removes_stale(rig):
    ns = rig.host("h", "10.168.0.2/24")
    with Netlink(netns=ns) as nl:
        ext = _ext(nl)
        net = VxlanBackend(FakeManager(), ext, nl, watch_links=False).register_network(CONFIG)
        mac = nl.link_info("flannel.1").mac
        net.handle_events(added(PEER_B, PEER_C))
        # drift: entries of B deleted by hand, a stale peer D left over, our MAC changed, /32 removed
        ipn(ns, "neigh", "del", "100.96.2.0", "dev", "flannel.1")
        sh(["ip", "netns", "exec", ns, "bridge", "fdb", "del", MAC_B, "dev", "flannel.1", "dst", "10.168.0.3"])
        ipn(ns, "route", "del", "100.96.2.0/24")
        ipn(ns, "neigh", "replace", "100.96.4.0", "lladdr", "0a:58:00:00:00:0d", "dev", "flannel.1", "nud", "permanent")
        sh(["ip", "netns", "exec", ns, "bridge", "fdb", "replace", "0a:58:00:00:00:0d", "dev", "flannel.1",
            "dst", "10.168.0.5", "self", "permanent"])
        ipn(ns, "route", "replace", "100.96.4.0/24", "via", "100.96.4.0", "dev", "flannel.1", "onlink")
        ipn(ns, "link", "set", "flannel.1", "address", "0a:58:12:34:56:78")
        ipn(ns, "addr", "flush", "dev", "flannel.1")
        net.reconcile({PEER_B.subnet: PEER_B, PEER_C.subnet: PEER_C})
        _assert_flannel_state(nl, ext, mac, [PEER_B, PEER_C])


@netns_marks
def test_kernel_restart_keeps_mac_and_recreates_incompatible_device(rig, caplog):
    ns = rig.host("h", "10.168.0.2/24")
    with Netlink(netns=ns) as nl:
        ext = _ext(nl)
        mgr = FakeManager()
        VxlanBackend(mgr, ext, nl, watch_links=False).register_network(CONFIG)
        mac = nl.link_info("flannel.1").mac
        # restart: a new backend reuses the compatible device and its MAC
        VxlanBackend(mgr, ext, nl, watch_links=False).register_network(CONFIG)
        assert nl.link_info("flannel.1").mac == mac == mgr.acquired[-1].backend_data["VtepMAC"]
        # incompatible (GBP differs): deleted and recreated, MAC kept via the previous lease, reason logged
        prev = Lease(IPv4Network("100.96.1.0/24"), mgr.acquired[-1])
        VxlanBackend(mgr, ext, nl, previous_lease=prev, watch_links=False).register_network(cfg(GBP=True))
        info = nl.link_info("flannel.1")
        assert info.vxlan.gbp and info.mac == mac
        assert "gbp off != on" in caplog.text
        # device gone while we were down: the previous lease's MAC is reused
        ipn(ns, "link", "del", "flannel.1")
        VxlanBackend(mgr, ext, nl, previous_lease=prev, watch_links=False).register_network(CONFIG)
        assert nl.link_info("flannel.1").mac == mac


@netns_marks
def test_kernel_direct_routing(rig):
    ns = rig.host("h", "10.168.0.2/24")
    with Netlink(netns=ns) as nl:
        ext = _ext(nl)
        net = VxlanBackend(FakeManager(), ext, nl, watch_links=False).register_network(cfg(DirectRouting=True))
        far = vxlan_lease("100.96.5.0/24", "192.0.2.5", "0a:58:00:00:00:05")
        ipn(ns, "route", "add", "192.0.2.0/24", "via", "10.168.0.1", "dev", "eth0")
        net.handle_events(added(PEER_B, far))
        routes = flannel_routes(ns)
        assert "100.96.2.0/24 via 10.168.0.3 dev eth0" in routes
        assert "100.96.5.0/24 via 100.96.5.0 dev flannel.1 onlink" in routes
        net.handle_events(removed(PEER_B, far))
        assert "100.96." not in ipn(ns, "route", "show")


@netns_marks
def test_interop_ping_with_iproute2_configured_flanneld_peer(rig):
    a, b = rig.pair("10.168.0.2/24", "10.168.0.3/24")
    Rig.pod_bridge(a, "100.96.1.1/24")
    Rig.pod_bridge(b, "100.96.2.1/24")
    mac_b = "0a:58:0a:a8:00:03"
    with Netlink(netns=a) as nl:
        mgr = FakeManager("100.96.1.0/24")
        net = VxlanBackend(mgr, _ext(nl), nl, watch_links=False).register_network(CONFIG)
        mac_a = mgr.acquired[0].backend_data["VtepMAC"]
        # side B: exactly the objects flanneld creates, with plain iproute2
        run_b = lambda argv: nsexec(b, *argv)  # noqa: E731
        flanneld.vxlan_device(run_b, dev="flannel.1", mac=mac_b, local="10.168.0.3", addr="100.96.2.0", mtu=1450)
        flanneld.vxlan_peer(run_b, dev="flannel.1", subnet="100.96.1.0/24", public_ip="10.168.0.2", mac=mac_a)
        net.handle_events(added(vxlan_lease("100.96.2.0/24", "10.168.0.3", mac_b)))
    nsexec(a, "ping", "-c", "2", "-W", "2", "-I", "100.96.1.1", "100.96.2.1")
    nsexec(b, "ping", "-c", "2", "-W", "2", "-I", "100.96.2.1", "100.96.1.1")
    # 1422 = 1450 (vxlan MTU) - 28 (IP+ICMP headers): a full-size inner packet crosses without fragmenting
    nsexec(a, "ping", "-c", "1", "-W", "2", "-M", "do", "-s", "1422", "-I", "100.96.1.1", "100.96.2.1")


@netns_marks
def test_kernel_link_watcher_recreates_device_immediately(rig):
    import time

    ns = rig.host("h", "10.168.0.2/24")
    with Netlink(netns=ns) as nl:
        ext = _ext(nl)
        net = VxlanBackend(FakeManager(), ext, nl).register_network(CONFIG)
        try:
            mac = nl.link_info("flannel.1").mac
            net.handle_events(added(PEER_B, PEER_C))
            assert net.watch_ready.wait(10), "link watcher did not subscribe"
            ipn(ns, "link", "del", "flannel.1")
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                info = nl.link_info("flannel.1")
                if info is not None and len(nl.routes(oif=info.index)) == 2:
                    break
                time.sleep(0.1)
            _assert_flannel_state(nl, ext, mac, [PEER_B, PEER_C])
        finally:
            net.close()
        assert net._watcher is None
