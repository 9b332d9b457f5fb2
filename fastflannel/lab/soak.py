# SPDX-License-Identifier: Apache-2.0
"""Soak: ``python -m fastflannel.lab.soak`` (``make soak``): the backends' clusters side by side in ONE run, with
mixed traffic, lease churn and restarts; samples every daemon's RSS, fds, threads, CPU and log lines; prints a
verdict per backend (docs/soak.md).

Per backend (default udp, vxlan, host-gw; all started together and driven by one loop), a 3-host testbed with one
container per host runs, for ``--minutes`` (default 10):
- a TCP stream: iperf3 from host1's container to host2's, back-to-back 20 s runs (``--iperf-rate``, default
  100 Mbit/s, so three clusters on a shared machine leave CPU to the daemons);
- a ping every 0.2 s from host3's container to host1's (bounded count);
- lease churn: every 5 s (``--churn-s``) a simulated remote lease is written or deleted (peers added and removed on
  every host);
- an etcd restart every ``--etcd-restart-min`` minutes (SIGTERM, down ``--etcd-down-s`` seconds, started again
  with its data) and a daemon restart (SIGTERM + start, hosts in turn h3, h2, h1) every ``--daemon-restart-min``,
  the last one early enough that the restarted daemon lives through the whole slope window after its warm-up.
Every ``--interval`` seconds it samples each daemon's VmRSS, open fds, threads, CPU seconds and log lines.

Verdict "flat" per backend when:
- RSS slope (least squares, MiB/h) over the last ``--slope-window-min`` minutes (default 30, at most half the run)
  of each daemon's current process, skipping its first ``--warmup-min`` minutes, is below ``--max-slope-mib-h``
  (default 1);
- fds and threads: the lowest count of the last quarter is at most 2 above the lowest of the first quarter (fds
  come and go: iptables-restore pipes, netlink and HTTP sockets; a leak raises the floor);
- no lost lease: every host holds the subnet it started with and no daemon logged ``event=lease_lost``;
- every daemon runs, most iperf3 runs succeeded, and at the end every container reaches every other (converged).
The last line is ``SOAK VERDICT: ...``; exit status 0 when every backend is flat. Raw samples: ``--json``.

Everything runs in testbed namespaces; every traffic generator is bounded in count/time and stops by itself.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from ipaddress import IPv4Address
from typing import Any, Callable, Dict, List, Optional, Sequence

from fastflannel.lab.testbed import Testbed, install_signal_handlers

NETWORK = "100.96.0.0/16"
CHURN_S = 5.0
_TICKS = os.sysconf("SC_CLK_TCK")


def proc_sample(pid: int) -> Dict[str, float]:
    """Return {rss_kb, threads, fds, cpu_s} of ``pid`` from /proc (-1 where it cannot be read)."""
    out: Dict[str, float] = {"rss_kb": -1, "threads": -1, "fds": -1, "cpu_s": -1.0}
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                out["rss_kb"] = int(line.split()[1])
            elif line.startswith("Threads:"):
                out["threads"] = int(line.split()[1])
        out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        out["cpu_s"] = (int(fields[11]) + int(fields[12])) / _TICKS  # utime + stime
    except (OSError, IndexError, ValueError):
        pass
    return out


def slope_per_hour(points: Sequence[tuple]) -> float:
    """Return the least-squares slope of (t seconds, value) points, per hour; 0.0 for fewer than 2 points."""
    n = len(points)
    if n < 2:
        return 0.0
    mt = sum(t for t, _ in points) / n
    mv = sum(v for _, v in points) / n
    den = sum((t - mt) ** 2 for t, _ in points)
    if den == 0:
        return 0.0
    return sum((t - mt) * (v - mv) for t, v in points) / den * 3600.0


def count_lines(path: Any) -> int:
    """Return the number of lines in the file at ``path`` (0 if it cannot be read)."""
    n = 0
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 16), b""):
                n += chunk.count(b"\n")
    except (OSError, TypeError):
        pass
    return n


def floor_delta(values: Sequence[float]) -> int:
    """Return min(last quarter) - min(first quarter): a leak raises the floor, transient fds/threads do not."""
    if not values:
        return 0
    q = max(1, len(values) // 4)
    return int(min(values[-q:]) - min(values[:q]))


def slope_window_s(minutes: float, slope_window_min: float) -> float:
    """Seconds at the end of the run over which a daemon's RSS slope is judged (at most half the run)."""
    return min(slope_window_min * 60, minutes * 30)


