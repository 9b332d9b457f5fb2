# SPDX-License-Identifier: Apache-2.0
"""Benchmark the udp fast path: Cython vs the pure-Python twin, 64 B and MTU-size (1472 B) packets.

Two kinds:
- ``test_process_*``: the fast path alone. The loop's process phase (validation, O(1) route lookup, TTL and
  checksum patch, peer/destination checks, counters) over batches of packets copied into the loop's slots, no
  syscalls. This is what the Cython code buys; the issue expects >= 20x the twin.
- ``test_loop_*``: the whole loop with syscalls. The TUN socketpair and the UDP socket are pre-filled before
  start(), then the time to forward everything is measured, so no Python load generator competes for the two
  cores. Used to choose between one thread for both directions and one per direction (docs/fastpath.md).
Only loopback and socketpairs are used.
"""
from __future__ import annotations

import socket
import time
from ipaddress import IPv4Address, IPv4Network
from typing import Dict, List, Tuple

import pytest
from conftest import IMPLS

from fastflannel.datapath.twin import ip_checksum
from fastflannel.datapath.fastpath import FastPath, FastPathOptions

NETWORK = IPv4Network("10.244.0.0/16")
OWN = IPv4Network("10.244.1.0/24")
PEER = IPv4Address("127.0.0.2")
SIZES = [64, 1472]
BATCH = 256  # packets per benchmark call of the process phase
BIG_BUFFER = 64 << 20  # socket buffers for the pre-filled rigs (FORCE variants: root)


def packet(src: str, dst: str, size: int, i: int = 0) -> bytes:
    h = bytearray(20)
    h[0] = 0x45
    h[2:4] = size.to_bytes(2, "big")
    h[4:6] = (i & 0xFFFF).to_bytes(2, "big")
    h[8] = 64
    h[9] = 17
    h[12:16] = IPv4Address(src).packed
    h[16:20] = IPv4Address(dst).packed
    h[10:12] = ip_checksum(h).to_bytes(2, "big")
    return bytes(h) + bytes(size - 20)


def make(impl: str, tun_fd: int = 0, udp_fd: int = 0, port: int = 8285, threads: int = 2) -> FastPath:
    fp = FastPath(tun_fd, udp_fd, network=NETWORK, subnet_len=24, own_subnet=OWN, tun_ip=IPv4Address("10.244.1.0"),
                  mtu=1472, port=port, options=FastPathOptions(implementation=impl, threads=threads))
    for k in range(2, 250):  # a populated table: 248 peers' subnets
        fp.set_route(IPv4Network(f"10.244.{k}.0/24"), PEER if k == 2 else IPv4Address(f"127.0.{k}.1"))
    return fp


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("impl", IMPLS)
def test_process_outbound(benchmark, pps, impl: str, size: int) -> None:  # type: ignore[no-untyped-def]
    benchmark.group = f"process_outbound {size}B"
    with make(impl) as fp:
        pkts = [packet("10.244.1.5", f"10.244.{2 + i % 248}.7", size, i) for i in range(BATCH)]
        assert fp.process_outbound_batch(pkts) == BATCH
        benchmark(fp.process_outbound_batch, pkts)
    if benchmark.stats is not None:  # None under --benchmark-disable (make bench-smoke)
        benchmark.extra_info["pps"] = pps(benchmark.group, impl, BATCH, benchmark.stats.stats.mean)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("impl", IMPLS)
def test_process_inbound(benchmark, pps, impl: str, size: int) -> None:  # type: ignore[no-untyped-def]
    benchmark.group = f"process_inbound {size}B"
    with make(impl) as fp:
        pkts = [packet("10.244.2.7", f"10.244.1.{i % 250 + 2}", size, i) for i in range(BATCH)]
        assert fp.process_inbound_batch(PEER, pkts) == BATCH
        benchmark(fp.process_inbound_batch, PEER, pkts)
    if benchmark.stats is not None:  # None under --benchmark-disable (make bench-smoke)
        benchmark.extra_info["pps"] = pps(benchmark.group, impl, BATCH, benchmark.stats.stats.mean)


# --- the whole loop, pre-filled rigs -----------------------------------------------------------------------

def _big_buffers(sock: socket.socket) -> None:
    for opt in (33, 32):  # SO_RCVBUFFORCE, SO_SNDBUFFORCE
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, BIG_BUFFER)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF if opt == 33 else socket.SO_SNDBUF, BIG_BUFFER)


class PrefilledRig:
    """A FastPath whose TUN socketpair holds ``n_tx`` packets and whose UDP socket holds ``n_rx`` datagrams."""

    def __init__(self, impl: str, threads: int, size: int, n_tx: int, n_rx: int) -> None:
        self.tun_loop, self.tun = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for s in (self.tun_loop, self.tun, self.udp, self.peer):
            _big_buffers(s)
        self.udp.bind(("127.0.0.1", 0))
        port = self.udp.getsockname()[1]
        self.peer.bind((str(PEER), port))
        self.n_tx, self.n_rx = n_tx, n_rx
        out = packet("10.244.1.5", "10.244.2.7", size)
        back = packet("10.244.2.7", "10.244.1.5", size)
        for _ in range(n_tx):
            self.tun.send(out)
        for _ in range(n_rx):
            self.peer.sendto(back, ("127.0.0.1", port))
        self.fp = make(impl, self.tun_loop.fileno(), self.udp.fileno(), port, threads)

    def run(self) -> None:
        self.fp.start()
        deadline = time.monotonic() + 60
        while True:
            s = self.fp.stats()
            if s["tx_packets"] >= self.n_tx and s["rx_packets"] >= self.n_rx:
                break
            self.fp.check()
            if time.monotonic() > deadline:
                raise AssertionError(f"loop did not drain the rig: {s}")
            time.sleep(0.0005)
        self.fp.close()

    def close(self) -> None:
        self.fp.close()
        for s in (self.tun_loop, self.tun, self.udp, self.peer):
            s.close()


