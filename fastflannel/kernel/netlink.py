# SPDX-License-Identifier: Apache-2.0
"""Program the kernel over rtnetlink: the only module that imports pyroute2 (design.md rule A2.1; link events:
``linkevents.py``, sysctl: ``sysctl.py``).

Every write is idempotent: ``replace`` (NLM_F_CREATE|NLM_F_REPLACE) or ensure-then-compare, never a blind
``add`` that fails on the second run. Reads return small frozen dataclasses with ``ipaddress`` values, so
callers never see pyroute2 messages. Every kernel error is re-raised as ``KernelError`` whose message names
the object and the kernel's reason, e.g. ``route 100.96.2.0/24 via 10.168.0.3 dev eth0: Network is unreachable``.

Threading: one ``Netlink`` may be shared by the daemon thread, the event loop thread and a reconcile timer;
calls are serialised by a lock (one request/response at a time on one socket). Namespaces: ``netns=<name>``
targets an existing named namespace (never created implicitly); ``None`` is the caller's namespace.
"""
from __future__ import annotations

import errno
import logging
import os
import threading
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Address, IPv6Interface, IPv6Network  # noqa: F401
from ipaddress import ip_address, ip_interface, ip_network
from typing import Any, Callable, Iterator, List, Optional, Union

from pyroute2 import IPRoute
from pyroute2 import config as _pyroute2_config
from pyroute2.netlink.exceptions import NetlinkError

from fastflannel.errors import KernelError
from fastflannel.kernel import linkevents, nexthop, nlbatch, nlread

log = logging.getLogger("fastflannel.kernel.netlink")

# For ``netns=...`` pyroute2 forks a child that enters the namespace, sends back the socket fd, and is then
# stopped with SIGTERM. A forked child inherits the parent's Python SIGTERM handler; if that handler raises
# (the daemon's and pytest's turn SIGTERM into an exception), the child would unwind the *parent's* stack copy
# and run its cleanup (deleting namespaces, closing files). Make the child reset SIGTERM/SIGINT first.
_pyroute2_config.disable_mp_signal = True

AF_INET = 2
AF_INET6 = 10
AF_BRIDGE = 7
RT_TABLE_MAIN = 254
RTN_UNICAST = 1
RTPROT_BOOT = 3  # linux/rtnetlink.h: what `ip route` and Flannel's netlink library use (printed as no proto)
RTNH_F_ONLINK = 4  # linux/rtnetlink.h: gateway is on-link even without a covering prefix route
NUD_PERMANENT = 0x80  # linux/neighbour.h
NUD_NOARP = 0x40
NTF_SELF = 0x02  # linux/neighbour.h: the entry lives in the device's own FDB (vxlan), not a bridge master
IFF_UP = 0x1
IFA_F_SECONDARY = 0x01  # == IFA_F_TEMPORARY for IPv6
IFA_F_DEPRECATED = 0x20
IFA_F_PERMANENT = 0x80
VXLAN_DEFAULT_PORT = 8472  # Linux's default (pre-IANA) VXLAN UDP port, used when no dstport is given

Address = Union[str, IPv4Address, IPv6Address]
Prefix = Union[str, IPv4Network, IPv6Network]
family_of = {4: AF_INET, 6: AF_INET6}.__getitem__  # IP version -> netlink address family


@dataclass(frozen=True)
class VxlanAttrs:
    """The vxlan link attributes Flannel compares (plus learning, which it reports but does not compare)."""

    vni: int
    link: int  # underlay ifindex, 0 if unset
    local: "Optional[IPv4Address | IPv6Address]"  # IFLA_VXLAN_LOCAL, or IFLA_VXLAN_LOCAL6 for flannel-v6.<VNI>
    group: Optional[IPv4Address]
    port: int  # UDP destination port; the kernel reports 8472 when none was given
    learning: bool
    gbp: bool
    l2miss: bool


