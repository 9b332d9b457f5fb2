# SPDX-License-Identifier: Apache-2.0
"""Pipelined rtnetlink: many requests in flight on one socket, ACKs matched back by sequence number.

Why: ``Netlink``'s verbs send one request through pyroute2 and wait for its ACK (about 3 ms of daemon CPU per
request here); a vxlan host with 5,000 peers needs 15,000 of them after every restart. This module packs the
per-peer requests (route, neighbour, FDB replace/delete) and the three table dumps itself: a request is a 12-byte
header plus two to four attributes, so ``struct`` packs one in a few microseconds where pyroute2's generic
message classes take ~100 us (measured in the commit that added this file). It imports nothing outside the
standard library and never touches pyroute2: ``netlink.py`` stays its only importer and owns the socket.

How a batch runs (``transact``): up to ``WINDOW`` requests are concatenated into one datagram, each with its own
sequence number and NLM_F_ACK. The kernel processes every message of a datagram in order inside ``send()`` and
queues one NLMSG_ERROR per message (error 0 = success), also after a failed one, so one bad request fails only
itself. ``match_acks`` maps every ACK back to its request by sequence number; an ACK never seen (a receive buffer
overrun) becomes ``ENOBUFS`` for its request, never success. NETLINK_CAP_ACK keeps error ACKs small and
NETLINK_EXT_ACK adds the kernel's own text ("Nexthop has invalid gateway"), which goes into the error message.

What one op sends is its "expansion" (``plain``: one request; ``kernel/nexthop.py``: a per-peer IPv4 route as a
nexthop object plus the route naming it), chosen once per ``Netlink``.

Everything but the socket I/O is a pure function of bytes (tests/unit/test_nlbatch_messages.py); the kernel's side
(an error in the middle of a batch) is tested in a namespace (tests/kernel/test_nlbatch.py).
"""
from __future__ import annotations

import collections
import errno as _errno
import os
import select
import socket
import struct
import time
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from fastflannel.errors import KernelError
from fastflannel.kernel.linkevents import event_socket

AF_INET = 2
AF_INET6 = 10
AF_BRIDGE = 7

NLMSG_ERROR = 2
NLMSG_DONE = 3
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
RTM_NEWNEIGH, RTM_DELNEIGH, RTM_GETNEIGH = 28, 29, 30

NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_DUMP_INTR = 0x10
NLM_F_DUMP = 0x300
NLM_F_REPLACE = 0x100
NLM_F_CREATE = 0x400
NLM_F_ACK_TLVS = 0x200  # in an NLMSG_ERROR: extended-ACK attributes follow

SOL_NETLINK = 270
NETLINK_CAP_ACK = 10
NETLINK_EXT_ACK = 11
NLMSGERR_ATTR_MSG = 1

RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_PREFSRC, RTA_TABLE = 1, 4, 5, 7, 15
NDA_DST, NDA_LLADDR = 1, 2
RT_SCOPE_UNIVERSE, RT_SCOPE_LINK, RT_SCOPE_NOWHERE = 0, 253, 255
RTN_UNICAST = 1
RTPROT_BOOT = 3
RTNH_F_ONLINK = 4
RT_TABLE_MAIN = 254
NUD_PERMANENT = 0x80
NTF_SELF = 0x02

WINDOW = 256  # requests per datagram: their ACKs (~1 KiB of receive buffer each, truesize) fit RCVBUF_BYTES
RCVBUF_BYTES = 4 << 20
RECV_BYTES = 1 << 18
TIMEOUT_S = 10.0  # a generous bound: the kernel answers a datagram within its send() call

_HDR = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid
_ERR = struct.Struct("=i")  # nlmsgerr.error (then the echoed request header)
_RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, protocol, scope, type, flags
_NDMSG = struct.Struct("=BxxxiHBB")  # family, pad, ifindex, state, flags, type
_ATTR = struct.Struct("=HH")
_U32 = struct.Struct("=I")
_REPLACE = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE
_DELETE = NLM_F_REQUEST | NLM_F_ACK


