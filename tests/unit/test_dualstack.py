# SPDX-License-Identifier: Apache-2.0
"""Dual stack as Flannel does it (issue 15): config, keys, lease JSON, allocation, watcher, subnet.env, iface.

Each expectation is Flannel's (pkg/subnet/config.go CheckNetworkConfig, MakeSubnetKey/ParseSubnetKey,
local_manager.go tryAcquireLease/allocateSubnet, WriteSubnetFile), written out by hand, not computed by our code.
"""
from __future__ import annotations

import json
import random
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Address, IPv6Interface, IPv6Network

import pytest

from fakes_registry import FakeRegistry
from fastflannel.config import ConfigError, parse_config
from fastflannel.ip import make_subnet_key, parse_subnet_key
from fastflannel.kernel.iface import InterfaceError, select_interface
from fastflannel.kernel.netlink import AddrInfo, LinkInfo, Route
from fastflannel.lease import Event, EventType, Lease, LeaseAttrs, LeaseWatcher
from fastflannel.subnet import OutOfSubnetsError
from fastflannel.subnet.allocator import free_candidates, pick_subnet
from fastflannel.subnet.manager import LocalManager
from fastflannel.subnet.registry import removed_lease, subnet_key
from fastflannel.subnet.subnetfile import format_subnet_file, read_previous_subnets

DUAL = '{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fc00::/48","Backend":{"Type":"vxlan"}}'
MAC4, MAC6 = "0a:58:0a:05:01:00", "0e:58:0a:05:01:06"
# flanneld's value for a dual-stack vxlan host (Go json.Marshal of lease.LeaseAttrs: field order, no spaces)
FLANNEL_DUAL_VXLAN = ('{"PublicIP":"192.0.2.10","PublicIPv6":"2001:db8::10","BackendType":"vxlan",'
                      '"BackendData":{"VNI":1,"VtepMAC":"0a:58:0a:05:01:00"},'
                      '"BackendV6Data":{"VNI":1,"VtepMAC":"0e:58:0a:05:01:06"}}')
FLANNEL_DUAL_HOSTGW = '{"PublicIP":"192.0.2.10","PublicIPv6":"2001:db8::10","BackendType":"host-gw"}'


def dual_attrs(ip="192.0.2.10", ip6="2001:db8::10") -> LeaseAttrs:
    return LeaseAttrs(IPv4Address(ip), "vxlan", {"VNI": 1, "VtepMAC": MAC4}, IPv6Address(ip6),
                      {"VNI": 1, "VtepMAC": MAC6})


# -- 1. config ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("net6, len6, smin, smax", [
    ("fc00::/48", 64, "fc00:0:0:1::", "fc00:0:0:ffff::"),
    ("fc00::/62", 64, "fc00:0:0:1::", "fc00:0:0:3::"),
    ("fc00::/63", 65, "fc00::8000:0:0:0", "fc00:0:0:1:8000::"),
    ("fc00::/124", 126, "fc00::4", "fc00::c"),
])
def test_ipv6_defaults_like_flannel(net6, len6, smin, smax):
    c = parse_config(json.dumps({"Network": "10.5.0.0/16", "EnableIPv6": True, "IPv6Network": net6}))
    assert (c.ipv6_subnet_len, str(c.ipv6_subnet_min), str(c.ipv6_subnet_max)) == (len6, smin, smax)
    assert c.enable_ipv4 and c.enable_ipv6


def test_enable_ipv4_defaults_true_and_ipv6_fields_ignored_without_enable():
    c = parse_config('{"Network":"10.5.0.0/16","IPv6Network":"banana"}')
    assert c.enable_ipv4 and not c.enable_ipv6 and c.ipv6_network is None


