# SPDX-License-Identifier: Apache-2.0
"""Chaos: ``python -m fastflannel.lab.chaos --minutes 10 --seed N``: random faults on a 4-host cluster under
continuous traffic, then a convergence and leak check, and the packet loss per fault (docs/soak.md).

World: a testbed of 4 hosts (one container each) and a 3-member etcd cluster, backend ``--backend`` (vxlan).
Traffic: a ring of pings, container i -> container i+1, every 0.1 s each, for the whole run (``ping -D -O``: every
reply and every missing reply is timestamped, so each lost packet is charged to the fault whose window it falls in).
Every ``--interval`` seconds (default 30) one fault, chosen by the seeded RNG so that every kind occurs:
- ``etcd_member_kill``: SIGKILL one etcd member (the leader when one is found), restarted 10 s later;
- ``daemon_kill9``: SIGKILL one host's fastflanneld, restarted 3 s later;
- ``lease_delete``: delete one host's lease key (the owner re-creates the same subnet);
- ``lease_garbage``: write a non-lease value over one host's key (the owner repairs it);
- ``vxlan_delete``: delete ``flannel.1`` on one host (the link watcher re-creates it; vxlan only);
- ``compaction_cutoff``: cut one host off from etcd (iptables DROP in its namespace), churn a few leases,
  compact etcd at the current revision, reconnect after 20 s (the watch must re-list, not hang).
At the end: every container reaches every other, every host holds kernel entries for exactly the other hosts'
leases, etcd holds exactly one lease per host, and each daemon's fds/threads are back near their floor. The seed
is printed first: ``--seed`` repeats a run's fault sequence. Exit status 0 when everything converged.
"""
from __future__ import annotations

import argparse
import base64
import json
import random
import re
import signal
import subprocess
import sys
import threading
import time
from ipaddress import IPv4Network
from typing import Any, Callable, Dict, List, Optional, Tuple

from fastflannel.lab.soak import proc_sample
from fastflannel.lab.testbed import Testbed, install_signal_handlers

NETWORK = "100.96.0.0/16"
PING_INTERVAL_S = 0.1
FAULTS = ("etcd_member_kill", "daemon_kill9", "lease_delete", "lease_garbage", "vxlan_delete", "compaction_cutoff")
_LINE = re.compile(r"^\[(\d+\.\d+)\] (?:\d+ bytes from .*icmp_seq=(\d+)|no answer yet for icmp_seq=(\d+))")


class PingStream:
    """A bounded ``ping -D -O`` from ``src`` to ``dst_ip``; a reader thread records (time, seq, ok)."""

    def __init__(self, src, dst_ip, seconds: float) -> None:
        self.name = f"{src.name}->{dst_ip}"
        self.events: List[Tuple[float, int, bool]] = []
        self.p = src.popen(["ping", "-n", "-D", "-O", "-i", str(PING_INTERVAL_S), "-W", "1",
                            "-c", str(int(seconds / PING_INTERVAL_S)), str(dst_ip)],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.t = threading.Thread(target=self._read, daemon=True)
        self.t.start()

    def _read(self) -> None:
        for line in self.p.stdout:
            m = _LINE.match(line)
            if m:
                ok = m.group(2) is not None
                self.events.append((float(m.group(1)), int(m.group(2) or m.group(3)), ok))

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGINT)
        try:
            self.p.wait(10)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait(5)
        self.t.join(5)

    def lost_between(self, a: float, b: float) -> Tuple[int, int, float]:
        """Return (lost, sent, longest run of losses in s) for packets timestamped in [a, b) (wall clock)."""
        got: Dict[int, Tuple[float, bool]] = {}
        for ts, seq, ok in self.events:
            if ok or seq not in got:
                got[seq] = (ts, ok)  # a late reply overrides its "no answer yet"
        window = sorted((ts, ok) for ts, ok in got.values() if a <= ts < b)
        lost = [ts for ts, ok in window if not ok]
        longest, run_start, prev = 0.0, None, None
        for ts, ok in window:
            if not ok:
                run_start = ts if run_start is None else run_start
                prev = ts
                longest = max(longest, prev - run_start + PING_INTERVAL_S)
            else:
                run_start = None
        return len(lost), len(window), longest


