# SPDX-License-Identifier: Apache-2.0
"""Scale benchmarks in the testbed: ``python -m fastflannel.lab.scale`` (figures in docs/scale.md; no CI assertion).

1. programming: N simulated remote leases, one real daemon. ``live``: the daemon runs when the leases are written
   to etcd (txns of 100 puts from a testbed host); the time runs from the first put. ``restart``: the leases are
   in etcd before the daemon starts (a host rebooting into a full cluster); the time runs from the daemon's start
   and from its subnet.env. Complete = the daemon's state read back: vxlan 3 kernel entries per lease (route,
   neighbour, FDB, read with ``ip``/``bridge``), host-gw one route per lease, udp one fast-path route per lease
   (counted from its log lines: the fast path's table is not kernel state). The PublicIPs are spread over
   10.168.0.0/16, the underlay here, so host-gw's routes are on-link. Daemon CPU seconds (steadier than wall time
   on a shared machine), RSS, fds, and one periodic reconcile of the same state timed in-process.
2. propagation: one new lease reaches M running daemons (host-gw): every host runs a watcher subscribed to the
   kernel's route events (no polling) that notes when the new subnet's route appears; latency = the watcher's
   timestamp minus the writer's timestamp just before the put (same clock: one machine).
3. etcd load (``--etcd-load``): the operations one host does in steady state (re-list, own-key check, keep-alive,
   watch delivery) against a 3-member etcd holding N leases: etcd CPU per operation and the rate it sustains.

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
# (Four txns in flight were not faster on 2 cores - 0.54-1.16 s for 5,000 - and took CPU from the daemon measured.)
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

# Wait for a route to a destination (hex, as /proc/net/route shows it) with a netlink subscription to IPv4 route
# events (RTMGRP_IPV4_ROUTE): blocked in recv, so 50 waiting watchers take no CPU from the daemons they measure
# (polling /proc every 2 ms did: load 50 on 2 cores). Prints the wall time the RTM_NEWROUTE arrived.
_WATCHER = r"""
import select, socket, struct, sys, time
dst, deadline = sys.argv[1], time.time() + float(sys.argv[2])
want = bytes.fromhex(dst)[::-1]
s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
s.bind((0, 0x40))
def present():
    with open("/proc/net/route") as f:
        return any(line.split("\t")[1] == dst for line in f.read().splitlines()[1:])
print("ready", flush=True)
if present():
    print(time.time(), flush=True)
    sys.exit(0)
while time.time() < deadline:
    if not select.select([s], [], [], max(0.0, deadline - time.time()))[0]:
        break
    data, t = s.recv(1 << 16), time.time()
    off = 0
    while off + 16 <= len(data):
        ln, typ = struct.unpack_from("=IH", data, off)
        if ln < 16:
            break
        if typ == 24:
            a = off + 16 + 12
            while a + 4 <= off + ln:
                alen, atype = struct.unpack_from("=HH", data, a)
                if alen < 4:
                    break
                if atype == 1 and data[a + 4:a + alen] == want:
                    print(t, flush=True)
                    sys.exit(0)
                a += (alen + 3) & ~3
        off += (ln + 3) & ~3
print("timeout", flush=True)
sys.exit(1)
"""

# etcd load client: one phase (relist | get | keepalive | put) ``count`` times on one kept-alive HTTP connection to
# the gateway, as a daemon's etcd3gw session does; prints wall seconds and bytes received.
_LOADER = r"""
import base64, http.client, json, sys, time
host, port, prefix, phase, count = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
b = lambda s: base64.b64encode(s.encode()).decode()
conn = http.client.HTTPConnection(host, port, timeout=120)
def post(path, body):
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    r = conn.getresponse()
    data = r.read()
    if r.status != 200:
        raise SystemExit(f"{path}: HTTP {r.status} {data[:200]!r}")
    return data
n = 0
t0 = time.time()
if phase == "relist":
    body = {"key": b(prefix + "/subnets/"), "range_end": b(prefix + "/subnets0")}
    for _ in range(count): n += len(post("/v3/kv/range", body))
elif phase == "get":
    body = {"key": b(prefix + "/subnets/100.64.1.0-24")}
    for _ in range(count): n += len(post("/v3/kv/range", body))
elif phase == "keepalive":
    lid = json.loads(post("/v3/lease/grant", {"TTL": 600}))["ID"]
    t0 = time.time()
    for _ in range(count): n += len(post("/v3/lease/keepalive", {"ID": lid}))