@pytest.mark.parametrize("extra, flannel_text", [
    ({}, "please define a correct IPv6Network parameter in the flannel config"),
    ({"IPv6Network": "10.0.0.0/8"}, "please define a correct IPv6Network parameter in the flannel config"),
    ({"IPv6Network": "fc00::/125"}, "IPv6Network is too small. Minimum useful network prefix is /124"),
    ({"IPv6Network": "fc00::/48", "IPv6SubnetLen": 127}, "SubnetLen must be less than /127"),
    ({"IPv6Network": "fc00::/48", "IPv6SubnetLen": 49}, "network must be able to accommodate at least four subnets"),
    ({"IPv6Network": "fc00::/48", "IPv6SubnetMin": "fc01::"}, "IPv6SubnetMin is not in the range of the IPv6Network"),
    ({"IPv6Network": "fc00::/48", "IPv6SubnetMax": "fc01::"}, "IPv6SubnetMax is not in the range of the IPv6Network"),
    ({"IPv6Network": "fc00::/48", "IPv6SubnetMin": "fc00:0:0:1::1"}, "IPv6SubnetMin is not on a SubnetLen boundary"),
    ({"IPv6Network": "fc00::/48", "IPv6SubnetMax": "fc00:0:0:2:8000::"}, "IPv6SubnetMax is not on a SubnetLen boundary"),
])
def test_ipv6_errors_carry_flannels_text(extra, flannel_text):
    with pytest.raises(ConfigError) as ei:
        parse_config(json.dumps({"Network": "10.5.0.0/16", "EnableIPv6": True, **extra}))
    assert str(ei.value).startswith(flannel_text)


def test_ipv4_errors_carry_flannels_text():
    cases = [({}, "please define a correct Network parameter in the flannel config"),
             ({"Network": "10.0.0.0/29"}, "network is too small. Minimum useful network prefix is /28"),
             ({"Network": "10.0.0.0/16", "SubnetLen": 31}, "SubnetLen must be less than /31"),
             ({"Network": "10.0.0.0/16", "SubnetMin": "10.1.0.0"}, "SubnetMin is not in the range of the Network"),
             ({"Network": "10.0.0.0/16", "SubnetMax": "10.0.3.7"}, "SubnetMax is not on a SubnetLen boundary")]
    for raw, text in cases:
        with pytest.raises(ConfigError) as ei:
            parse_config(json.dumps(raw))
        assert str(ei.value).startswith(text), (raw, str(ei.value))


def test_lease_compatibility_both_families():
    c = parse_config(DUAL)
    assert c.lease_in_range(IPv4Network("10.5.3.0/24"), IPv6Network("fc00:0:0:3::/64"))
    assert not c.lease_in_range(IPv4Network("10.5.3.0/24"), None)  # v4-only lease under EnableIPv6
    assert not c.lease_in_range(IPv4Network("10.5.3.0/24"), IPv6Network("fc00::/64"))  # below IPv6SubnetMin
    assert not c.lease_in_range(IPv4Network("10.5.3.0/24"), IPv6Network("fc00:0:0:3::/80"))
    v4 = parse_config('{"Network":"10.5.0.0/16"}')
    assert v4.lease_in_range(IPv4Network("10.5.3.0/24"), None)
    assert not v4.lease_in_range(IPv4Network("10.5.3.0/24"), IPv6Network("fc00:0:0:3::/64"))


# -- 2. keys and JSON --------------------------------------------------------------------------------------------

def test_dual_key_like_flannel():
    key = make_subnet_key(IPv4Network("10.5.1.0/24"), IPv6Network("fc00:0:0:1::/64"))
    assert key == "10.5.1.0-24&fc00:0:0:1::-64"
    assert subnet_key("/coreos.com/network/", IPv4Network("10.5.1.0/24"), IPv6Network("fc00:0:0:1::/64")) == \
        "/coreos.com/network/subnets/10.5.1.0-24&fc00:0:0:1::-64"
    assert parse_subnet_key("/coreos.com/network/subnets/10.5.1.0-24&fc00:0:0:1::-64") == \
        (IPv4Network("10.5.1.0/24"), IPv6Network("fc00:0:0:1::/64"))
    assert parse_subnet_key("10.5.1.0-24") == (IPv4Network("10.5.1.0/24"), None)
    with pytest.raises(ValueError):  # Flannel's regex is lower-case hex only
        parse_subnet_key("10.5.1.0-24&FC00:0:0:1::-64")


