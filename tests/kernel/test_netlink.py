# SPDX-License-Identifier: Apache-2.0
"""Netlink facade in a fresh namespace: idempotent replace/ensure, read-back types, error messages, TUN setup."""
from __future__ import annotations

import fcntl
import os
import struct
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

import pytest
from fakes import ipn, netns_marks, nsexec, rig, sh  # noqa: F401

from fastflannel.errors import BackendError
from fastflannel.kernel.netlink import KernelError, Netlink


def test_kernel_error_is_backend_error():
    e = KernelError("route 100.96.2.0/24 via 10.168.0.3 dev eth0", "Network is unreachable", 101)
    assert isinstance(e, BackendError) and e.errno == 101
    assert str(e) == "route 100.96.2.0/24 via 10.168.0.3 dev eth0: Network is unreachable"


@netns_marks
def test_missing_namespace_is_not_created():
    with pytest.raises(KernelError, match="No such file"):
        Netlink(netns="ffkb-does-not-exist")
    assert "ffkb-does-not-exist" not in sh(["ip", "netns", "list"])


@netns_marks
def test_links_addrs_routes_idempotent_and_errors(rig):
    ns = rig.host("h", "10.168.0.2/24")
    with Netlink(netns=ns) as nl:
        eth0 = nl.link_index("eth0")
        assert nl.link_index("nope") is None and nl.link_info("nope") is None
        info = nl.ensure_vxlan("flannel.1", 1, eth0, "10.168.0.2", mtu=1450, mac="0a:58:00:00:00:01")
        again = nl.ensure_vxlan("flannel.1", 1, eth0, "10.168.0.2", mtu=1400, mac="0a:58:00:00:00:02",
                                learning=True)  # MTU/learning/MAC not compared: reused as is
        assert again == info and info.mtu == 1450 and info.mac == "0a:58:00:00:00:01"
        moved = nl.ensure_vxlan("flannel.1", 1, eth0, "10.168.0.2", port=4789, mac="0a:58:00:00:00:03")
        assert moved.index != info.index and moved.vxlan.port == 4789  # incompatible port: recreated
        with pytest.raises(KernelError, match="dev flannel.1 onlink: Network is down"):
            nl.route_replace("100.96.2.0/24", gateway="100.96.2.0", oif=moved.index, onlink=True)
        nl.set_link_up("flannel.1")
        for _ in range(2):
            nl.addr_replace("flannel.1", "100.96.1.0/32")
            nl.route_replace("100.96.2.0/24", gateway="100.96.2.0", oif=moved.index, onlink=True)
            nl.neigh_replace(moved.index, "100.96.2.0", "0a:58:00:00:00:09")
            nl.fdb_replace(moved.index, "0a:58:00:00:00:09", "10.168.0.3")
        assert [a.address for a in nl.addr_list("flannel.1")] == [IPv4Interface("100.96.1.0/32")]
        assert len(nl.routes(oif=moved.index)) == 1
        assert "100.96.2.0/24 via 100.96.2.0 dev flannel.1 onlink" in ipn(ns, "route", "show")
        r = nl.route_get("10.168.0.77")
        assert r.gateway is None and r.oif == eth0
        with pytest.raises(KernelError) as e:
            nl.route_replace("100.96.3.0/24", gateway="10.169.0.3", oif=eth0)
        assert str(e.value) == "route 100.96.3.0/24 via 10.169.0.3 dev eth0: Network is unreachable"
        assert nl.route_del("100.96.2.0/24") and not nl.route_del("100.96.2.0/24")
        assert nl.neigh_del(moved.index, "100.96.2.0") and not nl.neigh_del(moved.index, "100.96.2.0")
        assert nl.fdb_del(moved.index, "0a:58:00:00:00:09") and not nl.fdb_del(moved.index, "0a:58:00:00:00:09")
        nl.set_mac("flannel.1", "0a:58:00:00:00:aa")
        nl.set_mtu("flannel.1", 1300)
        info = nl.link_info("flannel.1")
        assert (info.mac, info.mtu) == ("0a:58:00:00:00:aa", 1300)
        nl.addr_del("flannel.1", "100.96.1.0/32")
        assert nl.addr_list("flannel.1") == []
        assert nl.delete_link("flannel.1") and not nl.delete_link("flannel.1")
        with pytest.raises(KernelError, match="link flannel.1: No such device"):
            nl.set_mtu("flannel.1", 1400)
    nl.close()  # idempotent


@netns_marks
def test_udp_backend_tun_setup(rig):
    """What the udp backend does with a TUN it opened: /32, MTU, up, route for the whole Network."""
    ns = rig.netns("t")
    nsexec(ns, "ip", "tuntap", "add", "dev", "flannel0", "mode", "tun")  # persistent TUN stands in for the fd
    with Netlink(netns=ns) as nl:
        nl.set_mtu("flannel0", 1472)
        nl.addr_replace("flannel0", "100.96.1.0/32")
        nl.set_link_up("flannel0")
        for _ in range(2):
            nl.route_replace("100.96.0.0/16", oif=nl.link_index("flannel0"))
        info = nl.link_info("flannel0")
        assert (info.kind, info.mtu, info.up) == ("tun", 1472, True)
        routes = [r for r in nl.routes() if r.dst == IPv4Network("100.96.0.0/16")]
        assert len(routes) == 1 and routes[0].gateway is None and routes[0].oif == info.index