@dataclass(frozen=True)
class LinkInfo:
    name: str
    index: int
    kind: str  # "vxlan", "veth", "tun", "" for devices without IFLA_INFO_KIND
    mtu: int
    mac: str  # lower-case colon-separated, "" for devices without one
    up: bool  # administratively up (IFF_UP)
    vxlan: Optional[VxlanAttrs] = None


@dataclass(frozen=True)
class AddrInfo:
    index: int
    address: "IPv4Interface | IPv6Interface"
    scope: int  # 0 universe, 253 link, 254 host
    flags: int  # IFA_F_*


@dataclass(frozen=True)
class Route:
    dst: "IPv4Network | IPv6Network"
    gateway: "Optional[IPv4Address | IPv6Address]" = None
    oif: Optional[int] = None
    onlink: bool = False
    table: int = RT_TABLE_MAIN
    type: int = RTN_UNICAST
    proto: int = 0
    scope: int = 0
    prefsrc: "Optional[IPv4Address | IPv6Address]" = None

    def __str__(self) -> str:
        s = str(self.dst)
        if self.gateway is not None:
            s += f" via {self.gateway}"
        if self.oif is not None:
            s += f" dev #{self.oif}"
        if self.onlink:
            s += " onlink"
        return s

    def same_path(self, other: "Route") -> bool:
        """Return True if both routes have Flannel's identity: dst, mask, gateway, link index (and onlink)."""
        return (self.dst, self.gateway, self.oif, self.onlink) == (other.dst, other.gateway, other.oif, other.onlink)


@dataclass(frozen=True)
class Neigh:
    index: int
    ip: "IPv4Address | IPv6Address"
    mac: str
    state: int


@dataclass(frozen=True)
class Fdb:
    index: int
    mac: str
    dst: "Optional[IPv4Address | IPv6Address]"
    state: int
    flags: int


def _reason(e: BaseException) -> tuple:
    if isinstance(e, NetlinkError):
        code = e.code
        return (os.strerror(code) if code else str(e)), code
    if isinstance(e, OSError) and e.errno:
        return os.strerror(e.errno), e.errno
    return str(e), 0