@pytest.mark.parametrize("text", [FLANNEL_DUAL_VXLAN, FLANNEL_DUAL_HOSTGW])
def test_dual_json_byte_exact(text):
    assert LeaseAttrs.from_json(text).to_json() == text


def test_dual_json_encode():
    assert dual_attrs().to_json() == FLANNEL_DUAL_VXLAN


# -- 2. allocation -----------------------------------------------------------------------------------------------

def test_v6_candidates_walk_from_min_and_skip_taken():
    c = parse_config(DUAL)
    taken = [IPv6Network("fc00:0:0:1::/64"), IPv6Network("fc00:0:0:3::/64"), IPv4Network("10.5.2.0/24")]
    got = free_candidates(c, taken, limit=3, family=6)
    assert [str(n) for n in got] == ["fc00:0:0:2::/64", "fc00:0:0:4::/64", "fc00:0:0:5::/64"]
    assert len(free_candidates(c, [], family=6)) == 100


def test_v6_out_of_subnets():
    c = parse_config('{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fc00::/124"}')
    taken = [IPv6Network(f"fc00::{i:x}/126") for i in (4, 8, 12)]
    with pytest.raises(OutOfSubnetsError, match=r"out of subnets: all 3 subnets of fc00::/124 .*IPv6SubnetMin"):
        pick_subnet(c, taken, family=6)


def test_v6_allocation_on_huge_network_is_cheap():
    c = parse_config('{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fc00::/8"}')
    assert len(free_candidates(c, [IPv6Network("fc00:0:0:1::/64")], family=6)) == 100


def mgr(reg, **kw) -> LocalManager:
    kw.setdefault("rng", random.Random(7))
    return LocalManager(reg, **kw)


def test_acquire_allocates_both_and_writes_flannels_key_and_json():
    reg = FakeRegistry(config=DUAL)
    lease = mgr(reg).acquire_lease(dual_attrs())
    assert lease.subnet.prefixlen == 24 and lease.subnet6 is not None and lease.subnet6.prefixlen == 64
    assert lease.subnet6.subnet_of(IPv6Network("fc00::/48")) and lease.subnet6 != IPv6Network("fc00::/64")
    key = subnet_key(reg.prefix, lease.subnet, lease.subnet6)
    assert "&fc00:" in key and reg.kv[key].value == FLANNEL_DUAL_VXLAN
    # restart: found again by PublicIP, both subnets kept, even with another rng
    again = mgr(reg, rng=random.Random(99)).acquire_lease(dual_attrs())
    assert (again.subnet, again.subnet6) == (lease.subnet, lease.subnet6)
    assert [k for k in reg.kv if "/subnets/" in k] == [key]


def test_v4_only_lease_of_our_ip_is_replaced_when_ipv6_is_enabled():
    reg = FakeRegistry(config=DUAL)
    reg.put_lease("10.5.9.0/24", LeaseAttrs(IPv4Address("192.0.2.10"), "vxlan", {"VNI": 1, "VtepMAC": MAC4}))
    lease = mgr(reg).acquire_lease(dual_attrs())
    assert lease.subnet6 is not None
    assert subnet_key(reg.prefix, IPv4Network("10.5.9.0/24")) not in reg.kv  # deleted, as Flannel does
    assert subnet_key(reg.prefix, lease.subnet, lease.subnet6) in reg.kv


def test_other_hosts_v4_only_lease_blocks_only_its_v4_subnet():
    reg = FakeRegistry(config='{"Network":"10.5.0.0/22","SubnetLen":24,"EnableIPv6":true,"IPv6Network":"fc00::/62"}')
    reg.put_lease("10.5.1.0/24", LeaseAttrs(IPv4Address("192.0.2.20"), "vxlan", {"VNI": 1, "VtepMAC": MAC4}))
    reg.put_lease("10.5.2.0/24", dual_attrs("192.0.2.30", "2001:db8::30"), subnet6="fc00:0:0:1::/64")
    lease = mgr(reg).acquire_lease(dual_attrs())
    assert lease.subnet == IPv4Network("10.5.3.0/24")
    assert lease.subnet6 in (IPv6Network("fc00:0:0:2::/64"), IPv6Network("fc00:0:0:3::/64"))