elif phase == "put":
    v = json.dumps({"PublicIP": "10.168.200.1", "PublicIPv6": None, "BackendType": "host-gw"})
    for i in range(count):
        n += len(post("/v3/kv/put", {"key": b(prefix + "/subnets/100.127.%d.0-24" % (i % 200)), "value": b(v)}))
print(json.dumps({"s": time.time() - t0, "bytes": n}))
"""

# W watch streams on the subnets prefix (one connection each, as W daemons); prints "ready", then events seen.
_WATCHERS = r"""
import base64, http.client, json, sys, threading, time
host, port, prefix, w, secs = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
b = lambda s: base64.b64encode(s.encode()).decode()
seen = [0] * w
def watch(i):
    c = http.client.HTTPConnection(host, port, timeout=secs)
    c.request("POST", "/v3/watch", json.dumps({"create_request": {"key": b(prefix + "/subnets/"),
              "range_end": b(prefix + "/subnets0")}}), {"Content-Type": "application/json"})
    r = c.getresponse()
    end = time.time() + secs
    try:
        while time.time() < end:
            line = r.readline()
            if not line:
                break
            seen[i] += len(json.loads(line).get("result", {}).get("events", []))
    except OSError:  # the window's socket timeout: done
        pass
ts = [threading.Thread(target=watch, args=(i,), daemon=True) for i in range(w)]
for t in ts: t.start()
time.sleep(2.0)
print("ready", flush=True)
for t in ts: t.join()
print(json.dumps({"events": sum(seen)}), flush=True)
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
    iproute2's text output (cheaper than ``-j`` at 5,000 entries), not with the daemon's own decoder. vxlan: the
    routes first (the daemon writes them last), the neighbours and FDB only once the routes are all there, so the
    poller takes less of the CPU it shares with the daemon."""
    if backend == "udp":
        return _logged_added(host.daemon_log_text())  # the fast path's table is not kernel state
    routes = host.run(["ip", "-4", "route", "show", "root", str(NETWORK)]).stdout
    n_routes = sum(1 for line in routes.splitlines() if " via " in line)
    if backend == "host-gw" or n_routes < getattr(host, "_scale_want", 0):
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
    h._scale_want = n
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
            t_ready, cpu_ready = time.time(), _cpu_s(pid)
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
            cpu_ready = cpu0
            count = _wait_complete(h, backend, n, deadline, poll_s)
        done = time.time()
        cpu = _cpu_s(pid) - cpu0 if h.daemon.poll() is None else float("nan")
        ok = count >= n
        time.sleep(1.0)
        res = {"backend": backend, "mode": mode, "leases": n, "ok": ok, "programmed": count,
               "kernel_entries": (3 * count if backend == "vxlan" else count if backend == "host-gw" else 0),
               "write_s": round(w["t_written"] - w["t0"], 3), "total_s": round(done - t0, 3),
               "after_last_put_s": round(max(0.0, done - w["t_written"]), 3) if mode == "live" else None,
               "after_ready_s": round(done - t_ready, 3), "daemon_took_s": _daemon_took(h.daemon_log_text()),
               "cpu_s": round(cpu, 3), "cpu_after_ready_s": round(cpu + cpu0 - cpu_ready, 3),
               "rss_kb_before": rss0, "rss_kb_after": _rss_kb(pid),
               "fds_before": fds0, "fds_after": _fds(pid), "poll_s": poll_s}
        if reconcile and ok and backend != "udp":
            res["reconcile_cpu_s"] = _time_reconcile(tb, h, backend)
        say(f"programming {backend} ({mode}): {count}/{n} leases ({res['kernel_entries']} kernel entries) complete "
            f"{res['total_s']:.2f} s from the {'daemon start' if mode == 'restart' else 'first put'} "
            f"({res['after_ready_s']:.2f} s after {'subnet.env' if mode == 'restart' else 'it'}"
            + (f", {res['after_last_put_s']:.2f} s after the last" if mode == "live" else "") + "; daemon's own "
            f"batches {res['daemon_took_s']:.2f} s; puts took {res['write_s']:.2f} s); daemon CPU {cpu:.2f} s "
            f"({res['cpu_after_ready_s']:.2f} s after {'subnet.env' if mode == 'restart' else 'the first put'}); "
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


def _host_port(server) -> List[str]:
    from urllib.parse import urlsplit

    u = urlsplit(server.endpoint)
    return [u.hostname, str(u.port or 2379)]


def run_etcd_load(n_leases: int = 5000, members: int = 3, clients: int = 4, watchers: int = 100, *,
                  log_fn=None) -> Dict[str, Any]:
    """Measure what one host's steady-state etcd traffic costs a ``members``-member etcd holding ``n_leases``
    leases, and what that etcd sustains on this machine: ``clients`` client processes run each operation a host
    does (a full re-list of the subnets, the check of its own key, a lease keep-alive) back to back; the rate is
    operations per second of wall time, the cost etcd's CPU seconds (all members, from /proc) per operation. Watch
    fan-out: ``watchers`` watch streams, 200 puts; the cost of one event delivered to one watcher is the CPU of
    the puts with the watchers minus without them, divided by deliveries."""
    import subprocess

    say = log_fn or log.info
    rng = random.Random(7)
    with Testbed(0, underlay=UNDERLAY, etcd_members=members, log=lambda m: None) as tb:
        pairs = [(f"{tb.prefix_key}/subnets/{str(s).replace('/', '-')}", _lease_value("vxlan", i, rng))
                 for i, s in enumerate(_subnets(n_leases, IPv4Network("100.64.0.0/24")))]
        data = tb.workdir / "leases.json"
        data.write_text(json.dumps(pairs))
        (tb.workdir / "writer.py").write_text(_WRITER)
        (tb.workdir / "loader.py").write_text(_LOADER)
        (tb.workdir / "watchers.py").write_text(_WATCHERS)
        out = tb.add_outside_host()
        out.run([sys.executable, "-I", str(tb.workdir / "writer.py"), tb.etcd[0].endpoint, str(data)], timeout=300)
        pids = [e.pid for e in tb.etcd]
        etcd_cpu = lambda: sum(_cpu_s(p) for p in pids)

        def phase(name: str, count: int, n_clients: int = clients) -> Dict[str, float]:
            c0, t0 = etcd_cpu(), time.time()
            procs = [out.popen([sys.executable, "-I", str(tb.workdir / "loader.py"), *_host_port(tb.etcd[i % members]),
                                tb.prefix_key, name, str(count)], stdout=subprocess.PIPE, text=True)
                     for i in range(n_clients)]
            outs = [json.loads(p.communicate(timeout=600)[0]) for p in procs]
            wall, cpu, ops = time.time() - t0, etcd_cpu() - c0, count * n_clients
            r = {"ops": ops, "wall_s": round(wall, 3), "etcd_cpu_s": round(cpu, 3),
                 "etcd_cpu_ms_per_op": round(1000 * cpu / ops, 3), "ops_per_s": round(ops / wall, 1),
                 "bytes_per_op": round(sum(o["bytes"] for o in outs) / ops)}
            say(f"etcd load {name}: {ops} ops by {n_clients} clients in {wall:.2f} s = {r['ops_per_s']:.0f}/s; "
                f"etcd CPU {r['etcd_cpu_ms_per_op']:.3f} ms/op; {r['bytes_per_op']} bytes/op")
            return r

        res: Dict[str, Any] = {"leases": n_leases, "members": members, "clients": clients, "cpus": os.cpu_count()}
        res["relist"] = phase("relist", 10)
        res["get"] = phase("get", 500)
        res["keepalive"] = phase("keepalive", 500)
        base = phase("put", 200, 1)
        wp = out.popen([sys.executable, "-I", str(tb.workdir / "watchers.py"), *_host_port(tb.etcd[0]),
                        tb.prefix_key, str(watchers), "15"], stdout=subprocess.PIPE, text=True)
        assert wp.stdout.readline().strip() == "ready"
        with_w = phase("put", 200, 1)
        seen = json.loads(wp.communicate(timeout=120)[0].strip().splitlines()[-1])["events"]
        deliveries = max(seen, 1)
        res["watch"] = {"watchers": watchers, "puts": 200, "events_delivered": seen,
                        "etcd_cpu_ms_per_delivery": round(1000 * max(with_w["etcd_cpu_s"] - base["etcd_cpu_s"], 0)
                                                          / deliveries, 4),
                        "put_alone": base, "put_with_watchers": with_w}
        say(f"etcd watch fan-out: {seen} events delivered to {watchers} watchers; "
            f"{res['watch']['etcd_cpu_ms_per_delivery']:.4f} ms etcd CPU per delivery")
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
    p.add_argument("--etcd-load", action="store_true", help="also measure the per-host etcd operations against a "
                   "3-member etcd holding --leases leases (docs/scale.md, etcd load)")
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
    if ns.etcd_load:
        results["etcd_load"] = run_etcd_load(ns.leases)
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0 if all(r["ok"] for r in results["programming"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