@dataclass(frozen=True)
class Op:
    """One request of a batch: ``verb`` is the name of the ``Netlink`` method it stands for, with that method's
    positional ``args`` (so a batch means exactly what calling the verbs one by one means; see
    ``apply_serially``). Build ops with the helpers below."""

    verb: str
    args: Tuple[Any, ...]


def route_replace(dst, gateway=None, oif: Optional[int] = None, onlink: bool = False,
                  table: int = RT_TABLE_MAIN, scope: Optional[int] = None) -> Op:
    """``scope`` None: link for a device route, universe via a gateway (what ``ip route`` picks)."""
    return Op("route_replace", (dst, gateway, oif, onlink, table) + ((scope,) if scope is not None else ()))


def route_del(dst, gateway=None, oif: Optional[int] = None, table: int = RT_TABLE_MAIN) -> Op:
    return Op("route_del", (dst, gateway, oif, table))


def neigh_replace(ifindex: int, ip, mac: str) -> Op:
    return Op("neigh_replace", (ifindex, ip, mac))


def neigh_del(ifindex: int, ip) -> Op:
    return Op("neigh_del", (ifindex, ip))


def fdb_replace(ifindex: int, mac: str, dst) -> Op:
    return Op("fdb_replace", (ifindex, mac, dst))


def fdb_del(ifindex: int, mac: str, dst=None) -> Op:
    return Op("fdb_del", (ifindex, mac, dst))


# deletes of something already gone are not errors (as the single verbs: they return False)
IGNORED_ERRNOS = {"route_del": (_errno.ESRCH, _errno.ENOENT), "neigh_del": (_errno.ENOENT, _errno.ESRCH),
                  "fdb_del": (_errno.ENOENT, _errno.ESRCH)}


def apply_serially(target: Any, ops: Sequence[Op], errors: tuple = (Exception,)) -> List[Optional[BaseException]]:
    """Run ``ops`` as single verb calls on ``target`` (a test fake, or a fallback); return one error or None per op."""
    out: List[Optional[BaseException]] = []
    for op in ops:
        try:
            getattr(target, op.verb)(*op.args)
            out.append(None)
        except errors as e:
            out.append(e)
    return out


# -- encoding (pure) ---------------------------------------------------------------------------------------
def _attr(kind: int, payload: bytes) -> bytes:
    n = _ATTR.size + len(payload)
    return _ATTR.pack(n, kind) + payload + b"\0" * (-n & 3)


def _mac(mac: str) -> bytes:
    b = bytes.fromhex(mac.replace(":", ""))
    if len(b) != 6:
        raise ValueError(f"{mac!r} is not a MAC address")
    return b


def _net(x):
    return x if isinstance(x, (IPv4Network, IPv6Network)) else ip_network(x)


def _ip(x):
    return x if isinstance(x, (IPv4Address, IPv6Address)) else ip_address(x)


def _family(addr) -> int:
    return AF_INET6 if addr.version == 6 else AF_INET


