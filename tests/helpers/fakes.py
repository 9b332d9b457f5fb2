# SPDX-License-Identifier: Apache-2.0
"""Test doubles and a throw-away namespace rig for the kernel backend tests.

- ``FakeManager``: a SubnetManager whose ``acquire_lease`` hands out a fixed subnet and records the attrs.
- ``FakeNetlink``: records desired kernel state in dicts (enough for pure unit tests of the backends).
- ``Rig``: fresh network namespaces named ``ffkb<random>...`` built with iproute2 ``ip`` commands (an independent
  tool from our pyroute2 code), deleted on every exit path. Nothing is ever configured in the root namespace.
"""
from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import threading
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Network, ip_address, ip_interface, ip_network
from typing import Dict, List, Optional, Tuple

import pytest

from fastflannel.kernel.iface import ExternalInterface
from fastflannel.lease import Event, EventType, Lease, LeaseAttrs

IS_ROOT = os.geteuid() == 0
HAVE_IP = shutil.which("ip") is not None
needs_netns = [
    pytest.mark.netns,
    pytest.mark.skipif(not IS_ROOT, reason="needs root to create network namespaces"),
    pytest.mark.skipif(not HAVE_IP, reason="needs iproute2 'ip'"),
]


def netns_marks(fn):
    for m in needs_netns:
        fn = m(fn)
    return fn


class FakeManager:
    """SubnetManager stand-in: ``acquire_lease`` returns ``subnet`` with the attrs it was given."""

    def __init__(self, subnet: str = "100.96.1.0/24", subnet6: Optional[str] = None) -> None:
        self.subnet = IPv4Network(subnet)
        self.subnet6 = IPv6Network(subnet6) if subnet6 else None
        self.acquired: List[LeaseAttrs] = []

    def acquire_lease(self, attrs: LeaseAttrs) -> Lease:
        self.acquired.append(attrs)
        return Lease(subnet=self.subnet, attrs=attrs, subnet6=self.subnet6)

    def watch_leases(self, own: Lease, stop: threading.Event):  # pragma: no cover - not used by these tests
        while not stop.wait(0.05):
            yield []


def vxlan_lease(subnet: str, public_ip: str, mac: str, vni: int = 1) -> Lease:
    return Lease(
        subnet=IPv4Network(subnet),
        attrs=LeaseAttrs(public_ip=IPv4Address(public_ip), backend_type="vxlan",
                         backend_data={"VNI": vni, "VtepMAC": mac}),
    )


def hostgw_lease(subnet: str, public_ip: str) -> Lease:
    return Lease(subnet=IPv4Network(subnet), attrs=LeaseAttrs(public_ip=IPv4Address(public_ip), backend_type="host-gw"))


def added(*leases: Lease) -> List[Event]:
    return [Event(EventType.ADDED, x) for x in leases]


def removed(*leases: Lease) -> List[Event]:
    return [Event(EventType.REMOVED, x) for x in leases]


