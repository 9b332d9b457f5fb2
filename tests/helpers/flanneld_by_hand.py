# SPDX-License-Identifier: Apache-2.0
"""What flanneld programs on a host, as plain iproute2 commands (flannel-compat.md sections 5 and 6): the interop
peers of the tests are configured with these, an independent tool, never with our netlink code.

``run`` executes one argv (``["ip", ...]`` or ``["bridge", ...]``) on the peer host, e.g. ``host.run`` of the
testbed or ``lambda a: nsexec(ns, *a)``. Either address family: an IPv6 address gives the ``flannel-v6.<VNI>``
form (/128, ``ip -6``)."""
from __future__ import annotations

from ipaddress import ip_address, ip_network

VXLAN_PORT = "8472"


def vxlan_device(run, *, dev: str, mac: str, local, addr, mtu: int, vni: int = 1, underlay: str = "eth0") -> None:
    """flanneld's vxlan device: explicit MAC, ``nolearning``, port 8472, the lease's network address as /32 (/128)."""
    a = ip_address(str(addr))
    run(["ip", "link", "add", dev, "address", mac, "type", "vxlan", "id", str(vni), "dev", underlay, "local",
         str(local), "dstport", VXLAN_PORT, "nolearning"])
    run(["ip", "addr", "add", f"{a}/{a.max_prefixlen}", "dev", dev] + (["nodad"] if a.version == 6 else []))
    run(["ip", "link", "set", dev, "mtu", str(mtu), "up"])


def vxlan_peer(run, *, dev: str, subnet, public_ip, mac: str) -> None:
    """Per remote lease, in flanneld's order: neighbour, FDB entry, onlink route via the subnet's network address."""
    net = ip_network(str(subnet))
    fam = ["-6"] if net.version == 6 else []
    gw = str(net.network_address)
    run(["ip", *fam, "neigh", "replace", gw, "lladdr", mac, "dev", dev, "nud", "permanent"])
    run(["bridge", "fdb", "replace", mac, "dev", dev, "dst", str(public_ip), "self", "permanent"])
    run(["ip", *fam, "route", "replace", str(net), "via", gw, "dev", dev, "onlink"])


def hostgw_peer(run, *, subnet, public_ip, dev: str = "eth0") -> None:
    """Per remote lease: ``<subnet> via <PublicIP> dev <ext>`` (IPv6: via PublicIPv6)."""
    net = ip_network(str(subnet))
    run(["ip", *(["-6"] if net.version == 6 else []), "route", "replace", str(net), "via", str(public_ip), "dev", dev])