def encode(op: Op) -> Tuple[int, int, bytes]:
    """Return ``(message type, flags, body)`` for ``op``: what ``iproute2``/pyroute2 would send for that verb."""
    a = op.args
    if op.verb in ("route_replace", "route_del"):
        scope = None
        if op.verb == "route_replace":
            dst, gateway, oif, onlink, table = a[:5]
            scope = a[5] if len(a) > 5 else None
        else:
            (dst, gateway, oif, table), onlink = a, False
        net = _net(dst)
        new = op.verb == "route_replace"
        gw = _ip(gateway) if gateway is not None else None
        if scope is None:
            scope = (RT_SCOPE_UNIVERSE if gw is not None else RT_SCOPE_LINK) if new else RT_SCOPE_NOWHERE
        body = _RTMSG.pack(_family(net), net.prefixlen, 0, 0, table if table < 256 else 0,
                           RTPROT_BOOT if new else 0, scope, RTN_UNICAST if new else 0,
                           RTNH_F_ONLINK if onlink else 0)
        body += _attr(RTA_DST, net.network_address.packed)
        if table >= 256:
            body += _attr(RTA_TABLE, _U32.pack(table))
        if gw is not None:
            body += _attr(RTA_GATEWAY, gw.packed)
        if oif is not None:
            body += _attr(RTA_OIF, _U32.pack(oif))
        return (RTM_NEWROUTE, _REPLACE, body) if new else (RTM_DELROUTE, _DELETE, body)
    if op.verb in ("neigh_replace", "neigh_del"):
        ifindex, ip = a[0], _ip(a[1])
        new = op.verb == "neigh_replace"
        body = _NDMSG.pack(_family(ip), ifindex, NUD_PERMANENT if new else 0, 0, 0) + _attr(NDA_DST, ip.packed)
        if new:
            body += _attr(NDA_LLADDR, _mac(a[2]))
            return RTM_NEWNEIGH, _REPLACE, body
        return RTM_DELNEIGH, _DELETE, body
    if op.verb in ("fdb_replace", "fdb_del"):
        ifindex, mac, dst = a
        body = _NDMSG.pack(AF_BRIDGE, ifindex, NUD_PERMANENT, NTF_SELF, 0) + _attr(NDA_LLADDR, _mac(mac))
        if dst is not None:
            body += _attr(NDA_DST, _ip(dst).packed)
        return (RTM_NEWNEIGH, _REPLACE, body) if op.verb == "fdb_replace" else (RTM_DELNEIGH, _DELETE, body)
    raise ValueError(f"no batch encoding for {op.verb!r}")


def plain(op: Op) -> List[Tuple[Tuple[int, int, bytes], Sequence[int]]]:
    """``op``'s one request, with the errnos that are not errors (the default expansion of ``run_ops``)."""
    return [(encode(op), IGNORED_ERRNOS.get(op.verb, ()))]


def frame(mtype: int, flags: int, seq: int, body: bytes) -> bytes:
    return _HDR.pack(_HDR.size + len(body), mtype, flags, seq, 0) + body


# -- decoding (pure) ---------------------------------------------------------------------------------------
def messages(data: bytes) -> Iterator[Tuple[int, int, int, bytes]]:
    """Yield ``(type, flags, seq, payload)`` for every netlink message in one datagram (stops at a bad length)."""
    off, n = 0, len(data)
    while off + _HDR.size <= n:
        length, mtype, flags, seq, _pid = _HDR.unpack_from(data, off)
        if length < _HDR.size or off + length > n:
            return
        yield mtype, flags, seq, data[off + _HDR.size:off + length]
        off += (length + 3) & ~3


def attrs(data: bytes, off: int = 0) -> Dict[int, bytes]:
    """Return ``{type: payload}`` of the rtattrs in ``data[off:]`` (nested flag bits masked off)."""
    out: Dict[int, bytes] = {}
    n = len(data)
    while off + 4 <= n:
        alen, kind = _ATTR.unpack_from(data, off)
        if alen < 4 or off + alen > n:
            break
        out[kind & 0x3FFF] = data[off + 4:off + alen]
        off += (alen + 3) & ~3
    return out


def parse_ack(flags: int, payload: bytes) -> Tuple[int, str]:
    """Return ``(errno, kernel text)`` of an NLMSG_ERROR payload: 0 is success; the text is the extended ACK's
    message, if the kernel sent one."""
    if len(payload) < _ERR.size:
        return _errno.EIO, "truncated ACK"
    (err,) = _ERR.unpack_from(payload, 0)
    text = ""
    if flags & NLM_F_ACK_TLVS and len(payload) >= _ERR.size + _HDR.size:
        echoed_len = _HDR.unpack_from(payload, _ERR.size)[0]
        # with NETLINK_CAP_ACK (NLM_F_CAPPED) only the request's header is echoed, otherwise the whole request
        tlv_off = _ERR.size + (_HDR.size if flags & 0x100 else max(_HDR.size, (echoed_len + 3) & ~3))
        msg = attrs(payload, tlv_off).get(NLMSGERR_ATTR_MSG)
        if msg:
            text = msg.split(b"\0", 1)[0].decode(errors="replace")
    return -err, text