def test_previous_subnets_from_subnet_env_are_reused(tmp_path):
    env = tmp_path / "subnet.env"
    env.write_text("FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.77.1/24\nFLANNEL_IPV6_NETWORK=fc00::/48\n"
                   "FLANNEL_IPV6_SUBNET=fc00:0:0:4d::1/64\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n")
    prev, prev6 = read_previous_subnets(str(env))
    assert (prev, prev6) == (IPv4Network("10.5.77.0/24"), IPv6Network("fc00:0:0:4d::/64"))
    reg = FakeRegistry(config=DUAL)
    lease = mgr(reg, previous_subnet=prev, previous_subnet6=prev6).acquire_lease(dual_attrs())
    assert (lease.subnet, lease.subnet6) == (prev, prev6)
    # a taken previous IPv6 subnet is not reused (both are allocated afresh)
    reg2 = FakeRegistry(config=DUAL)
    reg2.put_lease("10.5.3.0/24", dual_attrs("192.0.2.30", "2001:db8::30"), subnet6="fc00:0:0:4d::/64")
    lease2 = mgr(reg2, previous_subnet=prev, previous_subnet6=prev6).acquire_lease(dual_attrs())
    assert lease2.subnet6 != prev6


def test_keeper_recreates_the_dual_key(tmp_path):
    import threading
    import time

    reg = FakeRegistry(config=DUAL)
    m = mgr(reg, check_s=0.05)
    lease = m.acquire_lease(dual_attrs())
    key = subnet_key(reg.prefix, lease.subnet, lease.subnet6)
    stop = threading.Event()
    t = threading.Thread(target=m.keep_lease, args=(lease, stop), daemon=True)
    t.start()
    try:
        reg.delete_raw(key.rsplit("/", 1)[-1])
        deadline = time.monotonic() + 10
        while key not in reg.kv and time.monotonic() < deadline:
            time.sleep(0.02)
        assert key in reg.kv and reg.kv[key].value == FLANNEL_DUAL_VXLAN
    finally:
        stop.set()
        t.join(5)


# -- watcher: removal of a re-keyed lease ------------------------------------------------------------------------

def test_removal_of_old_v4_key_keeps_the_rekeyed_dual_lease():
    w = LeaseWatcher(IPv4Network("10.5.1.0/24"))
    v4 = Lease(IPv4Network("10.5.2.0/24"), LeaseAttrs(IPv4Address("192.0.2.20")))
    dual = Lease(IPv4Network("10.5.2.0/24"), dual_attrs("192.0.2.20"), subnet6=IPv6Network("fc00:0:0:2::/64"))
    w.update([Event(EventType.ADDED, v4)])
    w.update([Event(EventType.ADDED, dual)])  # the host re-keyed: PUT of the new key may come first
    assert w.update([Event(EventType.REMOVED, removed_lease(v4.subnet))]) == []
    (ev,) = w.update([Event(EventType.REMOVED, removed_lease(dual.subnet, dual.subnet6))])
    assert ev.lease is dual  # the removal carries the cached attrs and both subnets


def test_watch_delete_of_dual_key_carries_both_subnets():
    import threading

    reg = FakeRegistry(config=DUAL)
    reg.put_lease("10.5.2.0/24", dual_attrs("192.0.2.20", "2001:db8::20"), subnet6="fc00:0:0:2::/64")
    m = mgr(reg)
    own = Lease(IPv4Network("10.5.1.0/24"), dual_attrs(), subnet6=IPv6Network("fc00:0:0:1::/64"))
    stop = threading.Event()
    it = m.watch_leases(own, stop)
    (first,) = next(it)
    assert first.lease.subnet6 == IPv6Network("fc00:0:0:2::/64")
    reg.delete_raw("10.5.2.0-24&fc00:0:0:2::-64")
    for batch in it:
        if batch:
            (ev,) = batch
            break
    stop.set()
    assert ev.type is EventType.REMOVED and ev.lease.subnet6 == IPv6Network("fc00:0:0:2::/64")
    assert ev.lease.attrs.public_ipv6 == IPv6Address("2001:db8::20")


