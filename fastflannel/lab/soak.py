# SPDX-License-Identifier: Apache-2.0
"""Soak: ``python -m fastflannel.lab.soak`` (``make soak``): mixed traffic over each backend for a while, with the
daemons' RSS and fd count sampled; prints the samples and a verdict per backend (docs/soak.md).

Per backend, a 3-host testbed with one container per host runs, for ``--minutes`` (default 10):
- a TCP stream (iperf3, 20 s runs, one after the other) from host1's container to host2's,
- a ping every 0.1 s from host3's container to host1's (bounded count),
- lease churn: every 5 s a simulated remote lease is written and, 5 s later, deleted (adds/removes peers).
Every ``--interval`` seconds (default 10) it samples each daemon's VmRSS and open fds. Verdict "flat" when, for
every daemon, the lowest fd count of the last quarter of the samples is at most 2 above the lowest of the first
quarter (fds come and go: iptables-restore pipes, netlink and HTTP sockets; a leak raises the floor) and RSS grew
by less than
``--rss-slack-mib`` (default 8 MiB) between the median of the first and of the last quarter of the samples
(after the warm-up sample); also every daemon must still run and the last ping/iperf runs must succeed. Exit
status 0 when every backend is flat.

Everything runs in testbed namespaces; every traffic generator is bounded in count/time and stops by itself.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import time
from ipaddress import IPv4Address
from typing import Any, Dict, List, Optional

from fastflannel.lab.testbed import Testbed, install_signal_handlers

NETWORK = "100.96.0.0/16"


def _rss_kb(pid: int) -> int:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return -1


def _fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def _lease(backend: str, i: int) -> str:
    from fastflannel.lease import LeaseAttrs

    ip = IPv4Address("10.168.0.100") + i % 100
    if backend == "vxlan":
        return LeaseAttrs(ip, "vxlan", {"VNI": 1, "VtepMAC": f"02:00:00:00:{i // 256 % 256:02x}:{i % 256:02x}"}).to_json()
    return LeaseAttrs(ip, "" if backend == "udp" else backend).to_json()


def soak_backend(backend: str, seconds: float, interval: float, rss_slack_mib: float,
                 say=print) -> Dict[str, Any]:
    with Testbed(3, log=lambda m: None) as tb:
        tb.put_config({"Network": NETWORK, "Backend": {"Type": backend}})
        for h in tb.hosts:
            h.start_daemon()
        for h in tb.hosts:
            h.wait_subnet_env(timeout=60)
        c1, c2, c3 = (h.add_container() for h in tb.hosts)
        for a, b in ((c1, c2), (c3, c1)):
            deadline = time.monotonic() + 30
            while not a.ping(b.ip, count=1, timeout=2):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{backend}: {a.name} cannot reach {b.ip}")
        pids = {h.name: h.daemon.pid for h in tb.hosts}
        iperf_srv = c2.popen(["iperf3", "-s", "-p", "5201"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        ping = c3.popen(["ping", "-n", "-q", "-i", "0.1", "-c", str(int(seconds * 10) + 50), "-W", "1", str(c1.ip)],
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        samples: List[Dict[str, Any]] = []
        iperf: Optional[subprocess.Popen] = None
        iperf_ok = iperf_runs = 0
        churn = 0
        t0 = time.monotonic()
        next_sample = t0
        next_churn = t0 + 5
        live: List[str] = []
        try:
            while True:
                now = time.monotonic()
                if now - t0 >= seconds:
                    break
                if iperf is None or iperf.poll() is not None:
                    if iperf is not None:
                        iperf_runs += 1
                        iperf_ok += iperf.returncode == 0
                    left = max(2, min(20, int(seconds - (now - t0))))
                    iperf = c1.popen(["iperf3", "-c", str(c2.ip), "-p", "5201", "-t", str(left)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                if now >= next_churn:
                    if live:
                        tb.etcdctl("del", live.pop())
                    else:
                        key = f"{tb.prefix_key}/subnets/100.96.{200 + churn % 50}.0-24"
                        tb.etcdctl("put", key, _lease(backend, churn))
                        live.append(key)
                        churn += 1
                    next_churn = now + 5
                if now >= next_sample:
                    s = {"t": round(now - t0, 1)}
                    for name, pid in pids.items():
                        s[name] = {"rss_kb": _rss_kb(pid), "fds": _fds(pid)}
                    samples.append(s)
                    say(f"{backend} t={s['t']:6.1f}s " + "  ".join(
                        f"{n}: rss {v['rss_kb'] / 1024:6.1f} MiB fds {v['fds']:3d}" for n, v in s.items() if n != "t"))
                    next_sample = now + interval
                time.sleep(0.2)
        finally:
            if iperf is not None:
                try:
                    iperf.wait(30)
                except subprocess.TimeoutExpired:
                    iperf.kill()
                iperf_runs += 1
                iperf_ok += iperf.returncode == 0
            ping.send_signal(signal.SIGINT)  # ping prints its summary on SIGINT
            try:
                out = ping.communicate(timeout=10)[0]
            except subprocess.TimeoutExpired:
                ping.kill()
                out = ping.communicate(timeout=10)[0]
            iperf_srv.kill()
        alive = all(h.daemon.poll() is None for h in tb.hosts)
        verdicts = {}
        for name in pids:
            series = [s[name] for s in samples[1:]] or [samples[0][name]]
            q = max(1, len(series) // 4)
            rss_first = statistics.median(x["rss_kb"] for x in series[:q])
            rss_last = statistics.median(x["rss_kb"] for x in series[-q:])
            # fds come and go (iptables-restore pipes, netlink and HTTP sockets): a leak raises the floor, so compare
            # the lowest count of the last quarter with the lowest of the first
            fd_delta = min(x["fds"] for x in series[-q:]) - min(x["fds"] for x in series[:q])
            verdicts[name] = {"rss_growth_mib": round((rss_last - rss_first) / 1024, 2), "fd_delta": fd_delta,
                              "rss_first_kb": series[0]["rss_kb"], "rss_last_kb": series[-1]["rss_kb"],
                              "flat": (rss_last - rss_first) / 1024 < rss_slack_mib and fd_delta <= 2}
        ping_summary = next((ln for ln in out.splitlines() if "packets transmitted" in ln), out[-200:])
        flat = alive and all(v["flat"] for v in verdicts.values()) and iperf_ok >= max(1, iperf_runs - 1)
        res = {"backend": backend, "seconds": seconds, "samples": samples, "verdicts": verdicts, "alive": alive,
               "iperf_runs": iperf_runs, "iperf_ok": iperf_ok, "ping": ping_summary, "lease_churn": churn,
               "verdict": "flat" if flat else "NOT FLAT"}
        say(f"{backend}: verdict {res['verdict']}: " + ", ".join(
            f"{n} rss {v['rss_growth_mib']:+.2f} MiB fds {v['fd_delta']:+d}" for n, v in verdicts.items())
            + f"; iperf3 {iperf_ok}/{iperf_runs} runs ok; ping {ping_summary}; {churn} leases churned; "
            f"daemons alive: {alive}")
        return res


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastflannel.lab.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0, help="per backend")
    p.add_argument("--backends", default="udp,vxlan,host-gw")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between samples")
    p.add_argument("--rss-slack-mib", type=float, default=8.0)
    p.add_argument("--json", help="write samples and verdicts to this file")
    ns = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    install_signal_handlers(sigterm=KeyboardInterrupt)
    results = [soak_backend(b, ns.minutes * 60, ns.interval, ns.rss_slack_mib, say=lambda m: print(m, flush=True))
               for b in ns.backends.split(",") if b]
    print("SOAK VERDICT: " + ", ".join(f"{r['backend']} {r['verdict']}" for r in results), flush=True)
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0 if all(r["verdict"] == "flat" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