def last_restart_s(minutes: float, slope_window_min: float, warmup_min: float) -> float:
    """The latest run time a daemon restart may happen at: the restarted daemon still lives through the whole slope
    window after its warm-up, so every daemon is judged over the same last N minutes (a daemon restarted 17 minutes
    before the end would be judged on its first, warming-up minutes instead)."""
    return minutes * 60 - slope_window_s(minutes, slope_window_min) - warmup_min * 60


def _lease(backend: str, i: int) -> str:
    from fastflannel.lease import LeaseAttrs

    ip = IPv4Address("10.168.0.100") + i % 100
    if backend == "vxlan":
        return LeaseAttrs(ip, "vxlan", {"VNI": 1, "VtepMAC": f"02:00:00:00:{i // 256 % 256:02x}:{i % 256:02x}"}).to_json()
    return LeaseAttrs(ip, "" if backend == "udp" else backend).to_json()


def churn_step(tb: Any, backend: str, live: List[str], n: int) -> int:
    """One lease churn write on ``tb``: delete the simulated lease in ``live`` if there is one, else put simulated
    lease number ``n`` (one of 50 subnets) and remember its key. Returns the next lease number."""
    if live:
        tb.etcdctl("del", live[-1])
        live.pop()
        return n
    key = f"{tb.prefix_key}/subnets/100.96.{200 + n % 50}.0-24"
    tb.etcdctl("put", key, _lease(backend, n))
    live.append(key)
    return n + 1


def _kill(p: Optional[subprocess.Popen], sig: int = signal.SIGTERM) -> None:
    if p is None or p.poll() is not None:
        return
    try:
        p.send_signal(sig)
        p.wait(10)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        p.kill()
        p.wait(5)


_PING_SUMMARY = re.compile(r"(\d+) packets transmitted, (\d+) received")


