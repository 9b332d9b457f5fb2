# SPDX-License-Identifier: Apache-2.0
"""Small-packet measurements between simulated containers: request/response, a 64-byte flood, loss by place, CPU.

Used by ``fastflannel bench``. Every command runs inside a testbed namespace (``node.run``/``node.popen``).

- **Request/response**: ``sockperf ping-pong --tcp -m 64`` (Debian's sockperf) from one container to a
  ``sockperf server`` in the other: transactions/s (received replies per second of the valid duration) and
  sockperf's one-way latency (half the round trip) p50/p99 in microseconds.
- **Flood**: iperf3's UDP sender makes one ``sendto()`` per datagram and tops out at 60-100 kpps on two shared
  vCPUs, below what the data path takes. :data:`FLOOD_CODE` sends 64-byte datagrams with ``sendmmsg(2)`` (through
  ctypes: no C to build), ``batch`` per call, for ``seconds``, optionally paced to ``pps``; the receiver is a
  socket that is bound and never read (:data:`SINK_CODE`): nothing answers, nothing spends CPU on it. What was
  *delivered* is counted where the data path ends, at the receiving container's UDP layer (``Udp: InDatagrams``
  plus the sink's own overflow ``Udp: RcvbufErrors``, which is not the data path's loss). Not ``eth0``
  rx_packets: a coalesced UDP write (udp backend, USO) crosses the veth as one GSO packet and is counted once.
- **Loss by place**: :func:`netns_counters` reads ``/proc/net/snmp`` and ``ip -s link`` of a namespace;
  :func:`loss_by_place` turns the deltas over a flood into datagrams lost at each place (see its docstring).
- **CPU**: :func:`machine_cpu` reads the busy time of the whole machine from ``/proc/stat``.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Sequence

from fastflannel.lab.measure import ServerProcess, process_cpu_seconds

SOCKPERF_PORT = 11111
FLOOD_PORT = 5401
FLOOD_BATCH = 256

# sockperf's summary lines (sockperf 3.7)
_SP_VALID = re.compile(r"\[Valid Duration\] RunTime=([\d.]+) sec; SentMessages=(\d+); ReceivedMessages=(\d+)")
_SP_PCT = re.compile(r"percentile ([\d.]+) =\s*([\d.]+)")
_SP_AVG = re.compile(r"avg-latency=([\d.]+)")


@dataclass
class PingPongResult:
    seconds: float
    sent: int
    received: int
    avg_us: float
    percentiles_us: Dict[float, float]

    @property
    def tps(self) -> float:
        """Transactions (request + reply) per second."""
        return self.received / self.seconds if self.seconds else float("nan")

    def p(self, q: float) -> float:
        return self.percentiles_us.get(q, float("nan"))


def parse_sockperf(text: str) -> PingPongResult:
    """Parse ``sockperf ping-pong`` output; raise ValueError naming what is missing."""
    m = _SP_VALID.search(text)
    if not m:
        raise ValueError(f"no '[Valid Duration]' line in sockperf output: {text[-400:]!r}")
    avg = _SP_AVG.search(text)
    pct = {float(q): float(v) for q, v in _SP_PCT.findall(text)}
    return PingPongResult(seconds=float(m.group(1)), sent=int(m.group(2)), received=int(m.group(3)),
                          avg_us=float(avg.group(1)) if avg else float("nan"), percentiles_us=pct)


class SockperfServer(ServerProcess):
    """A ``sockperf server --tcp`` inside ``node`` (tracked by the testbed: killed at teardown); a context manager."""

    def __init__(self, node, port: int = SOCKPERF_PORT) -> None:
        super().__init__(node, port, ["sockperf", "server", "--tcp", "-i", str(node.ip), "-p", str(port)])


def sockperf_pingpong(client, server_ip, seconds: float = 5.0, size: int = 64, port: int = SOCKPERF_PORT,
                      retries: int = 3) -> PingPongResult:
    """Run ``sockperf ping-pong --tcp -m size`` from ``client`` against a :class:`SockperfServer`."""
    args = ["sockperf", "ping-pong", "--tcp", "-i", str(server_ip), "-p", str(port), "-m", str(size),
            "-t", f"{seconds:g}"]
    last = ""
    for _ in range(retries):
        r = client.run(args, check=False, timeout=seconds + 30)
        try:
            return parse_sockperf(r.stdout + r.stderr)
        except ValueError as e:
            last = str(e)
            time.sleep(0.5)
    raise RuntimeError(f"sockperf ping-pong {client.name} -> {server_ip} failed: {last}")


# ---------------------------------------------------------------------------------------------------------------
# the 64-byte flood

FLOOD_CODE = r"""
import ctypes, json, socket, sys, time
dst, port, secs, size, batch, pps = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), \
    int(sys.argv[5]), float(sys.argv[6])
libc = ctypes.CDLL(None, use_errno=True)
class iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
class msghdr(ctypes.Structure):
    _fields_ = [("name", ctypes.c_void_p), ("namelen", ctypes.c_uint32), ("iov", ctypes.POINTER(iovec)),
                ("iovlen", ctypes.c_size_t), ("control", ctypes.c_void_p), ("controllen", ctypes.c_size_t),
                ("flags", ctypes.c_int)]
