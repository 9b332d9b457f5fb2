# SPDX-License-Identifier: Apache-2.0
"""The data path's contract: the one source of every name and number the two implementations share.

Counter names and their slots, per-peer counters, batch-size buckets, route/peer commands, loop roles, verdicts,
the errnos that end a loop, the error type, the encapsulation overhead and the wire constants of the packet rules.

Readers: the twin (``twin.py``), the front module (``fastpath.py``), ``service/metrics.py``, ``lab/bench.py``, and
the Cython extension: ``setup.py`` writes ``includes/contract.pxd`` (C enums, the per-peer counter structs and two
inline helpers) from this module at build time (``c_declarations()``), and ``_fastpath.pyx`` imports this module
for the Python-level names. Nothing here may import the twin, the extension or anything outside the standard
library: ``setup.py`` loads this file by path, before the package is installed.
"""
from __future__ import annotations

import errno
import os
import zlib
from typing import Dict, List, Tuple, Type

# --- counters -------------------------------------------------------------------------------------------------

# Order matters: it is the layout of the C counter array (``C_<NAME>`` enum in the generated contract.pxd).
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
    # Each direction's sum comes first, then its buckets in BATCH_BUCKET_NAMES order (the C code relies on it).
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
    # wake-ups and the busy-poll window (docs/fastpath.md "Wake-ups"; FastPathOptions.busy_poll_us)
    "polls_slept",  # blocking poll() calls entered with nothing ready: the loop went to sleep (one wake-up each)
    "busy_polls",  # zero-timeout polls made inside busy-poll windows
    "busy_hits",  # windows that found data before they ran out (a wake-up saved)
    "busy_misses",  # windows that ran out (then the loop slept)
    # adaptive priority of a real-time loop (docs/fastpath.md "Wake-ups"; FastPathOptions.demote_after)
    "prio_demotions",  # a real-time loop dropped to SCHED_OTHER after demote_after one-packet wake-ups in a row
    "prio_restores",  # ... and became real-time again after PRIO_IDLE_MS without a packet
)
COUNTER_INDEX: Dict[str, int] = {name: i for i, name in enumerate(COUNTER_NAMES)}

BATCH_BUCKETS: Tuple[int, ...] = (1, 4, 16, 64)  # upper bounds; a last bucket takes everything above 64
BATCH_BUCKET_NAMES: Tuple[str, ...] = tuple(f"le_{b}" for b in BATCH_BUCKETS) + (f"gt_{BATCH_BUCKETS[-1]}",)


def batch_bucket(n: int) -> int:
    """Return the bucket (0..4) of a burst of ``n`` packets: <= 1, <= 4, <= 16, <= 64, > 64."""
    for i, le in enumerate(BATCH_BUCKETS):
        if n <= le:
            return i
    return len(BATCH_BUCKETS)


for _d in ("tx", "rx"):  # the C ff_count_batch() adds 1 + bucket to the sum's slot
    _i = COUNTER_INDEX[f"{_d}_batch_packets"]
    if COUNTER_NAMES[_i + 1:_i + 2 + len(BATCH_BUCKETS)] != tuple(f"{_d}_batch_{b}" for b in BATCH_BUCKET_NAMES):
        raise ImportError(f"contract: the {_d} batch-size buckets must follow {_d}_batch_packets in COUNTER_NAMES")


# Per-peer counters (Proxy.peer_counters(pid), FastPath.peer_stats()): tx by the route's next hop, rx by the outer
# source. In C one block per direction (ff_peer_tx / ff_peer_rx, fields in this order, padded to a power of two
# of uint64_t). Peer id 0 is the "other" block: datagrams from sources that are not current peers, accepted
# because check_peer_source is off (and commands without a peer id).
PEER_TX_FIELDS: Tuple[str, ...] = ("packets", "bytes", "drop_send")
PEER_RX_FIELDS: Tuple[str, ...] = ("packets", "bytes", "drop_foreign_dest", "drop_malformed", "drop_ttl")
PEER_COUNTER_NAMES: Tuple[str, ...] = (tuple(f"tx_{f}" for f in PEER_TX_FIELDS)
                                       + tuple(f"rx_{f}" for f in PEER_RX_FIELDS))
