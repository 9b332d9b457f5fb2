# SPDX-License-Identifier: Apache-2.0
"""``fastflannel bench``: what the udp backend costs over kernel VXLAN (and no overlay at all), measured.

Method
------
One 2-host cluster per mode (a Testbed each: own namespaces, own etcd; all alive at once; the same underlay
addresses in isolated namespaces), one container per host, traffic container(h1) -> container(h2). Modes:

- ``host-gw``: no overlay, the kernel routes container subnets via the peer host (the reference floor);
- ``vxlan``: the kernel's vxlan device encapsulates;
- ``udp``: the udp backend with the Cython fast path and its defaults: TUN TSO/GRO (``IFF_VNET_HDR``) with UDP
  GSO/GRO, i.e. ~45 inner packets per kernel crossing (docs/fastpath.md "Offloads");
- ``udp-plain``: the same Cython loop without offloads (``FASTFLANNEL_UDP_TUN_OFFLOAD=0``,
  ``FASTFLANNEL_UDP_GRO=0``): one TUN read/write per packet, batching (``sendmmsg``/``recvmmsg``) only. This is
  the per-packet design (flanneld's shape, batched); what the offloads buy is udp / udp-plain;
- ``udp-python``: the same backend with the pure-Python twin (``FASTFLANNEL_NO_EXTENSIONS=1`` in the daemons);
- ``wireguard``: the wireguard backend, encrypted (ChaCha20-Poly1305) by wireguard-go here (no kernel module on
  this machine; with the module it is the kernel's): what encryption costs. Its CPU is the daemons' children's.

Repetitions are interleaved so drift on a noisy machine hits every mode alike: rep 1 runs host-gw, vxlan, udp,
udp-plain, udp-python; rep 2 the same list rotated by one; and so on. Per mode and repetition:

- RTT: iputils ``ping`` (10 ms interval), p50 and p99;
- TCP throughput, 1 and 4 streams (iperf3, receiver side);
- small packets: iperf3 UDP with 64-byte payloads at unlimited bitrate: datagrams/s delivered and loss %;
- CPU seconds per GB over the 1-stream TCP run: both daemons' CPU time (/proc/<pid>/stat) plus the machine's
  softirq time (/proc/stat), divided by payload GB delivered. iperf3's own CPU is not in it (reported apart);
- for the udp modes, the fast path's counters over the same TCP run (deltas of ``GET /debug/fastpath`` on each
  daemon's healthz port, read inside the host's namespace): syscalls per packet delivered, packets per
  batch, copies per packet and bytes moved across the user/kernel boundary per payload byte delivered. Every
  packet forwarded in user space crosses the boundary twice per daemon: TUN -> user and user -> socket on
  the sending host (``tx_*``), socket -> user and user -> TUN on the receiving one (``rx_*``). Kernel modes
  (host-gw, vxlan) cross it zero times: no daemon is in the data path. With offloads also: segments per TUN
  read (sender: ``tx_tso_segments / tx_tso_reads``), datagrams per UDP receive (receiver: ``rx_gro_datagrams /
  rx_gro_receives``) and packets per coalesced TUN write (receiver: ``rx_coalesced_packets /
  rx_coalesced_writes``); "kernel crossings" count the TUN reads/writes and socket sends/receives per direction.

Output: progress lines, a table (median with min-max per mode, then ratios of medians to VXLAN), a JSON file
``<out>/bench-<timestamp>.json`` (+ ``<out>/latest.json``) and a chart ``<out>/bench.png`` when matplotlib is
installed (the optional extra ``bench``). Ctrl-C or SIGTERM tears every testbed down and keeps the partial JSON.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from fastflannel.datapath.contract import COUNTER_NAMES

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
UDP_PAYLOAD = 64
SETTLE_S = 0.5  # after a UDP flood: let queues drain before the next test

# (key, label, unit, digits, higher_is_better)
METRICS: List[tuple] = [
    ("tcp1_gbps", "TCP 1 stream", "Gb/s", 2, True),
    ("tcp4_gbps", "TCP 4 streams", "Gb/s", 2, True),
    ("tcp1_retransmits", "TCP 1 stream retransmits", "", 0, False),
    ("tun_tx_dropped", "  TUN queue drops (TCP 1 stream)", "", 0, False),
    ("udp_rcvbuf_errors", "  UDP rcvbuf drops (TCP 1 stream)", "", 0, False),
    ("udp64_kpps", "UDP 64 B delivered", "kpps", 1, True),
    ("udp64_loss_pct", "UDP 64 B loss", "%", 1, False),
    ("rtt_p50_ms", "RTT p50", "ms", 3, False),
    ("rtt_p99_ms", "RTT p99", "ms", 3, False),
    ("cpu_s_per_gb", "CPU s/GB (daemons+softirq)", "s/GB", 2, False),
    ("daemon_cpu_s_per_gb", "  daemons' CPU s/GB", "s/GB", 2, False),
    ("softirq_s_per_gb", "  softirq s/GB", "s/GB", 2, False),
    ("syscalls_per_packet", "syscalls per packet", "", 2, False),
    ("sender_tx_syscalls_per_packet", "  sender tx syscalls/packet", "", 2, False),
    ("receiver_rx_syscalls_per_packet", "  receiver rx syscalls/packet", "", 2, False),
    ("packets_per_batch", "packets per batch", "", 1, True),
    ("segments_per_tun_read", "  segments per TUN read (TSO)", "", 1, True),
    ("datagrams_per_receive", "  datagrams per UDP receive (GRO)", "", 1, True),
    ("packets_per_coalesced_write", "  packets per coalesced TUN write", "", 1, True),
    ("sender_tx_packets_per_batch", "  sender tx packets/batch", "", 1, True),
    ("receiver_rx_packets_per_batch", "  receiver rx packets/batch", "", 1, True),
    ("copies_per_packet", "user/kernel copies per packet", "", 2, False),
    ("bytes_copied_per_byte", "bytes copied per byte delivered", "", 2, False),
]

# zero or undefined for the kernel reference: the absolute figures say it
NO_RATIO = {"tun_tx_dropped", "udp_rcvbuf_errors", "daemon_cpu_s_per_gb",
            "syscalls_per_packet", "sender_tx_syscalls_per_packet", "receiver_rx_syscalls_per_packet",
            "packets_per_batch", "sender_tx_packets_per_batch", "receiver_rx_packets_per_batch",
            "segments_per_tun_read", "datagrams_per_receive", "packets_per_coalesced_write",
            "copies_per_packet", "bytes_copied_per_byte", "tcp1_retransmits", "udp64_loss_pct"}


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


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v))


def summarize(runs: List[Dict[str, Any]], modes: Sequence[str]) -> Dict[str, Dict[str, Dict[str, float]]]:
    """Return {mode: {metric: {median, min, max, n}}} over the runs that produced the metric."""
    out: Dict[str, Dict[str, Dict[str, float]]] = {}
    for mode in modes:
        per: Dict[str, Dict[str, float]] = {}
        for key, *_ in METRICS:
            vals = [r[key] for r in runs if r["mode"] == mode and _finite(r.get(key))]
            if vals:
                per[key] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}
        out[mode] = per
    return out


def ratios(summary: Dict[str, Dict[str, Dict[str, float]]], ref: str = "vxlan") -> Dict[str, Dict[str, float]]:
    """Return {mode: {metric: median(mode) / median(ref)}} where both exist and the reference is non-zero."""
    base = summary.get(ref) or {}
    out: Dict[str, Dict[str, float]] = {}
    for mode, per in summary.items():
        r = {}
        for key, s in per.items():
            b = base.get(key)
            if b and b["median"]:
                r[key] = s["median"] / b["median"]
        out[mode] = r
    return out


def _cell(s: Optional[Dict[str, float]], digits: int) -> str:
    if not s:
        return "-"
    med, lo, hi = s["median"], s["min"], s["max"]
    if s["n"] == 1 or lo == hi:
        return f"{med:.{digits}f}"
    return f"{med:.{digits}f} ({lo:.{digits}f}-{hi:.{digits}f})"


def format_table(summary: Dict[str, Dict[str, Dict[str, float]]], modes: Sequence[str], ref: str = "vxlan") -> str:
    """Return the figures table (median with min-max) and, if ``ref`` ran, the ratios-to-``ref`` table."""
    lines: List[str] = []
    w0 = max(len(f"{label} [{unit}]") for _k, label, unit, *_ in METRICS) + 1
    cells = {m: {k: _cell(summary.get(m, {}).get(k), d) for k, _l, _u, d, _h in METRICS} for m in modes}
    widths = {m: max([len(m)] + [len(c) for c in cells[m].values()]) + 2 for m in modes}
    lines.append(f"{'median (min-max)':<{w0}}" + "".join(f"{m:>{widths[m]}}" for m in modes))
    lines.append("-" * len(lines[0]))
    for key, label, unit, digits, _h in METRICS:
        name = f"{label} [{unit}]" if unit else label
        lines.append(f"{name:<{w0}}" + "".join(f"{cells[m][key]:>{widths[m]}}" for m in modes))
    rat = ratios(summary, ref)
    if summary.get(ref):
        lines.append("")
        lines.append(f"{'ratio to ' + ref + ' (medians)':<{w0}}" + "".join(f"{m:>{widths[m]}}" for m in modes))
        lines.append("-" * len(lines[-1]))
        for key, label, unit, _d, _h in METRICS:
            if key in NO_RATIO:
                continue  # zero or undefined for the kernel reference: the absolute figures say it
            name = f"{label}" + (f" [{unit}]" if unit else "")
            vals = "".join(f"{('x%.2f' % rat[m][key]) if key in rat.get(m, {}) else '-':>{widths[m]}}" for m in modes)
            lines.append(f"{name:<{w0}}" + vals)
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------------
# one cluster per mode


class ModeCluster:
    """A 2-host testbed running one mode, with a container per host and an iperf3 server in the second one."""

    def __init__(self, mode: str, say: Callable[[str], Any], healthz_port: int = HEALTHZ_PORT) -> None:
        if mode not in MODE_SPECS:
            raise ValueError(f"unknown bench mode {mode!r} (known: {', '.join(MODE_SPECS)})")
        self.mode = mode
        self.spec = MODE_SPECS[mode]
        self.say = say
        self.healthz_port = healthz_port
        self.tb = None
        self.src = self.dst = None
        self.iperf_server = None
        self.mtu = 0

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
        self._start_iperf()
        self.say(f"{self.mode}: testbed {tb.prefix} up in {time.monotonic() - t0:.1f} s: "
                 f"{self.src.ip} on {tb.hosts[0].name} -> {self.dst.ip} on {tb.hosts[1].name}, "
                 f"MTU {self.mtu}")

    def _start_iperf(self) -> None:
        from fastflannel.lab.measure import IperfServer

        if self.iperf_server is not None:
            self.iperf_server.close()
        self.iperf_server = IperfServer(self.dst)  # tracked by the testbed: killed at teardown

    def _iperf(self, **kw):
        from fastflannel.lab.measure import iperf

        if self.iperf_server is None or self.iperf_server.proc.poll() is not None:
            self._start_iperf()
        return iperf(self.src, self.dst.ip, **kw)

    def stats(self) -> List[Dict[str, int]]:
        from fastflannel.lab.measure import fastpath_stats

        return [fastpath_stats(h, self.healthz_port) for h in self.tb.hosts]

    def kernel_drops(self) -> Dict[str, int]:
        """Return drops the fast path cannot see, summed over the hosts: UDP receive-buffer overflows
        (/proc/net/snmp ``Udp: RcvbufErrors`` of the host namespace) and packets the TUN device dropped
        because the daemon did not read them in time (``flannel0`` tx_dropped)."""
        out = {"udp_rcvbuf_errors": 0, "tun_tx_dropped": 0}
        for h in self.tb.hosts:
            lines = [ln.split() for ln in h.run(["cat", "/proc/net/snmp"]).stdout.splitlines() if ln.startswith("Udp:")]
            if len(lines) >= 2 and "RcvbufErrors" in lines[0]:
                out["udp_rcvbuf_errors"] += int(lines[1][lines[0].index("RcvbufErrors")])
            r = h.run(["ip", "-j", "-s", "link", "show", "flannel0"], check=False)
            try:
                link = json.loads(r.stdout)[0]
                out["tun_tx_dropped"] += int(link.get("stats64", link.get("stats", {}))["tx"]["dropped"])
            except (ValueError, LookupError, TypeError):
                pass
        return out

    def daemon_cpu(self) -> float:
        from fastflannel.lab.measure import process_cpu_seconds

        return sum(process_cpu_seconds(pid) for h in self.tb.hosts for pid in _with_children(h.daemon.pid))

    def check_daemons(self) -> None:
        for h in self.tb.hosts:
            if h.daemon is None or h.daemon.poll() is not None:
                raise RuntimeError(f"{self.mode}: fastflanneld on {h.name} exited; log tail:\n"
                                   f"{h.daemon_log_text()[-1500:]}")

    def measure(self, seconds: float, pings: int) -> Dict[str, Any]:
        """Run every test once; return one row of figures."""
        from fastflannel.lab.measure import ping_rtt, softirq_seconds

        self.check_daemons()
        row: Dict[str, Any] = {"mode": self.mode, "mtu": self.mtu}
        rtt = ping_rtt(self.src, self.dst.ip, count=pings, interval=0.01, timeout=max(10.0, pings * 0.05))
        row.update(rtt_p50_ms=rtt.p50, rtt_p99_ms=rtt.p99, rtt_loss=rtt.loss)

        user = self.spec["user_space"]
        before = self.stats() if user else None
        kd0 = self.kernel_drops() if user else None
        cpu0, sirq0 = self.daemon_cpu(), softirq_seconds()
        r1 = self._iperf(seconds=seconds, streams=1)
        cpu1, sirq1 = self.daemon_cpu(), softirq_seconds()
        after = self.stats() if user else None
        if user:
            row["kernel_drops"] = counter_delta(kd0, self.kernel_drops())
            row["tun_tx_dropped"] = row["kernel_drops"]["tun_tx_dropped"]
            row["udp_rcvbuf_errors"] = row["kernel_drops"]["udp_rcvbuf_errors"]
        gb = r1.bytes / 1e9
        row.update(tcp1_gbps=r1.gbps, tcp1_retransmits=r1.retransmits, tcp1_bytes=r1.bytes,
                   daemon_cpu_s=cpu1 - cpu0, softirq_s=sirq1 - sirq0)
        row["daemon_cpu_s_per_gb"] = (cpu1 - cpu0) / gb if gb else float("nan")
        row["softirq_s_per_gb"] = (sirq1 - sirq0) / gb if gb else float("nan")
        row["cpu_s_per_gb"] = (cpu1 - cpu0 + sirq1 - sirq0) / gb if gb else float("nan")
        cpu = (r1.raw or {}).get("end", {}).get("cpu_utilization_percent", {})
        row["iperf_cpu_pct"] = {"sender": cpu.get("host_total"), "receiver": cpu.get("remote_total")}
        if user:
            deltas = [counter_delta(b, a) for b, a in zip(before, after)]
            row["fastpath_deltas"] = {h.name: d for h, d in zip(self.tb.hosts, deltas)}
            row.update(fastpath_figures(deltas, r1.bytes))
        else:
            row.update(kernel_figures())

        r4 = self._iperf(seconds=seconds, streams=4)
        row.update(tcp4_gbps=r4.gbps, tcp4_retransmits=r4.retransmits)

        ru = self._iperf(seconds=seconds, udp=True, length=UDP_PAYLOAD, bitrate="0")
        row.update(udp64_kpps=ru.delivered_pps / 1e3, udp64_loss_pct=ru.lost_percent,
                   udp64_sent=ru.packets, udp64_lost=ru.lost_packets)
        time.sleep(SETTLE_S)
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


# --------------------------------------------------------------------------------------------------------------------
# machine description, output


def machine_info() -> Dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from fastflannel.datapath import fastpath

    return {"nproc": os.cpu_count(), "cpu_model": model, "kernel": platform.release(),
            "python": platform.python_version(), "fastpath_extension": fastpath.IMPLEMENTATION,
            "hostname": platform.node()}


def code_state() -> Dict[str, Any]:
    """Return what the udp figures depend on: the git commit, whether the tree is dirty, the extension's mtime."""
    import subprocess

    from fastflannel.datapath import fastpath

    root = Path(__file__).resolve().parent.parent
    state: Dict[str, Any] = {"git_commit": None, "git_dirty": None, "extension": None, "extension_mtime": None}
    try:
        state["git_commit"] = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                                             capture_output=True, text=True, timeout=10).stdout.strip() or None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout
        state["git_dirty"] = bool(dirty.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        mod = fastpath.implementation_module("cython")
        state["extension"] = getattr(mod, "__file__", None)
        state["extension_mtime"] = os.path.getmtime(mod.__file__) if state["extension"] else None
    except ImportError:
        pass
    return state


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def write_json(result: Dict[str, Any], out: Path, stamp: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"bench-{stamp}.json"
    text = json.dumps(_jsonable(result), indent=2, sort_keys=False) + "\n"
    path.write_text(text)
    (out / "latest.json").write_text(text)
    return path


def write_chart(summary: Dict[str, Dict[str, Dict[str, float]]], modes: Sequence[str], path: Path,
                title: str) -> Optional[str]:
    """Draw the main figures as bar charts with min-max whiskers; return None or why it was skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'fastflannel[bench]'): no PNG chart"
    panels = [("tcp1_gbps", "TCP 1 stream (Gb/s)"), ("tcp4_gbps", "TCP 4 streams (Gb/s)"),
              ("udp64_kpps", "UDP 64 B delivered (kpps)"), ("rtt_p50_ms", "RTT p50 (ms)"),
              ("rtt_p99_ms", "RTT p99 (ms)"), ("cpu_s_per_gb", "CPU s per GB (daemons + softirq)"),
              ("syscalls_per_packet", "syscalls per packet (user/kernel)"),
              ("bytes_copied_per_byte", "bytes copied per byte delivered")]
    colors = {"host-gw": "#4c72b0", "vxlan": "#55a868", "udp": "#dd8452", "udp-plain": "#8172b3",
              "udp-python": "#c44e52", "wireguard": "#937860"}
    fig, axes = plt.subplots(2, 4, figsize=(16, 7.5))
    for ax, (key, label) in zip(axes.flat, panels):
        meds, los, his, names = [], [], [], []
        for m in modes:
            s = summary.get(m, {}).get(key)
            names.append(m)
            if s:
                meds.append(s["median"])
                los.append(s["median"] - s["min"])
                his.append(s["max"] - s["median"])
            else:
                meds.append(0.0)
                los.append(0.0)
                his.append(0.0)
        xs = range(len(names))
        ax.bar(xs, meds, yerr=[los, his], capsize=4, color=[colors.get(m, "#888888") for m in names])
        ax.set_xticks(list(xs))
        ax.set_xticklabels(names, rotation=20)
        ax.set_title(label, fontsize=10)
        ax.set_ylim(bottom=0, top=None if max(m + h for m, h in zip(meds, his)) > 0 else 1)
        for x, v in zip(xs, meds):
            ax.annotate(f"{v:.3g}", (x, v), ha="center", va="bottom", fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


# --------------------------------------------------------------------------------------------------------------------
# entry point


def run_bench(ns) -> int:
    """Run the comparison described in the module docstring; return 0 if every requested mode produced figures."""
    from fastflannel.lab.testbed import install_signal_handlers, restore_signal_handlers
    from fastflannel.lab.progress import Progress

    say = Progress()
    modes = [m.strip() for m in str(getattr(ns, "modes", ",".join(ALL_MODES))).split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODE_SPECS]
    if unknown or not modes:
        print(f"fastflannel bench: unknown mode(s) {unknown}; known: {', '.join(MODE_SPECS)}", file=sys.stderr)
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
            (["--quick"] if quick else [f"--reps {reps}"]) + [f"--seconds {seconds:g}", f"--modes {','.join(modes)}"]),
        "settings": {"modes": modes, "reps": reps, "seconds": seconds, "pings": pings, "quick": quick,
                     "network": BENCH_NETWORK, "udp_payload": UDP_PAYLOAD, "hosts_per_mode": 2},
        "machine": machine_info(),
        "code": code_state(),
        "runs": [], "errors": {}, "setup_s": {},
    }
    say(f"fastflannel bench: modes {', '.join(modes)}; {reps} interleaved repetition(s) of {seconds:g} s tests; "
        f"{result['machine']['nproc']} CPUs ({result['machine']['cpu_model']}), kernel {result['machine']['kernel']}")
    previous = install_signal_handlers(sigterm=KeyboardInterrupt)
    interrupted = False
    try:
        with contextlib.ExitStack() as stack:
            clusters: Dict[str, ModeCluster] = {}
            for mode in modes:
                say(f"{mode}: bringing up 2 hosts, etcd and 2 containers ...")
                t1 = time.monotonic()
                c = ModeCluster(mode, say)
                try:
                    c.up(stack)
                    clusters[mode] = c
                except KeyboardInterrupt:
                    raise
                except Exception as e:  # this mode is broken: report it, keep measuring the others
                    log_tail = ""
                    if c.tb is not None:
                        log_tail = "".join(h.daemon_log_text()[-800:] for h in c.tb.hosts if h.daemon_log)
                    result["errors"][mode] = f"bring-up failed: {e}"
                    say(f"{mode}: FAILED to come up: {str(e).splitlines()[0] if str(e) else repr(e)}")
                    if log_tail:
                        say(f"{mode}: daemon log tail: {log_tail.strip().splitlines()[-1] if log_tail.strip() else ''}")
                result["setup_s"][mode] = round(time.monotonic() - t1, 2)
            for rep in range(reps):
                order = [m for m in rotation(modes, rep) if m in clusters]
                say(f"rep {rep + 1}/{reps}: order {', '.join(order)}")
                for mode in order:
                    try:
                        row = clusters[mode].measure(seconds, pings)
                    except KeyboardInterrupt:
                        raise
                    except Exception as e:
                        result["errors"].setdefault(f"{mode}/rep{rep + 1}", str(e)[:2000])
                        say(f"rep {rep + 1} {mode}: FAILED: {str(e).splitlines()[0] if str(e) else repr(e)}")
                        continue
                    row["rep"] = rep + 1
                    result["runs"].append(row)
                    extra = ""
                    if MODE_SPECS[mode]["user_space"]:
                        extra = (f", {row['syscalls_per_packet']:.2f} syscalls/pkt, "
                                 f"{row['packets_per_batch']:.1f} pkts/batch, "
                                 f"{row['bytes_copied_per_byte']:.2f} B copied/B")
                        if _finite(row.get("segments_per_tun_read")):
                            extra += (f", {row['segments_per_tun_read']:.1f} segs/TUN read, "
                                      f"{row.get('datagrams_per_receive', float('nan')):.1f} dgrams/receive, "
                                      f"{row.get('packets_per_coalesced_write', float('nan')):.1f} pkts/write")
                    say(f"rep {rep + 1} {mode}: TCP {row['tcp1_gbps']:.2f} / {row['tcp4_gbps']:.2f} Gb/s (1/4 "
                        f"streams), UDP64 {row['udp64_kpps']:.0f} kpps ({row['udp64_loss_pct']:.1f}% lost), "
                        f"RTT p50 {row['rtt_p50_ms']:.3f} p99 {row['rtt_p99_ms']:.3f} ms, "
                        f"{row['cpu_s_per_gb']:.2f} CPU s/GB{extra}")
            say("tearing down " + ", ".join(c.tb.prefix for c in clusters.values() if c.tb is not None))
    except KeyboardInterrupt:
        interrupted = True
        say("interrupted: every testbed the bench created has been removed")
    finally:
        restore_signal_handlers(previous)

    wall = time.monotonic() - t0
    result["wall_s"] = round(wall, 1)
    code_end = code_state()
    if code_end.get("extension_mtime") != result["code"].get("extension_mtime"):
        result["code"]["rebuilt_during_run"] = True
        say("WARNING: fastflannel/_fastpath was rebuilt during the run: the udp figures may mix builds; rerun")
    if "udp" in modes and not result["code"].get("extension"):
        say("WARNING: the Cython extension is not built: the 'udp' mode ran the pure-Python twin")
    result["interrupted"] = interrupted
    summary = summarize(result["runs"], modes)
    result["summary"] = summary
    result["ratios_to_vxlan"] = ratios(summary, "vxlan")
    path = write_json(result, out, stamp)
    print()
    print(format_table(summary, modes))
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