class Netlink:
    """Typed, idempotent rtnetlink operations. A context manager; ``close()`` is idempotent."""

    def __init__(self, netns: Optional[str] = None) -> None:
        self.netns = netns
        self._lock = threading.RLock()
        kw: dict = {"groups": 0}  # a command socket: no multicast events queue up behind our requests
        if netns is not None:
            kw.update(netns=netns, flags=0)  # flags=0: never create the namespace implicitly
        self._fast = nlbatch.Channel(netns)  # batches and dumps: a raw socket, opened on first use
        self._expand: Optional[Callable[..., list]] = None
        try:
            self._ipr: Optional[IPRoute] = IPRoute(**kw)
        except (NetlinkError, OSError) as e:
            reason, code = _reason(e)
            raise KernelError(f"netlink socket (netns {netns or 'current'})", reason, code) from e

    # -- lifecycle ---------------------------------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            ipr, self._ipr = self._ipr, None
            self._fast.close()
        if ipr is not None:
            ipr.close()

    def __enter__(self) -> "Netlink":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _call(self, what: str, fn: Callable[[IPRoute], Any], ignore: tuple = ()) -> Any:
        with self._lock:
            if self._ipr is None:
                raise KernelError(what, "netlink socket is closed")
            try:
                return fn(self._ipr)
            except NetlinkError as e:
                if e.code in ignore:
                    return None
                reason, code = _reason(e)
                raise KernelError(what, reason, code) from e
            except OSError as e:
                reason, code = _reason(e)
                raise KernelError(what, reason, code) from e
            finally:
                _drop_stray_messages(self._ipr)

    # -- pipelined batches and dumps (kernel/nlbatch.py) -------------------------------------------------------
    def batch(self, ops: "List[nlbatch.Op]") -> List[Optional[KernelError]]:
        """Run ``ops`` (``nlbatch.route_replace(...)`` etc.) pipelined on one socket, in order; return one
        ``KernelError`` or None per op, as if each verb had been called alone (see ``nlbatch.run_ops``)."""
        with self._lock:
            if self._expand is None:  # probed once, on the first batch (kernel/nexthop.py)
                self._expand, why = nexthop.choose(self._fast)
                log.info("event=route_programming mode=%r", why)
            return self._fast.batch(ops, self._name_quiet, self._expand)

    def _dump(self, what: str, fn: Callable[..., list]) -> list:
        with self._lock:
            return self._fast.dump(what, fn)
    def _name(self, index: int) -> str:
        info = self.link_by_index(index)
        return info.name if info else f"#{index}"

    # -- links -------------------------------------------------------------------------------------
    def link_index(self, name: str) -> Optional[int]:
        """Return the ifindex of ``name``, or None if there is no such link."""
        info = self.link_info(name)
        return info.index if info is not None else None

    def link_info(self, name: str) -> Optional[LinkInfo]:
        """Return the attributes of link ``name``, or None if it does not exist.

        One raw request on the batch socket, decoded by ``kernel/nlread.py`` (as ``addr_list``): reconcile asks
        every 10 s, and pyroute2's requests were the soak's slow RSS rise (docs/soak.md)."""
        with self._lock:
            payload = self._fast.get(f"link {name}", nlread.link_get_request(name), missing=(errno.ENODEV,))
        return nlread.link_info(nlread.parse_link(payload), LinkInfo, VxlanAttrs) if payload else None

    def link_by_index(self, index: int) -> Optional[LinkInfo]:
        msgs = self._call(f"link #{index}", lambda i: i.get_links(index), ignore=(errno.ENODEV,))
        return _link_info(msgs[0]) if msgs else None

    def links(self) -> List[LinkInfo]:
        """Return every link, in ifindex order."""
        return sorted((_link_info(m) for m in self._call("link dump", lambda i: i.get_links())), key=lambda x: x.index)

    def ensure_vxlan(
        self,
        name: str,
        vni: int,
        dev_index: int,
        local: Optional[Address],
        port: int = 0,
        gbp: bool = False,
        learning: bool = False,
        mtu: int = 0,
        mac: Optional[str] = None,
    ) -> LinkInfo:
        """Create vxlan ``name`` or reuse a compatible existing one; return its attributes.

        Compatibility is Flannel's (``vxlanLinksIncompat``): type, VNI, underlay index and local IP (when both
        set), group, l2miss, port (when both > 0), GBP. MTU and learning are not compared: an existing device
        keeps its MTU and MAC. An incompatible device is deleted and recreated; the reason is logged.
        ``port`` 0 omits the attribute so the kernel uses 8472. An IPv6 ``local``: flannel-v6.<VNI> (LOCAL6)."""
        local_ip = ip_address(local) if local else None
        existing = self.link_info(name)
        if existing is not None:
            why = _vxlan_incompat(existing, vni, dev_index, local_ip, port, gbp)
            if why is None:
                return existing
            log.warning("event=vxlan_incompatible dev=%s reason=%r action=recreate", name, why)
            self.delete_link(name)
        spec: dict = dict(
            ifname=name, kind="vxlan", vxlan_id=vni, vxlan_learning=1 if learning else 0,
        )
        if dev_index:
            spec["vxlan_link"] = dev_index
        if local_ip is not None:
            spec["vxlan_local6" if local_ip.version == 6 else "vxlan_local"] = str(local_ip)
        if port > 0:
            spec["vxlan_port"] = port
        if gbp:
            spec["vxlan_gbp"] = True
        if mtu > 0:
            spec["mtu"] = mtu
        if mac:
            spec["address"] = mac.lower()
        what = f"vxlan {name} id {vni} dev #{dev_index} local {local_ip} dstport {port or VXLAN_DEFAULT_PORT}"
        self._call(what, lambda i: i.link("add", **spec))
        info = self.link_info(name)
        if info is None:
            raise KernelError(what, "created but not found afterwards")
        return info

    def add_wireguard(self, name: str, mtu: int = 0) -> LinkInfo:
        """``ip link add <name> [mtu N] type wireguard``. No kernel module: KernelError with errno EOPNOTSUPP."""
        what = f"wireguard {name} mtu {mtu}"
        self._call(what, lambda i: i.link("add", ifname=name, kind="wireguard", **({"mtu": mtu} if mtu > 0 else {})))
        info = self.link_info(name)
        if info is None:
            raise KernelError(what, "created but not found afterwards")
        return info

    def set_link_up(self, name: str) -> None:
        idx = self._require(name)
        self._call(f"link set {name} up", lambda i: i.link("set", index=idx, state="up"))

    def set_mtu(self, name: str, mtu: int) -> None:
        idx = self._require(name)
        self._call(f"link set {name} mtu {mtu}", lambda i: i.link("set", index=idx, mtu=mtu))

    def set_link_queue(self, name: str, txqlen: Optional[int] = None, gso_max_size: Optional[int] = None) -> None:
        """Set the transmit queue length (``ip link set X txqueuelen N``; for a TUN also the size of the ring the
        reader drains) and/or ``gso_max_size`` (largest GSO packet the stack builds for X) of link ``name``."""
        idx = self._require(name)
        if txqlen is not None:
            self._call(f"link set {name} txqueuelen {txqlen}", lambda i: i.link("set", index=idx, txqlen=txqlen))
        if gso_max_size is not None:
            self._call(f"link set {name} gso_max_size {gso_max_size}",
                       lambda i: i.link("set", index=idx, gso_max_size=gso_max_size))

    def set_mac(self, name: str, mac: str) -> None:
        idx = self._require(name)
        self._call(f"link set {name} address {mac}", lambda i: i.link("set", index=idx, address=mac.lower()))

    def delete_link(self, name: str) -> bool:
        """Delete link ``name``; return False if it did not exist."""
        idx = self.link_index(name)
        if idx is None:
            return False
        self._call(f"link del {name}", lambda i: i.link("del", index=idx), ignore=(errno.ENODEV,))
        return True

    def _require(self, name: str) -> int:
        idx = self.link_index(name)
        if idx is None:
            raise KernelError(f"link {name}", "No such device", errno.ENODEV)
        return idx

    # -- addresses ---------------------------------------------------------------------------------
    def addr_replace(self, ifname: str, cidr: "Union[str, IPv4Interface, IPv6Interface]") -> None:
        """Ensure ``cidr`` (e.g. ``10.5.72.0/32`` or ``fc00:0:0:5::/128``) is on ``ifname`` (idempotent)."""
        ifa = ip_interface(cidr)
        idx, fam = self._require(ifname), family_of(ifa.version)
        self._call(
            f"addr {ifa} dev {ifname}",
            lambda i: i.addr("replace", index=idx, address=str(ifa.ip), prefixlen=ifa.network.prefixlen, family=fam),
        )

    def addr_list(self, ifname: Optional[str] = None, family: int = AF_INET) -> List[AddrInfo]:
        """Return the addresses of ``family`` (AF_INET or AF_INET6) of ``ifname`` (or of every link)."""
        idx = None
        if ifname is not None:
            idx = self.link_index(ifname)
            if idx is None:
                return []
        return self._dump(f"addr show {ifname or ''}".strip(),
                          lambda s, q: nlread.dump_addrs(s, q, AddrInfo, family, idx))

    def addr_del(self, ifname: str, cidr: "Union[str, IPv4Interface, IPv6Interface]") -> None:
        ifa = ip_interface(cidr)
        idx, fam = self._require(ifname), family_of(ifa.version)
        self._call(
            f"addr del {ifa} dev {ifname}",
            lambda i: i.addr("del", index=idx, address=str(ifa.ip), prefixlen=ifa.network.prefixlen, family=fam),
            ignore=(errno.EADDRNOTAVAIL, errno.ENOENT),
        )

    # -- routes ------------------------------------------------------------------------------------
    def route_replace(
        self,
        dst: Prefix,
        gateway: Optional[Address] = None,
        oif: Optional[int] = None,
        onlink: bool = False,
        table: int = RT_TABLE_MAIN,
        scope: Optional[int] = None,
    ) -> None:
        """``ip route replace dst [via gateway] [dev oif] [onlink] [scope N]`` in ``table``.

        A device route (no gateway; scope universe unless given, as pyroute2 and ``ip route`` make it) is one raw
        request on the batch socket: udp and wireguard re-assert theirs in every reconcile pass, and pyroute2's
        requests were the soak's RSS slope (docs/soak.md, "What udp's slope was")."""
        net = ip_network(dst)
        if gateway is None:
            err = self.batch([nlbatch.route_replace(net, None, oif, onlink, table,
                                                    nlbatch.RT_SCOPE_UNIVERSE if scope is None else scope)])[0]
            if err is not None:
                raise err
            return
        spec: dict = {"dst": str(net), "table": table, "proto": RTPROT_BOOT, "family": family_of(net.version)}
        if scope is not None:
            spec["scope"] = scope
        if gateway is not None:
            spec["gateway"] = str(gateway)
        if oif is not None:
            spec["oif"] = oif
        if onlink:
            spec["flags"] = RTNH_F_ONLINK
        self._call(self._route_what(net, gateway, oif, onlink), lambda i: i.route("replace", **spec))

    def route_del(
        self, dst: Prefix, gateway: Optional[Address] = None, oif: Optional[int] = None, table: int = RT_TABLE_MAIN
    ) -> bool:
        """Delete the route; return False if there was none."""
        net = ip_network(dst)
        spec: dict = {"dst": str(net), "table": table, "family": family_of(net.version)}
        if gateway is not None:
            spec["gateway"] = str(gateway)
        if oif is not None:
            spec["oif"] = oif
        r = self._call(
            "delete " + self._route_what(net, gateway, oif, False),
            lambda i: i.route("del", **spec),
            ignore=(errno.ESRCH, errno.ENOENT),
        )
        return r is not None

    def _route_what(self, net: Any, gateway: Any, oif: Optional[int], onlink: bool) -> str:
        s = f"route {net}"
        if gateway is not None:
            s += f" via {gateway}"
        if oif is not None:
            s += f" dev {self._name_quiet(oif)}"
        if onlink:
            s += " onlink"
        return s

    def _name_quiet(self, index: int) -> str:
        try:
            return self._name(index)
        except KernelError:
            return f"#{index}"

    def routes(self, oif: Optional[int] = None, table: int = RT_TABLE_MAIN, family: int = AF_INET) -> List[Route]:
        """Return the routes of ``family`` (AF_INET or AF_INET6) in ``table`` (optionally only those via ``oif``):
        one raw dump decoded by ``nlbatch`` (9-15x less CPU than pyroute2's decoder for 5,000 routes, measured)."""
        return self._dump("route show", lambda s, q: nlbatch.dump_routes(s, q, Route, family, table, oif))

    def route_get(self, ip: Address) -> Route:
        """``ip route get <ip>``: the route the kernel would use (gateway None means directly connected)."""
        msgs = self._call(f"route get {ip}", lambda i: i.route("get", dst=str(ip)))
        if not msgs:
            raise KernelError(f"route get {ip}", "no answer")
        return _route(msgs[0])

    def route_get_many(self, ips: List[Address]) -> List[Optional[Route]]:
        with self._lock:  # route_get for many addresses, pipelined; None where the kernel has no route
            return self._fast.route_get_many(ips, Route)

    # -- neighbours and FDB ------------------------------------------------------------------------
    def neigh_replace(self, ifindex: int, ip: Address, mac: str) -> None:
        """``ip neigh replace <ip> lladdr <mac> dev <ifindex> nud permanent``."""
        fam, what = family_of(ip_address(ip).version), f"neigh {ip} lladdr {mac} dev {self._name_quiet(ifindex)}"
        self._call(what, lambda i: i.neigh("replace", ifindex=ifindex, dst=str(ip), lladdr=mac.lower(),
                                           state=NUD_PERMANENT, family=fam))

    def neigh_del(self, ifindex: int, ip: Address) -> bool:
        r = self._call(
            f"delete neigh {ip} dev {self._name_quiet(ifindex)}",
            lambda i: i.neigh("del", ifindex=ifindex, dst=str(ip), family=family_of(ip_address(ip).version)),
            ignore=(errno.ENOENT, errno.ESRCH),
        )
        return r is not None

    def neighs(self, ifindex: int, family: int = AF_INET) -> List[Neigh]:
        """Return the neighbour entries of ``family`` (AF_INET or AF_INET6) on ``ifindex`` (one raw dump)."""
        return self._dump("neigh show", lambda s, q: nlbatch.dump_neighs(s, q, Neigh, family, ifindex))

    def fdb_replace(self, ifindex: int, mac: str, dst: Address) -> None:
        """``bridge fdb replace <mac> dev <ifindex> dst <dst> self permanent``."""
        self._call(
            f"fdb {mac} dev {self._name_quiet(ifindex)} dst {dst} self permanent",
            lambda i: i.neigh(
                "replace", family=AF_BRIDGE, ifindex=ifindex, lladdr=mac.lower(), dst=str(dst),
                state=NUD_PERMANENT, flags=NTF_SELF,
            ),
        )

    def fdb_del(self, ifindex: int, mac: str, dst: Optional[Address] = None) -> bool:
        spec: dict = dict(family=AF_BRIDGE, ifindex=ifindex, lladdr=mac.lower(), state=NUD_PERMANENT, flags=NTF_SELF)
        if dst is not None:
            spec["dst"] = str(dst)
        r = self._call(
            f"delete fdb {mac} dev {self._name_quiet(ifindex)}" + (f" dst {dst}" if dst else ""),
            lambda i: i.neigh("del", **spec),
            ignore=(errno.ENOENT, errno.ESRCH),
        )
        return r is not None

    def fdbs(self, ifindex: int) -> List[Fdb]:
        """Return the FDB entries (AF_BRIDGE) of ``ifindex`` (one raw dump, see ``routes``)."""
        return self._dump("fdb show", lambda s, q: nlbatch.dump_neighs(s, q, Fdb, AF_BRIDGE, ifindex))

    # -- events ------------------------------------------------------------------------------------
    def link_events(
        self, stop: threading.Event, poll_s: float = 1.0, ready: Optional[threading.Event] = None
    ) -> Iterator[tuple]:
        """Yield ``(event, name, index)`` for link add/delete events in this namespace until ``stop`` is set
        (``kernel.linkevents.link_events``: its own raw socket, not this one's)."""
        return linkevents.link_events(stop, netns=self.netns, poll_s=poll_s, ready=ready)


