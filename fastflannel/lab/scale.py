# SPDX-License-Identifier: Apache-2.0
"""Scale benchmarks in the testbed: ``python -m fastflannel.lab.scale`` (figures in docs/scale.md; no CI assertion).

1. programming: N simulated remote leases are written to etcd (batched txns of 100 puts from a testbed host) while
   one real daemon runs; the time is measured from the first put to the moment the daemon's state, read back, is
   complete: vxlan 3 kernel entries per lease (route, neighbour, FDB, read with ``ip -j``/``bridge -j``), host-gw
   one route per lease, udp one fast-path route per lease (counted from its ``event=peer_added`` log lines: the
   fast path's table is not in the kernel). The PublicIPs are spread over 10.168.0.0/16, which is the underlay
   (/16) here, so host-gw's routes are on-link. RSS of the daemon before and after, and its fd count.
2. propagation: one new lease reaches M running daemons (host-gw): every host runs a watcher that polls
   ``/proc/net/route`` every 2 ms for the new subnet; latency = the watcher's timestamp minus the writer's
   timestamp just before the put (same clock: one machine).

Everything runs inside testbed namespaces and is bounded (fixed counts, deadlines). Output: one line per figure
and, with ``--json FILE``, the raw numbers.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
import statistics
import sys
import time
from ipaddress import IPv4Address, IPv4Network
from typing import Any, Dict, List, Optional

from fastflannel.lab.testbed import Testbed, install_signal_handlers

log = logging.getLogger("fastflannel.lab.scale")

NETWORK = IPv4Network("100.64.0.0/10")  # room for 16,384 /24s; does not overlap the underlay
UNDERLAY = "10.168.0.0/16"
HEALTHZ_PORT = 8471

# Write leases (a JSON list of [key, value]) to etcd in txns of 100 puts; print the wall time of the first put.
_WRITER = r"""
import base64, json, sys, time, urllib.request
endpoint, path = sys.argv[1], sys.argv[2]
pairs = json.load(open(path))
b = lambda s: base64.b64encode(s.encode()).decode()
t0 = time.time()
for i in range(0, len(pairs), 100):
    txn = {"success": [{"request_put": {"key": b(k), "value": b(v)}} for k, v in pairs[i:i + 100]]}
    req = urllib.request.Request(endpoint + "/v3/kv/txn", data=json.dumps(txn).encode(),
                                 headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=30).read()
print(json.dumps({"t0": t0, "t_written": time.time()}))
"""

# Poll /proc/net/route for a destination (hex, as the file shows it) every 2 ms until seen or the deadline.
_WATCHER = r"""
import sys, time
dst, deadline = sys.argv[1], time.time() + float(sys.argv[2])
print("ready", flush=True)
while time.time() < deadline:
    with open("/proc/net/route") as f:
        if any(line.split("\t")[1] == dst for line in f.read().splitlines()[1:]):
            print(time.time(), flush=True)
            sys.exit(0)
    time.sleep(0.002)