# -- FakeNetlink --------------------------------------------------------------------------------------
@dataclass
class FakeNetlink:
    """Records what the backends ask for. Links are created by ``ensure_vxlan``; ``fail`` maps a method name to
    an exception to raise once."""

    links: Dict[str, dict] = field(default_factory=dict)
    addrs: Dict[str, set] = field(default_factory=dict)
    route_table: Dict[IPv4Network, tuple] = field(default_factory=dict)
    neigh_table: Dict[Tuple[int, IPv4Address], str] = field(default_factory=dict)
    fdb_table: Dict[Tuple[int, str], IPv4Address] = field(default_factory=dict)
    calls: List[tuple] = field(default_factory=list)
    fail: Dict[str, Exception] = field(default_factory=dict)
    next_index: int = 10
    direct: set = field(default_factory=set)  # IPs that route_get reports as directly connected
    batches: List[int] = field(default_factory=list)  # size of every batch() call

    def _hit(self, name: str, *args) -> None:
        self.calls.append((name,) + args)
        exc = self.fail.pop(name, None)
        if exc is not None:
            raise exc

    def link_info(self, name):
        from fastflannel.kernel.netlink import LinkInfo, VxlanAttrs

        li = self.links.get(name)
        if li is None:
            return None
        return LinkInfo(name=name, index=li["index"], kind="vxlan", mtu=li["mtu"], mac=li["mac"], up=li["up"],
                        vxlan=VxlanAttrs(li["vni"], li["dev"], li["local"], None, li["port"] or 8472,
                                         li["learning"], li["gbp"], False))

    def link_index(self, name):
        li = self.links.get(name)
        return li["index"] if li else None

    def ensure_vxlan(self, name, vni, dev_index, local, port=0, gbp=False, learning=False, mtu=0, mac=None):
        self._hit("ensure_vxlan", name)
        if name not in self.links:
            self.next_index += 1
            self.links[name] = dict(index=self.next_index, vni=vni, dev=dev_index, local=ip_address(local),
                                    port=port, gbp=gbp, learning=learning, mtu=mtu, mac=mac, up=False)
        return self.link_info(name)

    def set_link_up(self, name):
        self.links[name]["up"] = True

    def set_mtu(self, name, mtu):
        self.links[name]["mtu"] = mtu

    def set_mac(self, name, mac):
        self.links[name]["mac"] = mac

    def delete_link(self, name):
        return self.links.pop(name, None) is not None

    def addr_replace(self, ifname, cidr):
        self.addrs.setdefault(ifname, set()).add(ip_interface(cidr))

    def addr_list(self, ifname=None, family=2):
        from fastflannel.kernel.netlink import AddrInfo

        idx = self.link_index(ifname)
        version = 6 if family == 10 else 4
        return [AddrInfo(idx, a, 0, 0x80) for a in sorted(self.addrs.get(ifname, ()), key=str)
                if a.version == version]

    def addr_del(self, ifname, cidr):
        self.addrs.get(ifname, set()).discard(ip_interface(cidr))

    def route_replace(self, dst, gateway=None, oif=None, onlink=False, table=254):
        self._hit("route_replace", str(dst))
        self.route_table[ip_network(dst)] = (ip_address(gateway) if gateway else None, oif, onlink)

    def route_del(self, dst, gateway=None, oif=None, table=254):
        self._hit("route_del", str(dst))
        return self.route_table.pop(ip_network(dst), None) is not None

    def routes(self, oif=None, table=254, family=2):
        from fastflannel.kernel.netlink import Route

        version = 6 if family == 10 else 4
        return [Route(dst=d, gateway=g, oif=o, onlink=ol) for d, (g, o, ol) in self.route_table.items()
                if (oif is None or o == oif) and d.version == version]

    def route_get(self, ip):
        from fastflannel.kernel.netlink import Route

        ip = ip_address(ip)
        gw = None if ip in self.direct else ip_address("10.168.0.1" if ip.version == 4 else "fd00::1")
        return Route(dst=ip_network(f"{ip}/{ip.max_prefixlen}"), gateway=gw, oif=2)

    def route_get_many(self, ips):
        return [self.route_get(ip) for ip in ips]

    def neigh_replace(self, ifindex, ip, mac):
        self._hit("neigh_replace", str(ip))
        self.neigh_table[(ifindex, ip_address(ip))] = mac

    def neigh_del(self, ifindex, ip):
        self._hit("neigh_del", str(ip))
        return self.neigh_table.pop((ifindex, ip_address(ip)), None) is not None

    def neighs(self, ifindex, family=2):
        from fastflannel.kernel.netlink import Neigh

        version = 6 if family == 10 else 4
        return [Neigh(i, ip, mac, 0x80) for (i, ip), mac in self.neigh_table.items()
                if i == ifindex and ip.version == version]

    def fdb_replace(self, ifindex, mac, dst):
        self._hit("fdb_replace", mac)
        self.fdb_table[(ifindex, mac)] = ip_address(dst)

    def fdb_del(self, ifindex, mac, dst=None):
        self._hit("fdb_del", mac)
        return self.fdb_table.pop((ifindex, mac), None) is not None

    def batch(self, ops):
        """As ``Netlink.batch``: the same verbs one by one (so ``fail`` and ``calls`` work unchanged)."""
        from fastflannel.errors import BackendError
        from fastflannel.kernel.nlbatch import apply_serially

        self.batches.append(len(ops))
        return apply_serially(self, ops, (BackendError,))

    def fdbs(self, ifindex):
        from fastflannel.kernel.netlink import Fdb

        return [Fdb(i, mac, dst, 0x80, 0x02) for (i, mac), dst in self.fdb_table.items() if i == ifindex]


