# SPDX-License-Identifier: Apache-2.0
"""Measurements between simulated containers: RTT (iputils ping), TCP/UDP throughput (iperf3 -J), CPU.

Used by ``fastflannel demo`` and ``fastflannel bench``. Every command runs inside a testbed namespace
(``node.run``/``node.popen``), never in the root namespace.
"""
from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

IPERF_PORT = 5201
_RTT_RE = re.compile(r"time[=<]([\d.]+) ms")


def percentile(values: List[float], q: float) -> float:
    """Return the q-th percentile (0..100) by nearest rank; NaN for no values."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(q / 100.0 * len(s) + 0.5)) - 1))
    return s[k]


@dataclass
class RttResult:
    sent: int
    received: int
    rtts_ms: List[float]

    @property
    def loss(self) -> float:
        return 1.0 - self.received / self.sent if self.sent else 1.0

    @property
    def p50(self) -> float:
        return statistics.median(self.rtts_ms) if self.rtts_ms else float("nan")

    @property
    def p99(self) -> float:
        return percentile(self.rtts_ms, 99)


def ping_rtt(src, dst_ip, count: int = 50, interval: float = 0.01, timeout: float = 20.0,
             size: int = 56) -> RttResult:
    """Ping ``dst_ip`` from node ``src`` with iputils ``ping``; return the per-reply RTTs."""
    r = src.run(["ping", "-n", "-c", str(count), "-i", str(interval), "-s", str(size), "-W", "1",
                 "-w", str(int(timeout)), str(dst_ip)], check=False, timeout=timeout + 10)
    rtts = [float(m) for m in _RTT_RE.findall(r.stdout)]
    return RttResult(sent=count, received=len(rtts), rtts_ms=rtts)


@dataclass
class IperfResult:
    bits_per_second: float
    retransmits: int
    bytes: int
    lost_percent: float = 0.0
    packets: int = 0
    raw: Optional[dict] = None
    lost_packets: int = 0
    seconds: float = 0.0

    @property
    def delivered_packets(self) -> int:
        """UDP: datagrams that reached the server (sent minus lost)."""
        return max(0, self.packets - self.lost_packets)

    @property
    def delivered_pps(self) -> float:
        """UDP: datagrams per second that reached the server."""
        return self.delivered_packets / self.seconds if self.seconds else float("nan")

    @property
    def gbps(self) -> float:
        return self.bits_per_second / 1e9


class ServerProcess:
    """A server process started inside a testbed node for one measurement; a context manager that stops it."""

    def __init__(self, node, port: int, argv: Sequence[str]) -> None:
        self.node = node
        self.port = port
        self.proc = node.popen(list(argv), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.3)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class IperfServer(ServerProcess):
    """An iperf3 server inside ``node`` (one test at a time); a context manager."""

    def __init__(self, node, port: int = IPERF_PORT) -> None:
        super().__init__(node, port, ["iperf3", "-s", "-p", str(port)])


def iperf(client, server_ip, seconds: float = 3.0, streams: int = 1, udp: bool = False,
          length: Optional[int] = None, bitrate: str = "0", port: int = IPERF_PORT,
          retries: int = 3) -> IperfResult:
    """Run an iperf3 client in ``client`` against ``server_ip``; parse ``-J`` output."""
    args = ["iperf3", "-c", str(server_ip), "-p", str(port), "-t", str(seconds), "-P", str(streams), "-J"]
    if udp:
        args += ["-u", "-b", bitrate]
    if length:
        args += ["-l", str(length)]
    last = ""
    for _ in range(retries):
        r = client.run(args, check=False, timeout=seconds + 30)
        try:
            data = json.loads(r.stdout)
        except ValueError:
            data = {"error": r.stdout[-500:] + r.stderr[-500:]}
        if "error" not in data:
            end = data["end"]
            if udp:
                s = end["sum"]
                return IperfResult(s["bits_per_second"], 0, s["bytes"], s.get("lost_percent", 0.0),
                                   s.get("packets", 0), data, lost_packets=s.get("lost_packets", 0),
                                   seconds=s.get("seconds", 0.0))
            sent, recv = end["sum_sent"], end["sum_received"]
            return IperfResult(recv["bits_per_second"], sent.get("retransmits", 0), recv["bytes"], raw=data,
                               seconds=recv.get("seconds", 0.0))
        last = data["error"]
        time.sleep(0.5)  # the server may still be busy with the previous test
    raise RuntimeError(f"iperf3 {client.name} -> {server_ip} failed: {last}")


def transfer_checksum(src, dst, size_mb: int = 100, port: int = 5301, timeout: float = 120.0) -> Dict[str, str]:
    """Send ``size_mb`` MB of pseudo-random bytes over TCP from ``src`` to ``dst``; return both sides' sha256."""
    recv_code = (
        "import hashlib,socket,sys\n"
        f"s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);s.bind(('0.0.0.0',{port}));s.listen(1)\n"
        "print('ready',flush=True)\n"
        "c,_=s.accept();h=hashlib.sha256();n=0\n"
        "while True:\n"
        "    b=c.recv(1<<20)\n"
        "    if not b: break\n"
        "    h.update(b);n+=len(b)\n"
        "print(n,h.hexdigest(),flush=True)\n"
    )
    send_code = (
        "import hashlib,socket,sys,random\n"
        f"total={size_mb}<<20;rnd=random.Random(7);h=hashlib.sha256();\n"
        "c=socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=30);n=0\n"
        "while n<total:\n"
        "    b=rnd.randbytes(min(1<<20,total-n));c.sendall(b);h.update(b);n+=len(b)\n"
        "c.shutdown(socket.SHUT_WR);c.recv(1);c.close();print(n,h.hexdigest(),flush=True)\n"
    )
    import sys

    rp = dst.popen([sys.executable, "-c", recv_code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert rp.stdout is not None
        line = rp.stdout.readline()
        if "ready" not in line:
            raise RuntimeError(f"receiver in {dst.name} did not start: {line!r} {rp.stderr.read() if rp.stderr else ''}")
        s = src.run([sys.executable, "-c", send_code, str(dst.ip), str(port)], timeout=timeout)
        out, err = rp.communicate(timeout=timeout)
        sent_n, sent_h = s.stdout.split()
        got_n, got_h = out.split()
        return {"sent_bytes": sent_n, "sent_sha256": sent_h, "recv_bytes": got_n, "recv_sha256": got_h}
    finally:
        if rp.poll() is None:
            rp.kill()
            rp.wait(5)


def process_cpu_seconds(pid: int) -> float:
    """Return user+system CPU seconds of a process and its threads (from /proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def http_get_json(node, url: str, timeout: float = 5.0):
    """GET ``url`` from inside ``node``'s namespace (e.g. a daemon's healthz listener on 127.0.0.1); parse JSON.

    Raise RuntimeError with the error text if the request fails or the body is not JSON.
    """
    import sys

    code = ("import sys,urllib.request\n"
            f"sys.stdout.write(urllib.request.urlopen({url!r},timeout={timeout!r}).read().decode())\n")
    r = node.run([sys.executable, "-I", "-S", "-c", code], check=False, timeout=timeout + 10)
    if r.returncode != 0:
        raise RuntimeError(f"GET {url} in {node.name} failed: {(r.stderr or r.stdout).strip()[-300:]}")
    try:
        return json.loads(r.stdout)
    except ValueError as e:
        raise RuntimeError(f"GET {url} in {node.name}: not JSON: {r.stdout[:200]!r}") from e


def fastpath_stats(host, port: int) -> Dict[str, int]:
    """Return the udp fast path's counters of ``host``'s daemon (``/debug/fastpath`` on ``--healthz-port``)."""
    return http_get_json(host, f"http://127.0.0.1:{port}/debug/fastpath")


def softirq_seconds() -> float:
    """Return the machine's total softirq CPU seconds (from /proc/stat)."""
    with open("/proc/stat") as f:
        cpu = f.readline().split()
    return int(cpu[7]) / os.sysconf("SC_CLK_TCK")