print("timeout", flush=True)
sys.exit(1)
"""


def _rss_kb(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _subnets(n: int, skip: IPv4Network) -> List[IPv4Network]:
    out: List[IPv4Network] = []
    for s in NETWORK.subnets(new_prefix=24):
        if s != skip and s.network_address.packed[2] != 0:  # keep .0.x/24 out: readable, and never the own one
            out.append(s)
            if len(out) == n:
                return out
    raise ValueError(f"{NETWORK} has no {n} free /24s")


def _public_ip(i: int) -> str:
    return str(IPv4Address("10.168.1.1") + (i // 250) * 256 + i % 250)  # 10.168.1.1 .. : never a testbed host


def _lease_value(backend: str, i: int, rng: random.Random) -> str:
    from fastflannel.lease import LeaseAttrs

    if backend == "vxlan":
        mac = bytearray(rng.randbytes(6))
        mac[0] = (mac[0] & 0xFE) | 0x02
        return LeaseAttrs(IPv4Address(_public_ip(i)), "vxlan",
                          {"VNI": 1, "VtepMAC": ":".join(f"{x:02x}" for x in mac)}).to_json()
    return LeaseAttrs(IPv4Address(_public_ip(i)), "" if backend == "udp" else backend).to_json()


_ADDED_RE = re.compile(r"event=peer_added |event=peers_programmed .*? added=(\d+)")


def _logged_added(text: str) -> int:
    """Peers the daemon logged as added: one per ``event=peer_added`` line plus ``added=N`` of each summary line."""
    return sum(int(m.group(1)) if m.group(1) else 1 for m in _ADDED_RE.finditer(text))


def _count_state(host, backend: str) -> int:
    """Return how many leases ``host`` has fully programmed (the minimum over the entry kinds), read back with
    iproute2's text output (cheaper than ``-j`` at 5,000 entries), not with the daemon's own decoder."""
    if backend == "udp":
        return _logged_added(host.daemon_log_text())  # the fast path's table is not kernel state
    routes = host.run(["ip", "-4", "route", "show", "root", str(NETWORK)]).stdout
    n_routes = sum(1 for line in routes.splitlines() if " via " in line)
    if backend == "host-gw":
        return n_routes
    neigh = host.run(["ip", "-4", "neigh", "show", "dev", "flannel.1", "nud", "permanent"]).stdout
    fdb = host.run(["bridge", "fdb", "show", "dev", "flannel.1"]).stdout
    n_fdb = sum(1 for line in fdb.splitlines() if " dst " in line)
    return min(n_routes, len(neigh.splitlines()), n_fdb)


def _cpu_s(pid: int) -> float:
    """user + system CPU seconds of ``pid`` (its threads included)."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _wait_ready(host, timeout: float = 60.0) -> None:
    host.wait_subnet_env(timeout=timeout)


def _wait_complete(h, backend: str, n: int, deadline: float, poll_s: float) -> int:
    count = 0
    while True:
        count = _count_state(h, backend)
        if count >= n or time.time() > deadline or h.daemon.poll() is not None:
            return count
        time.sleep(poll_s)


def _daemon_took(text: str) -> float:
    """Sum of ``took_s`` of the daemon's summary lines: its own time to program the batches (no polling)."""
    return round(sum(float(x) for x in re.findall(r"event=peers_programmed .*?took_s=([0-9.]+)", text)), 3)