# -- 4. subnet.env -----------------------------------------------------------------------------------------------

def test_subnet_env_dual_stack_byte_for_byte():
    c = parse_config(DUAL)
    lease = Lease(IPv4Network("10.5.72.0/24"), dual_attrs(), subnet6=IPv6Network("fc00:0:0:48::/64"))
    assert format_subnet_file(c, lease, 1450, True) == (
        "FLANNEL_NETWORK=10.5.0.0/16\n"
        "FLANNEL_SUBNET=10.5.72.1/24\n"
        "FLANNEL_IPV6_NETWORK=fc00::/48\n"
        "FLANNEL_IPV6_SUBNET=fc00:0:0:48::1/64\n"
        "FLANNEL_MTU=1450\n"
        "FLANNEL_IPMASQ=true\n"
    )


# -- 3. interface selection --------------------------------------------------------------------------------------

class StubNetlink:
    def __init__(self, links, addrs, routes=()):
        self._links, self._addrs, self._routes = links, addrs, list(routes)

    def links(self):
        return self._links

    def addr_list(self, ifname=None, family=2):
        return [a for a in self._addrs if a.address.version == (6 if family == 10 else 4)]

    def routes(self, oif=None, table=254, family=2):
        return [r for r in self._routes if r.dst.version == (6 if family == 10 else 4)]


def _L(i, name):
    return LinkInfo(name=name, index=i, kind="", mtu=1500, mac="", up=True)


def _A(i, cidr, flags=0x80):
    iface = IPv6Interface(cidr) if ":" in cidr else IPv4Interface(cidr)
    return AddrInfo(index=i, address=iface, scope=0, flags=flags)


NL6 = StubNetlink(
    [_L(1, "lo"), _L(2, "eth0"), _L(3, "eth1")],
    [_A(1, "127.0.0.1/8"), _A(1, "::1/128"), _A(2, "10.0.2.15/24"), _A(2, "fe80::1/64"),
     _A(2, "fd00::15/64", flags=0x01 | 0x80), _A(2, "fd00::16/64"), _A(3, "192.168.56.10/24")],
    [Route(IPv4Network("0.0.0.0/0"), IPv4Address("10.0.2.2"), oif=2),
     Route(IPv6Network("::/0"), IPv6Address("fd00::1"), oif=2)],
)


def test_iface_v6_address_preferences_and_public_ipv6():
    e = select_interface([], [], None, NL6, ipv6=True)
    assert (e.name, str(e.iface_addr6), str(e.ext_addr6)) == ("eth0", "fd00::16", "fd00::16")
    e = select_interface(["eth0"], [], None, NL6, public_ipv6="2001:db8::7", ipv6=True)
    assert (str(e.iface_addr6), str(e.ext_addr6)) == ("fd00::16", "2001:db8::7")
    assert select_interface(["eth0"], [], None, NL6).iface_addr6 is None  # IPv4-only network: not looked up


def test_iface_v6_errors():
    with pytest.raises(InterfaceError, match="^failed to find IPv6 address for interface eth1"):
        select_interface(["eth1"], [], None, NL6, ipv6=True)
    with pytest.raises(InterfaceError, match="invalid public IPv6 address: 10.0.0.1"):
        select_interface(["eth0"], [], None, NL6, public_ipv6="10.0.0.1", ipv6=True)
    split = StubNetlink(NL6._links, NL6._addrs + [_A(3, "fd01::10/64")],
                        [Route(IPv4Network("0.0.0.0/0"), oif=3), Route(IPv6Network("::/0"), oif=2)])
    with pytest.raises(InterfaceError, match="v6 default route interface eth0 must be the same with v4 default "
                                             "route interface eth1"):
        select_interface([], [], None, split, ipv6=True)


# -- 3. flag and environment -------------------------------------------------------------------------------------

