# SPDX-License-Identifier: Apache-2.0
"""External interface selection (flannel-compat.md section 9): --iface, --iface-regex, --public-ip, default route."""
from __future__ import annotations

from ipaddress import IPv4Address, IPv4Interface, IPv4Network

import pytest
from fakes import ipn, netns_marks, rig  # noqa: F401

from fastflannel.kernel.iface import InterfaceError, select_interface
from fastflannel.kernel.netlink import AddrInfo, LinkInfo, Netlink, Route


class StubNetlink:
    def __init__(self, links, addrs, routes=()):
        self._links, self._addrs, self._routes = links, addrs, list(routes)

    def links(self):
        return self._links

    def addr_list(self, ifname=None):
        return self._addrs

    def routes(self, oif=None, table=254):
        return self._routes


def L(i, name, mtu=1500):
    return LinkInfo(name=name, index=i, kind="", mtu=mtu, mac="", up=True)


def A(i, cidr, flags=0x80, scope=0):
    return AddrInfo(index=i, address=IPv4Interface(cidr), scope=scope, flags=flags)


NL = StubNetlink(
    [L(1, "lo", 65536), L(2, "eth0"), L(3, "eth1", 9001)],
    [A(1, "127.0.0.1/8", scope=254), A(2, "10.0.2.15/24"), A(3, "169.254.3.3/16", scope=253),
     A(3, "192.168.56.10/24", flags=0), A(3, "192.168.56.11/24")],
    [Route(IPv4Network("10.0.2.0/24"), oif=2), Route(IPv4Network("0.0.0.0/0"), IPv4Address("10.0.2.2"), oif=2)],
)


def test_default_route_interface():
    e = select_interface([], [], None, NL)
    assert (e.name, e.index, str(e.iface_addr), str(e.ext_addr), e.mtu) == ("eth0", 2, "10.0.2.15", "10.0.2.15", 1500)


def test_iface_by_name_prefers_global_permanent():
    e = select_interface(["eth1"], [], None, NL)
    assert (e.name, str(e.iface_addr), e.mtu) == ("eth1", "192.168.56.11", 9001)


def test_iface_by_ip_and_first_match_wins():
    e = select_interface(["eth9", "192.168.56.10", "eth0"], [], None, NL)
    assert (e.name, str(e.iface_addr)) == ("eth1", "192.168.56.10")


def test_iface_no_match_message():
    with pytest.raises(InterfaceError, match=r"^no interface matches --iface=eth9; available: lo, eth0, eth1$"):
        select_interface(["eth9"], [], None, NL)


def test_regex_matches_ips_before_names():
    assert select_interface([], [r"^192\.168\.56\.1[0-9]$"], None, NL).name == "eth1"
    # "eth" matches no IP, then names: first interface by index
    assert select_interface([], ["eth"], None, NL).name == "eth0"
    # the first regex that matches anything wins, in flag order
    assert select_interface([], ["nomatch", "^10\\.0\\."], None, NL).name == "eth0"
    with pytest.raises(InterfaceError, match="--iface-regex=zzz"):
        select_interface([], ["zzz"], None, NL)


def test_public_ip_owner_or_error():
    e = select_interface([], [], "192.168.56.10", NL)
    assert (e.name, str(e.ext_addr), str(e.iface_addr)) == ("eth1", "192.168.56.10", "192.168.56.10")
    with pytest.raises(InterfaceError, match=r"no interface owns --public-ip=203.0.113.7; .*--iface"):
        select_interface([], [], "203.0.113.7", NL)
    nat = select_interface(["eth0"], [], "203.0.113.7", NL)  # NAT address with --iface: advertised as is
    assert (str(nat.iface_addr), str(nat.ext_addr)) == ("10.0.2.15", "203.0.113.7")


def test_mtu_zero_and_no_default_route():
    nl = StubNetlink([L(2, "eth0", 0)], [A(2, "10.0.2.15/24")], [Route(IPv4Network("0.0.0.0/0"), oif=2)])
    with pytest.raises(InterfaceError, match="MTU 0"):
        select_interface([], [], None, nl)
    with pytest.raises(InterfaceError, match="no default route"):
        select_interface([], [], None, StubNetlink([L(2, "eth0")], [A(2, "10.0.2.15/24")]))
    with pytest.raises(InterfaceError, match="lo has no usable IPv4 address"):
        select_interface(["lo"], [], None, NL)


def test_deprecated_address_is_skipped():
    nl = StubNetlink([L(2, "eth0")], [A(2, "10.0.0.1/24", flags=0x80 | 0x20), A(2, "10.0.0.2/24")])
    assert str(select_interface(["eth0"], [], None, nl).iface_addr) == "10.0.0.2"


@netns_marks
def test_select_in_namespace(rig):
    ns = rig.host("h", "10.168.0.2/24")
    ipn(ns, "route", "add", "default", "via", "10.168.0.1", "dev", "eth0")
    with Netlink(netns=ns) as nl:
        e = select_interface([], [], None, nl)
        assert (e.name, str(e.iface_addr), e.mtu) == ("eth0", "10.168.0.2", 1500)
        assert e.index == nl.link_index("eth0")
        assert select_interface([], [r"10\.168\."], None, nl).name == "eth0"


@netns_marks
def test_iface_can_reach_follows_the_kernel_route(rig):
    """--iface-can-reach: the interface and source address of ``ip route get`` (netlink), as flanneld."""
    ns = rig.host("h", "10.168.0.2/24")
    ipn(ns, "link", "add", "uplink2", "mtu", "9000", "type", "veth", "peer", "name", "uplink2p")
    ipn(ns, "link", "set", "uplink2p", "up")
    ipn(ns, "addr", "add", "192.168.77.2/24", "dev", "uplink2")
    ipn(ns, "addr", "add", "192.168.77.3/24", "dev", "uplink2")
    ipn(ns, "link", "set", "uplink2", "up")
    ipn(ns, "route", "add", "10.50.0.0/16", "via", "192.168.77.1", "dev", "uplink2", "src", "192.168.77.3")
    ipn(ns, "route", "add", "default", "via", "10.168.0.1", "dev", "eth0")
    with Netlink(netns=ns) as nl:
        e = select_interface([], [], None, nl, can_reach="10.50.3.4")
        assert (e.name, str(e.iface_addr), str(e.ext_addr), e.mtu) == ("uplink2", "192.168.77.3", "192.168.77.3", 9000)
        assert select_interface([], [], None, nl, can_reach="192.168.77.9").name == "uplink2"
        assert select_interface([], [], None, nl, can_reach="203.0.113.5").name == "eth0"  # the default route
        # --iface and --iface-regex win when they match, and fall through to the route when they do not
        assert select_interface(["eth0"], [], None, nl, can_reach="10.50.3.4").name == "eth0"
        assert select_interface(["eth9"], [], None, nl, can_reach="10.50.3.4").name == "uplink2"
        assert select_interface([], ["nomatch"], None, nl, can_reach="10.50.3.4").name == "uplink2"
        ipn(ns, "route", "del", "default")
        with pytest.raises(InterfaceError, match="--iface-can-reach=203.0.113.5: no route to it"):
            select_interface([], [], None, nl, can_reach="203.0.113.5")
