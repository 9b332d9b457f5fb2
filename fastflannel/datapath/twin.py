# SPDX-License-Identifier: Apache-2.0
"""Run the udp backend's data path in pure Python: the test oracle, the benchmark baseline and the fallback.

This module is the twin of ``_fastpath.pyx``: ``Proxy`` here has the same methods, the same per-packet rules
(``twin_rules.py``) and the same counters, written for clarity, not speed. What both implementations share
(counter names, commands, roles, verdicts, the error type) is the contract, ``contract.py``; the slow reference of
the offloads is ``twin_offload.py``. Both are re-exported here for the tests.

The Python loop does one ``os.read``/``sendto``/``recvfrom``/``os.write`` per packet (Python has no
``sendmmsg``); its ``*_syscalls`` counters are therefore higher than the extension's for the same traffic.
"""
from __future__ import annotations

import errno
import os
import select
import socket
import time
from array import array
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from fastflannel.datapath.contract import (  # noqa: F401  (re-exported: the twin's module is the oracle's namespace)
    BATCH_BUCKETS,
    CMD_DEL_ROUTE,
    CMD_PEER_ADD,
    CMD_PEER_DEL,
    CMD_SET_ROUTE,
    COUNTER_INDEX,
    COUNTER_NAMES,
    DROP_FOREIGN_DEST,
    DROP_MALFORMED,
    DROP_NO_ROUTE,
    DROP_TTL,
    DROP_UNKNOWN_PEER,
    FATAL_ERRNOS,
    ICMP,
    ICMP_ECHO_UNREACH_GAP_NS,
    IPV4_MAX,
    PEER_CHUNK_SHIFT,
    PEER_COUNTER_NAMES,
    PEER_INDEX,
    ROLE_BOTH,
    ROLE_NAMES,
    ROLE_RX,
    ROLE_TX,
    SEND,
    WRITE,
    FastPathError,
    batch_bucket,
    fastpath_error,
)
from fastflannel.datapath.twin_offload import gro_coalesce, gso_split, tcp_checksum  # noqa: F401
from fastflannel.datapath.twin_wait import LoopSched, busy_window_next, thin_next, wait  # noqa: F401
from fastflannel.datapath.twin_rules import (  # noqa: F401
    icmp_allowed,
    icmp_echo_request,
    icmp_net_unreachable,
    ip_checksum,
    malformed,
    ttl_decrement,
)