class mmsghdr(ctypes.Structure):
    _fields_ = [("hdr", msghdr), ("len", ctypes.c_uint)]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
s.connect((dst, port))
buf = ctypes.create_string_buffer(b"\x5a" * size, size)
iov = iovec(ctypes.addressof(buf), size)
msgs = (mmsghdr * batch)()
for m in msgs:
    m.hdr.iov = ctypes.pointer(iov)
    m.hdr.iovlen = 1
sendmmsg = libc.sendmmsg
sendmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
fd, sent, calls, errors, last_err = s.fileno(), 0, 0, 0, 0
t0 = time.monotonic(); end = t0 + secs
while True:
    now = time.monotonic()
    if now >= end:
        break
    if pps > 0:
        ahead = sent / pps - (now - t0)
        if ahead > 0:
            time.sleep(min(ahead, end - now))
            continue
    n = sendmmsg(fd, msgs, batch, 0)
    calls += 1
    if n < 0:
        errors += 1; last_err = ctypes.get_errno()
    else:
        sent += n
print(json.dumps({"sent": sent, "calls": calls, "errors": errors, "last_errno": last_err,
                  "seconds": time.monotonic() - t0}), flush=True)
"""

SINK_CODE = r"""
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
print("ready", flush=True)
while True:
    time.sleep(3600)
"""


class FloodSink:
    """A UDP socket bound in ``node`` that never reads (datagrams land in it, nothing answers); tracked."""

    def __init__(self, node, port: int = FLOOD_PORT) -> None:
        self.node = node
        self.port = port
        self.proc = node.popen([sys.executable, "-I", "-S", "-c", SINK_CODE, str(port)], stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if "ready" not in line:
            self.close()
            raise RuntimeError(f"flood sink in {node.name} did not start: {line!r}")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        if self.proc.stdout:
            self.proc.stdout.close()


def flood(client, dst_ip, seconds: float = 5.0, size: int = 64, batch: int = FLOOD_BATCH, pps: float = 0.0,
          port: int = FLOOD_PORT) -> Dict[str, Any]:
    """Send ``size``-byte UDP datagrams from ``client`` to ``dst_ip:port`` for ``seconds`` (``pps`` 0: as fast as
    ``sendmmsg`` goes); return ``{sent, calls, errors, last_errno, seconds}``."""
    r = client.run([sys.executable, "-I", "-S", "-c", FLOOD_CODE, str(dst_ip), str(port), f"{seconds:g}",
                    str(size), str(batch), f"{pps:g}"], check=False, timeout=seconds + 30)
    try:
        return json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError) as e:
        raise RuntimeError(f"flood from {client.name} failed (rc {r.returncode}): {r.stderr[-400:]}") from e


# ---------------------------------------------------------------------------------------------------------------
# counters by place

_SNMP_KEYS = ("InDatagrams", "OutDatagrams", "RcvbufErrors", "SndbufErrors", "InErrors", "NoPorts")


def parse_netns_counters(snmp_text: str, links_json: str) -> Dict[str, int]:
    """Return flat counters: ``udp.<Key>`` from /proc/net/snmp and ``<ifname>.<rx|tx>_<packets|dropped>``."""
    out: Dict[str, int] = {}
    rows = [ln.split() for ln in snmp_text.splitlines() if ln.startswith("Udp:")]
    if len(rows) >= 2:
        for k in _SNMP_KEYS:
            if k in rows[0]:
                out[f"udp.{k}"] = int(rows[1][rows[0].index(k)])
    try:
        links = json.loads(links_json or "[]")
    except ValueError:
        links = []
    for link in links:
        st = link.get("stats64") or link.get("stats") or {}
        name = link.get("ifname", "?")
        for d in ("rx", "tx"):
            for k in ("packets", "dropped", "errors"):
                if k in st.get(d, {}):
                    out[f"{name}.{d}_{k}"] = int(st[d][k])
    return out


def netns_counters(node) -> Dict[str, int]:
    """Read ``node``'s namespace counters (one command): UDP MIB and every link's packets/drops."""
    r = node.run(["sh", "-c", "cat /proc/net/snmp; echo '@@@'; ip -j -s link show"], check=False)
    snmp, _, links = r.stdout.partition("@@@")
    return parse_netns_counters(snmp, links.strip())


def softnet_dropped() -> int:
    """Return the machine's backlog drops (/proc/net/softnet_stat column 2, summed over CPUs; not per netns)."""
    total = 0
    with open("/proc/net/softnet_stat") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 1:
                total += int(parts[1], 16)
    return total


def _d(before: Mapping[str, int], after: Mapping[str, int], key: str) -> int:
    return int(after.get(key, 0)) - int(before.get(key, 0))


# places, in the order a datagram meets them; value: counters summed for it
LOSS_PLACES = ("sender_veth", "tun_queue", "sender_socket", "receiver_rcvbuf", "fastpath", "tun_write",
               "backlog", "unaccounted")


