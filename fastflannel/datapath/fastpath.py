# SPDX-License-Identifier: Apache-2.0
"""Forward the udp backend's traffic between a TUN device and a UDP socket (the facade over two implementations).

This is the only module that imports ``fastflannel.datapath._fastpath`` (the Cython nogil loop). It falls back to the
pure-Python twin ``fastflannel.datapath.twin`` when ``FASTFLANNEL_NO_EXTENSIONS=1`` is set or the extension is
not built; ``IMPLEMENTATION`` says which one is in use. Both have the same surface, rules and counters; the
design (threads, table layout, control channel, counters, drop reasons and their switches) is in
``docs/fastpath.md``.

Ownership: a FastPath owns nothing it did not open. The caller keeps ``tun_fd`` and ``udp_fd`` and closes them
after ``close()``. ``start()`` puts both fds in non-blocking mode (the loop drains them until EAGAIN).
"""
from __future__ import annotations

import errno
import heapq
import logging
import os
import socket
import threading
import warnings
from dataclasses import dataclass, replace
from ipaddress import IPv4Address, IPv4Network
from typing import Any, Dict, List, Optional, Sequence, Tuple

from fastflannel.datapath import twin as _fastpath_py
from fastflannel.datapath.contract import (
    MAX_BUSY_POLL_US,
    MAX_DEMOTE_AFTER,
    SOL_UDP,
    UDP_ENCAP_OVERHEAD,
    UDP_GRO,
    CMD_DEL_ROUTE,
    CMD_PEER_ADD,
    CMD_PEER_DEL,
    CMD_SET_ROUTE,
    COUNTER_NAMES,
    PEER_COUNTER_NAMES,
    ROLE_BOTH,
    ROLE_NAMES,
    ROLE_RX,
    ROLE_TX,
    FastPathError,
    fastpath_error,
)

log = logging.getLogger(__name__)

MAX_TABLE_ENTRIES = 1 << 22  # 16 MiB of uint32 next hops (+ 16 MiB of peer ids): a /8 cut into /30 subnets
MAX_BATCH = 1024  # recvmmsg/sendmmsg vlen limit (UIO_MAXIOV)
SOCKET_BUFFER_BYTES = 4 << 20  # fastpath.md section 2: 4-8 MiB socket buffers absorb bursts
# With UDP_GRO every queued skb is a ~64 KB train of up to 64 datagrams, and the receive buffer is charged the
# skb's truesize: 4 MiB overflowed with 4 TCP streams (UdpRcvbufErrors 198-264 skbs = the 7,130-8,580
# retransmits), 32 MiB gave 0 (docs/fastpath.md "Offloads"). Memory is only charged while queued.
GRO_RCVBUF_BYTES = 32 << 20
CTL_CHUNK = 64  # commands per loop round trip: they fit the ctl socketpair's send buffer (a send never waits)
JOIN_TIMEOUT_S = 10.0  # a loop answers stop within one batch; this only guards against a wedged kernel call

_impl: Any = _fastpath_py
_ext_error: Optional[BaseException] = None
if os.environ.get("FASTFLANNEL_NO_EXTENSIONS", "") in ("", "0"):
    try:
        from fastflannel.datapath import _fastpath as _ext

        if getattr(_ext, "IMPLEMENTATION", None) == "cython":
            _impl = _ext
    except ImportError as e:  # not built: the twin serves
        _ext_error = e

IMPLEMENTATION: str = _impl.IMPLEMENTATION


def implementation_module(name: Optional[str] = None) -> Any:
    """Return the module of implementation ``name`` ("cython"/"python"; default: the selected one).

    For tests and benchmarks that run both; raises ImportError if "cython" is asked for but not built.
    """
    if name is None:
        return _impl
    if name == "python":
        return _fastpath_py
    if name == "cython":
        from fastflannel.datapath import _fastpath as ext

        if getattr(ext, "IMPLEMENTATION", None) != "cython":
            raise ImportError("fastflannel.datapath._fastpath is a placeholder, not the Cython fast path; rebuild it")
        return ext
    raise ValueError(f"unknown fast path implementation {name!r}")