PEER_INDEX: Dict[str, int] = {name: i for i, name in enumerate(PEER_COUNTER_NAMES)}
PEER_CHUNK_SHIFT = 8  # peer counter blocks are allocated 256 at a time (never moved, freed by close())

# --- verdicts (process_outbound / process_inbound); the C ff_verdict enum V_<NAME> has this order --------------

SEND = "send"
ICMP = "icmp"
WRITE = "write"
DROP_MALFORMED = "drop:malformed"
DROP_NO_ROUTE = "drop:no_route"
DROP_TTL = "drop:ttl"
DROP_UNKNOWN_PEER = "drop:unknown_peer"
DROP_FOREIGN_DEST = "drop:foreign_dest"
VERDICTS: Tuple[str, ...] = (SEND, ICMP, WRITE, DROP_MALFORMED, DROP_NO_ROUTE, DROP_TTL, DROP_UNKNOWN_PEER,
                             DROP_FOREIGN_DEST)

# --- control: route/peer commands (Proxy.apply: (cmd, arg, value[, peer id])) and loop roles (Proxy.run) -------
# The ctl wire struct ff_command exists only in _fastpath.pxd.

CMD_SET_ROUTE = 1  # (index, next_hop, peer id of next_hop)
CMD_DEL_ROUTE = 2  # (index, 0)
CMD_PEER_ADD = 3  # (0, peer ip, peer id)
CMD_PEER_DEL = 4  # (0, peer ip)
CMD_SYNC = 99  # ctl only: echoed back by the loop once every earlier command is applied
COMMANDS: Dict[str, int] = {"CMD_SET_ROUTE": CMD_SET_ROUTE, "CMD_DEL_ROUTE": CMD_DEL_ROUTE,
                            "CMD_PEER_ADD": CMD_PEER_ADD, "CMD_PEER_DEL": CMD_PEER_DEL, "CMD_SYNC": CMD_SYNC}

ROLE_BOTH = 0
ROLE_TX = 1
ROLE_RX = 2
ROLE_NAMES = {ROLE_BOTH: "tx+rx", ROLE_TX: "tx", ROLE_RX: "rx"}

# --- errors -----------------------------------------------------------------------------------------------------

# errnos after which a loop cannot go on: its fds are gone or wrong (the C ff_fatal() is generated from these)
FATAL_ERRNO_NAMES: Tuple[str, ...] = ("EBADF", "EBADFD", "ENOTSOCK", "EFAULT", "EINVAL", "ENOMEM", "EPIPE", "ENODEV",
                                      "EISDIR")
FATAL_ERRNOS = frozenset(getattr(errno, n) for n in FATAL_ERRNO_NAMES)


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


# --- encapsulation and wire constants ---------------------------------------------------------------------------

MAX_BUSY_POLL_US = 10000  # the loop's busy-poll window limit: a bound on spinning, never a way to burn a core

UDP_ENCAP_OVERHEAD = 28  # bytes: 20 outer IPv4 + 8 UDP; TUN MTU = external MTU - 28 (flannel encapOverhead)