def wireguard_socket() -> Any:
    """Return pyroute2's WireGuard generic netlink socket, for ``kernel/wireguard.py`` (which never imports
    pyroute2). Call it once a ``wireguard`` link exists: the family comes with the module."""
    from pyroute2 import WireGuard

    return call_translated("wireguard generic netlink family", WireGuard)


def call_translated(what: str, fn: Callable[[], Any]) -> Any:
    """Run ``fn``; re-raise a netlink/OS/value error as ``KernelError`` naming ``what`` and the kernel's reason."""
    try:
        return fn()
    except (NetlinkError, OSError, ValueError) as e:
        reason, code = _reason(e)
        raise KernelError(what, reason, code) from e


def _drop_stray_messages(ipr: Any) -> None:
    """Discard what pyroute2 queued for nobody on the calling thread's message queue.

    pyroute2 0.9 sends ``get`` requests (link get by index/name, ``route get``) with NLM_F_ACK and returns on the
    reply, freeing the request's sequence tag; the kernel's trailing ACK (a 36-byte NLMSG_ERROR 0) then lands on
    the root queue (tag 0), which only an event reader would drain. On this command socket (groups=0) nothing
    else is ever put there, so without this every link lookup left one message behind for good: the vxlan
    daemon's RSS grew by ~2.4 KiB per lookup (heap fragmentation around the retained bytes), 6 lookups per peer
    add+remove (``_name_quiet`` names the device in every neigh/FDB/route request)."""
    root = getattr(getattr(getattr(getattr(ipr, "asyncore", None), "local", None), "msg_queue", None), "root", None)
    if root is None:
        return
    while not root.empty():
        root.get_nowait()
        root.task_done()


