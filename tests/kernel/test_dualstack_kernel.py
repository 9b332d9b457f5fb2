# SPDX-License-Identifier: Apache-2.0
"""Dual stack in the kernel (issue 15): flannel-v6.<VNI> and host-gw IPv6 routes against a peer configured with
plain iproute2 exactly as flanneld configures a dual-stack host, pinged over both families."""
from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import flanneld_by_hand as flanneld
from fakes import FakeManager, Rig, added, ipn, netns_marks, nsexec, removed, rig, sh  # noqa: F401

from fastflannel.backend.hostgw import HostGwBackend
from fastflannel.backend.vxlan import VxlanBackend
from fastflannel.config import parse_config
from fastflannel.kernel.iface import select_interface
from fastflannel.kernel.netlink import Netlink
from fastflannel.lease import Lease, LeaseAttrs


def dual_cfg(backend: str):
    return parse_config(json.dumps({"Network": "100.96.0.0/16", "EnableIPv6": True, "IPv6Network": "fc00::/48",
                                    "Backend": {"Type": backend}}))


def _pair(rig):
    a, b = rig.pair("10.168.0.2/24", "10.168.0.3/24")
    ipn(a, "addr", "add", "fd00::2/64", "dev", "eth0", "nodad")
    ipn(b, "addr", "add", "fd00::3/64", "dev", "eth0", "nodad")
    for ns, v4, v6 in ((a, "100.96.1.1/24", "fc00:0:0:1::1/64"), (b, "100.96.2.1/24", "fc00:0:0:2::1/64")):
        Rig.pod_bridge(ns, v4)
        ipn(ns, "addr", "add", v6, "dev", "cni0", "nodad")
        nsexec(ns, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
    return a, b


def _ping_both(a, b):
    nsexec(a, "ping", "-c", "1", "-W", "3", "-I", "100.96.1.1", "100.96.2.1")
    nsexec(b, "ping", "-c", "1", "-W", "3", "-I", "100.96.2.1", "100.96.1.1")
    nsexec(a, "ping", "-6", "-c", "1", "-W", "3", "-I", "fc00:0:0:1::1", "fc00:0:0:2::1")
    nsexec(b, "ping", "-6", "-c", "1", "-W", "3", "-I", "fc00:0:0:2::1", "fc00:0:0:1::1")


@netns_marks
def test_vxlan_dual_stack_interop_with_iproute2_flanneld_peer(rig):
    a, b = _pair(rig)
    mac_b, mac6_b = "0a:58:0a:a8:00:03", "0e:58:0a:a8:00:03"
    with Netlink(netns=a) as nl:
        ext = select_interface(["eth0"], [], None, nl, ipv6=True)
        assert (str(ext.iface_addr6), str(ext.ext_addr6)) == ("fd00::2", "fd00::2")
        mgr = FakeManager("100.96.1.0/24", "fc00:0:0:1::/64")
        net = VxlanBackend(mgr, ext, nl, watch_links=False).register_network(dual_cfg("vxlan"))
        attrs = mgr.acquired[0]
        mac_a, mac6_a = attrs.backend_data["VtepMAC"], attrs.backend_v6_data["VtepMAC"]
        assert mac_a != mac6_a and str(attrs.public_ipv6) == "fd00::2"
        assert attrs.to_json() == ('{"PublicIP":"10.168.0.2","PublicIPv6":"fd00::2","BackendType":"vxlan",'
                                   f'"BackendData":{{"VNI":1,"VtepMAC":"{mac_a}"}},'
                                   f'"BackendV6Data":{{"VNI":1,"VtepMAC":"{mac6_a}"}}}}')
        assert net.mtu == 1450
        v6 = nl.link_info("flannel-v6.1")
        assert v6 is not None and v6.mac == mac6_a and v6.mtu == 1430 and str(v6.vxlan.local) == "fd00::2"
        # side B: exactly the objects flanneld creates for a dual-stack host, with plain iproute2
        run_b = lambda argv: nsexec(b, *argv)  # noqa: E731
        flanneld.vxlan_device(run_b, dev="flannel.1", mac=mac_b, local="10.168.0.3", addr="100.96.2.0", mtu=1450)
        flanneld.vxlan_device(run_b, dev="flannel-v6.1", mac=mac6_b, local="fd00::3", addr="fc00:0:0:2::", mtu=1430)
        flanneld.vxlan_peer(run_b, dev="flannel.1", subnet="100.96.1.0/24", public_ip="10.168.0.2", mac=mac_a)
        flanneld.vxlan_peer(run_b, dev="flannel-v6.1", subnet="fc00:0:0:1::/64", public_ip="fd00::2", mac=mac6_a)
        peer = Lease(IPv4Network("100.96.2.0/24"),
                     LeaseAttrs.from_json('{"PublicIP":"10.168.0.3","PublicIPv6":"fd00::3","BackendType":"vxlan",'
                                          f'"BackendData":{{"VNI":1,"VtepMAC":"{mac_b}"}},'
                                          f'"BackendV6Data":{{"VNI":1,"VtepMAC":"{mac6_b}"}}}}'),
                     subnet6=IPv6Network("fc00:0:0:2::/64"))
        net.handle_events(added(peer))
        routes6 = nsexec(a, "ip", "-6", "route", "show", "fc00:0:0:2::/64")
        assert "via fc00:0:0:2:: dev flannel-v6.1" in routes6 and "onlink" in routes6
        assert f"{mac6_b} dst fd00::3 self permanent" in nsexec(a, "bridge", "fdb", "show", "dev", "flannel-v6.1")
        _ping_both(a, b)
        # a reconcile after the IPv6 device is deleted re-creates it with the same MAC and replays the peer
        ipn(a, "link", "del", "flannel-v6.1")
        net.reconcile({peer.subnet: peer})
        assert nl.link_info("flannel-v6.1").mac == mac6_a
        _ping_both(a, b)
        # removal deletes both families' entries
        net.handle_events(removed(peer))
        assert nsexec(a, "ip", "-6", "route", "show", "fc00:0:0:2::/64").strip() == ""
        assert nsexec(a, "ip", "route", "show", "100.96.2.0/24").strip() == ""
        assert mac6_b not in nsexec(a, "bridge", "fdb", "show", "dev", "flannel-v6.1")
        # a peer with a v4-only lease gets IPv4 entries only (as in Flannel)
        v4only = Lease(IPv4Network("100.96.2.0/24"),
                       LeaseAttrs.from_json('{"PublicIP":"10.168.0.3","PublicIPv6":null,"BackendType":"vxlan",'
                                            f'"BackendData":{{"VNI":1,"VtepMAC":"{mac_b}"}}}}'))
        net.handle_events(added(v4only))
        nsexec(a, "ping", "-c", "1", "-W", "3", "-I", "100.96.1.1", "100.96.2.1")
        assert nsexec(a, "ip", "-6", "route", "show", "fc00:0:0:2::/64").strip() == ""


@netns_marks
def test_hostgw_dual_stack_routes_via_public_ipv6(rig):
    a, b = _pair(rig)
    flanneld.hostgw_peer(lambda argv: nsexec(b, *argv), subnet="100.96.1.0/24", public_ip="10.168.0.2")
    flanneld.hostgw_peer(lambda argv: nsexec(b, *argv), subnet="fc00:0:0:1::/64", public_ip="fd00::2")
    with Netlink(netns=a) as nl:
        ext = select_interface(["eth0"], [], None, nl, ipv6=True)
        mgr = FakeManager("100.96.1.0/24", "fc00:0:0:1::/64")
        net = HostGwBackend(mgr, ext, nl).register_network(dual_cfg("host-gw"))
        assert mgr.acquired[0].to_json() == '{"PublicIP":"10.168.0.2","PublicIPv6":"fd00::2","BackendType":"host-gw"}'
        peer = Lease(IPv4Network("100.96.2.0/24"),
                     LeaseAttrs.from_json('{"PublicIP":"10.168.0.3","PublicIPv6":"fd00::3","BackendType":"host-gw"}'),
                     subnet6=IPv6Network("fc00:0:0:2::/64"))
        net.handle_events(added(peer))
        assert "fc00:0:0:2::/64 via fd00::3 dev eth0" in nsexec(a, "ip", "-6", "route", "show")
        _ping_both(a, b)
        ipn(a, "-6", "route", "del", "fc00:0:0:2::/64")
        net.reconcile({peer.subnet: peer})  # "Route recovered" for IPv6 too
        _ping_both(a, b)
        net.handle_events(removed(peer))
        assert nsexec(a, "ip", "-6", "route", "show", "fc00:0:0:2::/64").strip() == ""


# -- ip6tables (flannel-compat.md section 8: "IPv6 identical with ff00::/8 and ip6tables") -------------------------

NET6, POD6 = IPv6Network("fc00::/48"), IPv6Network("fc00:0:0:34::/64")
EXPECTED_NAT6 = [
    '-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG',
    '-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment "flanneld masq" -j RETURN',
    '-A FLANNEL-POSTRTG -s fc00:0:0:34::/64 -d fc00::/48 -m comment --comment "flanneld masq" -j RETURN',
    '-A FLANNEL-POSTRTG -s fc00::/48 -d fc00:0:0:34::/64 -m comment --comment "flanneld masq" -j RETURN',
    '-A FLANNEL-POSTRTG ! -s fc00::/48 -d fc00:0:0:34::/64 -m comment --comment "flanneld masq" -j RETURN',
    '-A FLANNEL-POSTRTG -s fc00::/48 ! -d ff00::/8 -m comment --comment "flanneld masq" -j MASQUERADE --random-fully',
    '-A FLANNEL-POSTRTG ! -s fc00::/48 -d fc00::/48 -m comment --comment "flanneld masq" -j MASQUERADE --random-fully',
]
EXPECTED_FILTER6 = [
    '-A FORWARD -m comment --comment "flanneld forward" -j FLANNEL-FWD',
    '-A FLANNEL-FWD -s fc00::/48 -m comment --comment "flanneld forward" -j ACCEPT',
    '-A FLANNEL-FWD -d fc00::/48 -m comment --comment "flanneld forward" -j ACCEPT',
]


def _rules(ns: str, tool: str, table: str) -> list:
    return [line for line in nsexec(ns, tool, "-t", table).splitlines() if line.startswith("-A ")]


@netns_marks
def test_ip6tables_rules_exact_and_resynced_beside_ipv4(rig):
    import shutil
    import threading
    import time

    import pytest

    from fastflannel.kernel.iptables import TrafficGroup, TrafficManager

    if shutil.which("ip6tables-restore") is None:
        pytest.skip("needs ip6tables")
    ns = rig.netns("t6")
    v4 = TrafficManager(IPv4Network("10.5.0.0/16"), IPv4Network("10.5.52.0/24"), True, True, netns=ns)
    v6 = TrafficManager(NET6, POD6, True, True, netns=ns, resync_s=0.2)
    group = TrafficGroup([v4, v6])
    for _ in range(2):
        group.apply()
    assert _rules(ns, "ip6tables-save", "nat") == EXPECTED_NAT6
    assert _rules(ns, "ip6tables-save", "filter") == EXPECTED_FILTER6
    assert any("10.5.52.0/24" in r for r in _rules(ns, "iptables-save", "nat"))
    assert group.check()
    stop = threading.Event()
    t = threading.Thread(target=group.run, args=(stop,), daemon=True)
    t.start()
    try:
        nsexec(ns, "ip6tables", "-t", "nat", "-F", "FLANNEL-POSTRTG")
        end = time.monotonic() + 10
        while _rules(ns, "ip6tables-save", "nat") != EXPECTED_NAT6 and time.monotonic() < end:
            time.sleep(0.1)
        assert _rules(ns, "ip6tables-save", "nat") == EXPECTED_NAT6
    finally:
        stop.set()
        t.join(5)