def match_acks(pending: Dict[int, int], data: bytes, results: List[Optional[Tuple[int, str]]]) -> None:
    """Record in ``results[index]`` the ``(errno, text)`` of every ACK in ``data`` whose sequence number is in
    ``pending`` (seq -> index of the request) and drop it from ``pending``. Other messages are ignored."""
    for mtype, flags, seq, payload in messages(data):
        if mtype == NLMSG_ERROR:
            idx = pending.pop(seq, None)
            if idx is not None:
                results[idx] = parse_ack(flags, payload)


def parse_route(payload: bytes) -> Optional[tuple]:
    """Return ``(family, dst bytes, dst_len, gateway bytes|None, oif|None, flags, table, type, proto, scope,
    prefsrc bytes|None)`` of an RTM_NEWROUTE payload."""
    if len(payload) < _RTMSG.size:
        return None
    family, dst_len, _s, _t, table, proto, scope, rtype, flags = _RTMSG.unpack_from(payload, 0)
    at = attrs(payload, _RTMSG.size)
    if RTA_TABLE in at:
        table = _U32.unpack(at[RTA_TABLE][:4])[0]
    oif = at.get(RTA_OIF)
    return (family, at.get(RTA_DST), dst_len, at.get(RTA_GATEWAY), _U32.unpack(oif[:4])[0] if oif else None,
            flags, table, rtype, proto, scope, at.get(RTA_PREFSRC))


def parse_neigh(payload: bytes) -> Optional[tuple]:
    """Return ``(family, ifindex, state, flags, dst bytes|None, lladdr bytes|None)`` of an RTM_NEWNEIGH payload."""
    if len(payload) < _NDMSG.size:
        return None
    family, ifindex, state, flags, _type = _NDMSG.unpack_from(payload, 0)
    at = attrs(payload, _NDMSG.size)
    return family, ifindex, state, flags, at.get(NDA_DST), at.get(NDA_LLADDR)


def route_get_request(ip) -> Tuple[int, int, bytes]:
    """``ip route get <ip>`` (no NLM_F_ACK: the answer is the route, or an NLMSG_ERROR)."""
    addr = _ip(ip)
    return RTM_GETROUTE, NLM_F_REQUEST, _RTMSG.pack(_family(addr), addr.max_prefixlen, 0, 0, 0, 0, 0, 0, 0) + _attr(
        RTA_DST, addr.packed)


def match_replies(pending: Dict[int, int], data: bytes, results: List[Optional[Tuple[int, Optional[bytes]]]]) -> None:
    """As ``match_acks`` for requests answered by a message (a get): ``(0, payload)`` for the answer, ``(errno,
    None)`` for an NLMSG_ERROR."""
    for mtype, flags, seq, payload in messages(data):
        idx = pending.pop(seq, None)
        if idx is None:
            continue
        results[idx] = (parse_ack(flags, payload)[0] or _errno.EIO, None) if mtype == NLMSG_ERROR else (0, payload)


def route_dump_request(family: int) -> Tuple[int, int, bytes]:
    return RTM_GETROUTE, NLM_F_REQUEST | NLM_F_DUMP, _RTMSG.pack(family, 0, 0, 0, 0, 0, 0, 0, 0)


def neigh_dump_request(family: int) -> Tuple[int, int, bytes]:
    return RTM_GETNEIGH, NLM_F_REQUEST | NLM_F_DUMP, _NDMSG.pack(family, 0, 0, 0, 0)


# -- the socket (I/O) ----------------------------------------------------------------------------------------
def configure(sock: socket.socket) -> None:
    """Make ``sock`` (a NETLINK_ROUTE socket) fit for batches: large receive buffer, small error ACKs with the
    kernel's message. Options an old kernel lacks are skipped."""
    for level, opt, val in ((socket.SOL_SOCKET, getattr(socket, "SO_RCVBUFFORCE", 33), RCVBUF_BYTES),
                            (socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF_BYTES),
                            (SOL_NETLINK, NETLINK_CAP_ACK, 1), (SOL_NETLINK, NETLINK_EXT_ACK, 1)):
        try:
            sock.setsockopt(level, opt, val)
        except OSError:
            pass