IPV4_HDR_MIN = 20  # bytes, IHL 5
IPV4_HDR_ICMP_LIMIT = 60  # flannel: no ICMP about offenders whose header is >= 20 + MAX_IPOPTLEN (40) bytes
IPV4_MAX = 65535  # largest IPv4 total length
IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17
ICMP_DEST_UNREACH = 3  # RFC 792
ICMP_NET_UNREACH = 0
ICMP_TTL = 8  # flannel send_net_unreachable
ICMP_ECHO_REQUEST = 8  # RFC 792 type: an echo request to an unleased subnet gets a net-unreachable (issue 14) ...
ICMP_ECHO_UNREACH_GAP_NS = 10_000_000  # ... at most one per 10 ms per loop (100/s): RFC 1812 4.3.2.8 rate limit
FRAG_OFFSET_MASK = 0x1FFF
TCP_FIN = 0x01
TCP_PSH = 0x08
TCP_ACK = 0x10
# offloads: struct virtio_net_hdr (host byte order) and UDP GSO/GRO (linux/udp.h; older libc headers lack them)
VNET_HDR_LEN = 10
VIRTIO_F_NEEDS_CSUM = 1
VIRTIO_GSO_NONE = 0
VIRTIO_GSO_TCPV4 = 1
VIRTIO_GSO_UDP_L4 = 5  # USO (linux/virtio_net.h): the TUN write path segments it (Linux >= 6.2)
SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104
SEGS_MAX = 256  # segments one TSO super-packet may split into (gso_size >= 256 for 64 KB)
WSLOTS = 64  # rx offload mode: pending TUN writes (single or coalesced packets) per flush
USO_SEGS = 64  # datagrams per coalesced UDP write (UDP_MAX_SEGMENTS of older kernels; newer ones allow 128)
# busy-poll window (run loop): events fed to the window policy (twin.busy_window_next, C ff_busy_next)
BUSY_HIT = 1  # data came within the window
BUSY_MISS = 2  # the window ran out: the loop sleeps
BUSY_WOKE = 3  # a sleep ended (after slept_ns)
BUSY_FLOOR_SHIFT = 3  # misses halve the window down to max >> 3, never to 0 while busy-polling is on
# adaptive priority (run loop; twin.thin_next, C ff_thin_next): a "thin" wake-up moved exactly one packet, from one
# source, less than THIN_GAP_NS after the previous wake-up of the same loop
THIN_NONE = 0  # the wake-up moved no packet, or more than one, or some of each direction
THIN_TUN = 1  # exactly one packet read from the TUN
THIN_UDP = 2  # exactly one datagram received
THIN_GAP_NS = 100_000  # one-way single packets at >= 10 kpps: a stream, not request/response
PRIO_IDLE_MS = 2  # a demoted loop that sees nothing for this long is real-time again
MAX_DEMOTE_AFTER = 1 << 20

# The C names of the constants above (enums in the generated contract.pxd).
C_CONSTANTS: Dict[str, int] = {
    "IPV4_HDR_MIN": IPV4_HDR_MIN, "IPV4_HDR_ICMP_LIMIT": IPV4_HDR_ICMP_LIMIT, "IPV4_MAX": IPV4_MAX,
    "IPPROTO_ICMP": IPPROTO_ICMP, "IPPROTO_TCP": IPPROTO_TCP, "IPPROTO_UDP": IPPROTO_UDP,
    "ICMP_DEST_UNREACH": ICMP_DEST_UNREACH,
    "ICMP_NET_UNREACH": ICMP_NET_UNREACH, "ICMP_TTL": ICMP_TTL, "FRAG_OFFSET_MASK": FRAG_OFFSET_MASK,
    "ICMP_ECHO_REQUEST": ICMP_ECHO_REQUEST, "ICMP_ECHO_UNREACH_GAP_NS": ICMP_ECHO_UNREACH_GAP_NS,
    "TCP_FIN": TCP_FIN, "TCP_PSH": TCP_PSH, "TCP_ACK": TCP_ACK,
    "FF_VNET": VNET_HDR_LEN, "VIRTIO_F_NEEDS_CSUM": VIRTIO_F_NEEDS_CSUM, "VIRTIO_GSO_NONE": VIRTIO_GSO_NONE,
    "VIRTIO_GSO_TCPV4": VIRTIO_GSO_TCPV4, "VIRTIO_GSO_UDP_L4": VIRTIO_GSO_UDP_L4, "FF_SOL_UDP": SOL_UDP,
    "FF_UDP_SEGMENT": UDP_SEGMENT,
    "FF_UDP_GRO": UDP_GRO, "FF_SEGS_MAX": SEGS_MAX, "FF_WSLOTS": WSLOTS, "FF_USO_SEGS": USO_SEGS,
    "BUSY_HIT": BUSY_HIT, "BUSY_MISS": BUSY_MISS, "BUSY_WOKE": BUSY_WOKE, "BUSY_FLOOR_SHIFT": BUSY_FLOOR_SHIFT,
    "THIN_NONE": THIN_NONE, "THIN_TUN": THIN_TUN, "THIN_UDP": THIN_UDP, "THIN_GAP_NS": THIN_GAP_NS,
    "PRIO_IDLE_MS": PRIO_IDLE_MS, "FF_MAX_DEMOTE_AFTER": MAX_DEMOTE_AFTER,
    "FF_PEER_SHIFT": PEER_CHUNK_SHIFT, "FF_PEER_CHUNK": 1 << PEER_CHUNK_SHIFT,
    **COMMANDS,
    "ROLE_BOTH": ROLE_BOTH, "ROLE_TX": ROLE_TX, "ROLE_RX": ROLE_RX,
}


