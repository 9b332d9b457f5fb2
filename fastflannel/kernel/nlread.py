# SPDX-License-Identifier: Apache-2.0
"""Link and address reads from raw rtnetlink answers, for ``Netlink.link_info`` / ``link_index`` / ``addr_list``.

Why not pyroute2 (docs/soak.md): every backend's reconcile reads its device and addresses every 10 s, and each
pyroute2 request builds and drops a few hundred Python objects (its request filters, an asyncio round), a few of
which outlive the call in CPython's caches. Those pin pymalloc pools: with nothing leaked, a udp daemon's RSS rose
1.9-2.1 MiB/h with its route check through pyroute2 and 0.3-0.5 without (side by side); decoded here with
``struct`` the reads leave nothing behind. pyroute2's own
decoder stays the reference the kernel test compares every field with (tests/kernel/test_netlink.py).

Pure functions of bytes, apart from ``dump_addrs`` (one dump on the batch socket, ``nlbatch.dump``).
"""
from __future__ import annotations

import socket
import struct
from ipaddress import ip_address, ip_interface
from typing import Any, Callable, Dict, Optional, Tuple

from fastflannel.kernel import nlbatch

RTM_GETLINK = 18
RTM_GETADDR = 22
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_LINKINFO = 1, 3, 4, 18
IFLA_INFO_KIND, IFLA_INFO_DATA = 1, 2
IFA_ADDRESS, IFA_FLAGS = 1, 8
IFF_UP = 0x1
# IFLA_VXLAN_* (linux/if_link.h): the ones VxlanAttrs holds
VX_ID, VX_GROUP, VX_LINK, VX_LOCAL, VX_LEARNING, VX_L2MISS, VX_PORT, VX_GROUP6, VX_LOCAL6, VX_GBP = (
    1, 2, 3, 4, 7, 13, 15, 16, 17, 23)

_IFINFOMSG = struct.Struct("=BxHiII")  # family, pad, type, index, flags, change
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
_U32 = struct.Struct("=I")


def _text(b: Optional[bytes]) -> str:
    return b.split(b"\0", 1)[0].decode(errors="replace") if b else ""


def _u32(at: Dict[int, bytes], kind: int) -> int:
    v = at.get(kind, b"")
    return _U32.unpack(v[:4])[0] if len(v) >= 4 else 0


def link_get_request(name: str) -> Tuple[int, int, bytes]:
    """``ip link show <name>``: answered by one RTM_NEWLINK, or an NLMSG_ERROR with ENODEV."""
    return RTM_GETLINK, nlbatch.NLM_F_REQUEST, _IFINFOMSG.pack(0, 0, 0, 0, 0) + nlbatch._attr(
        IFLA_IFNAME, name.encode() + b"\0")


def addr_dump_request(family: int) -> Tuple[int, int, bytes]:
    return RTM_GETADDR, nlbatch.NLM_F_REQUEST | nlbatch.NLM_F_DUMP, _IFADDRMSG.pack(family, 0, 0, 0, 0)


def parse_link(payload: bytes) -> Optional[tuple]:
    """Return ``(index, flags, name, mtu, lladdr bytes|None, kind, info data|None)`` of an RTM_NEWLINK payload; the
    last is ``{IFLA_<KIND>_*: bytes}`` of IFLA_INFO_DATA (the vxlan attributes, for a vxlan link)."""
    if len(payload) < _IFINFOMSG.size:
        return None
    _family, _type, index, flags, _change = _IFINFOMSG.unpack_from(payload, 0)
    at = nlbatch.attrs(payload, _IFINFOMSG.size)
    kind, data = "", None
    if IFLA_LINKINFO in at:
        info = nlbatch.attrs(at[IFLA_LINKINFO])
        kind = _text(info.get(IFLA_INFO_KIND))
        if IFLA_INFO_DATA in info:
            data = nlbatch.attrs(info[IFLA_INFO_DATA])
    return index, flags, _text(at.get(IFLA_IFNAME)), _u32(at, IFLA_MTU), at.get(IFLA_ADDRESS), kind, data


def link_info(p: Optional[tuple], make: Callable[..., Any], make_vxlan: Callable[..., Any]) -> Any:
    """``make(name=, index=, kind=, mtu=, mac=, up=, vxlan=)`` (``netlink.LinkInfo``) of ``parse_link``'s tuple,
    ``vxlan`` built by ``make_vxlan`` (``netlink.VxlanAttrs``) for a vxlan link; None for None."""
    if p is None:
        return None
    index, flags, name, mtu, lladdr, kind, data = p
    vx = None
    if kind == "vxlan" and data is not None:
        def addr(k4: int, k6: int):
            v = data.get(k4) or data.get(k6)
            return ip_address(v) if v and len(v) in (4, 16) else None

        group, port = addr(VX_GROUP, VX_GROUP6), data.get(VX_PORT, b"")
        vx = make_vxlan(vni=_u32(data, VX_ID), link=_u32(data, VX_LINK), local=addr(VX_LOCAL, VX_LOCAL6),
                        group=group if group is not None and not group.is_unspecified else None,
                        port=int.from_bytes(port[:2], "big") if len(port) >= 2 else 0,  # __be16
                        learning=data.get(VX_LEARNING, b"\0")[:1] != b"\0", gbp=VX_GBP in data,
                        l2miss=data.get(VX_L2MISS, b"\0")[:1] != b"\0")
    return make(name=name, index=index, kind=kind, mtu=mtu, mac=":".join(f"{x:02x}" for x in lladdr) if lladdr else "",
                up=bool(flags & IFF_UP), vxlan=vx)


def parse_addr(payload: bytes) -> Optional[tuple]:
    """Return ``(family, prefixlen, flags, scope, index, address bytes|None)`` of an RTM_NEWADDR payload (flags:
    IFA_FLAGS when present, else the header's 8 bits)."""
    if len(payload) < _IFADDRMSG.size:
        return None
    family, prefixlen, flags, scope, index = _IFADDRMSG.unpack_from(payload, 0)
    at = nlbatch.attrs(payload, _IFADDRMSG.size)
    if len(at.get(IFA_FLAGS, b"")) >= 4:
        flags = _u32(at, IFA_FLAGS)
    return family, prefixlen, flags, scope, index, at.get(IFA_ADDRESS)


def dump_addrs(sock: socket.socket, seqs: "nlbatch.SeqCounter", make: Callable[..., Any], family: int,
               index: Optional[int] = None) -> list:
    """Dump the addresses of ``family`` (of ``index`` only, if set) as ``make(index=, address=, scope=, flags=)``
    (``netlink.AddrInfo``)."""
    out = []
    for _t, payload in nlbatch.dump(sock, addr_dump_request(family), seqs):
        a = parse_addr(payload)
        if a is None or a[0] != family or (index is not None and a[4] != index) or not a[5]:
            continue
        _fam, plen, flags, scope, idx, addr = a
        out.append(make(index=idx, address=ip_interface(f"{ip_address(addr)}/{plen}"), scope=scope, flags=flags))
    return out