# counter slots the loop below writes (names from the contract: a typo is a KeyError at import)
_CTL_COMMANDS = COUNTER_INDEX["ctl_commands"]
_RX_BATCHES = COUNTER_INDEX["rx_batches"]
_RX_BATCH_PACKETS = COUNTER_INDEX["rx_batch_packets"]
_RX_BYTES = COUNTER_INDEX["rx_bytes"]
_RX_DROP_FOREIGN_DEST = COUNTER_INDEX["rx_drop_foreign_dest"]
_RX_DROP_MALFORMED = COUNTER_INDEX["rx_drop_malformed"]
_RX_DROP_TTL = COUNTER_INDEX["rx_drop_ttl"]
_RX_DROP_TUN_WRITE = COUNTER_INDEX["rx_drop_tun_write"]
_RX_DROP_UNKNOWN_PEER = COUNTER_INDEX["rx_drop_unknown_peer"]
_RX_PACKETS = COUNTER_INDEX["rx_packets"]
_RX_RECV_ERRORS = COUNTER_INDEX["rx_recv_errors"]
_RX_SYSCALLS = COUNTER_INDEX["rx_syscalls"]
_RX_TUN_WRITE_WAITS = COUNTER_INDEX["rx_tun_write_waits"]
_TX_BATCHES = COUNTER_INDEX["tx_batches"]
_TX_BATCH_PACKETS = COUNTER_INDEX["tx_batch_packets"]
_TX_BYTES = COUNTER_INDEX["tx_bytes"]
_TX_DROP_ICMP_WRITE = COUNTER_INDEX["tx_drop_icmp_write"]
_TX_DROP_MALFORMED = COUNTER_INDEX["tx_drop_malformed"]
_TX_DROP_NO_ROUTE = COUNTER_INDEX["tx_drop_no_route"]
_TX_DROP_SEND = COUNTER_INDEX["tx_drop_send"]
_TX_DROP_TTL = COUNTER_INDEX["tx_drop_ttl"]
_TX_ICMP_UNREACH = COUNTER_INDEX["tx_icmp_unreach"]
_TX_PACKETS = COUNTER_INDEX["tx_packets"]
_TX_READ_ERRORS = COUNTER_INDEX["tx_read_errors"]
_TX_SEND_WAITS = COUNTER_INDEX["tx_send_waits"]
_TX_SYSCALLS = COUNTER_INDEX["tx_syscalls"]
_P_RX_BYTES = PEER_INDEX["rx_bytes"]
_P_RX_DROP_FOREIGN_DEST = PEER_INDEX["rx_drop_foreign_dest"]
_P_RX_DROP_MALFORMED = PEER_INDEX["rx_drop_malformed"]
_P_RX_DROP_TTL = PEER_INDEX["rx_drop_ttl"]
_P_RX_PACKETS = PEER_INDEX["rx_packets"]
_P_TX_BYTES = PEER_INDEX["tx_bytes"]
_P_TX_DROP_SEND = PEER_INDEX["tx_drop_send"]
_P_TX_PACKETS = PEER_INDEX["tx_packets"]


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
                 udp_gso: bool = True, udp_gro: bool = False, busy_poll_us: int = 0, tun_uso: bool = False,
                 demote_after: int = 0) -> None:
        if tun_offload or udp_gro or tun_uso:  # the offload loop exists in the extension only; the split and coalescing
            raise ValueError("the pure-Python fast path has no offload mode (tun_offload/udp_gro)")  # reference is above
        self._tun_fd = tun_fd
        self._udp_fd = udp_fd
        self._net = net
        self._net_mask = _mask(net_plen)
        self._shift = 32 - subnet_len
        self._own_net = own_net
        self._own_mask = _mask(own_plen)
        self._tun_ip = tun_ip
        self._echo_next_ns = 0  # rate limit of net-unreachables about echo requests
        self._mtu = mtu
        self._port = port
        self._check_peer = check_peer_source
        self._check_dest = check_inner_dest
        self._batch = batch
        self._busy_ns = busy_poll_us * 1000
        self._demote_after = demote_after
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
            if icmp_allowed(pkt) or (icmp_echo_request(pkt) and self._echo_due()):
                c[_TX_ICMP_UNREACH] += 1
                return ICMP, icmp_net_unreachable(pkt, self._tun_ip), 0, 0
            return DROP_NO_ROUTE, None, 0, 0
        if pkt[8] <= 1:
            c[_TX_DROP_TTL] += 1
            return DROP_TTL, None, 0, 0
        ttl_decrement(pkt)
        return SEND, None, nh, self._route_pid[idx]

    def _echo_due(self) -> bool:
        """At most one net-unreachable about an echo request per ICMP_ECHO_UNREACH_GAP_NS (C: ff_echo_unreach_due)."""
        now = time.monotonic_ns()
        if now < self._echo_next_ns:
            return False
        self._echo_next_ns = now + ICMP_ECHO_UNREACH_GAP_NS
        return True

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
        window = self._busy_ns
        sched = LoopSched(role)
        while True:
            try:
                events, window = wait(poller, window, sched, self._c, self._busy_ns, self._demote_after)
            except InterruptedError:  # pragma: no cover - PEP 475 retries for us
                continue
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


IMPLEMENTATION = "python"

__all__ = ["gso_split", "gro_coalesce", "Proxy", "FastPathError", "fastpath_error", "COUNTER_NAMES",
           "PEER_COUNTER_NAMES", "BATCH_BUCKETS", "batch_bucket", "IMPLEMENTATION"]