def ext_iface(name="eth0", index=2, ip="10.168.0.2", public=None, mtu=1500) -> ExternalInterface:
    return ExternalInterface(name=name, index=index, iface_addr=IPv4Address(ip),
                             ext_addr=IPv4Address(public or ip), mtu=mtu)


# -- namespace rig ------------------------------------------------------------------------------------
def sh(cmd: List[str], check: bool = True, input: Optional[str] = None) -> str:
    """Run a command (argv list, no shell); return stdout; raise with stderr on failure."""
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=30, input=input)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stderr.strip()}")
    return p.stdout


def ipn(ns: str, *args: str, check: bool = True) -> str:
    return sh(["ip", "-n", ns, *args], check=check)


def flannel_routes(ns: str, *args: str, check: bool = True) -> str:
    """``ip route show`` as Flannel's routes read: the `` nhid N`` of a route through a nexthop object
    (kernel/nexthop.py) is dropped, so the rest - destination, gateway, device, flags - is compared with what
    Flannel programs. tests/kernel/test_nexthop.py checks the nhid itself."""
    return re.sub(r" nhid \d+", "", ipn(ns, *args, "route", "show", check=check))


def nsexec(ns: str, *args: str, check: bool = True, input: Optional[str] = None) -> str:
    return sh(["ip", "netns", "exec", ns, *args], check=check, input=input)


class Rig:
    """A set of throw-away namespaces. ``close()`` deletes every one it created (idempotent)."""

    def __init__(self) -> None:
        # named like conftest's netns_name() so the session leak guard attributes these to this run (and a
        # concurrent run's guard leaves them alone); from tiers, not conftest: with tests/e2e/conftest.py present,
        # the module named "conftest" is not always tests/conftest.py, and the old fallback name got deleted
        from tiers import SESSION_NETNS_PREFIX

        self.prefix = f"{SESSION_NETNS_PREFIX}-kb{secrets.token_hex(2)}"
        self.namespaces: List[str] = []

    def netns(self, suffix: str) -> str:
        name = f"{self.prefix}{suffix}"
        sh(["ip", "netns", "add", name])
        self.namespaces.append(name)
        ipn(name, "link", "set", "lo", "up")
        return name

    def close(self) -> None:
        while self.namespaces:
            sh(["ip", "netns", "del", self.namespaces.pop()], check=False)

    def __enter__(self) -> "Rig":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def host(self, suffix: str, ip: str = "10.168.0.2/24") -> str:
        """A lone host namespace with a veth ``eth0`` (peer ``eth1`` up, in the same ns) carrying ``ip``."""
        ns = self.netns(suffix)
        ipn(ns, "link", "add", "eth0", "type", "veth", "peer", "name", "eth1")
        ipn(ns, "addr", "add", ip, "dev", "eth0")
        ipn(ns, "link", "set", "eth0", "up")
        ipn(ns, "link", "set", "eth1", "up")
        return ns

    def pair(self, ip_a: str = "10.168.0.2/24", ip_b: str = "10.168.0.3/24") -> Tuple[str, str]:
        """Two host namespaces joined by a veth pair, each side named ``eth0``."""
        a, b = self.netns("a"), self.netns("b")
        ipn(a, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", b)
        ipn(a, "addr", "add", ip_a, "dev", "eth0")
        ipn(b, "addr", "add", ip_b, "dev", "eth0")
        ipn(a, "link", "set", "eth0", "up")
        ipn(b, "link", "set", "eth0", "up")
        return a, b

    @staticmethod
    def pod_bridge(ns: str, cidr: str) -> None:
        """A docker0/cni0-style bridge holding one pod-side address (e.g. ``100.96.1.1/24``)."""
        ipn(ns, "link", "add", "cni0", "type", "bridge")
        ipn(ns, "addr", "add", cidr, "dev", "cni0")
        ipn(ns, "link", "set", "cni0", "up")


def netns_list() -> List[str]:
    return sorted(line.split()[0] for line in sh(["ip", "netns", "list"]).splitlines() if line.strip())


@pytest.fixture
def rig():
    r = Rig()
    try:
        yield r
    finally:
        r.close()
        left = [ns for ns in netns_list() if ns.startswith(r.prefix)]
        assert not left, f"namespaces leaked: {left}"