def _recv(sock: socket.socket, deadline: float) -> bytes:
    while True:
        try:
            return sock.recv(RECV_BYTES)
        except BlockingIOError:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("netlink: no answer from the kernel") from None
            select.select([sock], [], [], left)


def drain(sock: socket.socket) -> None:
    """Discard whatever is queued (answers to an earlier, abandoned batch)."""
    while True:
        try:
            sock.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            if e.errno != _errno.ENOBUFS:
                return


class SeqCounter:
    """Sequence numbers for one socket (never 0, wraps at 2**32)."""

    def __init__(self) -> None:
        self.value = int.from_bytes(os.urandom(2), "little") << 8

    def take(self, n: int) -> int:
        first = self.value
        self.value = (self.value + n) % 0xFFFFFF00 or 1
        return first


def transact(sock: socket.socket, requests: Sequence[Tuple[int, int, bytes]], seqs: SeqCounter,
             window: int = WINDOW, timeout: float = TIMEOUT_S, match: Callable[..., None] = match_acks) -> list:
    """Send ``requests`` pipelined, ``window`` per datagram; return ``(errno, text)`` per request (0 = done), or
    with ``match=match_replies`` ``(errno, answer payload)``."""
    results: List[Optional[tuple]] = [None] * len(requests)
    for start in range(0, len(requests), window):
        chunk = requests[start:start + window]
        first = seqs.take(len(chunk))
        pending: Dict[int, int] = {}
        parts = []
        for i, (mtype, flags, body) in enumerate(chunk):
            seq = (first + i) % 0xFFFFFF00 or 1
            pending[seq] = start + i
            parts.append(frame(mtype, flags, seq, body))
        sock.send(b"".join(parts))
        deadline = time.monotonic() + timeout
        while pending:
            try:
                data = _recv(sock, deadline)
            except OSError as e:
                if e.errno == _errno.ENOBUFS:  # ACKs were dropped: whatever is still pending is unknown
                    drain(sock)
                    break
                raise
            match(pending, data, results)
    lost = (_errno.ENOBUFS, "ACK lost (receive buffer overrun)" if match is match_acks else None)
    return [r if r is not None else lost for r in results]


def dump(sock: socket.socket, request: Tuple[int, int, bytes], seqs: SeqCounter,
         timeout: float = TIMEOUT_S) -> List[Tuple[int, bytes]]:
    """Run one dump; return ``(type, payload)`` of every answer. Raises OSError with the kernel's errno. A dump
    the kernel marks interrupted (the table changed meanwhile, NLM_F_DUMP_INTR) is repeated once."""
    for attempt in (1, 2):
        seq = seqs.take(1)
        sock.send(frame(request[0], request[1], seq, request[2]))
        deadline = time.monotonic() + timeout
        out: List[Tuple[int, bytes]] = []
        intr = False
        while True:
            for mtype, flags, mseq, payload in messages(_recv(sock, deadline)):
                if mseq != seq:
                    continue
                if mtype == NLMSG_DONE:
                    break
                if mtype == NLMSG_ERROR:
                    err, text = parse_ack(flags, payload)
                    if err:
                        raise OSError(err, text or os.strerror(err))
                    continue
                intr = intr or bool(flags & NLM_F_DUMP_INTR)
                out.append((mtype, payload))
            else:
                continue
            break
        if not intr or attempt == 2:
            return out
    return out  # pragma: no cover