def run_programming(backend: str, n: int, *, mode: str = "live", timeout: float = 300.0, poll_s: float = 0.25,
                    reconcile: bool = False, log_fn=None) -> Dict[str, Any]:
    """Measure one daemon programming ``n`` remote leases of ``backend``; return the figures.

    ``mode="live"``: the daemon runs when the leases are written (txns of 100 puts); the time runs from the first
    put. ``mode="restart"``: the leases are in etcd when the daemon starts (a host rebooting into a full cluster);
    the time runs from the daemon's start (``total_s``, includes Python start-up and the lease) and from its
    subnet.env (``after_ready_s``). ``cpu_s``: the daemon's CPU from its start to complete. With ``reconcile``,
    one periodic reconcile of the same state is then timed in this process (``reconcile_cpu_s``)."""
    say = log_fn or log.info
    rng = random.Random(1000 + n)
    with Testbed(1, underlay=UNDERLAY, log=lambda m: None) as tb:
        tb.put_config({"Network": str(NETWORK), "Backend": {"Type": backend}})
        h = tb.hosts[0]
        pairs_for = lambda own: [(f"{tb.prefix_key}/subnets/{str(s).replace('/', '-')}", _lease_value(backend, i, rng))
                                 for i, s in enumerate(_subnets(n, own))]
        writer = tb.workdir / "writer.py"
        writer.write_text(_WRITER)
        data = tb.workdir / "leases.json"
        out = tb.add_outside_host()

        def write(pairs) -> Dict[str, float]:
            data.write_text(json.dumps(pairs))
            return json.loads(out.run([sys.executable, "-I", str(writer), tb.etcd[0].endpoint, str(data)],
                                      timeout=300).stdout)

        deadline = time.time() + timeout
        if mode == "restart":
            w = write(pairs_for(IPv4Network("100.64.0.0/24")))  # _subnets skips x.x.0.0/24: free for the daemon
            t_start = time.time()
            h.start_daemon(f"--healthz-port={HEALTHZ_PORT}")
            pid = h.daemon.pid
            rss0, fds0, cpu0 = 0, 0, 0.0
            _wait_ready(h, timeout=timeout)
            t_ready = time.time()
            count = _wait_complete(h, backend, n, deadline, poll_s)
            t0 = t_start
        else:
            h.start_daemon(f"--healthz-port={HEALTHZ_PORT}")
            _wait_ready(h)
            own = IPv4Network(h.read_subnet_env()["FLANNEL_SUBNET"], strict=False)
            time.sleep(1.0)
            pid = h.daemon.pid
            rss0, fds0, cpu0 = _rss_kb(pid), _fds(pid), _cpu_s(pid)
            w = write(pairs_for(own))
            t0 = t_ready = w["t0"]
            count = _wait_complete(h, backend, n, deadline, poll_s)
        done = time.time()
        cpu = _cpu_s(pid) - cpu0 if h.daemon.poll() is None else float("nan")
        ok = count >= n
        time.sleep(1.0)
        res = {"backend": backend, "mode": mode, "leases": n, "ok": ok, "programmed": count,
               "kernel_entries": (3 * count if backend == "vxlan" else count if backend == "host-gw" else 0),
               "write_s": round(w["t_written"] - w["t0"], 3), "total_s": round(done - t0, 3),
               "after_ready_s": round(done - t_ready, 3), "daemon_took_s": _daemon_took(h.daemon_log_text()),
               "cpu_s": round(cpu, 3), "rss_kb_before": rss0, "rss_kb_after": _rss_kb(pid),
               "fds_before": fds0, "fds_after": _fds(pid), "poll_s": poll_s}
        if reconcile and ok and backend != "udp":
            res["reconcile_cpu_s"] = _time_reconcile(tb, h, backend)
        say(f"programming {backend} ({mode}): {count}/{n} leases ({res['kernel_entries']} kernel entries) complete "
            f"{res['total_s']:.2f} s from the {'daemon start' if mode == 'restart' else 'first put'} "
            f"({res['after_ready_s']:.2f} s after {'subnet.env' if mode == 'restart' else 'it'}; daemon's own "
            f"batches {res['daemon_took_s']:.2f} s; puts took {res['write_s']:.2f} s); daemon CPU {cpu:.2f} s; "
            f"RSS {rss0 / 1024:.1f} -> {res['rss_kb_after'] / 1024:.1f} MiB; fds {fds0} -> {res['fds_after']}"
            + (f"; one reconcile {res['reconcile_cpu_s']:.3f} s CPU" if "reconcile_cpu_s" in res else ""))
        return res


def _time_reconcile(tb, h, backend: str) -> float:
    """Stop the daemon (its kernel state stays), then time one ``reconcile`` of the same leases by the product's
    own network object in this process (``time.process_time``: user + system CPU, the dumps' kernel time too)."""
    from fastflannel.backend import get_backend
    from fastflannel.config import parse_config
    from fastflannel.kernel.iface import ExternalInterface
    from fastflannel.kernel.netlink import Netlink

    h.stop_daemon()
    logging.getLogger("fastflannel").setLevel(logging.WARNING)  # the product's own INFO lines are not figures
    own = IPv4Network(h.read_subnet_env()["FLANNEL_SUBNET"], strict=False)
    config = parse_config(json.dumps({"Network": str(NETWORK), "Backend": {"Type": backend}}))
    with Netlink(netns=h.netns) as nl:
        info = nl.link_info("eth0")
        ext = ExternalInterface("eth0", info.index, h.ip, h.ip, info.mtu)
        leases = _read_leases(tb, h)
        mine = leases.pop(own)

        class _Manager:  # hands the network its own lease, as the subnet manager would
            def acquire_lease(self, attrs):
                return mine

        kw = {"watch_links": False} if backend == "vxlan" else {}
        net = get_backend(backend)(_Manager(), ext, nl, **kw).register_network(config)
        try:
            net.handle_events([])  # marks the network synced: the pass includes the stale-entry check
            t = time.process_time()
            net.reconcile(leases)
            return round(time.process_time() - t, 3)
        finally:
            net.close()


