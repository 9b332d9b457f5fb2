# SPDX-License-Identifier: Apache-2.0
"""Per-peer IPv4 routes through nexthop objects: the same routes, programmed in linear rather than quadratic time.

Why (measured here, kernel 6.18, ``ip -batch`` and ``tests/kernel/test_nexthop.py``): the kernel shares one
``fib_info`` between IPv4 routes with the same next hop, and to find a match it hashes a new route's protocol,
scope, metric, source and *output device* - not its gateway. Flannel's per-peer routes (host-gw ``<subnet> via
<PublicIP> dev eth0``, vxlan ``<subnet> via <subnet>.0 dev flannel.1 onlink``) all share protocol, scope and device,
so every one lands in the same hash bucket and each insert walks all the earlier ones: 1,000 such routes take
0.04 s of kernel time, 5,000 take 0.69 s, 10,000 about 2.3 s. A route that names a nexthop object (``ip route
replace <subnet> nhid N``, kernel 5.3+) hashes by the object's id instead, so 5,000 objects plus 5,000 routes
take 0.18 s. IPv6 routes have no shared ``fib_info`` and stay linear: they are left as they are.

What the kernel then holds: ``ip route`` shows ``100.96.7.0/24 nhid 2164557831 via 10.168.0.7 dev eth0`` - the
same destination, gateway, device and flags as Flannel's route plus the ``nhid``; route dumps keep carrying
RTA_GATEWAY/RTA_OIF (``net.ipv4.nexthop_compat_mode=1``, the default), so readers of the table (ours, iproute2's
JSON, monitoring) see Flannel's route. ``ip nexthop`` lists one object per peer.

Ids: a route's nexthop id is a pure function of its destination (``nexthop_id``), so the same peer gets the same
id after a restart and nothing has to be remembered or allocated: the prefix's bits behind a leading 1 (unique for
every prefix length up to /30), with the top bit set so that ids stay clear of the low ids routing daemons such as
FRR's zebra allocate. Deleting a peer deletes its object, which removes every route using it, and then the plain
route of the same destination (one left by Flannel, or by fastflannel without nexthop objects), so a switch in
either direction leaves nothing behind. A plain route is replaced by the nexthop form on the first replace.

When it is used (``choose``, once per ``Netlink``, logged as ``event=route_programming``): the kernel answers a
nexthop dump, ``nexthop_compat_mode`` is not 0 (with 0, dumps would lose the gateway our reconcile compares), and
``FASTFLANNEL_NEXTHOP_OBJECTS`` is not ``0`` (the operator's way back to plain routes). Otherwise batches send the
plain routes, as before; where the kernel has objects, a delete still removes the destination's object too.

Pure functions of bytes apart from ``choose``; ``nlbatch.run_ops`` calls the chosen expansion for each op.
"""
from __future__ import annotations

import errno as _errno
import os
import struct
from ipaddress import IPv4Network
from typing import Callable, List, Optional, Sequence, Tuple

from fastflannel.errors import KernelError
from fastflannel.kernel import nlbatch

RTM_NEWNEXTHOP, RTM_DELNEXTHOP, RTM_GETNEXTHOP = 104, 105, 106
NHA_ID, NHA_OIF, NHA_GATEWAY = 1, 5, 6
RTA_NH_ID = 30
ID_BIT = 0x80000000
MAX_PREFIXLEN = 30  # (1 << 30) | 30 bits of prefix < 2**31: the heap index stays below ID_BIT
ENV = "FASTFLANNEL_NEXTHOP_OBJECTS"
COMPAT_MODE = "/proc/sys/net/ipv4/nexthop_compat_mode"

_NHMSG = struct.Struct("=BBBBI")  # family, scope, protocol, reserved, flags
_DEL_IGNORED = (_errno.ENOENT, _errno.ESRCH)
_UNSUPPORTED = (_errno.EOPNOTSUPP, _errno.EINVAL, _errno.EPROTONOSUPPORT, _errno.ENOENT)  # a kernel before 5.3

Request = Tuple[int, int, bytes]


def nexthop_id(dst) -> Optional[int]:
    """The nexthop id of the per-peer route to ``dst`` (an IPv4 network up to /30), or None (IPv6, longer prefixes:
    those stay plain routes). Distinct destinations get distinct ids."""
    if not isinstance(dst, IPv4Network) or dst.prefixlen > MAX_PREFIXLEN:
        return None
    p = dst.prefixlen
    return ID_BIT | (1 << p) | (int(dst.network_address) >> (32 - p))