# -- message decoding ------------------------------------------------------------------------------
def _link_info(m: Any) -> LinkInfo:
    kind = ""
    vx = None
    li = m.get_attr("IFLA_LINKINFO")
    if li is not None:
        kind = li.get_attr("IFLA_INFO_KIND") or ""
        data = li.get_attr("IFLA_INFO_DATA")
        if kind == "vxlan" and data is not None:
            names = {a[0] for a in data["attrs"]}
            local = data.get_attr("IFLA_VXLAN_LOCAL") or data.get_attr("IFLA_VXLAN_LOCAL6")
            group = data.get_attr("IFLA_VXLAN_GROUP") or data.get_attr("IFLA_VXLAN_GROUP6")
            vx = VxlanAttrs(
                vni=data.get_attr("IFLA_VXLAN_ID") or 0,
                link=data.get_attr("IFLA_VXLAN_LINK") or 0,
                local=ip_address(local) if local else None,
                group=ip_address(group) if group and group not in ("0.0.0.0", "::") else None,
                port=data.get_attr("IFLA_VXLAN_PORT") or 0,
                learning=bool(data.get_attr("IFLA_VXLAN_LEARNING")),
                gbp="IFLA_VXLAN_GBP" in names,
                l2miss=bool(data.get_attr("IFLA_VXLAN_L2MISS")),
            )
    return LinkInfo(
        name=m.get_attr("IFLA_IFNAME"),
        index=m["index"],
        kind=kind,
        mtu=m.get_attr("IFLA_MTU") or 0,
        mac=(m.get_attr("IFLA_ADDRESS") or "").lower(),
        up=bool(m["flags"] & IFF_UP),
        vxlan=vx,
    )