def fault_plan(rng: random.Random, n: int, kinds: Tuple[str, ...] = FAULTS) -> List[str]:
    """Return ``n`` fault kinds in random order, every kind at least once when ``n`` allows (pure)."""
    plan = [kinds[i % len(kinds)] for i in range(n)]
    rng.shuffle(plan)
    return plan


class Chaos:
    def __init__(self, args: argparse.Namespace, say: Callable[[str], Any]) -> None:
        self.args, self.say = args, say
        self.rng = random.Random(args.seed)
        self.tb = Testbed(4, etcd_members=3, log=lambda m: None, workdir=args.workdir)
        self.rows: List[Dict[str, Any]] = []
        self.churn = 0

    # -- helpers -------------------------------------------------------------------------------------------------
    def key_of(self, h) -> str:
        net = IPv4Network(h.read_subnet_env()["FLANNEL_SUBNET"], strict=False)
        return f"{self.tb.prefix_key}/subnets/{str(net).replace('/', '-')}"

    def stored(self) -> Dict[str, Tuple[str, int]]:
        out = self.tb.etcdctl("get", "--prefix", f"{self.tb.prefix_key}/subnets/", "-w", "json")
        return {base64.b64decode(kv["key"]).decode().rsplit("/", 1)[1]: (base64.b64decode(kv["value"]).decode(),
                                                                          int(kv.get("lease", 0)))
                for kv in json.loads(out).get("kvs") or []}

    def revision(self) -> int:
        return int(json.loads(self.tb.etcdctl("get", "/", "-w", "json"))["header"]["revision"])

    def _cut(self, h, on: bool) -> None:
        """Drop everything between ``h`` and the etcd members, both ways (dropping only what ``h`` sends would
        still let etcd's watch events in: the daemon would miss nothing)."""
        for ip in self.tb.etcd_ips:
            for chain, flag in (("OUTPUT", "-d"), ("INPUT", "-s")):
                h.run(["iptables", "-w", "-I" if on else "-D", chain, flag, str(ip), "-j", "DROP"], check=on)

    # -- faults: each returns a text naming its target; recovery happens inside ---------------------------------
    def etcd_member_kill(self) -> str:
        try:
            m, what = self.tb.etcd_leader(timeout=5), "leader"
        except Exception:  # noqa: BLE001 - no leader found quickly: any member
            m, what = self.rng.choice(self.tb.etcd), "member"
        m.kill()
        time.sleep(10)
        m.start(timeout=60)
        return f"{m.name} ({what})"

    def daemon_kill9(self) -> str:
        h = self.rng.choice(self.tb.hosts)
        h.stop_daemon(signal.SIGKILL)
        time.sleep(3)
        h.start_daemon()
        h.wait_subnet_env(timeout=60)
        return h.name

    def lease_delete(self) -> str:
        h = self.rng.choice(self.tb.hosts)
        self.tb.etcdctl("del", self.key_of(h))
        return h.name

    def lease_garbage(self) -> str:
        h = self.rng.choice(self.tb.hosts)
        self.tb.etcdctl("put", self.key_of(h), f"garbage {self.rng.randrange(1 << 30)}")
        return h.name

    def vxlan_delete(self) -> str:
        h = self.rng.choice(self.tb.hosts)
        h.run(["ip", "link", "del", "flannel.1"], check=False)
        return h.name

    def compaction_cutoff(self) -> str:
        h = self.rng.choice(self.tb.hosts)
        self._cut(h, True)
        try:
            for i in range(4):  # revisions the cut-off daemon misses
                key = f"{self.tb.prefix_key}/subnets/100.96.{250 - i}.0-24"
                self.tb.etcdctl("put", key, json.dumps({"PublicIP": f"10.168.0.{200 + i}", "BackendType": "vxlan",
                                                        "BackendData": {"VNI": 1, "VtepMAC": f"02:00:00:00:00:{i:02x}"}}))
                self.tb.etcdctl("del", key)
            self.tb.etcdctl("compact", str(self.revision()))
            time.sleep(20)  # > the ~11 s TCP keep-alive that ends the dead watch stream
        finally:
            self._cut(h, False)
        return h.name

    # -- run -----------------------------------------------------------------------------------------------------
    def setup(self) -> None:
        tb = self.tb
        tb.start()
        tb.put_config({"Network": NETWORK, "Backend": {"Type": self.args.backend}})
        for h in tb.hosts:
            h.start_daemon()
        for h in tb.hosts:
            h.wait_subnet_env(timeout=90)
        self.cs = [h.add_container() for h in tb.hosts]
        self.wait_mesh(90)
        time.sleep(2)
        self.floor = {h.name: proc_sample(h.daemon.pid) for h in tb.hosts}

    def wait_mesh(self, timeout: float) -> List[str]:
        """Wait until every container reaches every other; return the pairs that never did."""
        deadline = time.monotonic() + timeout
        todo = [(a, b) for a in self.cs for b in self.cs if a is not b]
        while todo and time.monotonic() < deadline:
            todo = [(a, b) for a, b in todo if not a.ping(b.ip, count=1, timeout=2)]
        return [f"{a.name}->{b.ip}" for a, b in todo]

    def run(self) -> Dict[str, Any]:
        a = self.args
        seconds = a.minutes * 60
        n = max(1, int(seconds // a.interval))
        kinds = FAULTS if a.backend == "vxlan" else tuple(k for k in FAULTS if k != "vxlan_delete")
        plan = fault_plan(self.rng, n, kinds)
        self.say(f"chaos: plan {plan}")
        pings = [PingStream(c, self.cs[(i + 1) % len(self.cs)].ip, seconds + 60) for i, c in enumerate(self.cs)]
        t0 = time.monotonic()
        try:
            for i, kind in enumerate(plan):
                start_at = t0 + i * a.interval + 2
                time.sleep(max(0.0, start_at - time.monotonic()))
                wall, t = time.time(), round(time.monotonic() - t0, 1)
                target = getattr(self, kind)()
                self.rows.append({"n": i + 1, "t": t, "fault": kind, "target": target, "wall": wall})
                self.say(f"chaos: t={self.rows[-1]['t']:6.1f}s fault {i + 1}/{n} {kind} on {target}")
            time.sleep(max(0.0, t0 + n * a.interval + 2 - time.monotonic()))
            end_wall = time.time()
        finally:
            for p in pings:
                p.stop()
        for j, row in enumerate(self.rows):
            b = self.rows[j + 1]["wall"] if j + 1 < len(self.rows) else end_wall
            per = [p.lost_between(row["wall"], b) for p in pings]
            row["lost"], row["sent"] = sum(x[0] for x in per), sum(x[1] for x in per)
            row["longest_outage_s"] = round(max(x[2] for x in per), 1)
        return self.check(pings)

    def check(self, pings: List[PingStream]) -> Dict[str, Any]:
        tb = self.tb
        unreachable = self.wait_mesh(60)
        stored = self.stored()
        subnets = {h.name: self.key_of(h).rsplit("/", 1)[1] for h in tb.hosts}
        bad_leases = sorted(set(stored) - set(subnets.values()))
        garbage = [k for k, (v, _) in stored.items() if not v.startswith("{")]
        missing = [n for n, k in subnets.items() if k not in stored]
        tables = {}
        for h in tb.hosts if self.args.backend != "udp" else ():  # udp: per-peer state is in the fast path
            others = {IPv4Network(k.replace("-", "/")) for n, k in subnets.items() if n != h.name}
            routes = json.loads(h.run(["ip", "-j", "-4", "route", "show"]).stdout or "[]")
            have = {IPv4Network(r["dst"]) for r in routes if "/" in r.get("dst", "")
                    and IPv4Network(r["dst"]).subnet_of(IPv4Network(NETWORK)) and r.get("gateway")}
            tables[h.name] = {"missing": sorted(map(str, others - have)), "extra": sorted(map(str, have - others))}
        leaks = {}
        for h in tb.hosts:
            now = proc_sample(h.daemon.pid) if h.daemon and h.daemon.poll() is None else None
            f = self.floor[h.name]
            leaks[h.name] = None if now is None else {"fds": (f["fds"], now["fds"]), "threads": (f["threads"], now["threads"]),
                                                      "rss_mib": (round(f["rss_kb"] / 1024, 1), round(now["rss_kb"] / 1024, 1))}
        alive = all(v is not None for v in leaks.values())
        leaked = [n for n, v in leaks.items() if v and (v["fds"][1] > v["fds"][0] + 3 or v["threads"][1] > v["threads"][0] + 1)]
        ok = (alive and not unreachable and not bad_leases and not garbage and not missing and not leaked
              and not any(t["missing"] or t["extra"] for t in tables.values()))
        compacted = {h.name: h.daemon_log_text().count("event=watch_compacted") for h in tb.hosts}
        return {"seed": self.args.seed, "watch_compacted_logged": compacted, "backend": self.args.backend, "minutes": self.args.minutes,
                "faults": self.rows, "unreachable": unreachable, "extra_leases": bad_leases, "garbage": garbage,
                "missing_leases": missing, "tables": tables, "daemons": leaks, "leaked": leaked, "alive": alive,
                "total_lost": sum(r["lost"] for r in self.rows), "total_sent": sum(r["sent"] for r in self.rows),
                "verdict": "converged" if ok else "NOT CONVERGED"}


def format_table(res: Dict[str, Any]) -> str:
    lines = ["| # | t (s) | fault | target | lost / sent (4 pings) | longest outage (s) |", "|---|---|---|---|---|---|"]
    for r in res["faults"]:
        lines.append(f"| {r['n']} | {r['t']} | {r['fault']} | {r['target']} | {r['lost']} / {r['sent']} | "
                     f"{r['longest_outage_s']} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastflannel.lab.chaos", description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=None, help="repeat a run's fault sequence (default: random)")
    p.add_argument("--interval", type=float, default=30.0, help="seconds between faults")
    p.add_argument("--backend", default="vxlan", choices=("vxlan", "host-gw", "udp"))
    p.add_argument("--json", help="write the result to this file")
    p.add_argument("--workdir", help="keep the testbed's files (etcd data, daemon logs) in DIR (kept afterwards)")
    ns = p.parse_args(argv)
    if ns.seed is None:
        ns.seed = random.SystemRandom().randrange(1 << 31)
    say = lambda m: print(m, flush=True)  # noqa: E731
    say(f"chaos: seed {ns.seed} (repeat with --seed {ns.seed}), {ns.minutes} min, backend {ns.backend}, "
        f"a fault every {ns.interval} s, started {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}")
    install_signal_handlers(sigterm=KeyboardInterrupt)
    c = Chaos(ns, say)
    try:
        c.setup()
        res = c.run()
    finally:
        c.tb.close(raise_on_leak=False)
    say(format_table(res))
    say(f"chaos: lost {res['total_lost']} of {res['total_sent']} packets; unreachable {res['unreachable']}; extra "
        f"leases {res['extra_leases']}; garbage {res['garbage']}; missing {res['missing_leases']}; watch re-lists after "
        f"compaction {res['watch_compacted_logged']}; tables "
        f"{res['tables']}; daemons {res['daemons']}")
    say(f"CHAOS VERDICT: {res['verdict']} (seed {ns.seed})")
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0 if res["verdict"] == "converged" else 1


if __name__ == "__main__":
    sys.exit(main())
