# SPDX-License-Identifier: Apache-2.0
"""``fastflannel bench``: what the udp backend costs over kernel VXLAN (and no overlay at all), measured.

One 2-host cluster per mode (a Testbed each: own namespaces, own etcd; all alive at once), one container per
host, traffic container(h1) -> container(h2). Modes (``MODE_SPECS``; ``--variant NAME=MODE[:ENV=V,...]`` adds
more, e.g. ``udp-base=udp:PYTHONPATH=/tmp/ffbase`` runs the daemons from another checkout, for before/after in
one run):

- ``host-gw``: no overlay, the kernel routes container subnets via the peer host (the reference floor);
- ``vxlan``: the kernel's vxlan device encapsulates;
- ``udp``: the udp backend with the Cython fast path and its defaults (docs/fastpath.md);
- ``udp-plain``: the same loop without offloads (``FASTFLANNEL_UDP_TUN_OFFLOAD=0 FASTFLANNEL_UDP_GRO=0``);
- ``udp-python``: the same backend with the pure-Python twin (``FASTFLANNEL_NO_EXTENSIONS=1``);
- ``wireguard``: the wireguard backend, encrypted (ChaCha20-Poly1305) by wireguard-go here (no kernel module on
  this machine; with the module it is the kernel's): what encryption costs. Its CPU is the daemons' children's.

Repetitions are interleaved (rep *r* runs the mode list rotated by *r*), so drift on a noisy machine hits every
mode alike, and ratios to VXLAN are medians of per-round ratios. The tests (``--tests``, default all; what each
measures is in docs/benchmarks.md "What is measured"):

- ``ping``: iputils ping every 10 ms, RTT p50/p99, and the daemons' CPU under that light load;
- ``rr``: sockperf TCP ping-pong with 64-byte messages: transactions/s, one-way latency p50/p99, and for the
  udp modes polls (and polls that slept) per transaction and loop demotions;
- ``flood``: 64-byte UDP datagrams offered with ``sendmmsg`` faster than the data path takes, delivered rate and
  loss by place (``fastflannel.lab.smallpkt.loss_by_place``), and the udp loops' demotions to SCHED_OTHER;
- ``tcp1``/``tcp4``: iperf3 TCP, 1 and 4 streams: rate, retransmits, CPU core-seconds per Gbit (daemons + iperf3
  + softirq) and the fast path's per-packet figures (syscalls, batches, segments per crossing, copies);
- ``udp64``: iperf3 UDP with 64-byte payloads at unlimited bitrate (the old small-packet figure);
- ``idle``: the daemons' CPU over 3 s without traffic.

Output: progress lines, a table, a JSON file ``<out>/bench-<timestamp>.json`` (+ ``latest.json``) and a chart
``<out>/bench.png`` with matplotlib (``fastflannel.lab.benchout``). Ctrl-C or SIGTERM tears every testbed down
and keeps the partial JSON.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from fastflannel.datapath.contract import COUNTER_NAMES
from fastflannel.lab.benchout import (  # noqa: F401  (re-exported: the bench's public surface)
    METRICS,
    NO_RATIO,
    _finite,
    code_state,
    format_table,
    machine_info,
    paired_ratios,
    ratios,
    summarize,
    write_chart,
    write_json,
)

BENCH_NETWORK = "100.96.0.0/16"
HEALTHZ_PORT = 8471
ALL_MODES = ("host-gw", "vxlan", "udp", "udp-plain", "udp-python", "wireguard")
MODE_SPECS: Dict[str, Dict[str, Any]] = {
    "host-gw": {"backend": "host-gw", "env": {}, "user_space": False},
    "vxlan": {"backend": "vxlan", "env": {}, "user_space": False},
    "udp": {"backend": "udp", "env": {}, "user_space": True},
    "udp-plain": {"backend": "udp", "env": {"FASTFLANNEL_UDP_TUN_OFFLOAD": "0", "FASTFLANNEL_UDP_GRO": "0"},
                  "user_space": True},
    "udp-python": {"backend": "udp", "env": {"FASTFLANNEL_NO_EXTENSIONS": "1"}, "user_space": True},
    "wireguard": {"backend": "wireguard", "env": {}, "user_space": False},  # wireguard-go: not our fast path
}
OVERLAY_DEVICE = {"udp": "flannel0", "vxlan": "flannel.1", "host-gw": ""}
ALL_TESTS = ("ping", "rr", "flood", "tcp1", "tcp4", "udp64", "idle")
UDP_PAYLOAD = 64
IDLE_S = 3.0
SETTLE_S = 0.5  # after a UDP flood: let queues drain before the next test


def parse_env(text: str, items: str) -> Dict[str, str]:
    """``ENV=VALUE,ENV=VALUE`` (may be empty) of ``--variant text`` -> dict; ValueError naming the bad item."""
    env: Dict[str, str] = {}
    for kv in filter(None, items.split(",")):
        k, eq, v = kv.partition("=")
        if not eq or not k:
            raise ValueError(f"--variant {text!r}: {kv!r} is not ENV=VALUE")
        env[k] = v
    return env


def parse_variant(text: str) -> tuple:
    """Parse ``NAME=MODE[:ENV=V,ENV=V]`` into (name, spec): MODE's spec with the extra environment.

    Raise ValueError saying what is wrong (unknown mode, missing ``=``, a name that is already a mode).
    """
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise ValueError(f"--variant {text!r}: expected NAME=MODE[:ENV=VALUE,...], e.g. udp-base=udp:PYTHONPATH=/tmp/b")
    mode, _, envs = rest.partition(":")
    if mode not in MODE_SPECS:
        raise ValueError(f"--variant {text!r}: unknown mode {mode!r} (known: {', '.join(MODE_SPECS)})")
    if name in MODE_SPECS:
        raise ValueError(f"--variant {text!r}: {name!r} is already a mode; pick another name")
    env = {**MODE_SPECS[mode]["env"], **parse_env(text, envs)}
    return name, {**MODE_SPECS[mode], "env": env, "base_mode": mode}


# --------------------------------------------------------------------------------------------------------------------
# pure helpers (unit-testable without namespaces)


def counter_delta(before: Dict[str, int], after: Dict[str, int]) -> Dict[str, int]:
    """Return after - before for every numeric counter present in ``after``."""
    return {k: int(v) - int(before.get(k, 0)) for k, v in after.items() if isinstance(v, (int, float))}


def fastpath_figures(deltas: Sequence[Dict[str, int]], payload_bytes: int) -> Dict[str, float]:
    """Derive the per-packet cost figures from the counter deltas of every daemon over one transfer.

    ``payload_bytes`` is what the receiving application got (iperf3's receiver bytes). Packets "delivered end
    to end" are those written to a TUN (``rx_packets``, all daemons: data one way, ACKs the other). Each of them
    was read from a TUN and sent by one daemon (tx) and received and written by another (rx), so the bytes that
    crossed the user/kernel boundary are 2 * tx_bytes + 2 * rx_bytes summed over the daemons.
    """
    # every counter of the contract present (0 if a daemon did not report it): a name that is not a counter of the
    # fast path is a KeyError here, not a silent 0
    zero = dict.fromkeys(COUNTER_NAMES, 0)
    deltas = [{**zero, **d} for d in deltas]
    tot: Dict[str, int] = dict(zero)
    for d in deltas:
        for k, v in d.items():
            tot[k] = tot.get(k, 0) + v

    def g(name: str) -> int:
        return tot[name]

    delivered = g("rx_packets")
    forwarded = g("tx_packets") + delivered
    syscalls = g("tx_syscalls") + g("rx_syscalls") + g("polls")
    batches = g("tx_batches") + g("rx_batches")
    copies = 2 * g("tx_packets") + 2 * g("rx_packets")  # TUN->user, user->sock; sock->user, user->TUN
    copied_bytes = 2 * g("tx_bytes") + 2 * g("rx_bytes")
    nan = float("nan")
    drops = sum(v for k, v in tot.items() if "_drop_" in k)
    per_dir: Dict[str, float] = {}
    if len(deltas) >= 2:  # deltas[0] is the data sender's daemon, deltas[1] the receiver's
        s, r = deltas[0], deltas[1]
        per_dir = {
            "sender_tx_syscalls_per_packet": s["tx_syscalls"] / s["tx_packets"] if s["tx_packets"] else nan,
            "sender_tx_packets_per_batch": s["tx_packets"] / s["tx_batches"] if s["tx_batches"] else nan,
            "receiver_rx_syscalls_per_packet": r["rx_syscalls"] / r["rx_packets"] if r["rx_packets"] else nan,
            "receiver_rx_packets_per_batch": r["rx_packets"] / r["rx_batches"] if r["rx_batches"] else nan,
            # offload counters (0 without offloads: NaN, "-" in the table)
            "segments_per_tun_read": (s["tx_tso_segments"] / s["tx_tso_reads"]
                                      if s["tx_tso_reads"] else nan),
            "datagrams_per_receive": (r["rx_gro_datagrams"] / r["rx_gro_receives"]
                                      if r["rx_gro_receives"] else nan),
            "packets_per_coalesced_write": (r["rx_coalesced_packets"] / r["rx_coalesced_writes"]
                                            if r["rx_coalesced_writes"] else nan),
        }
    return {
        **per_dir,
        "packets_delivered": delivered,
        "syscalls": syscalls,
        "syscalls_per_packet": syscalls / delivered if delivered else nan,
        "tx_syscalls_per_packet": g("tx_syscalls") / g("tx_packets") if g("tx_packets") else nan,
        "rx_syscalls_per_packet": g("rx_syscalls") / delivered if delivered else nan,
        "polls_per_packet": g("polls") / delivered if delivered else nan,
        "packets_per_batch": forwarded / batches if batches else nan,
        "copies_per_packet": copies / delivered if delivered else nan,
        "bytes_copied": copied_bytes,
        "bytes_copied_per_byte": copied_bytes / payload_bytes if payload_bytes else nan,
        "drops": drops,
    }


def kernel_figures() -> Dict[str, float]:
    """The same figures for a kernel data path: nothing crosses into user space."""
    return {"syscalls_per_packet": 0.0, "copies_per_packet": 0.0, "bytes_copied_per_byte": 0.0,
            "packets_per_batch": float("nan")}


def rotation(modes: Sequence[str], rep: int) -> List[str]:
    """Return the order of ``modes`` in repetition ``rep`` (0-based): the list rotated by ``rep``."""
    if not modes:
        return []
    k = rep % len(modes)
    return list(modes[k:]) + list(modes[:k])

# --------------------------------------------------------------------------------------------------------------------
# one cluster per mode


class ModeCluster:
    """A 2-host testbed running one mode, with a container per host and the servers (iperf3, sockperf, a flood
    sink) in the second one."""

    def __init__(self, mode: str, say: Callable[[str], Any], healthz_port: int = HEALTHZ_PORT,
                 spec: Optional[Dict[str, Any]] = None) -> None:
        if spec is None and mode not in MODE_SPECS:
            raise ValueError(f"unknown bench mode {mode!r} (known: {', '.join(MODE_SPECS)})")
        self.mode = mode
        self.spec = spec if spec is not None else MODE_SPECS[mode]
        self.say = say
        self.healthz_port = healthz_port
        self.tb = None
        self.src = self.dst = None
        self.iperf_server = self.sockperf_server = self.sink = None
        self.mtu = 0
        self.tun = OVERLAY_DEVICE.get(self.spec["backend"], "")

    def up(self, stack: contextlib.ExitStack) -> None:
        """Build the testbed inside ``stack`` (so it is torn down on every exit path) and prove reachability."""
        from fastflannel.lab.testbed import Testbed

        t0 = time.monotonic()
        tb = stack.enter_context(Testbed(2))
        self.tb = tb
        tb.put_config({"Network": BENCH_NETWORK, "Backend": {"Type": self.spec["backend"]}})
        for h in tb.hosts:
            h.start_daemon(f"--healthz-port={self.healthz_port}", env=self.spec["env"] or None)
        envs = [h.wait_subnet_env(timeout=60) for h in tb.hosts]
        self.mtu = int(envs[0]["FLANNEL_MTU"])
        self.src, self.dst = (h.add_container() for h in tb.hosts)
        if not _wait_ping(self.src, self.dst.ip, timeout=20):
            raise RuntimeError(f"{self.mode}: {self.src.name} ({self.src.ip}) cannot reach {self.dst.ip}")
        if self.spec["user_space"]:
            self.stats()  # the counters must be readable before we rely on them
        self._servers()
        self.say(f"{self.mode}: testbed {tb.prefix} up in {time.monotonic() - t0:.1f} s: "
                 f"{self.src.ip} on {tb.hosts[0].name} -> {self.dst.ip} on {tb.hosts[1].name}, "
                 f"MTU {self.mtu}")

    def _servers(self) -> None:
        """(Re)start whichever server is not running; all are tracked by the testbed and killed at teardown."""
        from fastflannel.lab.measure import IperfServer
        from fastflannel.lab.smallpkt import FloodSink, SockperfServer

        if self.iperf_server is None or self.iperf_server.proc.poll() is not None:
            self.iperf_server = IperfServer(self.dst)
        if self.sockperf_server is None or not self.sockperf_server.alive():
            self.sockperf_server = SockperfServer(self.dst)
        if self.sink is None or not self.sink.alive():
            self.sink = FloodSink(self.dst)

    def _iperf(self, **kw):
        from fastflannel.lab.measure import iperf

        self._servers()
        return iperf(self.src, self.dst.ip, **kw)

    def stats(self) -> List[Dict[str, int]]:
        from fastflannel.lab.measure import fastpath_stats

        return [fastpath_stats(h, self.healthz_port) for h in self.tb.hosts]

    def kernel_drops(self) -> Dict[str, int]:
        """Return drops the fast path cannot see, summed over the hosts: UDP receive-buffer overflows
        (``Udp: RcvbufErrors`` of the host namespace) and the TUN's tx_dropped (the daemon read too late)."""
        from fastflannel.lab.smallpkt import netns_counters

        out = {"udp_rcvbuf_errors": 0, "tun_tx_dropped": 0}
        for h in self.tb.hosts:
            c = netns_counters(h)
            out["udp_rcvbuf_errors"] += c.get("udp.RcvbufErrors", 0)
            out["tun_tx_dropped"] += c.get(f"{self.tun}.tx_dropped", 0) if self.tun else 0
        return out

    def daemon_pids(self) -> List[int]:
        return [h.daemon.pid for h in self.tb.hosts]

    def daemon_cpu(self) -> float:
        from fastflannel.lab.measure import process_cpu_seconds

        return sum(process_cpu_seconds(pid) for h in self.tb.hosts for pid in _with_children(h.daemon.pid))

    def check_daemons(self) -> None:
        for h in self.tb.hosts:
            if h.daemon is None or h.daemon.poll() is not None:
                raise RuntimeError(f"{self.mode}: fastflanneld on {h.name} exited; log tail:\n"
                                   f"{h.daemon_log_text()[-1500:]}")

    # -- the tests ---------------------------------------------------------------------------------------------

    def _ping(self, row: Dict[str, Any], pings: int) -> None:
        from fastflannel.lab.measure import ping_rtt
        from fastflannel.lab.smallpkt import per_daemon_cpu_pct

        res = {}

        def go() -> None:
            res["rtt"] = ping_rtt(self.src, self.dst.ip, count=pings, interval=0.01, timeout=max(10.0, pings * 0.05))

        if self.spec["user_space"]:
            row["ping_cpu_pct"] = per_daemon_cpu_pct(self.daemon_pids(), go)
        else:
            go()
        rtt = res["rtt"]
        row.update(rtt_p50_ms=rtt.p50, rtt_p99_ms=rtt.p99, rtt_loss=rtt.loss)

    def _rr(self, row: Dict[str, Any], seconds: float) -> None:
        from fastflannel.lab.smallpkt import sockperf_pingpong

        self._servers()
        user = self.spec["user_space"]
        before = self.stats() if user else None
        pp = sockperf_pingpong(self.src, self.dst.ip, seconds=seconds, size=UDP_PAYLOAD)
        row.update(rr_tps=pp.tps, rr_lat_p50_us=pp.p(50.0), rr_lat_p99_us=pp.p(99.0), rr_lat_avg_us=pp.avg_us,
                   rr_received=pp.received)
        if user:
            d = [counter_delta(b, a) for b, a in zip(before, self.stats())]
            row["rr_fastpath_deltas"] = d
            # the counters run over sockperf's warm-up too: per transaction of the whole run, roughly
            trans = max(1, pp.sent)
            row["rr_polls_per_trans"] = sum(x.get("polls", 0) for x in d) / trans
            if any("polls_slept" in x for x in d):
                row["rr_sleeps_per_trans"] = sum(x.get("polls_slept", 0) for x in d) / trans
            if any("prio_demotions" in x for x in d):
                row["rr_demotions"] = sum(x.get("prio_demotions", 0) for x in d)

    def _flood(self, row: Dict[str, Any], seconds: float) -> None:
        from fastflannel.lab.smallpkt import counters_delta, flood, loss_by_place, netns_counters, softnet_dropped

        self._servers()
        user = self.spec["user_space"]
        nodes = {"src": self.src, "dst": self.dst, "h1": self.tb.hosts[0], "h2": self.tb.hosts[1]}
        c0 = {k: netns_counters(n) for k, n in nodes.items()}
        s0, f0 = softnet_dropped(), (self.stats() if user else None)
        g = flood(self.src, self.dst.ip, seconds=seconds, size=UDP_PAYLOAD)
        time.sleep(SETTLE_S)  # let queues drain before counting what arrived
        c1 = {k: netns_counters(n) for k, n in nodes.items()}
        s1 = softnet_dropped()
        fdrops = 0
        if user:
            d = [counter_delta(b, a) for b, a in zip(f0, self.stats())]
            row["flood_fastpath_deltas"] = d
            if any("prio_demotions" in x for x in d):
                row["flood_demotions"] = sum(x.get("prio_demotions", 0) for x in d)
            # the fast path's own drops only: tx_drop_tun_queue / rx_drop_udp_rcvbuf are the kernel's (counted above)
            fdrops = sum(v for x in d for k, v in x.items() if "_drop_" in k and k in COUNTER_NAMES)
        lb = loss_by_place(int(g["sent"]), counters_delta(c0, c1), fdrops, s1 - s0, self.tun)
        secs = float(g["seconds"]) or seconds
        pct = lb["places_pct"]
        row.update(flood_offered_kpps=g["sent"] / secs / 1e3, flood_kpps=lb["delivered"] / secs / 1e3,
                   flood_loss_pct=lb["loss_pct"], flood_loss_tun_queue_pct=pct["tun_queue"],
                   flood_loss_receiver_rcvbuf_pct=pct["receiver_rcvbuf"], flood_loss_fastpath_pct=pct["fastpath"],
                   flood_loss_backlog_pct=pct["backlog"],
                   flood_loss_other_pct=pct["sender_veth"] + pct["sender_socket"] + pct["tun_write"]
                   + pct["unaccounted"],
                   flood=lb, flood_sender=g)

    def _tcp(self, row: Dict[str, Any], seconds: float, streams: int) -> None:
        from fastflannel.lab.measure import softirq_seconds
        from fastflannel.lab.smallpkt import cpu_delta, iperf_cpu_seconds, machine_cpu

        user = self.spec["user_space"]
        before = self.stats() if user and streams == 1 else None
        kd0 = self.kernel_drops() if user and streams == 1 else None
        cpu0, sirq0, m0 = self.daemon_cpu(), softirq_seconds(), machine_cpu()
        r = self._iperf(seconds=seconds, streams=streams)
        cpu1, sirq1, m1 = self.daemon_cpu(), softirq_seconds(), machine_cpu()
        gbit = r.bytes * 8 / 1e9
        ours = (cpu1 - cpu0) + (sirq1 - sirq0) + iperf_cpu_seconds(r.raw, r.seconds or seconds)
        nan = float("nan")
        if streams != 1:
            row.update(tcp4_gbps=r.gbps, tcp4_retransmits=r.retransmits,
                       cpu4_s_per_gbit=ours / gbit if gbit else nan)
            return
        gb = r.bytes / 1e9
        row.update(tcp1_gbps=r.gbps, tcp1_retransmits=r.retransmits, tcp1_bytes=r.bytes,
                   daemon_cpu_s=cpu1 - cpu0, softirq_s=sirq1 - sirq0,
                   cpu_s_per_gbit=ours / gbit if gbit else nan,
                   machine_cpu_s_per_gbit=cpu_delta(m0, m1)["busy"] / gbit if gbit else nan,
                   daemon_cpu_s_per_gb=(cpu1 - cpu0) / gb if gb else nan,
                   softirq_s_per_gb=(sirq1 - sirq0) / gb if gb else nan,
                   cpu_s_per_gb=(cpu1 - cpu0 + sirq1 - sirq0) / gb if gb else nan)
        cpu = (r.raw or {}).get("end", {}).get("cpu_utilization_percent", {})
        row["iperf_cpu_pct"] = {"sender": cpu.get("host_total"), "receiver": cpu.get("remote_total")}
        if user:
            row["kernel_drops"] = counter_delta(kd0, self.kernel_drops())
            row["tun_tx_dropped"] = row["kernel_drops"]["tun_tx_dropped"]
            row["udp_rcvbuf_errors"] = row["kernel_drops"]["udp_rcvbuf_errors"]
            deltas = [counter_delta(b, a) for b, a in zip(before, self.stats())]
            row["fastpath_deltas"] = {h.name: d for h, d in zip(self.tb.hosts, deltas)}
            row.update(fastpath_figures(deltas, r.bytes))
        else:
            row.update(kernel_figures())

    def measure(self, seconds: float, pings: int, tests: Sequence[str] = ALL_TESTS) -> Dict[str, Any]:
        """Run every test in ``tests`` once; return one row of figures."""
        from fastflannel.lab.smallpkt import per_daemon_cpu_pct

        self.check_daemons()
        row: Dict[str, Any] = {"mode": self.mode, "mtu": self.mtu}
        if "idle" in tests and self.spec["user_space"]:
            row["idle_cpu_pct"] = per_daemon_cpu_pct(self.daemon_pids(), lambda: time.sleep(min(IDLE_S, seconds)))
        if "ping" in tests:
            self._ping(row, pings)
        if "rr" in tests:
            self._rr(row, seconds)
        if "tcp1" in tests:
            self._tcp(row, seconds, 1)
        if "tcp4" in tests:
            self._tcp(row, seconds, 4)
        if "flood" in tests:
            self._flood(row, seconds)
            time.sleep(SETTLE_S)
        if "udp64" in tests:
            ru = self._iperf(seconds=seconds, udp=True, length=UDP_PAYLOAD, bitrate="0")
            row.update(udp64_kpps=ru.delivered_pps / 1e3, udp64_loss_pct=ru.lost_percent,
                       udp64_sent=ru.packets, udp64_lost=ru.lost_packets)
            time.sleep(SETTLE_S)
        self.check_daemons()
        return row


def _with_children(pid: int) -> List[int]:
    """Return ``pid`` and its child processes (wireguard-go under the wireguard backend's daemon)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [pid, *map(int, f.read().split())]
    except OSError:
        return [pid]


def _wait_ping(node, ip, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if node.ping(ip, count=1, timeout=2):
            return True
    return False


def _progress_line(row: Dict[str, Any]) -> str:
    parts = []
    for key, fmt in (("rr_tps", "RR {:.0f}/s"), ("rr_lat_p50_us", "lat p50 {:.0f} us"),
                     ("rtt_p50_ms", "RTT p50 {:.3f}"), ("rtt_p99_ms", "p99 {:.3f} ms"),
                     ("flood_kpps", "flood {:.0f} kpps"), ("flood_loss_pct", "({:.1f}% lost)"),
                     ("tcp1_gbps", "TCP {:.2f}"), ("tcp4_gbps", "/ {:.2f} Gb/s"),
                     ("cpu_s_per_gbit", "{:.3f} CPU s/Gbit"), ("udp64_kpps", "iperf3 UDP64 {:.0f} kpps"),
                     ("idle_cpu_pct", "idle {:.2f}%"), ("ping_cpu_pct", "ping load {:.2f}%")):
        if _finite(row.get(key)):
            parts.append(fmt.format(row[key]))
    return ", ".join(parts)


# --------------------------------------------------------------------------------------------------------------------
# entry point


def run_bench(ns) -> int:
    """Run the comparison described in the module docstring; return 0 if every requested mode produced figures."""
    from fastflannel.lab.progress import Progress
    from fastflannel.lab.testbed import install_signal_handlers, restore_signal_handlers

    say = Progress()
    specs = dict(MODE_SPECS)
    try:
        for v in getattr(ns, "variant", None) or []:
            name, spec = parse_variant(v)
            specs[name] = spec
    except ValueError as e:
        print(f"fastflannel bench: {e}", file=sys.stderr)
        return 2
    modes = [m.strip() for m in str(getattr(ns, "modes", ",".join(ALL_MODES))).split(",") if m.strip()]
    modes += [n for n in specs if n not in MODE_SPECS and n not in modes]
    tests = [t.strip() for t in str(getattr(ns, "tests", ",".join(ALL_TESTS))).split(",") if t.strip()]
    unknown = [m for m in modes if m not in specs] + [t for t in tests if t not in ALL_TESTS]
    if unknown or not modes or not tests:
        print(f"fastflannel bench: unknown mode(s)/test(s) {unknown}; modes: {', '.join(specs)}; "
              f"tests: {', '.join(ALL_TESTS)}", file=sys.stderr)
        return 2
    quick = bool(getattr(ns, "quick", False))
    reps = 1 if quick else max(1, int(getattr(ns, "reps", 3)))
    seconds = float(getattr(ns, "seconds", 5.0))
    if quick:
        seconds = min(seconds, 2.0)
    pings = 100 if quick else 300
    out = Path(getattr(ns, "out", "bench-results"))
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    t0 = time.monotonic()
    result: Dict[str, Any] = {
        "tool": "fastflannel bench",
        "started": started,
        "command": "fastflannel bench " + " ".join(
            (["--quick"] if quick else [f"--reps {reps}"]) + [f"--seconds {seconds:g}", f"--modes {','.join(modes)}",
                                                              f"--tests {','.join(tests)}"]
            + [f"--variant {v}" for v in getattr(ns, "variant", None) or []]),
        "settings": {"modes": modes, "tests": tests, "reps": reps, "seconds": seconds, "pings": pings,
                     "quick": quick, "network": BENCH_NETWORK, "udp_payload": UDP_PAYLOAD, "hosts_per_mode": 2,
                     "specs": {m: specs[m] for m in modes}},
        "machine": machine_info(),
        "code": code_state(),
        "runs": [], "errors": {}, "setup_s": {},
    }
    say(f"fastflannel bench: modes {', '.join(modes)}; tests {', '.join(tests)}; {reps} interleaved "
        f"repetition(s) of {seconds:g} s tests; {result['machine']['nproc']} CPUs ({result['machine']['cpu_model']}), "
        f"kernel {result['machine']['kernel']}")
    previous = install_signal_handlers(sigterm=KeyboardInterrupt)
    interrupted = False
    try:
        with contextlib.ExitStack() as stack:
            clusters: Dict[str, ModeCluster] = {}
            for mode in modes:
                say(f"{mode}: bringing up 2 hosts, etcd and 2 containers ...")
                t1 = time.monotonic()
                c = ModeCluster(mode, say, spec=specs[mode])
                try:
                    c.up(stack)
                    clusters[mode] = c
                except KeyboardInterrupt:
                    raise
                except Exception as e:  # this mode is broken: report it, keep measuring the others
                    result["errors"][mode] = f"bring-up failed: {e}"
                    say(f"{mode}: FAILED to come up: {str(e).splitlines()[0] if str(e) else repr(e)}")
                    if c.tb is not None:
                        tail = "".join(h.daemon_log_text()[-800:] for h in c.tb.hosts if h.daemon_log).strip()
                        if tail:
                            say(f"{mode}: daemon log tail: {tail.splitlines()[-1]}")
                result["setup_s"][mode] = round(time.monotonic() - t1, 2)
            for rep in range(reps):
                order = [m for m in rotation(modes, rep) if m in clusters]
                say(f"rep {rep + 1}/{reps}: order {', '.join(order)}")
                for mode in order:
                    try:
                        row = clusters[mode].measure(seconds, pings, tests)
                    except KeyboardInterrupt:
                        raise
                    except Exception as e:
                        result["errors"].setdefault(f"{mode}/rep{rep + 1}", str(e)[:2000])
                        say(f"rep {rep + 1} {mode}: FAILED: {str(e).splitlines()[0] if str(e) else repr(e)}")
                        continue
                    row["rep"] = rep + 1
                    result["runs"].append(row)
                    say(f"rep {rep + 1} {mode}: {_progress_line(row)}")
            say("tearing down " + ", ".join(c.tb.prefix for c in clusters.values() if c.tb is not None))
    except KeyboardInterrupt:
        interrupted = True
        say("interrupted: every testbed the bench created has been removed")
    finally:
        restore_signal_handlers(previous)

    wall = time.monotonic() - t0
    result["wall_s"] = round(wall, 1)
    if code_state().get("extension_mtime") != result["code"].get("extension_mtime"):
        result["code"]["rebuilt_during_run"] = True
        say("WARNING: fastflannel/_fastpath was rebuilt during the run: the udp figures may mix builds; rerun")
    if "udp" in modes and not result["code"].get("extension"):
        say("WARNING: the Cython extension is not built: the 'udp' mode ran the pure-Python twin")
    result["interrupted"] = interrupted
    summary = summarize(result["runs"], modes)
    result["summary"] = summary
    result["ratios_to_vxlan"] = ratios(summary, "vxlan")
    result["paired_ratios_to_vxlan"] = paired_ratios(result["runs"], modes, "vxlan")
    path = write_json(result, out, stamp)
    print()
    print(format_table(summary, modes, runs=result["runs"]))
    print()
    for k, v in result["errors"].items():
        print(f"error: {k}: {v.splitlines()[0] if v else ''}")
    title = (f"fastflannel bench, {reps} rep(s) x {seconds:g} s, {result['machine']['nproc']} CPU "
             f"{result['machine']['cpu_model']}, Linux {result['machine']['kernel']}, {started[:10]}")
    skipped = write_chart(summary, modes, out / "bench.png", title)
    say(f"wrote {path} and {out / 'latest.json'}" + (f"; {skipped}" if skipped else f" and {out / 'bench.png'}"))
    say(f"wall time {wall:.1f} s")
    if interrupted:
        return 130
    produced = {r["mode"] for r in result["runs"]}
    return 0 if all(m in produced for m in modes) else 1