def parse_loop_priority(text: str) -> Tuple[str, int]:
    """Parse FastPathOptions.loop_priority: '' or 'inherit', 'nice:N' (-20..19) or 'fifo:N' (SCHED_FIFO 1..99).

    Raise ValueError saying what is accepted."""
    text = (text or "").strip()
    if text in ("", "inherit"):
        return ("", 0)
    kind, sep, num = text.partition(":")
    try:
        value = int(num) if sep else None
    except ValueError:
        value = None
    if kind == "nice" and value is not None and -20 <= value <= 19:
        return ("nice", value)
    if kind == "fifo" and value is not None and 1 <= value <= 99:
        return ("fifo", value)
    raise ValueError(f"loop priority {text!r}: expected 'inherit', 'nice:N' (N in -20..19) or 'fifo:N' (N in 1..99)")


def apply_loop_priority(kind: str, value: int) -> Optional[str]:
    """Give the calling thread (a loop thread) its scheduling priority; return None or why it was refused."""
    try:
        if kind == "nice":
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), value)  # Linux: a thread id is one thread
        elif kind == "fifo":
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(value))  # 0: the calling thread
    except OSError as e:
        return f"{kind}:{value}: {e.strerror}"
    return None


@dataclass(frozen=True)
class FastPathOptions:
    """Switches of the fast path. The checks are fastflannel's additions to Flannel, each on by default."""

    check_peer_source: bool = True  # drop datagrams whose outer source is not the PublicIP of a current route/lease
    check_inner_dest: bool = True  # drop inner packets whose destination is not in own_subnet (no open relay)
    batch: int = 64  # max packets per recvmmsg/sendmmsg/TUN-drain burst
    threads: int = 2  # 2: one loop thread per direction; 1: one thread for both (docs/fastpath.md: measured)
    spin: int = 8  # bursts read without poll() while a fd keeps returning data; 0: poll() before every burst
    # busy-poll window: when nothing is ready after a burst, look again (zero-timeout poll, yielding the CPU)
    # for up to this many microseconds before sleeping in poll(); adaptive below it (docs/fastpath.md "Wake-ups").
    # 0: off (sleep at once). An idle loop never spins: a window starts only after a wake-up.
    busy_poll_us: int = 0
    # scheduling of the loop threads (docs/fastpath.md "Wake-ups"): '' inherits the daemon's, 'nice:N' sets the
    # threads' nice value, 'fifo:N' SCHED_FIFO priority N (a woken loop preempts ordinary tasks at once).
    loop_priority: str = ""
    # adaptive priority of a real-time loop (fifo:N): after this many one-packet wake-ups in a row from one source,
    # each < 100 us after the last (a one-way small-packet stream, which a FIFO loop would serve one preemption of
    # its producer per packet), the loop runs as an ordinary thread until it has been idle for 2 ms. 0: never.
    demote_after: int = 0
    # Offloads (docs/fastpath.md "Offloads"; Cython only). tun_offload: tun_fd was opened with IFF_VNET_HDR and
    # TSO (tun.open_tun_offload): split super-packets on read, write coalesced GSO packets. udp_gso: send the
    # segments of a run with UDP_SEGMENT (only in offload mode). udp_gro: enable UDP_GRO on udp_fd. tun_uso: also
    # coalesce UDP datagrams of one flow into UDP GSO writes (only in offload mode; tun.uso_supported probes it).
    tun_offload: bool = False
    udp_gso: bool = True
    udp_gro: bool = False
    tun_uso: bool = False
    implementation: Optional[str] = None  # "cython"/"python"; None: IMPLEMENTATION (env/extension decide)


def tune_socket(sock: socket.socket, size: int = SOCKET_BUFFER_BYTES, rcvbuf: Optional[int] = None) -> Tuple[int, int]:
    """Raise SO_SNDBUF to ``size`` and SO_RCVBUF to ``rcvbuf`` (default ``size``) on ``sock`` (FORCE variants
    first, needing CAP_NET_ADMIN).

    Returns the (sndbuf, rcvbuf) the kernel granted (it reports twice the requested value). Never raises for a
    refused size: the plain options are capped by net.core.[rw]mem_max instead.
    """
    for force, plain, want in ((getattr(socket, "SO_SNDBUFFORCE", 32), socket.SO_SNDBUF, size),
                               (getattr(socket, "SO_RCVBUFFORCE", 33), socket.SO_RCVBUF, rcvbuf or size)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, want)
        except OSError:
            try:
                sock.setsockopt(socket.SOL_SOCKET, plain, want)
            except OSError as e:
                log.warning("cannot set socket buffer option %d to %d bytes: %s", plain, want, e)
    return (sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF),
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))