LOOP_N = {64: 20000, 1472: 10000}


def _loop_bench(benchmark, pps, impl: str, threads: int, size: int, n_tx: int, n_rx: int,  # type: ignore[no-untyped-def]
                kind: str) -> None:
    if impl == "python":
        n_tx, n_rx = n_tx // 4, n_rx // 4
    rigs: List[PrefilledRig] = []
    benchmark.group = f"loop {kind} {size}B {threads}thr"

    def setup() -> Tuple[tuple, Dict]:
        rigs.append(PrefilledRig(impl, threads, size, n_tx, n_rx))
        return (), {}

    try:
        benchmark.pedantic(lambda: rigs[-1].run(), setup=setup, rounds=3, iterations=1)
    finally:
        for r in rigs:
            r.close()
    if benchmark.stats is not None:  # None under --benchmark-disable (make bench-smoke)
        benchmark.extra_info["pps"] = pps(benchmark.group, impl, n_tx + n_rx, benchmark.stats.stats.min)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("impl", IMPLS)
def test_loop_bidirectional(benchmark, pps, impl: str, threads: int, size: int) -> None:  # type: ignore[no-untyped-def]
    n = LOOP_N[size]
    _loop_bench(benchmark, pps, impl, threads, size, n, n, "both ways")


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("impl", IMPLS)
def test_loop_tx_only(benchmark, pps, impl: str, threads: int, size: int) -> None:  # type: ignore[no-untyped-def]
    _loop_bench(benchmark, pps, impl, threads, size, 2 * LOOP_N[size], 0, "tx only")


# ---------------------------------------------------------------------------------------------------------------
# Variants side by side on real testbeds (not a pytest benchmark): docs/fastpath.md "Goal A"/"Goal B".
#   cd /tmp && python /work/main/bench/bench_fastpath.py --variants SECONDS REPS name=backend[:ENV=V,ENV=V] ...
# e.g. vxlan=vxlan udp=udp: plain=udp:FASTFLANNEL_UDP_TUN_OFFLOAD=0 base=udp:PYTHONPATH=/tmp/ffbase
# Each variant is a 2-host testbed (fastflannel.lab.bench.ModeCluster), all up at once, measured in rotated order.
# Run from a directory other than the checkout, so that PYTHONPATH=<other checkout> can select older code.


def _variants_main(argv):  # pragma: no cover - needs root and namespaces
    import contextlib
    import json
    import statistics
    import sys

    from fastflannel.lab import bench
    from fastflannel.lab.progress import Progress

    seconds = float(argv[0])
    reps = int(argv[1])
    modes = []
    for spec in argv[2:]:
        name, rest = spec.split("=", 1)
        backend, _, envs = rest.partition(":")
        env = dict(kv.split("=", 1) for kv in envs.split(",") if kv)
        bench.MODE_SPECS[name] = {"backend": backend, "env": env, "user_space": backend == "udp"}
        modes.append(name)
    say = Progress()
    rows = {m: [] for m in modes}
    with contextlib.ExitStack() as stack:
        cl = {}
        for m in modes:
            c = bench.ModeCluster(m, say)
            c.up(stack)
            cl[m] = c
        for rep in range(reps):
            for m in bench.rotation(modes, rep):
                c = cl[m]
                c.check_daemons()
                user = c.spec["user_space"]
                b = c.stats() if user else None
                r1 = c._iperf(seconds=seconds, streams=1)
                a = c.stats() if user else None
                r4 = c._iperf(seconds=seconds, streams=4)
                row = {"tcp1": r1.gbps, "rtx1": r1.retransmits, "tcp4": r4.gbps, "rtx4": r4.retransmits}
                if user:
                    d = [bench.counter_delta(x, y) for x, y in zip(b, a)]
                    row["deltas"] = d
                rows[m].append(row)
                say(f"rep {rep+1} {m}: tcp1 {r1.gbps:.2f} Gb/s rtx {r1.retransmits}, tcp4 {r4.gbps:.2f} rtx {r4.retransmits}")
                if user:
                    s, r = d
                    keys = [k for k in s if (s[k] or r[k]) and k not in ("polls",)]
                    say("   sender:   " + " ".join(f"{k}={s[k]}" for k in keys if s[k]))
                    say("   receiver: " + " ".join(f"{k}={r[k]}" for k in keys if r[k]))
    print()
    ref = "vxlan" if "vxlan" in rows else modes[0]
    med = {m: {k: statistics.median([r[k] for r in rows[m]]) for k in ("tcp1", "rtx1", "tcp4", "rtx4")} for m in modes}
    print(f"{'mode':<14}{'tcp1 Gb/s':>10}{'ratio':>8}{'rtx1':>8}{'tcp4 Gb/s':>10}{'ratio':>8}{'rtx4':>8}   per-rep tcp1")
    for m in modes:
        x = med[m]
        print(f"{m:<14}{x['tcp1']:>10.2f}{x['tcp1']/med[ref]['tcp1']:>8.3f}{x['rtx1']:>8.0f}{x['tcp4']:>10.2f}"
              f"{x['tcp4']/med[ref]['tcp4']:>8.3f}{x['rtx4']:>8.0f}   " + " ".join(f"{r['tcp1']:.2f}" for r in rows[m]))
    print(json.dumps(rows))


if __name__ == "__main__":  # pragma: no cover
    import sys as _sys

    if _sys.argv[1:2] == ["--variants"]:
        _variants_main(_sys.argv[2:])
    else:
        raise SystemExit("usage: bench_fastpath.py --variants SECONDS REPS name=backend[:ENV=V,...] ...")