def _read_leases(tb, h) -> Dict[IPv4Network, Any]:
    """Every lease in the testbed's etcd (read from a testbed namespace, never from the root one)."""
    import base64

    from fastflannel.lease import Lease, LeaseAttrs

    key = base64.b64encode(f"{tb.prefix_key}/subnets/".encode()).decode()
    end = base64.b64encode(f"{tb.prefix_key}/subnets0".encode()).decode()
    body = json.dumps({"key": key, "range_end": end})
    fetch = ("import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(urllib.request.Request("
             "sys.argv[1], data=sys.argv[2].encode()), timeout=60).read().decode())")
    raw = h.run([sys.executable, "-I", "-c", fetch, tb.etcd[0].endpoint + "/v3/kv/range", body], timeout=90).stdout
    out: Dict[IPv4Network, Any] = {}
    for kv in json.loads(raw).get("kvs", []):
        k = base64.b64decode(kv["key"]).decode().rsplit("/", 1)[1]
        subnet = IPv4Network(k.replace("-", "/"))
        out[subnet] = Lease(subnet, LeaseAttrs.from_json(base64.b64decode(kv["value"])))
    return out


def run_propagation(n_hosts: int, reps: int = 5, *, log_fn=None) -> Dict[str, Any]:
    """Measure how long one new lease takes to reach ``n_hosts`` running daemons (host-gw routes)."""
    import subprocess

    say = log_fn or log.info
    with Testbed(n_hosts, underlay=UNDERLAY, log=lambda m: None) as tb:
        tb.put_config({"Network": str(NETWORK), "Backend": {"Type": "host-gw"}})
        for h in tb.hosts:
            h.start_daemon()
        for h in tb.hosts:
            _wait_ready(h, timeout=120)
        time.sleep(2.0)
        watcher = tb.workdir / "watcher.py"
        watcher.write_text(_WATCHER)
        writer = tb.workdir / "writer.py"
        writer.write_text(_WRITER)
        out = tb.add_outside_host()
        lat: List[List[float]] = []
        for r in range(reps):
            subnet = IPv4Network(f"100.127.{200 + r}.0/24")
            dst_hex = subnet.network_address.packed[::-1].hex().upper()  # /proc/net/route: little-endian hex
            watchers = []
            for h in tb.hosts:
                p = h.popen([sys.executable, "-I", str(watcher), dst_hex, "20"], stdout=subprocess.PIPE, text=True)
                watchers.append(p)
            for p in watchers:
                p.stdout.readline()  # "ready"
            data = tb.workdir / f"one{r}.json"
            data.write_text(json.dumps([[f"{tb.prefix_key}/subnets/{str(subnet).replace('/', '-')}",
                                         _lease_value("host-gw", 5000 + r, random.Random(r))]]))
            w = json.loads(out.run([sys.executable, "-I", str(writer), tb.etcd[0].endpoint, str(data)]).stdout)
            seen = []
            for p in watchers:
                line = p.communicate(timeout=30)[0].split()
                seen.append(float(line[-1]) - w["t0"] if line and line[-1] != "timeout" else float("inf"))
            lat.append(seen)
            time.sleep(0.5)
        worst = [max(x) for x in lat]
        res = {"hosts": n_hosts, "reps": reps, "latency_s": lat, "worst_per_rep_s": worst,
               "median_all_s": statistics.median(v for rep in lat for v in rep), "max_s": max(worst)}
        say(f"propagation to {n_hosts} daemons: all had the route after {', '.join(f'{x:.3f}' for x in worst)} s "
            f"(median per host {res['median_all_s']:.3f} s, worst {res['max_s']:.3f} s)")
        return res


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastflannel.lab.scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--leases", type=int, default=1000)
    p.add_argument("--backends", default="vxlan,udp,host-gw")
    p.add_argument("--modes", default="restart,live", help="restart: leases in etcd before the daemon starts; "
                   "live: written while it runs")
    p.add_argument("--no-reconcile", action="store_true", help="skip timing one reconcile after each run")
    p.add_argument("--hosts", type=int, default=10, help="daemons for the propagation figure (0: skip)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--json", help="write the raw figures to this file")
    ns = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    install_signal_handlers(sigterm=KeyboardInterrupt)
    results: Dict[str, Any] = {"programming": [], "propagation": None, "cpus": os.cpu_count()}
    for backend in [b for b in ns.backends.split(",") if b]:
        for mode in [m for m in ns.modes.split(",") if m]:
            results["programming"].append(run_programming(backend, ns.leases, mode=mode,
                                                           reconcile=not ns.no_reconcile and mode == "live"))
    if ns.hosts:
        results["propagation"] = run_propagation(ns.hosts, ns.reps)
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0 if all(r["ok"] for r in results["programming"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