def loss_by_place(sent: int, delta: Dict[str, Dict[str, int]], fastpath_drops: int, backlog: int,
                  tun: str) -> Dict[str, Any]:
    """Split the datagrams ``sent`` into delivered and lost-at-each-place from counter deltas over the flood.

    ``delta`` holds per-namespace deltas of :func:`netns_counters` under ``src`` (sending container), ``dst``
    (receiving container), ``h1`` (sending host), ``h2`` (receiving host); ``tun`` is the overlay device (the udp
    backend's ``flannel0``, VXLAN's ``flannel.1``, '' for host-gw). Places:

    - ``sender_veth``: the sending container's eth0 tx_dropped (veth could not queue);
    - ``tun_queue``: the sending host's ``tun`` tx_dropped (the TUN's queue was full: the daemon read too late);
    - ``sender_socket``: the sending host's ``Udp: SndbufErrors`` (the daemon's send refused);
    - ``receiver_rcvbuf``: the receiving host's ``Udp: RcvbufErrors`` (the daemon's socket overflowed);
    - ``fastpath``: the fast path's own drop counters, both daemons (``*_drop_*``);
    - ``tun_write``: the receiving host's ``tun`` rx_dropped (written but refused by the kernel);
    - ``backlog``: the machine's softnet backlog drops (``/proc/net/softnet_stat``: not per namespace, so other
      traffic on the machine lands here too);
    - ``unaccounted``: the rest (sent - delivered - the above; may be negative if a place counted other packets).

    Delivered = the datagrams that reached the receiving container's UDP layer: ``Udp: InDatagrams`` +
    ``Udp: RcvbufErrors`` there, each counted once the kernel has cut GSO packets into datagrams (a veth counts a
    GSO packet once). The receiving application's own drops (its socket overflowing) are ``app_rcvbuf`` and not
    loss of the data path.
    """
    src, dst, h1, h2 = (delta.get(k, {}) for k in ("src", "dst", "h1", "h2"))
    delivered = int(dst.get("udp.InDatagrams", 0)) + int(dst.get("udp.RcvbufErrors", 0))
    places = {
        "sender_veth": int(src.get("eth0.tx_dropped", 0)),
        "tun_queue": int(h1.get(f"{tun}.tx_dropped", 0)) if tun else 0,
        "sender_socket": int(h1.get("udp.SndbufErrors", 0)),
        "receiver_rcvbuf": int(h2.get("udp.RcvbufErrors", 0)),
        "fastpath": int(fastpath_drops),
        "tun_write": int(h2.get(f"{tun}.rx_dropped", 0)) if tun else 0,
        "backlog": int(backlog),
    }
    lost = max(0, sent - delivered)
    places["unaccounted"] = lost - sum(places.values())
    pct = {k: 100.0 * v / sent if sent else float("nan") for k, v in places.items()}
    return {"sent": sent, "delivered": delivered, "lost": lost,
            "loss_pct": 100.0 * lost / sent if sent else float("nan"),
            "places": places, "places_pct": pct, "app_rcvbuf": int(dst.get("udp.RcvbufErrors", 0))}


def counters_delta(before: Mapping[str, Mapping[str, int]], after: Mapping[str, Mapping[str, int]]
                   ) -> Dict[str, Dict[str, int]]:
    """Per-namespace deltas of two :func:`netns_counters` snapshots keyed alike."""
    return {ns: {k: _d(before.get(ns, {}), after[ns], k) for k in after[ns]} for ns in after}


# ---------------------------------------------------------------------------------------------------------------
# CPU


def machine_cpu() -> Dict[str, float]:
    """Return the whole machine's CPU seconds from /proc/stat: ``busy`` (user+nice+system+irq+softirq),
    ``softirq`` and ``total`` (busy + idle + iowait)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    user, nice, system, idle, iowait, irq, softirq = v[:7]
    busy = user + nice + system + irq + softirq
    return {"busy": busy / hz, "softirq": softirq / hz, "total": (busy + idle + iowait) / hz}


def cpu_delta(a: Mapping[str, float], b: Mapping[str, float]) -> Dict[str, float]:
    return {k: b[k] - a[k] for k in b}


def iperf_cpu_seconds(raw: Optional[dict], seconds: float) -> float:
    """Return iperf3's own CPU seconds (client + server) from its -J ``cpu_utilization_percent``."""
    cpu = (raw or {}).get("end", {}).get("cpu_utilization_percent", {})
    return ((cpu.get("host_total") or 0.0) + (cpu.get("remote_total") or 0.0)) / 100.0 * seconds


def per_daemon_cpu_pct(pids: Sequence[int], run: Any) -> float:
    """Run ``run()`` and return the largest per-process CPU use of ``pids`` over it, in % of one core."""
    c0 = [process_cpu_seconds(p) for p in pids]
    t0 = time.monotonic()
    run()
    dt = max(time.monotonic() - t0, 1e-9)
    c1 = [process_cpu_seconds(p) for p in pids]
    return max(100.0 * (b - a) / dt for a, b in zip(c0, c1)) if pids else float("nan")
