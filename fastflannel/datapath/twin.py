# SPDX-License-Identifier: Apache-2.0
"""Run the udp backend's data path in pure Python: the test oracle, the benchmark baseline and the fallback.

This module is the twin of ``_fastpath.pyx``: ``Proxy`` here has the same methods, the same per-packet rules
and the same counters, written for clarity, not speed. It also holds what both implementations share and
that must not need the extension: the error type (``FastPathError``), the counter names (``COUNTER_NAMES``,
whose order is the C counter array's) and the verdict strings.

Per-packet rules (both implementations; ``docs/fastpath.md`` has the table):

outbound (TUN -> UDP): malformed -> drop; destination outside the network or no route -> count ``no_route``
and, unless the offender is ICMP (RFC 792), a non-first fragment, or has an IP header of 60 bytes or more,
write an ICMP net-unreachable back into the TUN (flannel ``send_net_unreachable``); TTL <= 1 -> drop; else
TTL - 1 with the RFC 1624 checksum update and send to ``(next_hop, port)``.

inbound (UDP -> TUN): outer source not a current peer -> drop (``check_peer_source``); malformed -> drop;
inner destination outside our subnet -> drop (``check_inner_dest``); TTL <= 1 -> drop; else TTL - 1 and
write to the TUN.

"Malformed" is: shorter than 20 bytes, longer than 65535, version != 4, IHL < 5, IHL beyond the data, or an
IPv4 total length that differs from the number of bytes received (truncated or padded).

The Python loop does one ``os.read``/``sendto``/``recvfrom``/``os.write`` per packet (Python has no
``sendmmsg``); its ``*_syscalls`` counters are therefore higher than the extension's for the same traffic.
"""
from __future__ import annotations

import errno
import os
import select
import socket
import struct
from array import array
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Type

# --- shared between both implementations ------------------------------------------------------------

# Order matters: it is the layout of the C counter array (ff_counter enum in _fastpath.pxd).
COUNTER_NAMES: Tuple[str, ...] = (
    "tx_packets",  # inner packets handed to the UDP socket and accepted (process_outbound: verdict "send")
    "tx_bytes",  # their bytes (inner IP packet length)
    "tx_syscalls",  # TUN reads (including the EAGAIN one ending a burst), sends, ICMP writes, POLLOUT waits
    "tx_batches",  # non-empty TUN bursts processed
    "tx_drop_malformed",
    "tx_drop_no_route",  # no route for the destination (ICMP generated or not)
    "tx_drop_ttl",
    "tx_drop_send",  # the UDP send failed for this packet (e.g. EPERM from a firewall, ENETUNREACH)
    "tx_icmp_unreach",  # ICMP net-unreachable packets generated
    "tx_drop_icmp_write",  # ... whose write back into the TUN failed
    "tx_send_waits",  # times the UDP socket was full and the loop waited for POLLOUT
    "tx_read_errors",  # TUN reads that failed with a non-fatal errno
    "rx_packets",  # inner packets written to the TUN (process_inbound: verdict "write")
    "rx_bytes",
    "rx_syscalls",  # recv calls (including the EAGAIN one), TUN writes, POLLOUT waits
    "rx_batches",
    "rx_drop_unknown_peer",  # outer source is not the PublicIP of a current route (check_peer_source)
    "rx_drop_foreign_dest",  # inner destination not in own_subnet (check_inner_dest)
    "rx_drop_malformed",
    "rx_drop_ttl",
    "rx_drop_tun_write",  # the TUN write failed for this packet
    "rx_tun_write_waits",
    "rx_recv_errors",  # UDP receives that failed with a non-fatal errno (e.g. a queued ICMP error)
    "polls",  # poll() calls, all loop threads
    "ctl_commands",  # route/peer commands applied by the loop
    # offload mode (docs/fastpath.md "Offloads")
    "tx_tso_reads",  # TUN reads that returned a TSO super-packet (virtio gso_type TCPV4)
    "tx_tso_segments",  # MTU-sized packets split from them
    "tx_gso_sends",  # UDP messages sent with UDP_SEGMENT (more than one datagram each)
    "tx_gso_errors",  # UDP_SEGMENT sends refused with EIO: GSO switched off, segments resent one by one
    "rx_gro_receives",  # messages received while UDP_GRO is on
    "rx_gro_datagrams",  # inner datagrams they carried
    "rx_coalesced_writes",  # TUN writes of a coalesced TCP run (a GSO packet with a virtio_net_hdr)
    "rx_coalesced_packets",  # inner packets in those writes
    # batch-size distribution (docs/fastpath.md "Counters"): packets per non-empty burst (tx: packets read, or
    # segments after the TSO split; rx: datagrams received, or inner datagrams after the GRO split). One bucket
    # per burst, NOT cumulative: le_1 = 0..1, le_4 = 2..4, le_16 = 5..16, le_64 = 17..64, gt_64 = 65 and more.
    "tx_batch_packets",  # sum of the burst sizes (the histogram's _sum)
    "tx_batch_le_1",
    "tx_batch_le_4",
    "tx_batch_le_16",
    "tx_batch_le_64",
    "tx_batch_gt_64",
    "rx_batch_packets",
    "rx_batch_le_1",
    "rx_batch_le_4",
    "rx_batch_le_16",
    "rx_batch_le_64",
    "rx_batch_gt_64",
)
COUNTER_INDEX: Dict[str, int] = {name: i for i, name in enumerate(COUNTER_NAMES)}
_TX_PACKETS = 0
_TX_BYTES = 1
_TX_SYSCALLS = 2
_TX_BATCHES = 3
_TX_DROP_MALFORMED = 4
_TX_DROP_NO_ROUTE = 5
_TX_DROP_TTL = 6
_TX_DROP_SEND = 7
_TX_ICMP_UNREACH = 8
_TX_DROP_ICMP_WRITE = 9
_TX_SEND_WAITS = 10
_TX_READ_ERRORS = 11
_RX_PACKETS = 12
_RX_BYTES = 13
_RX_SYSCALLS = 14
_RX_BATCHES = 15
_RX_DROP_UNKNOWN_PEER = 16
_RX_DROP_FOREIGN_DEST = 17
_RX_DROP_MALFORMED = 18
_RX_DROP_TTL = 19
_RX_DROP_TUN_WRITE = 20
_RX_TUN_WRITE_WAITS = 21
_RX_RECV_ERRORS = 22
_POLLS = 23
_CTL_COMMANDS = 24
_TX_TSO_READS = 25
_TX_TSO_SEGMENTS = 26
_TX_GSO_SENDS = 27
_TX_GSO_ERRORS = 28
_RX_GRO_RECEIVES = 29
_RX_GRO_DATAGRAMS = 30
_RX_COALESCED_WRITES = 31
_RX_COALESCED_PACKETS = 32
_TX_BATCH_PACKETS = 33  # then the 5 tx buckets
_RX_BATCH_PACKETS = 39  # then the 5 rx buckets
BATCH_BUCKETS: Tuple[int, ...] = (1, 4, 16, 64)  # upper bounds; a last bucket takes everything above 64


