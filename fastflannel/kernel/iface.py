# SPDX-License-Identifier: Apache-2.0
"""The external interface: which host interface and address carry the overlay (flannel ``ExternalInterface``)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import Any, List, Optional, Sequence, Tuple


@dataclass(frozen=True)
class ExternalInterface:
    """The chosen interface. ``iface_addr`` is the interface's own IPv4; ``ext_addr`` is what the lease
    advertises as PublicIP (``--public-ip`` or ``iface_addr``). With EnableIPv6, ``iface_addr6`` is the
    interface's own IPv6 and ``ext_addr6`` the lease's PublicIPv6 (``--public-ipv6`` or ``iface_addr6``);
    both None for an IPv4-only network."""

    name: str
    index: int
    iface_addr: IPv4Address
    ext_addr: IPv4Address
    mtu: int
    iface_addr6: Optional[IPv6Address] = None
    ext_addr6: Optional[IPv6Address] = None


# -- interface selection (flannel-compat.md section 9; flannel pkg/ipmatch/match.go) -----------------
IFA_F_SECONDARY = 0x01  # also IFA_F_TEMPORARY
IFA_F_DEPRECATED = 0x20
IFA_F_PERMANENT = 0x80
RT_SCOPE_LINK = 253


class InterfaceError(ValueError):
    """No usable external interface; the message is one line that says what to do."""


def select_interface(
    ifaces: "Sequence[str]",
    iface_regexes: "Sequence[str]",
    public_ip: "Optional[str | IPv4Address]",
    netlink: Any,
    can_reach: "Optional[str | IPv4Address]" = None,
    public_ipv6: "Optional[str | IPv6Address]" = None,
    ipv6: bool = False,
) -> ExternalInterface:
    """Pick the external interface and address the way flanneld does.

    ``--iface`` (name or IP, first match wins), else ``--iface-regex`` (each regex tried against every IPv4
    address first, then against interface names), then ``--iface-can-reach`` (the interface and source address of
    the kernel's route to that IP, ``ip route get`` through netlink; also tried when the --iface or --iface-regex
    values match nothing, as flanneld does), else with ``--public-ip`` the interface owning that IP, else the
    interface of the first default route. ``ext_addr`` is ``public_ip`` or the interface address.

    ``ipv6`` (EnableIPv6, dual stack): the same interface must also have an IPv6 address (chosen with the same
    preferences: global > link-local, permanent, non-temporary), else "failed to find IPv6 address for
    interface X" as in Flannel; ``--public-ipv6`` overrides what the lease advertises. With neither --iface nor
    --iface-regex, an IPv6 default route on another interface than the IPv4 one is an error (Flannel's rule);
    unlike Flannel, no IPv6 default route at all is fine (the IPv4 default route's interface is used).
    Raises ``InterfaceError``; blocks on netlink reads only."""
    links = {li.index: li for li in netlink.links()}
    addrs = netlink.addr_list()
    pub = IPv4Address(public_ip) if public_ip else None
    names = ", ".join(li.name for li in links.values())

    def addrs_of(index: int) -> "List[Any]":
        return [a for a in addrs if a.index == index]

    def by_ip(ip: IPv4Address) -> "Optional[Tuple[Any, IPv4Address]]":
        for a in addrs:
            if a.address.ip == ip and a.index in links:
                return links[a.index], ip
        return None

    def by_name(name: str) -> "Optional[Tuple[Any, IPv4Address]]":
        for li in links.values():
            if li.name == name:
                ip = _preferred_addr(addrs_of(li.index))
                if ip is None:
                    raise InterfaceError(
                        f"interface {name} has no usable IPv4 address (global unicast or link-local); "
                        f"add one or pick another with --iface"
                    )
                return li, ip
        return None

    chosen: "Optional[Tuple[Any, IPv4Address]]" = None
    if ifaces:
        for spec in ifaces:
            try:
                chosen = by_ip(IPv4Address(spec))
            except ValueError:
                chosen = by_name(spec)
            if chosen is not None:
                break
        if chosen is None and not can_reach:
            flags = " ".join(f"--iface={s}" for s in ifaces)
            raise InterfaceError(f"no interface matches {flags}; available: {names}")
    elif iface_regexes:
        for rx_text in iface_regexes:
            try:
                rx = re.compile(rx_text)
            except re.error as e:
                raise InterfaceError(f"--iface-regex={rx_text} is not a valid regular expression: {e}") from None
            for a in addrs:
                if a.index in links and _usable(a) and rx.search(str(a.address.ip)):
                    chosen = links[a.index], a.address.ip
                    break
            if chosen is None:
                for li in links.values():
                    if rx.search(li.name):
                        ip = _preferred_addr(addrs_of(li.index))
                        if ip is not None:
                            chosen = li, ip
                            break
            if chosen is not None:
                break
        if chosen is None and not can_reach:
            flags = " ".join(f"--iface-regex={s}" for s in iface_regexes)
            raise InterfaceError(f"no interface address or name matches {flags}; available: {names}")
    elif can_reach:
        pass  # below
    elif pub is not None:
        chosen = by_ip(pub)
        if chosen is None:
            raise InterfaceError(
                f"no interface owns --public-ip={pub}; if it is a NAT address, also pass --iface=<name> "
                f"(available: {names})"
            )
    else:
        for r in netlink.routes():
            if r.dst.prefixlen == 0 and r.oif is not None and r.oif in links:
                chosen = by_name(links[r.oif].name)
                break
        if chosen is None:
            raise InterfaceError(f"no default route to pick the interface from; pass --iface=<name> (available: {names})")

    if chosen is None and can_reach:
        chosen = _by_route(IPv4Address(str(can_reach)), links, addrs_of, netlink)
    assert chosen is not None
    li, ip = chosen
    if not li.mtu:
        raise InterfaceError(f"interface {li.name} reports MTU 0; pick another with --iface")
    ip6 = pub6 = None
    if ipv6:
        ip6, pub6 = _select_v6(li, links, public_ipv6, netlink, default_route=not (ifaces or iface_regexes or can_reach))
    return ExternalInterface(name=li.name, index=li.index, iface_addr=ip, ext_addr=pub or ip, mtu=li.mtu,
                             iface_addr6=ip6, ext_addr6=pub6)


def _select_v6(li: Any, links: "dict", public_ipv6: "Optional[str | IPv6Address]", netlink: Any,
               default_route: bool) -> "Tuple[IPv6Address, IPv6Address]":
    """Return (interface IPv6, PublicIPv6) for the chosen interface ``li`` (see ``select_interface``)."""
    from fastflannel.kernel.netlink import AF_INET6

    try:
        pub6 = IPv6Address(public_ipv6) if public_ipv6 else None
    except ValueError:
        raise InterfaceError(f"invalid public IPv6 address: {public_ipv6} (--public-ipv6 / FLANNELD_PUBLIC_IPV6)") from None
    if default_route:
        for r in netlink.routes(family=AF_INET6):
            if r.dst.prefixlen == 0 and r.oif is not None and r.oif in links and r.oif != li.index:
                raise InterfaceError(
                    f"v6 default route interface {links[r.oif].name} must be the same with v4 default route "
                    f"interface {li.name}; pass --iface=<name>"
                )
    ip6 = _preferred_addr([a for a in netlink.addr_list(family=AF_INET6) if a.index == li.index])
    if ip6 is None:
        raise InterfaceError(
            f"failed to find IPv6 address for interface {li.name} (EnableIPv6 is true in the network config); "
            f"add a global IPv6 address to {li.name} or pick another interface with --iface"
        )
    return ip6, pub6 or ip6


def _by_route(target: IPv4Address, links: Any, addrs_of: Any, netlink: Any) -> "Tuple[Any, IPv4Address]":
    """--iface-can-reach: the route's output interface, and its preferred source (else the interface's address)."""
    from fastflannel.errors import KernelError

    try:
        route = netlink.route_get(target)
    except KernelError as e:
        raise InterfaceError(f"--iface-can-reach={target}: no route to it ({e.reason}); add one or use --iface") from None
    if route.oif is None or route.oif not in links:
        raise InterfaceError(f"--iface-can-reach={target}: the route to it has no output interface; use --iface")
    li = links[route.oif]
    ip = route.prefsrc or _preferred_addr(addrs_of(li.index))
    if ip is None:
        raise InterfaceError(f"--iface-can-reach={target}: interface {li.name} (the route to it) has no usable IPv4 "
                             f"address; use --iface")
    return li, ip


def _usable(a: Any) -> bool:
    ip = a.address.ip
    ok = ip.is_link_local or not (ip.is_loopback or ip.is_multicast or ip.is_unspecified or ip == _BCAST)
    return ok and not (a.flags & IFA_F_DEPRECATED)


_BCAST = IPv4Address("255.255.255.255")


def _preferred_addr(addrs: "List[Any]") -> Optional[IPv4Address]:
    """Return the first usable address, preferring global > link-local, permanent > dynamic, primary > temporary."""
    cands = [a for a in addrs if _usable(a)]
    cands.sort(key=lambda a: (
        a.address.ip.is_link_local,
        not (a.flags & IFA_F_PERMANENT),
        bool(a.flags & IFA_F_SECONDARY),
    ))  # stable: kernel order breaks ties
    return cands[0].address.ip if cands else None
