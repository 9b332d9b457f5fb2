# SPDX-License-Identifier: Apache-2.0
"""Every switch of the udp backend as one typed value, filled in one place (``UdpOptions.load``).

Sources, in order: the network config's ``Backend`` object (``Port``, as flanneld), then the daemon's environment
(``FASTFLANNEL_UDP_*``; fastflanneld has no command-line flag for these). Operator switches change behaviour a
user may want (the two inbound checks, the offloads); measurement knobs (``bench_*``) exist for benchmarks and
tests and keep their defaults in production. docs/configuration.md has the table (knob, default, meaning, cost).
Pure: no I/O, no root; bad input raises BackendError naming the variable and what it accepts.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Mapping, Optional

from fastflannel.datapath.contract import MAX_BUSY_POLL_US, MAX_DEMOTE_AFTER
from fastflannel.errors import BackendError

DEFAULT_PORT = 8285
# flannel0's transmit queue, i.e. the ring the kernel fills for our read()s. The default 500 overflows when a pod's
# 64 KB TCP burst (44 packets) arrives while the reader is off-CPU: measured 4,880 drops (= retransmits) in 4 s.
# docs/fastpath.md "Goal A".
TUN_TXQUEUELEN = 5000
# Loop threads when both offloads are on. With ~45 packets per kernel crossing one loop serving both directions is
# seldom busy, and one thread instead of two halves the wake-ups (polls per 3 s TCP run 20-25k -> 4-7k): measured
# side by side, 8 interleaved pairs on 2 vCPUs, 1 stream 5.84 vs 5.33 Gb/s (within noise), 4 streams 6.39 vs
# 5.32 Gb/s (docs/fastpath.md "Offloads"). The per-packet path keeps 2.
OFFLOAD_THREADS = 1
PLAIN_THREADS = 2
# The loop threads' scheduling (FASTFLANNEL_UDP_LOOP_PRIORITY: inherit, nice:N, fifo:N). SCHED_FIFO 1: a woken loop
# runs at once instead of queueing behind ordinary tasks, like the kernel's own softirq forwarding for vxlan.
# Measured side by side on 2 shared vCPUs (docs/fastpath.md "Wake-ups", docs/benchmarks.md): request/response
# 0.48x -> 0.71x VXLAN, ping p99 7.4x -> 2.4x VXLAN's, TCP 1 stream 0.49x -> 0.57x, 4 streams 0.37x -> 0.65x; idle
# unchanged; CPU per Gbit up (smaller batches). Refused without CAP_SYS_NICE (or an RT budget in the cgroup):
# logged once per loop thread, the loop runs at the daemon's priority. Re-measured 2026-12-02 quiet and loaded
# (docs/benchmarks.md): kept for the loaded case (ping p99 0.45 vs 4.3 ms); on a quiet host `inherit` batches
# small-packet floods better (a FIFO loop preempts the sender per packet): DEMOTE_AFTER below takes that case back.
LOOP_PRIORITY = "fifo:1"
# A real-time loop runs as an ordinary thread after this many one-packet wake-ups in a row from one source, each
# < 100 us after the last, until it idles 2 ms (FASTFLANNEL_UDP_DEMOTE_AFTER; 0: never). A FIFO loop woken on a
# small-packet sender's CPU preempts it at every packet, one packet per wake-up; request/response alternates
# sources and keeps FIFO. docs/fastpath.md "Wake-ups" has the measurement.
DEMOTE_AFTER = 32
# The busy-poll window before the loop sleeps (FASTFLANNEL_UDP_BUSY_POLL_US): off, measured slower on shared CPUs.
BUSY_POLL_US = 0

# field -> environment variable
ENV = {
    "check_peer_source": "FASTFLANNEL_UDP_CHECK_PEER_SOURCE",
    "check_inner_dest": "FASTFLANNEL_UDP_CHECK_INNER_DEST",
    "tun_offload": "FASTFLANNEL_UDP_TUN_OFFLOAD",
    "udp_gso": "FASTFLANNEL_UDP_GSO",
    "udp_gro": "FASTFLANNEL_UDP_GRO",
    "tun_uso": "FASTFLANNEL_UDP_TUN_USO",
    "bench_threads": "FASTFLANNEL_UDP_THREADS",
    "bench_spin": "FASTFLANNEL_UDP_SPIN",
    "bench_busy_poll_us": "FASTFLANNEL_UDP_BUSY_POLL_US",
    "bench_loop_priority": "FASTFLANNEL_UDP_LOOP_PRIORITY",
    "bench_demote_after": "FASTFLANNEL_UDP_DEMOTE_AFTER",
    "bench_txqueuelen": "FASTFLANNEL_UDP_TXQUEUELEN",
    "bench_rcvbuf": "FASTFLANNEL_UDP_RCVBUF",
    "bench_gso_max_size": "FASTFLANNEL_UDP_GSO_MAX_SIZE",
}
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_RANGES = {  # integer knobs: (min, max)
    "bench_threads": (1, 2), "bench_spin": (0, 1024), "bench_busy_poll_us": (0, MAX_BUSY_POLL_US),
    "bench_txqueuelen": (1, 1 << 20), "bench_demote_after": (0, MAX_DEMOTE_AFTER),
    "bench_rcvbuf": (4096, 1 << 30), "bench_gso_max_size": (1, 65536),
}


@dataclass(frozen=True)
class UdpOptions:
    """The udp backend's switches. Operator switches first, measurement knobs (``bench_*``) after."""

    port: int = DEFAULT_PORT  # Backend.Port: the UDP port, the same on every host (flanneld's 8285)
    # inbound checks flanneld lacks (docs/security.md); off only while migrating clusters with NAT'd peers
    check_peer_source: bool = True  # drop datagrams whose source is not a current lease's PublicIP
    check_inner_dest: bool = True  # drop inner packets not for our subnet (off = open relay into the pod network)
    # offloads (docs/fastpath.md "Offloads", Cython only): each probed at start with a clean fallback
    tun_offload: bool = True  # TUN with IFF_VNET_HDR + TSO: split super-packets, write coalesced GSO packets
    udp_gso: bool = True  # send split segments with UDP_SEGMENT (off: one sendto per segment; kernel bug 1.5)
    udp_gro: bool = True  # UDP_GRO on the socket: one receive carries up to 64 datagrams
    tun_uso: bool = True  # with tun_offload: write runs of one UDP flow's datagrams as one UDP GSO packet (6.2+)
    # measurement knobs: benchmarks and tests only; None/0 = the measured default
    bench_threads: Optional[int] = None  # loop threads; None: 1 with both offloads, else 2
    bench_spin: int = 8  # bursts read without poll() while a fd keeps returning data (0: poll every burst)
    bench_busy_poll_us: int = BUSY_POLL_US  # busy-poll window before sleeping, us (0: off; docs/fastpath.md "Wake-ups")
    # the loop threads' scheduling: 'inherit', 'nice:N' or 'fifo:N' (an operator may turn it off: configuration.md)
    bench_loop_priority: str = LOOP_PRIORITY
    bench_demote_after: int = DEMOTE_AFTER  # thin wake-ups before a real-time loop runs as an ordinary one (0: never)
    bench_txqueuelen: int = TUN_TXQUEUELEN  # flannel0's txqueuelen
    bench_rcvbuf: Optional[int] = None  # SO_RCVBUF bytes; None: 32 MiB with GRO, else 4 MiB (fastpath.py)
    bench_gso_max_size: int = 0  # TUN gso_max_size; 0: the kernel's (62000 measured harmful)

    @classmethod
    def load(cls, backend_option=None, environ: Optional[Mapping[str, str]] = None) -> "UdpOptions":
        """Fill the options from ``backend_option`` (NetworkConfig.backend_option: name, default -> value) and
        ``environ`` (the daemon's environment); raise BackendError for a bad value."""
        values = {}
        if backend_option is not None:
            port = backend_option("Port", DEFAULT_PORT) or DEFAULT_PORT
            if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
                raise BackendError(f"Backend.Port: {port!r} is not a UDP port number (1..65535)")
            values["port"] = port
        env = environ or {}
        for f in fields(cls):
            var = ENV.get(f.name)
            raw = env.get(var, "").strip() if var else ""
            if raw:
                values[f.name] = _parse(f.name, var, raw)
        return cls(**values)

    def threads(self) -> int:
        """Loop threads: the knob, else 1 when both offloads are on (after the start-up probes), else 2."""
        if self.bench_threads is not None:
            return self.bench_threads
        return OFFLOAD_THREADS if self.tun_offload and self.udp_gro else PLAIN_THREADS


def _parse(name: str, var: str, raw: str):
    if name == "bench_loop_priority":
        from fastflannel.datapath.fastpath import parse_loop_priority

        try:
            parse_loop_priority(raw)
        except ValueError as e:
            raise BackendError(f"{var}={raw!r}: {e}") from None
        return raw
    if name in _RANGES:
        lo, hi = _RANGES[name]
        try:
            v = int(raw)
        except ValueError:
            raise BackendError(f"{var}={raw!r}: not an integer ({lo}..{hi})") from None
        if not lo <= v <= hi:
            raise BackendError(f"{var}={v}: out of range {lo}..{hi}")
        return v
    low = raw.lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise BackendError(f"{var}={raw!r}: not a switch (use 1/0, true/false, yes/no or on/off)")


__all__ = ["UdpOptions", "ENV", "DEFAULT_PORT", "TUN_TXQUEUELEN", "OFFLOAD_THREADS", "LOOP_PRIORITY", "DEMOTE_AFTER",
           "BUSY_POLL_US"]