# --- the generated Cython declarations --------------------------------------------------------------------------

def _padded(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return p


def contract_hash() -> int:
    """A fingerprint of everything c_declarations() emits (the extension checks it at import: no stale build)."""
    return zlib.crc32(_c_body().encode()) & 0x7FFFFFFF


def c_declarations() -> str:
    """Return the text of ``includes/contract.pxd``: everything above that the C code needs, as Cython declarations.

    Written by setup.py before cythonize (only when it changed, so an unchanged contract rebuilds nothing).
    """
    return _c_body() + f"\n\ncdef enum:\n    FF_CONTRACT_HASH = {contract_hash()}  # contract_hash()\n"


def _c_body() -> str:
    out: List[str] = [
        "# SPDX-License-Identifier: Apache-2.0",
        "# GENERATED by setup.py from fastflannel/datapath/contract.py (c_declarations): do not edit, do not commit.",
        '"""The data path contract for the C code: counter slots, verdicts, commands, roles, constants, per-peer',
        'counter blocks, the batch-size bucket and the fatal-errno test."""',
        "from libc.stdint cimport uint64_t",
        "",
        "",
        'cdef extern from "<errno.h>" nogil:',
        "    enum:",
    ]
    out += [f"        {n}" for n in FATAL_ERRNO_NAMES]
    out += ["", "", "cdef enum:  # constants"]
    out += [f"    {name} = {value}" for name, value in C_CONSTANTS.items()]
    out += ["", "", "cdef enum:  # counter slots, COUNTER_NAMES order"]
    out += [f"    C_{name.upper()} = {i}" for i, name in enumerate(COUNTER_NAMES)]
    out += [f"    FF_NCOUNTERS = {len(COUNTER_NAMES)}"]
    out += ["", "", "cdef enum ff_verdict:  # VERDICTS order"]
    out += [f"    V_{v.replace(':', '_').upper()} = {i}" for i, v in enumerate(VERDICTS)]
    for struct, fields in (("ff_peer_tx", PEER_TX_FIELDS), ("ff_peer_rx", PEER_RX_FIELDS)):
        out += ["", "", f"cdef struct {struct}:  # one peer's block; PEER_{struct[-2:].upper()}_FIELDS order"]
        out += [f"    uint64_t {f}" for f in fields]
        pad = _padded(len(fields)) - len(fields)
        if pad:
            out += [f"    uint64_t _pad[{pad}]"]
    out += ["", "", "cdef enum:", f"    FF_PEER_TX_N = {len(PEER_TX_FIELDS)}", f"    FF_PEER_RX_N = {len(PEER_RX_FIELDS)}"]
    out += ["", "", "cdef inline int ff_batch_bucket(uint64_t n) noexcept nogil:",
            '    """The batch-size bucket of a burst of n packets (BATCH_BUCKETS; the last takes the rest)."""']
    out += [f"    if n <= {le}:\n        return {i}" for i, le in enumerate(BATCH_BUCKETS)]
    out += [f"    return {len(BATCH_BUCKETS)}"]
    out += ["", "", "cdef inline bint ff_fatal(int e) noexcept nogil:",
            '    """Tell whether errno e means the fd is gone or wrong (FATAL_ERRNO_NAMES)."""',
            "    return (" + "\n            or ".join(f"e == {n}" for n in FATAL_ERRNO_NAMES) + ")"]
    return "\n".join(out) + "\n"