class Channel:
    """The raw NETLINK_ROUTE command socket of one ``Netlink`` (in its namespace), opened on first use, closed by
    ``close()``. Not locked: ``Netlink`` serialises every call with its own lock."""

    def __init__(self, netns: Optional[str] = None) -> None:
        self.netns = netns
        self.seqs = SeqCounter()
        self._sock: Optional[socket.socket] = None
        self._closed = False

    def socket(self) -> socket.socket:
        if self._closed:
            raise KernelError("netlink batch", "netlink socket is closed")
        if self._sock is None:
            try:
                self._sock = event_socket(0, self.netns)  # groups 0: a command socket, no events queue up
            except OSError as e:  # e.g. the namespace is gone
                code = e.errno or 0
                raise KernelError(f"netlink socket (netns {self.netns or 'current'})",
                                  os.strerror(code) if code else str(e), code) from e
            configure(self._sock)
        return self._sock

    def batch(self, ops: Sequence[Op], name_of: Callable[[int], str], expand: Callable[[Op], list] = plain
              ) -> List[Optional[KernelError]]:
        return run_ops(self.socket(), self.seqs, ops, name_of, expand)

    def dump(self, what: str, fn: Callable[[socket.socket, SeqCounter], list]) -> list:
        """``fn(sock, seqs)`` (``dump_routes``/``dump_neighs``); an OSError becomes ``KernelError`` naming ``what``."""
        try:
            return fn(self.socket(), self.seqs)
        except OSError as e:
            code = e.errno or 0
            raise KernelError(what, os.strerror(code) if code else str(e), code) from e

    def get(self, what: str, request: Tuple[int, int, bytes], missing: Sequence[int] = ()) -> Optional[bytes]:
        """One get request (``nlread.link_get_request``): the answer's payload, None if the kernel answered an
        errno of ``missing``; any other failure is a ``KernelError`` naming ``what``."""
        try:
            ((err, payload),) = transact(self.socket(), [request], self.seqs, match=match_replies)
        except OSError as e:
            err, payload = e.errno or _errno.EIO, None
        if not err:
            return payload
        if err in missing:
            return None
        raise KernelError(what, os.strerror(err), err)

    def route_get_many(self, ips: Sequence[Any], make: Callable[..., Any]) -> list:
        """``route get`` for every address, pipelined: the route (``make(...)``, as ``dump_routes``) or None when
        the kernel has none (unreachable)."""
        try:
            answers = transact(self.socket(), [route_get_request(ip) for ip in ips], self.seqs, match=match_replies)
        except OSError as e:
            code = e.errno or 0
            raise KernelError(f"route get of {len(ips)} addresses", os.strerror(code) if code else str(e), code) from e
        return [_make_route(make, parse_route(payload)) if not err and payload else None for err, payload in answers]

    def close(self) -> None:
        self._closed = True
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()


def run_ops(sock: socket.socket, seqs: SeqCounter, ops: Sequence[Op], name_of: Callable[[int], str],
            expand: Callable[[Op], list] = plain) -> List[Optional[KernelError]]:
    """``Netlink.batch``: encode (``expand``: an op's requests, e.g. ``kernel/nexthop.py``'s two per route) and
    ``transact`` ``ops``; return one ``KernelError`` (naming the object the way the single verbs do, with the
    kernel's extended-ACK text; an op's first failed request) or None per op. Deletes of absent objects are not
    errors. Raises ``KernelError`` only if the socket itself fails (then nothing is known about the ops)."""
    out: List[Optional[KernelError]] = [None] * len(ops)

    def what(op: Op) -> str:
        idx = op_ifindex(op)
        return describe(op, name_of(idx) if idx is not None else "")

    reqs, where = [], []
    for i, op in enumerate(ops):
        try:
            parts = expand(op)
        except ValueError as e:
            out[i] = KernelError(what(op), str(e), _errno.EINVAL)
            continue
        for req, ignored in parts:
            reqs.append(req)
            where.append((i, ignored))
    if not reqs:
        return out
    try:
        results = transact(sock, reqs, seqs)
    except OSError as e:
        code = e.errno or 0
        raise KernelError(f"netlink batch of {len(reqs)} requests ({summary(ops)})",
                          os.strerror(code) if code else str(e), code) from e
    for (i, ignored), (code, text) in zip(where, results):
        if code and code not in ignored and out[i] is None:
            out[i] = KernelError(what(ops[i]), os.strerror(code) + (f" ({text})" if text else ""), code)
    return out