def test_public_ipv6_flag_and_env():
    from fastflannel.cli import parse_options

    assert parse_options(["--public-ipv6=2001:db8::9"], environ={}).public_ipv6 == "2001:db8::9"
    assert parse_options(["-public-ipv6", "2001:db8::9"], environ={}).public_ipv6 == "2001:db8::9"
    assert parse_options([], environ={"FLANNELD_PUBLIC_IPV6": "2001:db8::8"}).public_ipv6 == "2001:db8::8"
    assert parse_options(["--public-ipv6=2001:db8::9"],
                         environ={"FLANNELD_PUBLIC_IPV6": "2001:db8::8"}).public_ipv6 == "2001:db8::9"
    assert parse_options([], environ={}).public_ipv6 == ""


# -- 7. CNI plugin: both families as Flannel's plugin hands them out ------------------------------------------------

def test_cni_delegate_has_ranges_and_routes_for_both_families():
    from fastflannel.cni import plugin as cni

    c = parse_config(DUAL)
    lease = Lease(IPv4Network("10.5.72.0/24"), dual_attrs(), subnet6=IPv6Network("fc00:0:0:48::/64"))
    senv = cni.parse_subnet_env(format_subnet_file(c, lease, 1450, False))
    d = cni.build_delegate({"name": "cbr0", "cniVersion": "0.3.1", "type": "flannel"}, senv)
    assert d["ipam"] == {
        "type": "host-local",
        "ranges": [[{"subnet": "10.5.72.0/24"}], [{"subnet": "fc00:0:0:48::/64"}]],
        "routes": [{"dst": "10.5.0.0/16"}, {"dst": "fc00::/48"}],
    }
    assert (d["type"], d["mtu"], d["ipMasq"], d["isGateway"]) == ("bridge", 1450, True, True)


def test_udp_refuses_ipv6_with_a_clear_error():
    from fastflannel.backend.udp import UDP_IPV6_ERROR, UdpBackend
    from fastflannel.errors import BackendError

    backend = UdpBackend.__new__(UdpBackend)  # register_network checks the config before touching anything
    with pytest.raises(BackendError) as ei:
        backend.register_network(parse_config(DUAL.replace("vxlan", "udp")))
    assert str(ei.value) == UDP_IPV6_ERROR and "EnableIPv6" in UDP_IPV6_ERROR


# -- 9. demo --dual-stack: IPv6 column, udp skipped ------------------------------------------------------------

def test_demo_dual_stack_table_and_udp_skip(monkeypatch):
    import argparse
    import io

    from fastflannel.lab import demo

    out = io.StringIO()
    demo.print_table([{"backend": "vxlan", "reachable": True, "reachable6": True, "mtu": 1450},
                      {"backend": "host-gw", "reachable": True, "reachable6": False, "mtu": 1500}], out=out)
    lines = out.getvalue().splitlines()
    assert lines[0].split()[-1] == "IPv6" and lines[2].split()[-1] == "yes" and lines[3].split()[-1] == "NO"
    ran = []
    monkeypatch.setattr(demo, "demo_backend", lambda b, say, **kw: ran.append((b, kw["dual_stack"])) or
                        {"backend": b, "reachable": True, "reachable6": True})
    monkeypatch.setattr("fastflannel.lab.testbed.install_signal_handlers", lambda **kw: None)
    rc = demo.cmd_demo(argparse.Namespace(backends="udp,vxlan", seconds=1.0, verbose=False, dual_stack=True))
    assert rc == 0 and ran == [("vxlan", True)]


# -- 5. DualStackNetwork on FakeNetlink: projections, v4-only peers, DirectRouting over IPv6 -----------------------

def _vx_dual_peer(sub4, sub6, ip, ip6, mac4, mac6):
    return Lease(IPv4Network(sub4), LeaseAttrs(IPv4Address(ip), "vxlan", {"VNI": 1, "VtepMAC": mac4},
                                               IPv6Address(ip6), {"VNI": 1, "VtepMAC": mac6}),
                 subnet6=IPv6Network(sub6))


def _dual_vxlan(direct=False):
    from fakes import FakeManager, FakeNetlink, ext_iface
    from dataclasses import replace

    from fastflannel.backend.vxlan import VxlanBackend

    nl = FakeNetlink()
    ext = replace(ext_iface(), iface_addr6=IPv6Address("fd00::2"), ext_addr6=IPv6Address("fd00::2"))
    cfg = parse_config(json.dumps({"Network": "10.5.0.0/16", "EnableIPv6": True, "IPv6Network": "fc00::/48",
                                   "Backend": {"Type": "vxlan", "DirectRouting": direct}}))
    mgr = FakeManager("10.5.1.0/24", "fc00:0:0:1::/64")
    return VxlanBackend(mgr, ext, nl, watch_links=False).register_network(cfg), nl, mgr