def _enable_udp_gro(fd: int) -> bool:
    """Set UDP_GRO on socket ``fd`` (Linux 5.0+); False (logged) if the kernel refuses."""
    s = socket.socket(fileno=os.dup(fd))
    try:
        s.setsockopt(SOL_UDP, UDP_GRO, 1)
        return True
    except OSError as e:
        log.warning("UDP_GRO refused on fd %d (%s): receiving one datagram per slot", fd, e)
        return False
    finally:
        s.close()


class FastPath:
    """Forward packets TUN -> UDP (tx) and UDP -> TUN (rx) in loop thread(s) steered by route updates.

    Owns nothing it did not open: the caller keeps ownership of tun_fd and udp_fd and closes them AFTER close().
    Thread-safety: the control methods (set_route, del_route, start, close) may be called from any thread; they
    are serialised by a lock that the loops never take. stats() and check() are lock-free.
    """

    def __init__(self, tun_fd: int, udp_fd: int, *, network: IPv4Network, subnet_len: int,
                 own_subnet: IPv4Network, tun_ip: IPv4Address, mtu: int, port: int = 8285,
                 options: FastPathOptions = FastPathOptions()) -> None:
        network = IPv4Network(network)
        own_subnet = IPv4Network(own_subnet)
        if not network.prefixlen < subnet_len <= 32:
            raise ValueError(f"subnet_len {subnet_len} must be longer than the network prefix /{network.prefixlen}"
                             f" and at most 32 (network {network})")
        entries = 1 << (subnet_len - network.prefixlen)
        if entries > MAX_TABLE_ENTRIES:
            raise ValueError(f"network {network} with subnet_len {subnet_len} needs {entries} route table entries;"
                             f" the fast path supports at most {MAX_TABLE_ENTRIES} (subnet_len <= "
                             f"{network.prefixlen + 22})")
        if own_subnet.prefixlen != subnet_len or not own_subnet.subnet_of(network):
            raise ValueError(f"own_subnet {own_subnet} must be a /{subnet_len} inside {network}")
        if not 68 <= mtu <= 65535:
            raise ValueError(f"mtu {mtu} out of range 68..65535")
        if not 1 <= port <= 65535:
            raise ValueError(f"port {port} out of range 1..65535")
        if not 1 <= options.batch <= MAX_BATCH:
            raise ValueError(f"batch {options.batch} out of range 1..{MAX_BATCH}")
        if not 0 <= options.spin <= 1024:
            raise ValueError(f"spin {options.spin} out of range 0..1024")
        self._priority = parse_loop_priority(options.loop_priority)
        if not 0 <= options.busy_poll_us <= MAX_BUSY_POLL_US:
            raise ValueError(f"busy_poll_us {options.busy_poll_us} out of range 0..{MAX_BUSY_POLL_US}")
        if not 0 <= options.demote_after <= MAX_DEMOTE_AFTER:
            raise ValueError(f"demote_after {options.demote_after} out of range 0..{MAX_DEMOTE_AFTER}")
        if options.threads not in (1, 2):
            raise ValueError(f"threads must be 1 or 2, not {options.threads}")
        for name, fd in (("tun_fd", tun_fd), ("udp_fd", udp_fd)):
            if not isinstance(fd, int) or fd < 0:
                raise ValueError(f"{name} must be a file descriptor number, not {fd!r}")
        self.network = network
        self.subnet_len = subnet_len
        self.own_subnet = own_subnet
        self.tun_ip = IPv4Address(tun_ip)
        self.mtu = mtu
        self.port = port
        self.options = options
        self.tun_fd = tun_fd
        self.udp_fd = udp_fd
        impl = implementation_module(options.implementation)
        self.implementation: str = impl.IMPLEMENTATION
        if impl.IMPLEMENTATION != "cython" and (options.tun_offload or options.udp_gro or options.tun_uso):
            raise ValueError("offloads (tun_offload, udp_gro, tun_uso) need the Cython fast path")
        if options.udp_gro and not _enable_udp_gro(udp_fd):
            options = replace(options, udp_gro=False)
            self.options = options
        self._lock = threading.Lock()
        self._routes: Dict[IPv4Network, IPv4Address] = {}
        self._peer_refs: Dict[int, int] = {}
        # per-peer counters: each accepted peer holds a peer id (1..table entries) naming its counter blocks in the
        # loop; ids are reused smallest first once a peer's last route is gone (its counters then vanish)
        self._peer_ids: Dict[int, int] = {}
        self._free_ids: List[int] = []
        self._next_id = 1
        self._freed: List[int] = []  # peer ids freed by the update_routes call in progress (lock held)
        self._threads: List[threading.Thread] = []
        self._errors: List[BaseException] = []
        self._started = False
        self._closed = False
        self._proxy = impl.Proxy(
            tun_fd, udp_fd, int(network.network_address), network.prefixlen, subnet_len,
            int(own_subnet.network_address), own_subnet.prefixlen, int(self.tun_ip), mtu, port,
            bool(options.check_peer_source), bool(options.check_inner_dest), options.batch, spin=options.spin,
            busy_poll_us=options.busy_poll_us, demote_after=options.demote_after,
            tun_offload=bool(options.tun_offload), udp_gso=bool(options.udp_gso), udp_gro=bool(options.udp_gro),
            tun_uso=bool(options.tun_uso))

    # --- lifecycle ---

    def start(self) -> None:
        """Spawn the loop thread(s) (one per direction, or one for both: options.threads)."""
        with self._lock:
            if self._closed:
                raise ValueError("FastPath is closed")
            if self._started:
                raise RuntimeError("FastPath already started")
            os.set_blocking(self.tun_fd, False)
            os.set_blocking(self.udp_fd, False)
            roles = [ROLE_BOTH] if self.options.threads == 1 else [ROLE_TX, ROLE_RX]
            for role in roles:
                self._proxy.mark_running(role)
            self._started = True
            for role in roles:
                t = threading.Thread(target=self._run, args=(role,), daemon=True,
                                     name=f"fastpath-{ROLE_NAMES[role]}")
                self._threads.append(t)
                t.start()

    def _run(self, role: int) -> None:
        if self._priority[0]:
            why = apply_loop_priority(*self._priority)
            if why is not None:
                log.warning("event=loop_priority_refused loop=%s priority=%s: the loop runs at the daemon's "
                            "priority", ROLE_NAMES[role], why)
        try:
            self._proxy.run(role)
        except BaseException as e:  # stored for check(); the process goes on
            log.error("fast path %s loop stopped: %s", ROLE_NAMES[role], e)
            self._errors.append(e)

    def check(self) -> None:
        """Raise the first error a loop thread died with (a FastPathError, also the right OSError subclass)."""
        if self._errors:
            raise self._errors[0]

    def close(self) -> None:
        """Stop the loop(s) (eventfd/pipe in their poll sets), join them and free C memory; idempotent.

        Never closes tun_fd/udp_fd. Raises FastPathError(ETIMEDOUT) if a loop does not return in JOIN_TIMEOUT_S,
        in which case its memory is kept (leaked) rather than freed under it.
        """
        with self._lock:
            if self._closed:
                return
            self._proxy.stop()
            for t in self._threads:
                t.join(JOIN_TIMEOUT_S)
                if t.is_alive():
                    raise fastpath_error(errno.ETIMEDOUT, f"fast path thread {t.name} did not stop")
            self._closed = True
            self._proxy.close()

    def __enter__(self) -> "FastPath":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True) and hasattr(self, "_proxy"):
            warnings.warn(f"unclosed {self!r}", ResourceWarning, source=self)
            try:
                self.close()
            except Exception:  # noqa: BLE001 - nothing to report to in a finaliser
                pass

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("running" if self._started else "idle")
        return (f"<FastPath {self.implementation} {state} {self.own_subnet} in {self.network}"
                f" tun_fd={self.tun_fd} udp_fd={self.udp_fd}>")

    # --- routes ---

    def _index(self, subnet: IPv4Network) -> int:
        """The slot of ``subnet`` in the flat table (integer arithmetic: ``ipaddress``'s ``subnet_of`` and a
        re-parse cost 75 us per route, most of programming 5,000 peers)."""
        if not isinstance(subnet, IPv4Network):
            subnet = IPv4Network(subnet)
        offset = int(subnet.network_address) - int(self.network.network_address)
        if subnet.prefixlen != self.subnet_len or not 0 <= offset < self.network.num_addresses:
            raise ValueError(f"route subnet {subnet} is not a /{self.subnet_len} inside {self.network}")
        return offset >> (32 - self.subnet_len)

    def _apply(self, cmds: Sequence[Tuple[int, int, int]]) -> None:
        self.check()
        try:
            self._proxy.apply(cmds)
        except FastPathError:
            self.check()  # a loop that died explains the failure better
            raise

    def set_route(self, subnet: IPv4Network, next_hop: IPv4Address) -> None:
        """Route ``subnet`` (a /subnet_len of the network) to the peer ``next_hop`` (its PublicIP), port ``port``.

        Works before or after start(); idempotent. When it returns, the loop uses the route (and accepts
        datagrams from ``next_hop``). Raises ValueError for a subnet outside the network or an unusable next hop,
        FastPathError if the loop is dead.
        """
        err = self.update_routes([(subnet, next_hop)])[0]
        if err is not None:
            raise err

    def del_route(self, subnet: IPv4Network) -> None:
        """Remove the route for ``subnet``; idempotent. Its traffic then gets ICMP net-unreachable."""
        err = self.update_routes([(subnet, None)])[0]
        if err is not None:
            raise err

    def update_routes(self, changes: Sequence[Tuple[IPv4Network, Optional[IPv4Address]]]) -> List[Optional[ValueError]]:
        """``set_route(subnet, next_hop)`` for every ``(subnet, next_hop)`` of ``changes`` and ``del_route(subnet)``
        for every ``(subnet, None)``, in order, with one loop round trip per ``CTL_CHUNK`` commands instead of one
        per route (5,000 peers after a restart: docs/scale.md). Returns None or the ValueError of each change (a
        bad subnet or next hop changes nothing). Raises FastPathError if the loop fails; then the Python-side
        table is as before the call and the next reconcile re-sends what the loop may lack."""
        out: List[Optional[ValueError]] = [None] * len(changes)
        with self._lock:
            if self._closed:
                raise ValueError("FastPath is closed")
            saved = (dict(self._routes), dict(self._peer_refs), dict(self._peer_ids), list(self._free_ids),
                     self._next_id)
            cmds: List[Tuple[int, ...]] = []
            for i, (subnet, nh) in enumerate(changes):
                try:
                    net = subnet if isinstance(subnet, IPv4Network) else IPv4Network(subnet)
                    if nh is None:
                        self._stage_del(net, cmds)
                    else:
                        self._stage_set(net, nh if isinstance(nh, IPv4Address) else IPv4Address(nh), cmds)
                except ValueError as e:
                    out[i] = e
            try:
                for k in range(0, len(cmds), CTL_CHUNK):
                    self._apply(cmds[k:k + CTL_CHUNK])
            except BaseException:
                self._routes, self._peer_refs, self._peer_ids, self._free_ids, self._next_id = saved
                self._freed = []
                raise
            for pid in self._freed:  # only now: the loop has synced the deletes and no longer counts under them
                heapq.heappush(self._free_ids, pid)
            self._freed = []
        return out

    def _stage_set(self, subnet: IPv4Network, nh: IPv4Address, cmds: List[Tuple[int, ...]]) -> None:
        """Append the commands of routing ``subnet`` to ``nh`` and update the Python-side table (lock held)."""
        if nh.is_unspecified or int(nh) == 0xFFFFFFFF:
            raise ValueError(f"next hop {nh} for {subnet} is not a peer address")
        idx = self._index(subnet)
        old = self._routes.get(subnet)
        if old == nh:
            return
        ip = int(nh)
        if self._peer_refs.get(ip, 0) == 0:
            self._peer_ids[ip] = self._alloc_id()
            cmds.append((CMD_PEER_ADD, 0, ip, self._peer_ids[ip]))  # accept the peer before routing to it
        cmds.append((CMD_SET_ROUTE, idx, ip, self._peer_ids[ip]))
        self._peer_refs[ip] = self._peer_refs.get(ip, 0) + 1
        self._routes[subnet] = nh
        if old is not None:
            self._stage_unref(int(old), cmds)

    def _stage_del(self, subnet: IPv4Network, cmds: List[Tuple[int, ...]]) -> None:
        idx = self._index(subnet)
        old = self._routes.pop(subnet, None)
        if old is not None:
            cmds.append((CMD_DEL_ROUTE, idx, 0))
            self._stage_unref(int(old), cmds)

    def _alloc_id(self) -> int:
        """A free peer id with zeroed counter blocks (the loop no longer writes a freed id: its route and peer
        entry were removed, and synced, before it was freed)."""
        pid = self._free_ids[0] if self._free_ids else self._next_id
        self._proxy.reset_peer(pid)
        if self._free_ids:
            heapq.heappop(self._free_ids)
        else:
            self._next_id += 1
        return pid

    def _stage_unref(self, ip: int, cmds: List[Tuple[int, ...]]) -> None:
        """Drop one route's reference to peer ``ip``; its last route gone, the peer is no longer accepted."""
        n = self._peer_refs[ip] - 1
        if n:
            self._peer_refs[ip] = n
        else:
            del self._peer_refs[ip]
            cmds.append((CMD_PEER_DEL, 0, ip))
            self._freed.append(self._peer_ids.pop(ip))  # reusable once update_routes has synced the delete

    def routes(self) -> Dict[IPv4Network, IPv4Address]:
        """Return a copy of the Python-side mirror of the route table."""
        with self._lock:
            return dict(self._routes)

    def peers(self) -> Dict[IPv4Address, int]:
        """Return the accepted peer addresses with the number of routes using each."""
        with self._lock:
            return {IPv4Address(ip): n for ip, n in self._peer_refs.items()}

    # --- observation ---

    def stats(self) -> Dict[str, int]:
        """Return the counters (names in contract.COUNTER_NAMES); safe while running, no lock."""
        return self._proxy.stats()

    def peer_stats(self) -> Dict[IPv4Address, Dict[str, int]]:
        """Return the per-peer counters (names in contract.PEER_COUNTER_NAMES) of every accepted peer.

        tx is keyed by the route's next hop, rx by the outer source. A peer's counters start at 0 when it is
        accepted (its first route) and vanish when its last route is deleted. Datagrams accepted from a source
        that is not a current peer (only with check_peer_source off) are counted under 0.0.0.0, present only
        when non-zero. Safe while running (relaxed loads); takes the control lock for a consistent id map.
        """
        with self._lock:
            if self._closed:
                raise ValueError("FastPath is closed")
            out = {IPv4Address(ip): dict(zip(PEER_COUNTER_NAMES, self._proxy.peer_counters(pid)))
                   for ip, pid in sorted(self._peer_ids.items())}
            other = self._proxy.peer_counters(0)
            if any(other):
                out[IPv4Address(0)] = dict(zip(PEER_COUNTER_NAMES, other))
            return out

    # --- pure per-packet entry points (loop not running) ---

    def process_outbound(self, packet: bytes) -> Tuple[str, Optional[bytes], Optional[IPv4Address]]:
        """Apply the TUN -> UDP rules to one packet, with no I/O, updating the counters as the loop would.

        Returns (verdict, bytes, next_hop): ("send", packet with TTL-1, peer), ("icmp", ICMP for the TUN, None)
        or ("drop:<reason>", None, None). Raises RuntimeError while the loop runs.
        """
        verdict, data, nh = self._proxy.process_outbound(bytes(packet))
        return verdict, data, (IPv4Address(nh) if nh else None)

    def process_inbound(self, src: IPv4Address, datagram: bytes) -> Tuple[str, Optional[bytes]]:
        """Apply the UDP -> TUN rules to one datagram from ``src``: ("write", bytes) or ("drop:<reason>", None)."""
        return self._proxy.process_inbound(int(IPv4Address(src)), bytes(datagram))

    def process_outbound_batch(self, packets: Sequence[bytes]) -> int:
        """Run the loop's TX stage over ``packets`` (one batch, no I/O); return how many would be sent."""
        return self._proxy.process_outbound_batch(packets)

    def process_inbound_batch(self, src: IPv4Address, datagrams: Sequence[bytes]) -> int:
        """Run the loop's RX stage over ``datagrams`` from ``src`` (no I/O); return how many would be written."""
        return self._proxy.process_inbound_batch(int(IPv4Address(src)), datagrams)


__all__ = ["FastPath", "FastPathOptions", "FastPathError", "IMPLEMENTATION", "COUNTER_NAMES", "PEER_COUNTER_NAMES",
           "tune_socket",
           "implementation_module", "UDP_ENCAP_OVERHEAD", "MAX_TABLE_ENTRIES", "GRO_RCVBUF_BYTES"]