def dump_routes(sock: socket.socket, seqs: SeqCounter, make: Callable[..., Any], family: int, table: int,
                oif: Optional[int] = None) -> list:
    """Dump the routes of ``family`` in ``table`` (only via ``oif`` if set) as ``make(dst=..., gateway=..., ...)``
    (``netlink.Route``)."""
    out = []
    for _t, payload in dump(sock, route_dump_request(family), seqs):
        r = parse_route(payload)
        if r is None or r[0] != family or r[6] != table or (oif is not None and r[4] != oif):
            continue
        out.append(_make_route(make, r))
    return out


def _make_route(make: Callable[..., Any], r: Optional[tuple]) -> Any:
    if r is None:
        return None
    fam, dst, dst_len, gw, r_oif, flags, r_table, rtype, proto, scope, src = r
    dst_net = (IPv4Network if fam == AF_INET else IPv6Network)((int.from_bytes(dst, "big") if dst else 0, dst_len))
    return make(dst=dst_net, gateway=ip_address(gw) if gw else None, oif=r_oif, onlink=bool(flags & RTNH_F_ONLINK),
                table=r_table, type=rtype, proto=proto, scope=scope, prefsrc=ip_address(src) if src else None)


def dump_neighs(sock: socket.socket, seqs: SeqCounter, make: Callable[..., Any], family: int, ifindex: int) -> list:
    """Dump the neighbours (``family`` AF_INET/AF_INET6: ``make(index, ip, mac, state)``, ``netlink.Neigh``) or
    the FDB (AF_BRIDGE: ``make(index, mac, dst, state, flags)``, ``netlink.Fdb``) of ``ifindex``."""
    out = []
    for _t, payload in dump(sock, neigh_dump_request(family), seqs):
        n = parse_neigh(payload)
        if n is None or n[0] != family or n[1] != ifindex:
            continue
        _fam, _idx, state, flags, dst, lladdr = n
        mac = ":".join(f"{x:02x}" for x in lladdr) if lladdr else ""
        if family == AF_BRIDGE:
            out.append(make(ifindex, mac, ip_address(dst) if dst else None, state, flags))
        elif dst is not None:
            out.append(make(ifindex, ip_address(dst), mac, state))
    return out


def summary(ops: Iterable[Op]) -> str:
    """``verb=count ...`` of a batch, for log lines."""
    return " ".join(f"{k}={v}" for k, v in sorted(collections.Counter(op.verb for op in ops).items()))


def describe(op: Op, dev: str) -> str:
    """Name the object of ``op`` the way the single verbs' errors do (``dev`` is the device's name)."""
    a = op.args
    if op.verb == "route_replace":
        s = f"route {ip_network(a[0])}" + (f" via {a[1]}" if a[1] is not None else "")
        return s + (f" dev {dev}" if a[2] is not None else "") + (" onlink" if a[3] else "")
    if op.verb == "route_del":
        return f"delete route {ip_network(a[0])}" + (f" via {a[1]}" if a[1] is not None else "") + (
            f" dev {dev}" if a[2] is not None else "")
    if op.verb == "neigh_replace":
        return f"neigh {a[1]} lladdr {a[2]} dev {dev}"
    if op.verb == "neigh_del":
        return f"delete neigh {a[1]} dev {dev}"
    if op.verb == "fdb_replace":
        return f"fdb {a[1]} dev {dev} dst {a[2]} self permanent"
    if op.verb == "fdb_del":
        return f"delete fdb {a[1]} dev {dev}" + (f" dst {a[2]}" if a[2] is not None else "")
    return f"{op.verb} {a}"


def op_ifindex(op: Op) -> Optional[int]:
    """The device index ``op`` names (routes: their oif), for ``describe``."""
    if op.verb.startswith("route_"):
        return op.args[2]
    return op.args[0]