class SoakCluster:
    """One backend's 3-host testbed with its traffic, churn and restart schedule; driven by ``tick``."""

    def __init__(self, backend: str, args: argparse.Namespace, say: Callable[[str], Any]) -> None:
        self.backend, self.args, self.say = backend, args, say
        workdir = os.path.join(args.workdir, backend) if args.workdir else None
        self.tb = Testbed(3, log=lambda m: None, workdir=workdir)
        self.samples: List[Dict[str, Any]] = []
        self.events: List[Dict[str, Any]] = []
        self.iperf: Optional[subprocess.Popen] = None
        self.iperf_srv: Optional[subprocess.Popen] = None
        self.ping: Optional[subprocess.Popen] = None
        self.iperf_runs = self.iperf_ok = 0
        self.churn = 0
        self.live: List[str] = []
        self.churn_errors = 0
        self.etcd_down_until: Optional[float] = None
        self.restarts = 0
        self.started: Dict[str, float] = {}  # host -> run time its current daemon started
        self.pid_start: Dict[int, float] = {}  # daemon pid -> run time it started (after begin)

    # -- set-up / tear-down ------------------------------------------------------------------------------------
    def start(self) -> None:
        tb = self.tb
        tb.start()
        tb.put_config({"Network": NETWORK, "Backend": {"Type": self.backend}})
        for h in tb.hosts:
            h.start_daemon()
        for h in tb.hosts:
            h.wait_subnet_env(timeout=90)
        self.subnets = {h.name: h.read_subnet_env()["FLANNEL_SUBNET"] for h in tb.hosts}
        self.containers = [h.add_container() for h in tb.hosts]
        c1, c2, c3 = self.containers
        for a, b in ((c1, c2), (c3, c1)):
            if not _wait_ping(a, b.ip, 60):
                raise RuntimeError(f"{self.backend}: {a.name} cannot reach {b.ip}")
        self.iperf_srv = c2.popen(["iperf3", "-s", "-p", "5201"], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)

    def begin(self, t0: float) -> None:
        a = self.args
        self.t0 = t0
        c1, _c2, c3 = self.containers
        self.ping = c3.popen(["ping", "-n", "-q", "-i", "0.2", "-c", str(int(a.minutes * 300) + 50), "-W", "1",
                              str(c1.ip)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.next_sample = t0
        self.next_churn = t0 + a.churn_s
        self.next_etcd = t0 + a.etcd_restart_min * 60 if a.etcd_restart_min > 0 else float("inf")
        self.next_daemon = t0 + a.daemon_restart_min * 60 if a.daemon_restart_min > 0 else float("inf")
        self.started = {h.name: 0.0 for h in self.tb.hosts}

    def close(self) -> None:
        for p in (self.iperf, self.iperf_srv, self.ping):
            _kill(p, signal.SIGKILL)
        self.tb.close(raise_on_leak=False)

    # -- one step of the loop ----------------------------------------------------------------------------------
    def tick(self, now: float) -> None:
        a = self.args
        t = now - self.t0
        if self.iperf is None or self.iperf.poll() is not None:
            if self.iperf is not None:
                self.iperf_runs += 1
                self.iperf_ok += self.iperf.returncode == 0
            left = int(a.minutes * 60 - t)
            if left >= 2:
                c1, c2, _ = self.containers
                self.iperf = c1.popen(["iperf3", "-c", str(c2.ip), "-p", "5201", "-t", str(min(20, left)),
                                       "-b", a.iperf_rate], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            else:
                self.iperf = None
        if now >= self.next_churn and self.etcd_down_until is None:
            self._churn()
            self.next_churn = now + a.churn_s
        if self.etcd_down_until is not None and now >= self.etcd_down_until:
            self.tb.etcd[0].spawn()
            self.etcd_down_until = None
            self._event(t, "etcd_started")
        elif now >= self.next_etcd:
            self.tb.etcd[0].stop()
            self.etcd_down_until = now + a.etcd_down_s
            self.next_etcd = now + a.etcd_restart_min * 60
            self._event(t, "etcd_stopped")
        if now >= self.next_daemon and t <= last_restart_s(a.minutes, a.slope_window_min, a.warmup_min):
            h = self.tb.hosts[2 - self.restarts % 3]
            rc = h.stop_daemon(signal.SIGTERM)
            h.start_daemon()
            self.started[h.name] = time.monotonic() - self.t0
            self.pid_start[h.daemon.pid] = self.started[h.name]
            self.restarts += 1
            self.next_daemon = now + a.daemon_restart_min * 60
            self._event(t, "daemon_restarted", host=h.name, exit_status=rc)
        if now >= self.next_sample:
            self._sample(t)
            self.next_sample = now + a.interval

    def _event(self, t: float, what: str, **kw: Any) -> None:
        self.events.append({"t": round(t, 1), "event": what, **kw})
        self.say(f"{self.backend} t={t:7.1f}s {what} " + " ".join(f"{k}={v}" for k, v in kw.items()))

    def _churn(self) -> None:
        try:
            self.churn = churn_step(self.tb, self.backend, self.live, self.churn)
        except Exception:  # noqa: BLE001 - etcd just restarted: try again at the next churn
            self.churn_errors += 1

    def _sample(self, t: float) -> None:
        s: Dict[str, Any] = {"t": round(t, 1)}
        for h in self.tb.hosts:
            pid = h.daemon.pid if h.daemon is not None and h.daemon.poll() is None else -1
            d = proc_sample(pid) if pid > 0 else {"rss_kb": -1, "threads": -1, "fds": -1, "cpu_s": -1}
            d["pid"] = pid
            d["log_lines"] = count_lines(h.daemon_log)
            s[h.name] = d
        self.samples.append(s)
        self.say(f"{self.backend:7s} t={t:7.1f}s " + "  ".join(
            f"{n}: rss {v['rss_kb'] / 1024:5.1f} MiB fds {v['fds']:3d} thr {v['threads']:2d} cpu {v['cpu_s']:6.1f}s"
            for n, v in s.items() if n != "t"))

    # -- end ---------------------------------------------------------------------------------------------------
    def finish(self) -> Dict[str, Any]:
        a = self.args
        if self.etcd_down_until is not None:
            self.tb.etcd[0].spawn()
        self.tb.etcd[0].wait_healthy(30)
        if self.iperf is not None:
            try:
                self.iperf.wait(30)
            except subprocess.TimeoutExpired:
                self.iperf.kill()
                self.iperf.wait(5)
            self.iperf_runs += 1
            self.iperf_ok += self.iperf.returncode == 0
        self.ping.send_signal(signal.SIGINT)  # ping prints its summary on SIGINT
        try:
            out = self.ping.communicate(timeout=10)[0]
        except subprocess.TimeoutExpired:
            self.ping.kill()
            out = self.ping.communicate(timeout=10)[0]
        for key in self.live:  # the churn lease still standing
            self.tb.etcdctl("del", key)
        tb = self.tb
        alive = all(h.daemon is not None and h.daemon.poll() is None for h in tb.hosts)
        subnets_end = {}
        for h in tb.hosts:
            try:
                subnets_end[h.name] = h.read_subnet_env()["FLANNEL_SUBNET"]
            except (OSError, KeyError):
                subnets_end[h.name] = None
        lost_logged = {h.name: h.daemon_log_text().count("event=lease_lost") for h in tb.hosts}
        unreachable = []
        for x in self.containers:
            for y in self.containers:
                if x is not y and not _wait_ping(x, y.ip, 30):
                    unreachable.append(f"{x.name}->{y.ip}")
        window = slope_window_s(a.minutes, a.slope_window_min)
        verdicts = {}
        for h in tb.hosts:
            name = h.name
            # fds and threads of a daemon still starting (its first 30 s) are not its floor
            series = [s[name] for s in self.samples[1:] if s[name]["pid"] > 0
                      and s["t"] >= self.pid_start.get(s[name]["pid"], 0.0) + 30] or [self.samples[-1][name]]
            pid_now = series[-1]["pid"]
            end_t = self.samples[-1]["t"]
            since = max(end_t - window, self.started.get(name, 0.0) + a.warmup_min * 60)
            pts = [(s["t"], s[name]["rss_kb"] / 1024) for s in self.samples
                   if s[name]["pid"] == pid_now and s["t"] >= since]
            slope = slope_per_hour(pts)
            cpu = [s[name]["cpu_s"] for s in self.samples if s[name]["pid"] == pid_now]
            dur = (pts[-1][0] - pts[0][0]) if len(pts) > 1 else 0.0
            lines = [s[name]["log_lines"] for s in self.samples]
            v = {
                "rss_first_mib": round(series[0]["rss_kb"] / 1024, 1), "rss_last_mib": round(series[-1]["rss_kb"] / 1024, 1),
                "rss_slope_mib_h": round(slope, 3), "slope_window_min": round(dur / 60, 1),
                "fd_delta": floor_delta([x["fds"] for x in series]),
                "thread_delta": floor_delta([x["threads"] for x in series]),
                "fd_range": [min(x["fds"] for x in series), max(x["fds"] for x in series)],
                "cpu_s": round(cpu[-1] - cpu[0], 1) if cpu else None,
                "log_lines_per_min": round((lines[-1] - lines[0]) / max(1.0, end_t / 60), 2) if lines else None,
                "subnet_kept": subnets_end[name] == self.subnets[name], "lease_lost_logged": lost_logged[name],
            }
            v["flat"] = (slope < a.max_slope_mib_h and dur >= 60 and v["fd_delta"] <= 2 and v["thread_delta"] <= 2
                         and v["subnet_kept"] and not v["lease_lost_logged"])
            verdicts[name] = v
        m = _PING_SUMMARY.search(out)
        ping_sent, ping_recv = (int(m.group(1)), int(m.group(2))) if m else (0, 0)
        flat = (alive and not unreachable and all(v["flat"] for v in verdicts.values())
                and self.iperf_ok >= max(1, self.iperf_runs - 1 - len(self.events)))
        res = {"backend": self.backend, "seconds": a.minutes * 60, "samples": self.samples, "events": self.events,
               "verdicts": verdicts, "alive": alive, "unreachable": unreachable, "iperf_runs": self.iperf_runs,
               "iperf_ok": self.iperf_ok, "ping_sent": ping_sent, "ping_received": ping_recv,
               "lease_churn": self.churn, "churn_errors": self.churn_errors,
               "verdict": "flat" if flat else "NOT FLAT"}
        self.say(f"{self.backend}: verdict {res['verdict']}: " + ", ".join(
            f"{n} rss {v['rss_first_mib']}->{v['rss_last_mib']} MiB slope {v['rss_slope_mib_h']:+.2f} MiB/h over "
            f"{v['slope_window_min']} min fds {v['fd_delta']:+d} threads {v['thread_delta']:+d} cpu {v['cpu_s']}s "
            f"log {v['log_lines_per_min']}/min subnet kept {v['subnet_kept']}"
            for n, v in verdicts.items())
            + f"; iperf3 {self.iperf_ok}/{self.iperf_runs} runs ok; ping {ping_recv}/{ping_sent}; {self.churn} "
            f"leases churned; converged: {not unreachable} {unreachable or ''}; daemons alive: {alive}")
        return res


def _wait_ping(a, ip, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if a.ping(ip, count=1, timeout=2):
            return True
        if time.monotonic() > deadline:
            return False


def run(args: argparse.Namespace, say: Callable[[str], Any] = print) -> List[Dict[str, Any]]:
    """Start every backend's cluster, drive them together for ``args.minutes``, return one result per backend."""
    clusters = [SoakCluster(b, args, say) for b in args.backends.split(",") if b]
    try:
        for c in clusters:
            c.start()
            say(f"{c.backend}: cluster {c.tb.prefix} up, subnets {c.subnets}")
        t0 = time.monotonic()
        for c in clusters:
            c.begin(t0)
        while time.monotonic() - t0 < args.minutes * 60:
            for c in clusters:
                c.tick(time.monotonic())
            time.sleep(0.2)
        return [c.finish() for c in clusters]
    finally:
        for c in clusters:
            c.close()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastflannel.lab.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0, help="length of the run (all backends together)")
    p.add_argument("--backends", default="udp,vxlan,host-gw")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between samples")
    p.add_argument("--iperf-rate", default="100M", help="iperf3 -b (0 = unlimited)")
    p.add_argument("--churn-s", type=float, default=CHURN_S, help="seconds between lease churn writes")
    p.add_argument("--etcd-restart-min", type=float, default=15.0, help="minutes between etcd restarts (0: none)")
    p.add_argument("--etcd-down-s", type=float, default=10.0)
    p.add_argument("--daemon-restart-min", type=float, default=12.0,
                   help="minutes between daemon restarts (0: none); none later than the slope window plus the warm-up "
                   "before the end (60 min: at 12 and 24)")
    p.add_argument("--slope-window-min", type=float, default=30.0)
    p.add_argument("--warmup-min", type=float, default=3.0, help="skipped after each daemon start for the slope")
    p.add_argument("--max-slope-mib-h", type=float, default=1.0)
    p.add_argument("--json", help="write samples and verdicts to this file")
    p.add_argument("--workdir", help="keep each testbed's files (etcd data, daemon logs) under DIR/<backend> "
                   "instead of a temp dir (kept afterwards; safe from /tmp cleaners during a long run)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    ns = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    install_signal_handlers(sigterm=KeyboardInterrupt)
    say = lambda m: print(m, flush=True)  # noqa: E731
    say(f"soak: {ns.minutes} min, backends {ns.backends}, started {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}")
    results = run(ns, say)
    say("SOAK VERDICT: " + ", ".join(f"{r['backend']} {r['verdict']}" for r in results))
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0 if all(r["verdict"] == "flat" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
