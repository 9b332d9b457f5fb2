# SPDX-License-Identifier: Apache-2.0
"""Pipelined netlink batches against the kernel, in fresh namespaces: an error in the middle of a batch (and of a
datagram) is attributed to the request and the peer it belongs to, every other request takes, and a vxlan peer
that failed half-way is rolled back (no neighbour, FDB entry or route of it left behind)."""
from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

from fakes import FakeManager, added, ipn, netns_marks, rig, sh, vxlan_lease  # noqa: F401

from fastflannel.backend.vxlan import VxlanBackend
from fastflannel.config import parse_config
from fastflannel.kernel import nlbatch
from fastflannel.kernel.iface import ExternalInterface
from fastflannel.kernel.netlink import KernelError, Netlink

CONFIG = parse_config('{"Network": "100.96.0.0/16", "Backend": {"Type": "vxlan"}}')


@netns_marks
def test_error_in_the_middle_of_a_batch_fails_only_its_request(rig):
    ns = rig.host("h", "10.168.0.2/16")
    n, bad = nlbatch.WINDOW + 50, nlbatch.WINDOW - 6  # two datagrams; the bad one in the first
    with Netlink(netns=ns) as nl:
        eth0 = nl.link_index("eth0")
        ops = [nlbatch.route_replace(f"100.97.{i // 256}.{i % 256}/32", f"10.168.1.{i % 250 + 1}", eth0)
               for i in range(n)]
        ops[bad] = nlbatch.route_replace("100.98.0.0/24", "192.0.2.1", eth0)  # not on-link: unreachable
        errors = nl.batch(ops)
        assert [i for i, e in enumerate(errors) if e is not None] == [bad]
        assert isinstance(errors[bad], KernelError) and errors[bad].errno == 101
        assert str(errors[bad]).startswith("route 100.98.0.0/24 via 192.0.2.1 dev eth0: Network is unreachable")
        routes = {r.dst for r in nl.routes(oif=eth0) if r.gateway is not None}
        assert len(routes) == n - 1 and IPv4Network("100.98.0.0/24") not in routes
        again = nl.batch(ops[:bad] + ops[bad + 1:])  # replace semantics: a second run changes nothing, no error
        assert again == [None] * (n - 1)
        gone = nl.batch([nlbatch.route_del(op.args[0]) for op in ops])  # deletes of absent routes are not errors
        assert gone == [None] * n and not [r for r in nl.routes(oif=eth0) if r.gateway is not None]


@netns_marks
def test_half_programmed_vxlan_peer_is_rolled_back(rig, caplog):
    ns = rig.host("h", "10.168.0.2/16")
    # peer B's gateway (its subnet's first address) is a local address here: the kernel takes B's neighbour and
    # FDB entry (stage 1) but refuses its onlink route (stage 2, "Nexthop has invalid gateway")
    ipn(ns, "addr", "add", "100.96.3.0/32", "dev", "lo")
    peers = [vxlan_lease(f"100.96.{i}.0/24", f"10.168.0.{10 + i}", f"0a:58:00:00:00:{i:02x}") for i in range(2, 40)]
    bad = peers[1]
    assert bad.subnet == IPv4Network("100.96.3.0/24")
    with Netlink(netns=ns) as nl:
        info = nl.link_info("eth0")
        ext = ExternalInterface("eth0", info.index, IPv4Address("10.168.0.2"), IPv4Address("10.168.0.2"), info.mtu)
        net = VxlanBackend(FakeManager(), ext, nl, watch_links=False).register_network(CONFIG)
        seen = []
        real_batch = nl.batch

        def spy(ops):
            errors = real_batch(ops)
            seen.append(list(zip(ops, errors)))
            return errors

        nl.batch = spy
        net.handle_events(added(*peers))
        dev = net.device.index
        neighs = {n.ip for n in nl.neighs(dev)}
        fdbs = {f.mac for f in nl.fdbs(dev) if f.dst is not None}
        routes = {r.dst for r in nl.routes(oif=dev)}
    gw = bad.subnet.network_address
    assert [e for op, e in seen[0] if op.verb == "neigh_replace" and op.args[1] == gw] == [None]  # B half-way
    assert any(op.verb == "neigh_del" and op.args[1] == gw and e is None for op, e in seen[-1])  # rolled back
    good = [p for p in peers if p is not bad]
    assert neighs == {p.subnet.network_address for p in good}
    assert fdbs == {p.attrs.backend_data["VtepMAC"] for p in good}
    assert routes == {p.subnet for p in good}
    failed = [line for line in caplog.text.splitlines() if "event=peer_failed" in line]
    assert len(failed) == 1 and "subnet=100.96.3.0/24" in failed[0] and "Nexthop has invalid gateway" in failed[0]
    assert "event=rollback_failed" not in caplog.text
    # B's entries are gone from the kernel too (read back with iproute2, not our own decoder)
    assert "100.96.3.0 " not in ipn(ns, "neigh", "show", "dev", "flannel.1")
    assert "0a:58:00:00:00:03" not in sh(["bridge", "-n", ns, "fdb", "show", "dev", "flannel.1"])


