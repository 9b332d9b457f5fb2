# SPDX-License-Identifier: Apache-2.0
"""``fastflannel demo``: the first thing a new user runs.

A 3-host cluster in network namespaces with a real etcd, the classic addressing (underlay 10.168.0.0/24, hosts .2 .3
.4, network 100.96.0.0/16), each backend in turn, then a table. Everything it creates is removed at the end, on
error and on Ctrl-C. ``--dual-stack``: an IPv6 underlay too (fd00:168::/64), ``EnableIPv6`` with IPv6Network
fc00::/48, dual-stack containers, ``ping -6`` beside every ping and an IPv6 column in the table (udp is skipped:
it is IPv4 only, as Flannel's).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from typing import List

from fastflannel.lab.progress import Progress

DEMO_NETWORK = "100.96.0.0/16"
DEMO_NETWORK6 = "fc00::/48"
DEMO_UNDERLAY6 = "fd00:168::/64"
IPV4_ONLY_BACKENDS = ("udp",)  # refuse EnableIPv6 (backend/udp.py UDP_IPV6_ERROR)
ALL_BACKENDS = ("udp", "vxlan", "host-gw", "wireguard")


def _fmt(v: float, digits: int = 2) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def demo_backend(backend: str, say: Progress, seconds: float = 3.0, tb_log=None, dual_stack: bool = False) -> dict:
    """Bring up 3 hosts on ``backend``, prove container reachability (both families with ``dual_stack``),
    measure; return a table row."""
    from fastflannel.lab.measure import IperfServer, iperf, ping_rtt
    from fastflannel.lab.testbed import Testbed

    row = {"backend": backend}
    with Testbed(3, log=tb_log, underlay6=DEMO_UNDERLAY6 if dual_stack else None) as tb:
        say(f"{backend}: testbed {tb.prefix}: etcd at {tb.endpoints}, hosts "
            + ", ".join(f"{h.name}={h.ip}" for h in tb.hosts))
        config = {"Network": DEMO_NETWORK, "Backend": {"Type": backend}}
        if dual_stack:
            config.update(EnableIPv6=True, IPv6Network=DEMO_NETWORK6)
        tb.put_config(config)
        say(f"{backend}: etcdctl put {tb.prefix_key}/config '{_json(config)}'")
        for h in tb.hosts:
            h.start_daemon()
        envs = [h.wait_subnet_env(timeout=60) for h in tb.hosts]
        for h, env in zip(tb.hosts, envs):
            six = f" FLANNEL_IPV6_SUBNET={env['FLANNEL_IPV6_SUBNET']}" if dual_stack else ""
            say(f"{backend}: {h.name} ({h.ip}) leased FLANNEL_SUBNET={env['FLANNEL_SUBNET']}{six} "
                f"FLANNEL_MTU={env['FLANNEL_MTU']}")
        containers = [h.add_container(f"{h.name}c1") for h in tb.hosts]
        for c in containers:
            say(f"{backend}: container {c.name} on {c.host.name} has {c.ip}" + (f" and {c.ip6}" if c.ip6 else ""))
        ok = True
        for i, a in enumerate(containers):
            b = containers[(i + 1) % len(containers)]
            reached = _wait_ping(a, b.ip)
            ok &= reached
            say(f"{backend}: ping {a.name} ({a.ip}) -> {b.name} ({b.ip}): {'ok' if reached else 'FAILED'}")
            if dual_stack:
                reached6 = b.ip6 is not None and _wait_ping(a, b.ip6)
                ok &= reached6
                row["reachable6"] = row.get("reachable6", True) and reached6
                say(f"{backend}: ping -6 {a.name} ({a.ip6}) -> {b.name} ({b.ip6}): {'ok' if reached6 else 'FAILED'}")
        row["reachable"] = ok
        row["mtu"] = int(envs[0]["FLANNEL_MTU"])
        if ok:
            rtt = ping_rtt(containers[0], containers[1].ip, count=50)
            row["rtt_p50_ms"], row["rtt_p99_ms"] = rtt.p50, rtt.p99
            say(f"{backend}: RTT {containers[0].name} -> {containers[1].name}: p50 {rtt.p50:.3f} ms, "
                f"p99 {rtt.p99:.3f} ms ({rtt.received}/{rtt.sent} replies)")
            say(f"{backend}: iperf3 TCP {containers[0].name} -> {containers[1].name} for {seconds:g} s ...")
            with IperfServer(containers[1]):
                r = iperf(containers[0], containers[1].ip, seconds=seconds)
            row["tcp_gbps"] = r.gbps
            say(f"{backend}: TCP throughput {r.gbps:.2f} Gb/s, {r.retransmits} retransmits")
        say(f"{backend}: tearing down {tb.prefix}")
    return row


def _json(obj) -> str:
    import json

    return json.dumps(obj, separators=(",", ":"))


def _wait_ping(a, ip, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if a.ping(ip, count=1, timeout=2):
            return True
    return False


def print_table(rows: List[dict], out=sys.stdout) -> None:
    six = any("reachable6" in r for r in rows)
    head = f"{'backend':<9} {'reachable':<9} {'RTT p50 ms':>10} {'RTT p99 ms':>10} {'TCP Gb/s':>9} {'MTU':>5}"
    head += f" {'IPv6':>4}" if six else ""
    print(head, file=out)
    print("-" * len(head), file=out)
    for r in rows:
        line = (f"{r['backend']:<9} {('yes' if r.get('reachable') else 'NO'):<9} {_fmt(r.get('rtt_p50_ms'), 3):>10} "
                f"{_fmt(r.get('rtt_p99_ms'), 3):>10} {_fmt(r.get('tcp_gbps')):>9} {r.get('mtu', '-'):>5}")
        if six:
            line += f" {('yes' if r.get('reachable6') else 'NO'):>4}"
        print(line, file=out)


def cmd_demo(ns: argparse.Namespace) -> int:
    from fastflannel.lab.testbed import install_signal_handlers

    install_signal_handlers(sigterm=KeyboardInterrupt)
    say = Progress()
    backends = [b.strip() for b in ns.backends.split(",") if b.strip()]
    dual = bool(getattr(ns, "dual_stack", False))
    if dual:
        for b in [b for b in backends if b in IPV4_ONLY_BACKENDS]:
            say(f"{b}: skipped: the {b} backend is IPv4 only (as Flannel's) and refuses EnableIPv6")
        backends = [b for b in backends if b not in IPV4_ONLY_BACKENDS]
    say("fastflannel demo: 3 simulated hosts on underlay 10.168.0.0/24 (.2 .3 .4)"
        + (f" and {DEMO_UNDERLAY6}" if dual else "") + ", etcd at 10.168.0.250, "
        f"network {DEMO_NETWORK}" + (f" and {DEMO_NETWORK6}" if dual else "") + f"; backends: {', '.join(backends)}")
    rows = []
    try:
        for b in backends:
            rows.append(demo_backend(b, say, seconds=ns.seconds, tb_log=(say if ns.verbose else None),
                                     dual_stack=dual))
    except KeyboardInterrupt:
        say("interrupted: everything the demo created has been removed")
        return 130
    print()
    print_table(rows)
    return 0 if all(r.get("reachable") for r in rows) else 1