def nexthop_replace(nh_id: int, gateway, oif: int, onlink: bool) -> Request:
    """``ip nexthop replace id N via <gateway> dev <oif> [onlink]``."""
    body = _NHMSG.pack(nlbatch.AF_INET, 0, nlbatch.RTPROT_BOOT, 0, nlbatch.RTNH_F_ONLINK if onlink else 0)
    body += nlbatch._attr(NHA_ID, nlbatch._U32.pack(nh_id)) + nlbatch._attr(NHA_OIF, nlbatch._U32.pack(oif))
    body += nlbatch._attr(NHA_GATEWAY, gateway.packed)
    return RTM_NEWNEXTHOP, nlbatch._REPLACE, body


def nexthop_del(nh_id: int) -> Request:
    """``ip nexthop del id N`` (the kernel also deletes every route using it)."""
    return RTM_DELNEXTHOP, nlbatch._DELETE, _NHMSG.pack(0, 0, 0, 0, 0) + nlbatch._attr(NHA_ID, nlbatch._U32.pack(nh_id))


def route_via_nexthop(dst: IPv4Network, nh_id: int, table: int) -> Request:
    """``ip route replace <dst> nhid N [table T]``."""
    body = nlbatch._RTMSG.pack(nlbatch.AF_INET, dst.prefixlen, 0, 0, table if table < 256 else 0, nlbatch.RTPROT_BOOT,
                               nlbatch.RT_SCOPE_UNIVERSE, nlbatch.RTN_UNICAST, 0)
    body += nlbatch._attr(nlbatch.RTA_DST, dst.network_address.packed)
    if table >= 256:
        body += nlbatch._attr(nlbatch.RTA_TABLE, nlbatch._U32.pack(table))
    return nlbatch.RTM_NEWROUTE, nlbatch._REPLACE, body + nlbatch._attr(RTA_NH_ID, nlbatch._U32.pack(nh_id))


def expand(op: "nlbatch.Op") -> List[Tuple[Request, Sequence[int]]]:
    """The requests that carry out ``op`` with nexthop objects, each with the errnos that are not errors. An IPv4
    gateway route replace becomes the object then the route naming it; its delete becomes the object's delete then
    the plain route's; every other op is its plain request (``nlbatch.plain``)."""
    if op.verb == "route_replace" and len(op.args) == 5:  # one with its own scope stays a plain route
        dst, gateway, oif, onlink, table = op.args
        net = nlbatch._net(dst)
        nh_id = nexthop_id(net)
        if nh_id is not None and gateway is not None and oif is not None:
            gw = nlbatch._ip(gateway)
            if gw.version == 4:
                return [(nexthop_replace(nh_id, gw, oif, onlink), ()), (route_via_nexthop(net, nh_id, table), ())]
    elif op.verb == "route_del":
        nh_id = nexthop_id(nlbatch._net(op.args[0]))
        if nh_id is not None:
            return [(nexthop_del(nh_id), _DEL_IGNORED)] + nlbatch.plain(op)
    return nlbatch.plain(op)


def expand_deletes(op: "nlbatch.Op") -> List[Tuple[Request, Sequence[int]]]:
    """Plain routes, but a route delete also deletes the destination's nexthop object: with objects switched off
    (``FASTFLANNEL_NEXTHOP_OBJECTS=0``) the routes an earlier run made through them still go with their peer (the
    kernel never matches a delete naming a gateway against a route through an object)."""
    return expand(op) if op.verb == "route_del" else nlbatch.plain(op)


def choose(channel: "nlbatch.Channel") -> Tuple[Callable[["nlbatch.Op"], list], str]:
    """The expansion for batches on ``channel`` (``expand``, ``expand_deletes`` or ``nlbatch.plain``) and why, for
    the log line (see the module's notes)."""
    try:
        channel.dump("nexthop dump", lambda s, q: nlbatch.dump(s, (RTM_GETNEXTHOP, nlbatch.NLM_F_REQUEST |
                                                                   nlbatch.NLM_F_DUMP, _NHMSG.pack(0, 0, 0, 0, 0)), q))
    except KernelError as e:
        if e.errno not in _UNSUPPORTED:  # the socket failed: the caller's batch would fail alike; ask again later
            raise
        return nlbatch.plain, f"plain routes: the kernel has no nexthop objects ({e})"
    if os.environ.get(ENV, "").strip() == "0":
        return expand_deletes, f"plain routes: {ENV}=0"
    if channel.netns is None:  # the sysctl is per namespace; /proc/sys shows the daemon's own
        try:
            with open(COMPAT_MODE) as f:
                if f.read().strip() == "0":
                    return expand_deletes, "plain routes: net.ipv4.nexthop_compat_mode=0 (dumps would hide gateways)"
        except OSError:
            pass  # kernels 5.3-5.7 have nexthop objects but not the switch: they behave as mode 1
    return expand, "nexthop objects"