@netns_marks
def test_no_messages_pile_up_on_the_command_socket(rig):
    """pyroute2 0.9 leaves the kernel's ACK of every ``get`` request (link by index/name, route get) on its root
    queue, which nothing reads: one message per lookup forever (the vxlan daemon's RSS grew ~10 KiB per peer
    add+remove). After peer churn through the real kernel, nothing must be left queued."""
    from fakes import FakeManager, added, ext_iface, removed, vxlan_lease

    from fastflannel.backend.vxlan import VxlanBackend
    from fastflannel.config import parse_config

    ns = rig.host("h", "10.168.0.2/24")
    with Netlink(netns=ns) as nl:
        net = VxlanBackend(FakeManager(), ext_iface(index=nl.link_index("eth0")), nl, watch_links=False) \
            .register_network(parse_config('{"Network": "100.96.0.0/16", "Backend": {"Type": "vxlan"}}'))
        queued = lambda: nl._ipr.asyncore.local.msg_queue.root.qsize()  # noqa: E731 - this thread's (pyroute2)

        def churn(n: int) -> None:
            for i in range(n):
                peer = vxlan_lease(f"100.96.{2 + i % 50}.0/24", f"10.168.0.{3 + i % 50}",
                                   f"0a:58:00:00:01:{i % 256:02x}")
                net.handle_events(added(peer))
                net.reconcile({peer.subnet: peer})
                net.handle_events(removed(peer))

        churn(30)
        nl.route_get("10.168.0.3")
        nl.addr_list("eth0")
        assert queued() == 0
        net.close()


@netns_marks
def test_raw_link_and_addr_reads_match_pyroute2_and_iproute2(rig):
    """link_info/link_index/addr_list decode the kernel's answers themselves (nlbatch, off pyroute2 since the soak's
    RSS slope): every field equals what pyroute2's decoder (``links()``) and ``ip -j`` read from the same links."""
    import json

    from fastflannel.kernel.netlink import AF_INET6

    ns = rig.host("h", "10.168.0.2/24")
    ipn(ns, "-6", "addr", "add", "fd00:1::2/64", "dev", "eth0", "nodad")
    ipn(ns, "link", "add", "flannel.1", "type", "vxlan", "id", "7", "dev", "eth0", "local", "10.168.0.2",
        "dstport", "4789", "nolearning", "l2miss", "gbp")
    ipn(ns, "link", "add", "flannel-v6.1", "type", "vxlan", "id", "1", "dev", "eth0", "local", "fd00:1::2",
        "dstport", "0", "learning")
    ipn(ns, "link", "add", "vx-group", "type", "vxlan", "id", "9", "group", "239.1.1.1", "dev", "eth0")
    ipn(ns, "link", "add", "cbr0", "type", "bridge")
    ipn(ns, "link", "set", "flannel.1", "mtu", "1400", "address", "0a:58:00:00:00:07", "up")
    ipn(ns, "addr", "add", "100.96.7.0/32", "dev", "flannel.1")
    ipn(ns, "addr", "add", "100.96.7.1/24", "dev", "cbr0")
    ipn(ns, "-6", "addr", "add", "fd00:7::/128", "dev", "flannel.1", "nodad")
    with Netlink(netns=ns) as nl:
        reference = nl.links()  # pyroute2's decoder
        assert {x.kind for x in reference} >= {"vxlan", "veth", "bridge"}
        for want in reference:
            assert nl.link_info(want.name) == want
            assert nl.link_index(want.name) == want.index
        vx = nl.link_info("flannel.1").vxlan
        assert (vx.vni, vx.port, vx.learning, vx.l2miss, vx.gbp, str(vx.local)) == (7, 4789, False, True, True,
                                                                                  "10.168.0.2")
        assert str(nl.link_info("flannel-v6.1").vxlan.local) == "fd00:1::2" and nl.link_info("vx-group").vxlan.group
        ip_j = {x["ifname"]: x for x in json.loads(ipn(ns, "-j", "link", "show"))}
        for name, x in ip_j.items():
            info = nl.link_info(name)
            assert (info.index, info.mtu, info.mac, info.up) == (
                x["ifindex"], x["mtu"], x.get("address", ""), "UP" in x["flags"]), name
        for family, flag in ((None, "-4"), (AF_INET6, "-6")):
            for name in ip_j:
                got = nl.addr_list(name) if family is None else nl.addr_list(name, family=family)
                want = [f"{a['local']}/{a['prefixlen']}" for x in json.loads(ipn(ns, "-j", flag, "addr", "show", "dev",
                                                                                 name))
                        for a in x.get("addr_info", [])]
                assert sorted(str(a.address) for a in got) == sorted(want), (name, flag)
        assert nl.addr_list("nope") == [] and nl.link_info("nope") is None and nl.link_index("nope") is None