def batch_bucket(n: int) -> int:
    """Return the bucket (0..4) of a burst of ``n`` packets: <= 1, <= 4, <= 16, <= 64, > 64."""
    for i, le in enumerate(BATCH_BUCKETS):
        if n <= le:
            return i
    return len(BATCH_BUCKETS)


# Per-peer counters (Proxy.peer_counters(pid), FastPath.peer_stats()): tx by the route's next hop, rx by the outer
# source. Order = the C blocks ff_peer_tx (3) + ff_peer_rx (5). Peer id 0 is the "other" block: datagrams from
# sources that are not current peers, accepted because check_peer_source is off (and commands without a peer id).
PEER_COUNTER_NAMES: Tuple[str, ...] = (
    "tx_packets", "tx_bytes", "tx_drop_send",
    "rx_packets", "rx_bytes", "rx_drop_foreign_dest", "rx_drop_malformed", "rx_drop_ttl",
)
_P_TX_PACKETS, _P_TX_BYTES, _P_TX_DROP_SEND = 0, 1, 2
_P_RX_PACKETS, _P_RX_BYTES, _P_RX_DROP_FOREIGN_DEST, _P_RX_DROP_MALFORMED, _P_RX_DROP_TTL = 3, 4, 5, 6, 7
PEER_CHUNK_SHIFT = 8  # peer counter blocks are allocated 256 at a time (never moved, freed by close())

# Verdicts (process_outbound / process_inbound)
SEND = "send"
ICMP = "icmp"
WRITE = "write"
DROP_MALFORMED = "drop:malformed"
DROP_NO_ROUTE = "drop:no_route"
DROP_TTL = "drop:ttl"
DROP_UNKNOWN_PEER = "drop:unknown_peer"
DROP_FOREIGN_DEST = "drop:foreign_dest"

# Route/peer commands (Proxy.apply: (cmd, arg, value[, peer id])); the wire struct exists only in _fastpath.pxd.
CMD_SET_ROUTE = 1  # (index, next_hop, peer id of next_hop)
CMD_DEL_ROUTE = 2  # (index, 0)
CMD_PEER_ADD = 3  # (0, peer ip, peer id)
CMD_PEER_DEL = 4  # (0, peer ip)

# Loop roles (Proxy.run)
ROLE_BOTH = 0
ROLE_TX = 1
ROLE_RX = 2
ROLE_NAMES = {ROLE_BOTH: "tx+rx", ROLE_TX: "tx", ROLE_RX: "rx"}

IPV4_HDR_MIN = 20  # bytes, IHL 5
IPV4_HDR_ICMP_LIMIT = 60  # flannel: no ICMP about offenders whose header is >= 20 + MAX_IPOPTLEN (40) bytes
IPV4_MAX = 65535  # largest IPv4 total length
IPPROTO_ICMP = 1
ICMP_DEST_UNREACH = 3  # RFC 792
ICMP_NET_UNREACH = 0
ICMP_TTL = 8  # flannel send_net_unreachable
FRAG_OFFSET_MASK = 0x1FFF