@netns_marks
def test_route_get_many_matches_route_get(rig):
    ns = rig.host("h", "10.168.0.2/16")
    ipn(ns, "route", "add", "172.16.0.0/16", "via", "10.168.0.1", "dev", "eth0")
    ips = ["10.168.1.5", "172.16.3.4", "192.0.2.1", "10.168.0.9"] * 100  # 400: two datagrams
    with Netlink(netns=ns) as nl:
        got = nl.route_get_many(ips)
        eth0 = nl.link_index("eth0")
        assert len(got) == len(ips) and got[2] is None  # no route to 192.0.2.1 here (no default route)
        for ip, r in zip(ips[:4], got[:4]):
            if r is not None:
                single = nl.route_get(ip)
                assert (r.gateway, r.oif) == (single.gateway, single.oif)
        assert (got[0].gateway, got[0].oif) == (None, eth0)
        assert (str(got[1].gateway), got[1].oif) == ("10.168.0.1", eth0)
        assert [r is None for r in got] == [ip == "192.0.2.1" for ip in ips]


@netns_marks
def test_direct_routing_decided_by_one_pipelined_route_get(rig):
    ns = rig.host("h", "10.168.0.2/16")
    ipn(ns, "route", "add", "172.16.0.0/16", "via", "10.168.0.1", "dev", "eth0")
    near = [vxlan_lease(f"100.96.{i}.0/24", f"10.168.0.{10 + i}", f"0a:58:00:00:00:{i:02x}") for i in range(2, 30)]
    far = vxlan_lease("100.96.40.0/24", "172.16.0.40", "0a:58:00:00:00:40")  # behind a router: vxlan
    config = parse_config('{"Network": "100.96.0.0/16", "Backend": {"Type": "vxlan", "DirectRouting": true}}')
    with Netlink(netns=ns) as nl:
        info = nl.link_info("eth0")
        ext = ExternalInterface("eth0", info.index, IPv4Address("10.168.0.2"), IPv4Address("10.168.0.2"), info.mtu)
        net = VxlanBackend(FakeManager(), ext, nl, watch_links=False).register_network(config)
        calls = []
        real = nl.route_get_many
        nl.route_get_many = lambda ips: calls.append(len(ips)) or real(ips)
        net.handle_events(added(*near, far))
        routes = {r.dst: r for r in nl.routes()}
        dev = net.device.index
        neighs = {n.ip for n in nl.neighs(dev)}
    assert calls == [len(near) + 1]  # one batch for every peer, not one request each
    for p in near:
        r = routes[p.subnet]
        assert (r.gateway, r.oif, r.onlink) == (p.attrs.public_ip, info.index, False)
    r = routes[far.subnet]
    assert (r.gateway, r.oif, r.onlink) == (far.subnet.network_address, dev, True)
    assert neighs == {far.subnet.network_address}