def _vxlan_incompat(
    link: LinkInfo, vni: int, dev_index: int, local: "Optional[IPv4Address | IPv6Address]", port: int, gbp: bool
) -> Optional[str]:
    """Return why ``link`` cannot be reused for the wanted vxlan attributes (Flannel's ``vxlanLinksIncompat``)."""
    if link.kind != "vxlan" or link.vxlan is None:
        return f"link type {link.kind or 'unknown'} != vxlan"
    x = link.vxlan
    if x.vni != vni:
        return f"vxlan id {x.vni} != {vni}"
    if x.link and dev_index and x.link != dev_index:
        return f"underlay dev index {x.link} != {dev_index}"
    if x.local and local and x.local != local:
        return f"local {x.local} != {local}"
    if x.group is not None:
        return f"group {x.group} != none"
    if x.l2miss:
        return "l2miss on != off"
    if x.port > 0 and port > 0 and x.port != port:
        return f"dstport {x.port} != {port}"
    if x.gbp != gbp:
        return f"gbp {'on' if x.gbp else 'off'} != {'on' if gbp else 'off'}"
    return None


def _route(m: Any) -> Route:
    dst = m.get_attr("RTA_DST")
    gw = m.get_attr("RTA_GATEWAY")
    oif = m.get_attr("RTA_OIF")
    src = m.get_attr("RTA_PREFSRC")
    table = m.get_attr("RTA_TABLE") or m["table"]
    any_addr = "::" if m["family"] == AF_INET6 else "0.0.0.0"
    return Route(dst=ip_network(f"{dst or any_addr}/{m['dst_len']}", strict=False),
                 gateway=ip_address(gw) if gw else None, oif=oif, onlink=bool(m["flags"] & RTNH_F_ONLINK),
                 table=table, type=m["type"], proto=m["proto"], scope=m["scope"],
                 prefsrc=ip_address(src) if src else None)


__all__ = [
    "AF_INET", "AF_INET6", "AddrInfo", "Fdb", "KernelError", "LinkInfo", "Neigh", "Netlink", "Route", "VxlanAttrs",
    "VXLAN_DEFAULT_PORT", "call_translated", "wireguard_socket",
]