# errnos after which a loop cannot go on: its fds are gone or wrong
FATAL_ERRNOS = frozenset({errno.EBADF, errno.EBADFD, errno.ENOTSOCK, errno.EFAULT, errno.EINVAL, errno.ENOMEM,
                          errno.EPIPE, errno.ENODEV, errno.EISDIR})


class FastPathError(OSError):
    """Report that a fast-path loop stopped on an error (errno set), or that the fast path cannot be steered."""


_ERROR_CLASSES: Dict[Type[OSError], Type[FastPathError]] = {}


def fastpath_error(err: int, what: str) -> FastPathError:
    """Return a FastPathError for ``err`` that is also the builtin OSError subclass for it (e.g. PermissionError)."""
    base = type(OSError(err, ""))
    cls: Type[FastPathError] = FastPathError
    if base is not OSError:
        cls = _ERROR_CLASSES.get(base) or _ERROR_CLASSES.setdefault(
            base, type(f"FastPath{base.__name__}", (FastPathError, base), {"__module__": __name__}))
    return cls(err, f"{what}: {os.strerror(err)}")


def ip_checksum(data: bytes) -> int:
    """Return the Internet checksum (RFC 1071) of ``data`` (zero-padded to an even length)."""
    if len(data) % 2:
        data = bytes(data) + b"\0"
    s = sum(int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ttl_decrement(pkt: bytearray) -> None:
    """Decrement the TTL of the IPv4 header in ``pkt`` and patch its checksum (RFC 1624 eqn. 3, HC' = ~(~HC + ~m + m'))."""
    old = (pkt[8] << 8) | pkt[9]  # the 16-bit word holding TTL and protocol
    new = old - 0x100
    s = (~((pkt[10] << 8) | pkt[11]) & 0xFFFF) + (~old & 0xFFFF) + new
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    hc = ~s & 0xFFFF
    pkt[8] -= 1
    pkt[10] = hc >> 8
    pkt[11] = hc & 0xFF


def icmp_allowed(pkt: bytes) -> bool:
    """Tell whether flannel would answer this (well-formed) offender with an ICMP error."""
    ihl = (pkt[0] & 0x0F) * 4
    frag = ((pkt[6] << 8) | pkt[7]) & FRAG_OFFSET_MASK
    return pkt[9] != IPPROTO_ICMP and frag == 0 and ihl < IPV4_HDR_ICMP_LIMIT


def icmp_net_unreachable(offender: bytes, tun_ip: int) -> bytes:
    """Build flannel's ICMP net-unreachable for ``offender``: IP header + 8 payload bytes, zero-padded."""
    ihl = (offender[0] & 0x0F) * 4
    quote = bytes(offender[:ihl + 8]).ljust(ihl + 8, b"\0")
    icmp = bytearray(8) + quote
    icmp[0] = ICMP_DEST_UNREACH
    icmp[1] = ICMP_NET_UNREACH
    ck = ip_checksum(icmp)
    icmp[2:4] = ck.to_bytes(2, "big")
    total = IPV4_HDR_MIN + len(icmp)
    iph = bytearray(IPV4_HDR_MIN)
    iph[0] = 0x45
    iph[2:4] = total.to_bytes(2, "big")
    iph[8] = ICMP_TTL
    iph[9] = IPPROTO_ICMP
    iph[12:16] = tun_ip.to_bytes(4, "big")
    iph[16:20] = offender[12:16]
    iph[10:12] = ip_checksum(iph).to_bytes(2, "big")
    return bytes(iph + icmp)


def malformed(pkt: bytes) -> bool:
    """Tell whether ``pkt`` is not one complete IPv4 packet (short, truncated, padded, wrong version or IHL)."""
    n = len(pkt)
    if n < IPV4_HDR_MIN or n > IPV4_MAX or pkt[0] >> 4 != 4:
        return True
    ihl = (pkt[0] & 0x0F) * 4
    if ihl < IPV4_HDR_MIN or ihl > n:
        return True
    return ((pkt[2] << 8) | pkt[3]) != n


def _mask(plen: int) -> int:
    return (0xFFFFFFFF << (32 - plen)) & 0xFFFFFFFF if plen else 0


class Proxy:
    """Own the state of one fast path: route table, peer set, counters, stop signal; run the loop(s).

    Addresses are host-order ``int`` here; the facade (fastpath.py) converts. The caller keeps ``tun_fd``; the
    Proxy dups ``udp_fd`` into a socket object of its own, closed by ``close()``.
    """

    def __init__(self, tun_fd: int, udp_fd: int, net: int, net_plen: int, subnet_len: int, own_net: int,
                 own_plen: int, tun_ip: int, mtu: int, port: int, check_peer_source: bool,
                 check_inner_dest: bool, batch: int, *, spin: int = 8, tun_offload: bool = False,
                 udp_gso: bool = True, udp_gro: bool = False) -> None:
        if tun_offload or udp_gro:  # the offload loop exists in the extension only; the split and coalescing
            raise ValueError("the pure-Python fast path has no offload mode (tun_offload/udp_gro)")  # reference is above
        self._tun_fd = tun_fd
        self._udp_fd = udp_fd
        self._net = net
        self._net_mask = _mask(net_plen)
        self._shift = 32 - subnet_len
        self._own_net = own_net
        self._own_mask = _mask(own_plen)
        self._tun_ip = tun_ip
        self._mtu = mtu
        self._port = port
        self._check_peer = check_peer_source
        self._check_dest = check_inner_dest
        self._batch = batch
        self._table = array("I", bytes(4 << (subnet_len - net_plen)))
        self._route_pid = array("I", bytes(4 << (subnet_len - net_plen)))  # peer id per table slot
        self._peers: Dict[int, int] = {}  # accepted peer address -> peer id
        self._peer_cap = len(self._table) + 1  # ids 1..table size: never more peers than routes; 0 = "other"
        self._chunks: set = {0}  # allocated blocks of 256 peer ids (the C side's chunks)
        self._pc: Dict[int, List[int]] = {}  # peer id -> PEER_COUNTER_NAMES values
        self._c = [0] * len(COUNTER_NAMES)
        self._stop_r, self._stop_w = os.pipe()
        self._sock: Optional[socket.socket] = None
        self._running: set = set()
        self._closed = False

    # --- control (called by the facade, serialised by its lock) ---

    def apply(self, cmds: Iterable[Tuple[int, int, int]]) -> None:
        """Apply route/peer commands; effective for the next packet. Python threads share the GIL: no channel."""
        if self._closed:
            raise ValueError("FastPath is closed")
        for c in cmds:
            cmd, arg, value = c[0], c[1], c[2]
            pid = self._pid_ok(c[3] if len(c) > 3 else 0)
            if cmd == CMD_SET_ROUTE:
                self._table[arg] = value
                self._route_pid[arg] = pid
            elif cmd == CMD_DEL_ROUTE:
                self._table[arg] = 0
                self._route_pid[arg] = 0
            elif cmd == CMD_PEER_ADD:
                if value:
                    self._peers[value] = pid
            elif cmd == CMD_PEER_DEL:
                self._peers.pop(value, None)
            else:
                raise ValueError(f"unknown command {cmd}")
            if self._running:
                self._c[_CTL_COMMANDS] += 1

    def mark_running(self, role: int) -> None:
        """Record that a loop thread for ``role`` is about to run (before the thread starts)."""
        if self._closed:
            raise ValueError("FastPath is closed")
        if self._sock is None:
            self._sock = socket.socket(fileno=os.dup(self._udp_fd))
            self._sock.setblocking(False)
        self._running.add(role)

    def running(self) -> bool:
        """Tell whether any loop thread is still inside run()."""
        return bool(self._running)

    def stop(self) -> None:
        """Ask every loop thread to return (idempotent, non-blocking)."""
        if not self._closed:
            try:
                os.write(self._stop_w, b"x")
            except BlockingIOError:  # pipe full: a stop is already pending
                pass

    def close(self) -> None:
        """Free everything the Proxy opened; the loops must have returned (the facade joins them first)."""
        if self._closed:
            return
        if self._running:
            raise RuntimeError("close() while a loop thread is running; stop() and join it first")
        self._closed = True
        os.close(self._stop_r)
        os.close(self._stop_w)
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def stats(self) -> Dict[str, int]:
        """Return a snapshot of the counters."""
        return dict(zip(COUNTER_NAMES, self._c))

    # --- per-peer counters ---

    def _pid_ok(self, pid: int) -> int:
        """A peer id the loop may count into (its block exists), else 0 (the "other" block), as the C ff_pid_ok."""
        return pid if 0 <= pid < self._peer_cap and (pid >> PEER_CHUNK_SHIFT) in self._chunks else 0

    def _pcs(self, pid: int) -> List[int]:
        pc = self._pc.get(pid)
        if pc is None:
            pc = self._pc[pid] = [0] * len(PEER_COUNTER_NAMES)
        return pc

    def reset_peer(self, pid: int) -> None:
        """Make peer id ``pid``'s counter block exist and zero it; only for an id no route or peer uses."""
        if self._closed:
            raise ValueError("FastPath is closed")
        if not 0 < pid < self._peer_cap:
            raise ValueError(f"peer id {pid} out of range 1..{self._peer_cap - 1}")
        self._chunks.add(pid >> PEER_CHUNK_SHIFT)
        self._pc[pid] = [0] * len(PEER_COUNTER_NAMES)

    def peer_counters(self, pid: int) -> Tuple[int, ...]:
        """Return peer id ``pid``'s counters (PEER_COUNTER_NAMES order); zeros for an unused id."""
        if self._closed:
            raise ValueError("FastPath is closed")
        return tuple(self._pc.get(pid) or (0,) * len(PEER_COUNTER_NAMES))

    # --- per-packet rules ---

    def _out(self, pkt: bytearray) -> Tuple[str, Optional[bytes], int, int]:
        """(verdict, icmp, next hop, peer id of the next hop)."""
        c = self._c
        if malformed(pkt):
            c[_TX_DROP_MALFORMED] += 1
            return DROP_MALFORMED, None, 0, 0
        dst = int.from_bytes(pkt[16:20], "big")
        idx = (dst - self._net) >> self._shift
        nh = self._table[idx] if (dst & self._net_mask) == self._net else 0
        if not nh:
            c[_TX_DROP_NO_ROUTE] += 1
            if icmp_allowed(pkt):
                c[_TX_ICMP_UNREACH] += 1
                return ICMP, icmp_net_unreachable(pkt, self._tun_ip), 0, 0
            return DROP_NO_ROUTE, None, 0, 0
        if pkt[8] <= 1:
            c[_TX_DROP_TTL] += 1
            return DROP_TTL, None, 0, 0
        ttl_decrement(pkt)
        return SEND, None, nh, self._route_pid[idx]

    def _sent(self, pid: int, n: int) -> None:
        """Count one inner packet of ``n`` bytes accepted by the UDP socket, in total and for its peer."""
        c = self._c
        c[_TX_PACKETS] += 1
        c[_TX_BYTES] += n
        pc = self._pcs(pid)
        pc[_P_TX_PACKETS] += 1
        pc[_P_TX_BYTES] += n

    def _written(self, pid: int, n: int) -> None:
        """Count one inner packet of ``n`` bytes written to the TUN, in total and for the peer it came from."""
        c = self._c
        c[_RX_PACKETS] += 1
        c[_RX_BYTES] += n
        pc = self._pcs(pid)
        pc[_P_RX_PACKETS] += 1
        pc[_P_RX_BYTES] += n

    def _count_batch(self, base: int, n: int) -> None:
        """Count one burst of ``n`` packets in the batch-size histogram at counter ``base`` (_TX/_RX_BATCH_PACKETS)."""
        c = self._c
        c[base] += n
        c[base + 1 + batch_bucket(n)] += 1

    def _in(self, src: int, pkt: bytearray) -> Tuple[str, int]:
        """(verdict, peer id of the source: 0 if it is not a current peer)."""
        c = self._c
        pid = self._peers.get(src)
        if pid is None:
            if self._check_peer:
                c[_RX_DROP_UNKNOWN_PEER] += 1
                return DROP_UNKNOWN_PEER, 0
            pid = 0  # the "other" block: the source check is off, the datagram is not from a current peer
        if malformed(pkt):
            c[_RX_DROP_MALFORMED] += 1
            self._pcs(pid)[_P_RX_DROP_MALFORMED] += 1
            return DROP_MALFORMED, pid
        if self._check_dest and (int.from_bytes(pkt[16:20], "big") & self._own_mask) != self._own_net:
            c[_RX_DROP_FOREIGN_DEST] += 1
            self._pcs(pid)[_P_RX_DROP_FOREIGN_DEST] += 1
            return DROP_FOREIGN_DEST, pid
        if pkt[8] <= 1:
            c[_RX_DROP_TTL] += 1
            self._pcs(pid)[_P_RX_DROP_TTL] += 1
            return DROP_TTL, pid
        ttl_decrement(pkt)
        return WRITE, pid

    def _check_idle(self) -> None:
        if self._running:
            raise RuntimeError("process_* entry points are for a FastPath whose loop is not running")
        if self._closed:
            raise ValueError("FastPath is closed")

    def process_outbound(self, packet: bytes) -> Tuple[str, Optional[bytes], Optional[int]]:
        """Apply the TUN -> UDP rules to one packet; return (verdict, bytes to send or to write back, next hop)."""
        self._check_idle()
        pkt = bytearray(packet)
        verdict, icmp, nh, pid = self._out(pkt)
        if verdict == SEND:
            self._sent(pid, len(pkt))
            return verdict, bytes(pkt), nh
        return verdict, icmp, None

    def process_inbound(self, src: int, datagram: bytes) -> Tuple[str, Optional[bytes]]:
        """Apply the UDP -> TUN rules to one datagram from ``src``; return (verdict, bytes to write to the TUN)."""
        self._check_idle()
        pkt = bytearray(datagram)
        verdict, pid = self._in(src, pkt)
        if verdict == WRITE:
            self._written(pid, len(pkt))
            return verdict, bytes(pkt)
        return verdict, None

    def process_outbound_batch(self, packets: Sequence[bytes]) -> int:
        """Run the TX stage over ``packets`` as one batch, without I/O; return how many would be sent."""
        self._check_idle()
        c = self._c
        sent = 0
        packets = list(packets)
        for start in range(0, max(1, len(packets)), self._batch):  # one batch per loop-sized chunk, as the loop
            chunk = packets[start:start + self._batch]
            for p in chunk:
                pkt = bytearray(p)
                verdict, _icmp, _nh, pid = self._out(pkt)
                if verdict == SEND:
                    sent += 1
                    self._sent(pid, len(pkt))
            c[_TX_BATCHES] += 1
            self._count_batch(_TX_BATCH_PACKETS, len(chunk))
        return sent

    def process_inbound_batch(self, src: int, datagrams: Sequence[bytes]) -> int:
        """Run the RX stage over ``datagrams`` from ``src`` as one batch, without I/O; return how many pass."""
        self._check_idle()
        c = self._c
        passed = 0
        datagrams = list(datagrams)
        for start in range(0, max(1, len(datagrams)), self._batch):
            chunk = datagrams[start:start + self._batch]
            for d in chunk:
                pkt = bytearray(d)
                verdict, pid = self._in(src, pkt)
                if verdict == WRITE:
                    passed += 1
                    self._written(pid, len(pkt))
            c[_RX_BATCHES] += 1
            self._count_batch(_RX_BATCH_PACKETS, len(chunk))
        return passed

    # --- the loop ---

    def run(self, role: int) -> None:
        """Forward until stop(); raise FastPathError if a fd fails. Called once per role in its own thread."""
        try:
            self._run(role)
        finally:
            self._running.discard(role)

    def _run(self, role: int) -> None:
        poller = select.poll()
        poller.register(self._stop_r, select.POLLIN)
        if role != ROLE_RX:
            poller.register(self._tun_fd, select.POLLIN)
        if role != ROLE_TX:
            poller.register(self._udp_fd, select.POLLIN)
        c = self._c
        while True:
            try:
                events = poller.poll()
            except InterruptedError:  # pragma: no cover - PEP 475 retries for us
                continue
            c[_POLLS] += 1
            for fd, ev in events:
                if ev & select.POLLNVAL:
                    raise fastpath_error(errno.EBADF, f"{ROLE_NAMES[role]} loop: poll on fd {fd}")
                if fd == self._stop_r:
                    return
            for fd, ev in events:
                if fd == self._tun_fd and role != ROLE_RX:
                    if ev & select.POLLIN:
                        self._tx_burst()
                    elif ev & (select.POLLERR | select.POLLHUP):
                        raise fastpath_error(errno.EPIPE, f"tx loop: tun fd {fd} hung up")
                if fd == self._udp_fd and role != ROLE_TX:
                    self._rx_burst()

    def _wait_writable(self, fd: int) -> bool:
        p = select.poll()
        p.register(fd, select.POLLOUT)
        p.register(self._stop_r, select.POLLIN)
        return all(f != self._stop_r for f, _ in p.poll())

    def _tx_burst(self) -> None:
        c = self._c
        tun = self._tun_fd
        pkts: List[bytearray] = []
        while len(pkts) < self._batch:
            c[_TX_SYSCALLS] += 1
            try:
                pkts.append(bytearray(os.read(tun, IPV4_MAX + 1)))
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                if e.errno in FATAL_ERRNOS:
                    raise fastpath_error(e.errno, f"tx loop: read from tun fd {tun}") from None
                c[_TX_READ_ERRORS] += 1
                break
        if not pkts:
            return
        c[_TX_BATCHES] += 1
        self._count_batch(_TX_BATCH_PACKETS, len(pkts))
        sock = self._sock
        assert sock is not None
        for pkt in pkts:
            verdict, icmp, nh, pid = self._out(pkt)
            if verdict == SEND:
                addr = (str(socket.inet_ntoa(nh.to_bytes(4, "big"))), self._port)
                while True:
                    c[_TX_SYSCALLS] += 1
                    try:
                        sock.sendto(pkt, addr)
                    except BlockingIOError:
                        c[_TX_SEND_WAITS] += 1
                        c[_TX_SYSCALLS] += 1
                        if not self._wait_writable(self._udp_fd):
                            return
                        continue
                    except OSError as e:
                        if e.errno in FATAL_ERRNOS:
                            raise fastpath_error(e.errno, f"tx loop: send on udp fd {self._udp_fd}") from None
                        c[_TX_DROP_SEND] += 1
                        self._pcs(pid)[_P_TX_DROP_SEND] += 1
                    else:
                        self._sent(pid, len(pkt))
                    break
            elif verdict == ICMP:
                c[_TX_SYSCALLS] += 1
                try:
                    os.write(tun, icmp)  # type: ignore[arg-type]
                except OSError:
                    c[_TX_DROP_ICMP_WRITE] += 1

    def _rx_burst(self) -> None:
        c = self._c
        sock = self._sock
        assert sock is not None
        got: List[Tuple[int, bytearray]] = []
        while len(got) < self._batch:
            c[_RX_SYSCALLS] += 1
            try:
                data, (host, _port) = sock.recvfrom(IPV4_MAX + 1)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                if e.errno in FATAL_ERRNOS:
                    raise fastpath_error(e.errno, f"rx loop: recv on udp fd {self._udp_fd}") from None
                c[_RX_RECV_ERRORS] += 1
                break
            got.append((int.from_bytes(socket.inet_aton(host), "big"), bytearray(data)))
        if not got:
            return
        c[_RX_BATCHES] += 1
        self._count_batch(_RX_BATCH_PACKETS, len(got))
        tun = self._tun_fd
        for src, pkt in got:
            verdict, pid = self._in(src, pkt)
            if verdict != WRITE:
                continue
            while True:
                c[_RX_SYSCALLS] += 1
                try:
                    os.write(tun, pkt)
                except BlockingIOError:
                    c[_RX_TUN_WRITE_WAITS] += 1
                    c[_RX_SYSCALLS] += 1
                    if not self._wait_writable(tun):
                        return
                    continue
                except OSError as e:
                    if e.errno in FATAL_ERRNOS:
                        raise fastpath_error(e.errno, f"rx loop: write to tun fd {tun}") from None
                    c[_RX_DROP_TUN_WRITE] += 1
                else:
                    self._written(pid, len(pkt))
                break


# --- offloads: the slow reference of the TSO split and the TCP coalescing (fastpath research notes 1.3, 1.4) ---

VNET_HDR_LEN = 10  # struct virtio_net_hdr, host byte order
VIRTIO_F_NEEDS_CSUM = 1
VIRTIO_GSO_NONE = 0
VIRTIO_GSO_TCPV4 = 1
IPPROTO_TCP = 6
TCP_FIN, TCP_PSH, TCP_ACK = 0x01, 0x08, 0x10
SEGS_MAX = 256  # segments one super-packet may split into (the C loop's FF_SEGS_MAX)
WSLOTS = 64  # pending TUN writes per flush (the C loop's FF_WSLOTS)
_VNET = struct.Struct("=BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset


def tcp_checksum(ip: bytes, ihl: int = 20) -> int:
    """Return the TCP checksum of IPv4 packet ``ip`` computed in full (pseudo-header included), field as zero."""
    seg = bytearray(ip[ihl:])
    seg[16:18] = b"\0\0"
    pseudo = bytes(ip[12:20]) + bytes([0, IPPROTO_TCP]) + len(seg).to_bytes(2, "big")
    return ip_checksum(pseudo + bytes(seg))


def _fold_sum(data: bytes) -> int:
    """Folded (not complemented) one's-complement sum."""
    return ~ip_checksum(data) & 0xFFFF


def gso_split(buf: bytes) -> List[bytes]:
    """Split one TUN read (virtio_net_hdr + packet) into plain IPv4 packets (the tx loop's ff_gso_split).

    NONE: the packet, with its checksum completed if NEEDS_CSUM. TCPV4: hdr_len recomputed; per segment i: IP id
    + i, total length, header checksum; seq + i * gso_size; FIN/PSH only on the last; TCP checksum in full.
    Raises ValueError for what the loop counts as tx_drop_malformed.
    """
    if len(buf) < VNET_HDR_LEN:
        raise ValueError("shorter than a virtio_net_hdr")
    flags, gso_type, _hdr_len, gso_size, cs, co = _VNET.unpack_from(buf)
    pkt = bytearray(buf[VNET_HDR_LEN:])
    if gso_type == VIRTIO_GSO_NONE:
        if flags & VIRTIO_F_NEEDS_CSUM:
            if cs + co + 2 > len(pkt):
                raise ValueError("checksum offset outside the packet")
            # the field holds the folded pseudo-header sum: summing over it completes the checksum
            pkt[cs + co:cs + co + 2] = ip_checksum(bytes(pkt[cs:])).to_bytes(2, "big")
        return [bytes(pkt)]
    if gso_type != VIRTIO_GSO_TCPV4:
        raise ValueError(f"gso_type {gso_type} not supported")
    if len(pkt) < IPV4_HDR_MIN or pkt[0] >> 4 != 4 or pkt[9] != IPPROTO_TCP:
        raise ValueError("not an IPv4 TCP packet")
    ihl = (pkt[0] & 0x0F) * 4
    if ihl < IPV4_HDR_MIN or cs != ihl or len(pkt) < ihl + 20 or gso_size == 0:
        raise ValueError("bad header lengths")
    doff = (pkt[ihl + 12] >> 4) * 4
    hdr = ihl + doff
    if doff < 20 or hdr > len(pkt):
        raise ValueError("bad TCP data offset")
    payload = bytes(pkt[hdr:])
    nseg = max(1, -(-len(payload) // gso_size))
    if nseg > SEGS_MAX:
        raise ValueError("too many segments")
    seq0 = int.from_bytes(pkt[ihl + 4:ihl + 8], "big")
    id0 = int.from_bytes(pkt[4:6], "big")
    tflags = pkt[ihl + 13]
    out = []
    for i in range(nseg):
        data = payload[i * gso_size:(i + 1) * gso_size]
        o = bytearray(pkt[:hdr]) + data
        o[2:4] = len(o).to_bytes(2, "big")
        o[4:6] = ((id0 + i) & 0xFFFF).to_bytes(2, "big")
        o[10:12] = b"\0\0"
        o[10:12] = ip_checksum(bytes(o[:ihl])).to_bytes(2, "big")
        o[ihl + 4:ihl + 8] = ((seq0 + i * gso_size) & 0xFFFFFFFF).to_bytes(4, "big")
        if i != nseg - 1:
            o[ihl + 13] = tflags & ~(TCP_FIN | TCP_PSH) & 0xFF
        o[ihl + 16:ihl + 18] = tcp_checksum(bytes(o), ihl).to_bytes(2, "big")
        out.append(bytes(o))
    return out


def gro_candidate(p: bytes) -> bool:
    """IHL 5, TCP, not a fragment, TCP header inside, flags exactly ACK or ACK|PSH, payload > 0."""
    if len(p) < 40 or p[0] != 0x45 or p[9] != IPPROTO_TCP or (p[6] & 0x3F) or p[7]:
        return False
    doff = (p[32] >> 4) * 4
    if doff < 20 or 20 + doff >= len(p):
        return False
    return (p[33] & ~TCP_PSH) == TCP_ACK


def gro_coalesce(packets: Sequence[bytes]) -> List[bytes]:
    """Coalesce IPv4 packets for the TUN (the rx loop's ff_gro_add/ff_gro_finish); return the writes.

    Append only: a packet joins the newest pending item of its flow (addresses, ports, ACK number) if that item is
    open, has the same header length, TCP options, TOS, TTL and IP flags, the packet continues its sequence, is no
    larger than the first segment and the result fits 65535 bytes; a shorter or PSH segment closes the item.
    Checksums are verified first (an invalid packet is written as is). Items of more than one packet get a
    NEEDS_CSUM/TCPV4 header and the folded pseudo-header sum in the checksum field; the rest a zero header.
    """
    items: List[dict] = []
    out: List[bytes] = []

    def flush() -> None:
        for it in items:
            ip = it["buf"]
            if it["count"] > 1:
                ip[2:4] = len(ip).to_bytes(2, "big")
                ip[10:12] = b"\0\0"
                ip[10:12] = ip_checksum(bytes(ip[:20])).to_bytes(2, "big")
                pseudo = bytes(ip[12:20]) + bytes([0, IPPROTO_TCP]) + (len(ip) - 20).to_bytes(2, "big")
                ip[36:38] = _fold_sum(pseudo).to_bytes(2, "big")
                hdr = _VNET.pack(VIRTIO_F_NEEDS_CSUM, VIRTIO_GSO_TCPV4, it["hlen"], it["gso"], 20, 16)
            else:
                hdr = bytes(VNET_HDR_LEN)
            out.append(hdr + bytes(ip))
        items.clear()

    for p in packets:
        p = bytes(p)
        if len(p) > IPV4_MAX:
            raise ValueError("packet longer than 65535 bytes")
        cand = gro_candidate(p) and tcp_checksum(p) == int.from_bytes(p[36:38], "big")
        if cand:
            hlen = 20 + (p[32] >> 4) * 4
            pay = len(p) - hlen
            key = (p[12:20], p[20:24], p[28:32])
            seq = int.from_bytes(p[24:28], "big")
            merged = False
            for it in reversed(items):
                if it["open"] and it["key"] == key:
                    h = it["buf"]
                    if (it["hlen"] == hlen and it["next"] == seq and pay <= it["gso"]
                            and len(h) + pay <= IPV4_MAX and h[1] == p[1] and h[8] == p[8] and h[6] == p[6]
                            and h[40:hlen] == p[40:hlen]):
                        h += p[hlen:]
                        it["next"] = (seq + pay) & 0xFFFFFFFF
                        it["count"] += 1
                        if pay < it["gso"]:
                            it["open"] = False
                        if p[33] & TCP_PSH:
                            h[33] |= TCP_PSH
                            it["open"] = False
                        merged = True
                    break
            if merged:
                continue
            if len(items) == WSLOTS:
                flush()
            items.append({"key": key, "hlen": hlen, "gso": pay, "next": (seq + pay) & 0xFFFFFFFF,
                          "open": not (p[33] & TCP_PSH), "count": 1, "buf": bytearray(p)})
        else:
            if len(items) == WSLOTS:
                flush()
            items.append({"key": None, "hlen": 0, "gso": 0, "next": 0, "open": False, "count": 1,
                          "buf": bytearray(p)})
    flush()
    return out


IMPLEMENTATION = "python"

__all__ = ["gso_split", "gro_coalesce", "Proxy", "FastPathError", "fastpath_error", "COUNTER_NAMES",
           "PEER_COUNTER_NAMES", "BATCH_BUCKETS", "batch_bucket", "IMPLEMENTATION"]