def test_dual_vxlan_programs_both_families_and_v4_only_peers_get_v4_only():
    from fakes import added, removed

    net, nl, mgr = _dual_vxlan()
    assert set(nl.links) == {"flannel.1", "flannel-v6.1"} and nl.links["flannel-v6.1"]["mtu"] == 1430
    assert str(nl.links["flannel-v6.1"]["local"]) == "fd00::2"
    a = mgr.acquired[0]
    assert a.backend_v6_data["VtepMAC"] == nl.links["flannel-v6.1"]["mac"] != a.backend_data["VtepMAC"]
    assert IPv6Interface("fc00:0:0:1::/128") in nl.addrs["flannel-v6.1"]
    dual = _vx_dual_peer("10.5.2.0/24", "fc00:0:0:2::/64", "10.168.0.3", "fd00::3", "0a:00:00:00:00:02", "0e:00:00:00:00:02")
    v4only = Lease(IPv4Network("10.5.3.0/24"), LeaseAttrs(IPv4Address("10.168.0.4"), "vxlan",
                                                          {"VNI": 1, "VtepMAC": "0a:00:00:00:00:03"}))
    net.handle_events(added(dual, v4only))
    dev6 = nl.links["flannel-v6.1"]["index"]
    assert nl.route_table[IPv6Network("fc00:0:0:2::/64")] == (IPv6Address("fc00:0:0:2::"), dev6, True)
    assert nl.neigh_table[(dev6, IPv6Address("fc00:0:0:2::"))] == "0e:00:00:00:00:02"
    assert nl.fdb_table[(dev6, "0e:00:00:00:00:02")] == IPv6Address("fd00::3")
    assert IPv4Network("10.5.3.0/24") in nl.route_table
    assert [d for d in nl.route_table if d.version == 6] == [IPv6Network("fc00:0:0:2::/64")]
    # reconcile with the same leases changes nothing; a removal takes both families' entries
    net.reconcile({dual.subnet: dual, v4only.subnet: v4only})
    assert len([d for d in nl.route_table if d.version == 6]) == 1
    net.handle_events(removed(dual))
    assert not [d for d in nl.route_table if d.version == 6] and IPv4Network("10.5.2.0/24") not in nl.route_table
    assert (dev6, IPv6Address("fc00:0:0:2::")) not in nl.neigh_table


def test_dual_vxlan_direct_routing_over_ipv6():
    from fakes import added

    net, nl, _ = _dual_vxlan(direct=True)
    nl.direct.add(IPv6Address("fd00::3"))  # the IPv6 peer is on-link, the IPv4 one is not
    dual = _vx_dual_peer("10.5.2.0/24", "fc00:0:0:2::/64", "10.168.0.3", "fd00::3", "0a:00:00:00:00:02", "0e:00:00:00:00:02")
    net.handle_events(added(dual))
    assert nl.route_table[IPv6Network("fc00:0:0:2::/64")] == (IPv6Address("fd00::3"), 2, False)  # via PublicIPv6
    assert nl.route_table[IPv4Network("10.5.2.0/24")][2] is True  # IPv4 stays vxlan (onlink)


def test_hostgw_refuses_a_nat_public_ipv6():
    from dataclasses import replace

    from fakes import FakeManager, FakeNetlink, ext_iface
    from fastflannel.backend.hostgw import HostGwBackend
    from fastflannel.errors import BackendError

    ext = replace(ext_iface(), iface_addr6=IPv6Address("fd00::2"), ext_addr6=IPv6Address("2001:db8::2"))
    with pytest.raises(BackendError, match="PublicIPv6 differs"):
        HostGwBackend(FakeManager(), ext, FakeNetlink()).register_network(parse_config(DUAL.replace("vxlan", "host-gw")))
