# SPDX-License-Identifier: Apache-2.0
"""Faults of a real cluster, survived under traffic (issue 6, part 1): real fastflanneld, real etcd, real packets.

Each test runs a bounded traffic generator (iputils ``ping`` with a fixed count, so it stops by itself) across
hosts while the fault happens, asserts a bound on the loss during the fault, and full convergence after it
(kernel tables equal to what Flannel programs for the leases in etcd, read back with iproute2; for udp, whose
per-peer state lives in the fast path, traffic and the daemon's peer events).

One 3-host world per backend (udp, vxlan, host-gw) is shared by the tests of that backend (module scope,
parametrized indirectly, as in test_kernel_backends_e2e.py). Order inside a world: etcd down for 30 s; kill -9
of a daemon (udp only: vxlan and host-gw lose no packet across a kill -9, already shown by
``test_kernel_backends_e2e.py::test_restart_during_ping_loses_nothing[SIGKILL]``); watch compaction while a
daemon is cut off (vxlan only: the watch logic is backend-independent); a host vanishes (defined last: the
vanished host stays dead). The 3-member etcd cluster whose leader is killed has its own world (host-gw).
"""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from ipaddress import IPv4Address, IPv4Network

import pytest

from cluster import fastpath_stats, free_subnets, key_of, random_mac, stored, subnet_of, tables
from waiting import wait_for

from fastflannel.lease import LeaseAttrs

pytestmark = [pytest.mark.netns, pytest.mark.etcd]

BACKENDS = ["udp", "vxlan", "host-gw"]
ETCD_DOWN_S = 30.0
VANISH_TTL_S = 6  # FASTFLANNEL_SUBNET_TTL of the host that vanishes


def lease_ttl(tb, lease_id: int) -> int:
    """Return the remaining TTL of etcd lease ``lease_id`` (-1 if it does not exist)."""
    out = tb.etcdctl("lease", "timetolive", f"{lease_id:x}", "-w", "json")
    return int(json.loads(out).get("ttl", -1))


def fake_lease(backend: str, public_ip: str) -> str:
    """Return the lease value a Flannel host of ``backend`` would write (a host that needs not exist)."""
    if backend == "vxlan":
        return LeaseAttrs(IPv4Address(public_ip), "vxlan", {"VNI": 1, "VtepMAC": random_mac()}).to_json()
    return LeaseAttrs(IPv4Address(public_ip), "" if backend == "udp" else backend).to_json()


_SUMMARY = re.compile(r"(\d+) packets transmitted, (\d+) received")
_REPLY = re.compile(r"^\[(\d+\.\d+)\] \d+ bytes from .*icmp_seq=(\d+)")


class Ping:
    """A bounded ``ping -D -c count -i interval`` from a container; stops by itself after count * interval."""

    def __init__(self, src, dst_ip, count: int, interval: float) -> None:
        self.count, self.interval = count, interval
        self.p = src.popen(["ping", "-n", "-D", "-i", str(interval), "-c", str(count), "-W", "1", str(dst_ip)],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        head = self.p.stdout.readline() + self.p.stdout.readline()  # "PING ..." and a first reply: traffic flows
        assert "bytes from" in head, head
        self.out = head

    def finish(self) -> tuple[int, int, list[float]]:
        """Wait for the end; return (sent, received, reply timestamps)."""
        try:
            rest, _ = self.p.communicate(timeout=self.count * self.interval + 30)
        finally:
            if self.p.poll() is None:
                self.p.kill()
                self.p.wait(5)
        self.out += rest
        m = _SUMMARY.search(self.out)
        assert m, self.out[-2000:]
        stamps = [float(m2.group(1)) for line in self.out.splitlines() if (m2 := _REPLY.match(line))]
        return int(m.group(1)), int(m.group(2)), stamps


# A TCP connect probe: the kernel maps the ICMP net-unreachable the udp fast path writes back to ENETUNREACH (101)
_CONNECT = ("import socket,sys\ns=socket.socket();s.settimeout(3)\n"
            "try:\n    s.connect((sys.argv[1],5999));print('connected')\n"
            "except OSError as e:\n    print('errno', e.errno)\n")


every_backend = pytest.mark.parametrize("bed", BACKENDS, indirect=True)


# ----------------------------------------------------------------------------------------------------------------
# 1. etcd down for 30 s


@every_backend
def test_etcd_down_30s_forwarding_continues_leases_held(bed):
    tb = bed.tb
    c1, c2, c3 = bed.ctrs
    before = {h.name: subnet_of(h) for h in bed.hosts}
    held = stored(tb)
    ids = {h.name: held[before[h.name]][1] for h in bed.hosts}
    # 36 s of traffic at 5/s from c1 to c2 and from c3 to c1, covering the whole outage
    kernel = {h.name: tables(h, bed.backend) for h in bed.hosts} if bed.backend != "udp" else {}
    pings = [Ping(c1, c2.ip, count=180, interval=0.2), Ping(c3, c1.ip, count=180, interval=0.2)]
    tb.etcd[0].stop()
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < ETCD_DOWN_S:
            time.sleep(2)
            for h in bed.hosts:
                assert h.daemon.poll() is None, f"{h.name} died during the outage"
        for h in bed.hosts:  # the kernel tables did not move during the outage
            if kernel:
                assert tables(h, bed.backend) == kernel[h.name], f"{h.name} changed its tables while etcd was down"
    finally:
        tb.etcd[0].start()
    results = [p.finish() for p in pings]
    for (sent, got, _), p in zip(results, pings):
        # the data plane never depended on etcd: at most 1 % loss (the noisy shared VM), normally none
        assert sent == 180 and got >= sent - 3, f"{bed.backend}: {got}/{sent} during a {ETCD_DOWN_S:.0f} s outage"
    # leases still held: same subnets, the keys present, bound to live etcd leases (the same ones)
    wait_for(lambda: all(before[h.name] in stored(tb) for h in bed.hosts), timeout=30, what="keys after restart")
    after = stored(tb)
    for h in bed.hosts:
        assert subnet_of(h) == before[h.name]
        value, lid = after[before[h.name]]
        assert lid == ids[h.name] and lease_ttl(tb, lid) > 0, (h.name, value, lid)
        assert "event=lease_lost" not in h.daemon_log_text(), h.name
    # reconnected: a lease written now reaches every daemon, and its removal too
    extra = free_subnets(tb, start=150)[0]
    tb.etcdctl("put", key_of(tb, extra), fake_lease(bed.backend, "10.168.0.99"))
    bed.wait_converged(timeout=30)
    tb.etcdctl("del", key_of(tb, extra))
    bed.wait_converged(timeout=30)
    bed.ping_all()
    for h in bed.hosts:
        log = h.daemon_log_text()
        assert "Traceback" not in log, log[-3000:]
        assert log.count("store_unavailable") < 20, "one line per state change, not a storm"
    print(f"{bed.backend}: etcd down {ETCD_DOWN_S:.0f} s: ping {[r[:2] for r in results]}")


# ----------------------------------------------------------------------------------------------------------------
# 2. kill -9 of a udp daemon: same subnet, traffic resumes after the restart (how soon is printed, not asserted:
#    a timed assertion on a shared machine measures the machine; the figure is in docs/testing.md)


@pytest.mark.parametrize("bed", ["udp"], indirect=True)
def test_udp_kill9_same_subnet_traffic_resumes(bed):
    h1 = bed.hosts[0]
    src, dst = bed.ctrs[0], bed.ctrs[1]
    subnet = subnet_of(h1)
    ping = Ping(src, dst.ip, count=1000, interval=0.02)  # 20 s at 50/s: room for a slow restart
    time.sleep(1.0)
    t_kill = time.time()
    h1.stop_daemon(signal.SIGKILL)
    before = h1.daemon_log_text().count("event=subnet_file_written")
    bed.start(h1)
    wait_for(lambda: h1.daemon_log_text().count("event=subnet_file_written") > before, timeout=30, interval=0.02,
             what="restarted daemon ready")
    t_ready = time.time()
    sent, got, stamps = ping.finish()
    assert subnet_of(h1) == subnet
    after = [t for t in stamps if t > t_kill + 0.05]
    assert after, f"no reply after the restart: {got}/{sent}"
    resume = after[0] - t_ready
    gaps = sorted((b - a for a, b in zip(stamps, stamps[1:])), reverse=True)
    print(f"udp kill -9: ready {t_ready - t_kill:.2f} s after the kill, first reply {resume:+.2f} s after ready, "
          f"largest gap {gaps[0]:.2f} s, {got}/{sent} replies")
    assert stamps[-1] > t_ready, "traffic must flow again after the restarted daemon is ready"
    # and nothing else was disturbed: every pair still reaches each other
    bed.wait_converged()
    bed.ping_all()


# ----------------------------------------------------------------------------------------------------------------
# 3. watch compaction while a daemon is cut off from etcd


def _cut(host, on: bool) -> None:
    """Cut ``host`` off from etcd (TCP 2379 both ways, reset at once) or undo it; inside the host's namespace."""
    op = "-I" if on else "-D"
    for chain, port in (("OUTPUT", "--dport"), ("INPUT", "--sport")):
        host.run(["iptables", "-w", op, chain, "-p", "tcp", port, "2379", "-j", "REJECT", "--reject-with",
                  "tcp-reset"])


@pytest.mark.parametrize("bed", ["vxlan"], indirect=True)
def test_watch_compacted_while_cut_off_relists_and_converges(bed):
    tb, h1 = bed.tb, bed.hosts[0]
    # h1's periodic re-list (every 45-75 s) must not fall inside the cut: it would read the new state from a fresh
    # listing and the watch would never meet the compaction this test is about (CI hit that twice)
    h1.stop_daemon()
    bed.start(h1, env={"FASTFLANNEL_LEASE_RESYNC_S": "3600"})
    bed.wait_converged()
    doomed = free_subnets(tb, start=160)[0]
    tb.etcdctl("put", key_of(tb, doomed), fake_lease(bed.backend, "10.168.0.98"))
    bed.wait_converged()
    ping = Ping(bed.ctrs[0], bed.ctrs[1].ip, count=200, interval=0.2)
    noticed = h1.daemon_log_text().count("event=store_unavailable op=watch")
    _cut(h1, True)
    try:
        # the daemon notices that its watch stream is dead (TCP keep-alive on the etcd connections)
        wait_for(lambda: h1.daemon_log_text().count("event=store_unavailable op=watch") > noticed, timeout=40,
                 what="h1 notices it is cut off")
        # meanwhile the cluster changes and its history is compacted away
        new = [free_subnets(tb, start=170)[0], free_subnets(tb, start=180)[0]]
        for i, s in enumerate(new):
            tb.etcdctl("put", key_of(tb, s), fake_lease(bed.backend, f"10.168.0.{90 + i}"))
        tb.etcdctl("del", key_of(tb, doomed))
        rev = json.loads(tb.etcdctl("get", "x", "-w", "json"))["header"]["revision"]
        tb.etcdctl("compact", str(rev))
        for h in bed.hosts[1:]:  # the connected hosts follow at once
            wait_for(lambda: bed.peers_ok(h), what=f"{h.name} follows")
        assert not bed.peers_ok(h1), "h1 cannot have seen the changes"
    finally:
        _cut(h1, False)
    wait_for(lambda: "event=watch_compacted" in h1.daemon_log_text(), timeout=30, what="h1 sees the compaction")
    bed.wait_converged(timeout=30)
    sent, got, _ = ping.finish()
    assert got >= sent - 3, f"{got}/{sent}: the cut-off must not touch the data plane"
    assert h1.daemon.poll() is None
    for s in new:
        tb.etcdctl("del", key_of(tb, s))
    bed.wait_converged()
    h1.stop_daemon()  # the next tests get h1 with the default re-list period again
    bed.start(h1)
    bed.wait_converged()


# ----------------------------------------------------------------------------------------------------------------
# bad input in etcd while the daemons run: fuzzed lease keys and values remove no good peer


def fuzzed_leases(tb) -> list[tuple[str, str]]:
    """Return (key, value) pairs: broken JSON, wrong types, bad addresses and MACs, bad keys, odd but valid ones."""
    h1_ip = str(tb.hosts[0].ip)
    values = [
        "", "null", "[]", "{}", "42", '"text"', "{", "\u00ff\u00fe", '{"PublicIP":null}', '{"PublicIP":17}',
        '{"PublicIP":"10.168.0.300"}', '{"PublicIP":"::1"}', '{"PublicIP":"10.168.0.77","PublicIPv6":"nope"}',
        '{"PublicIP":"10.168.0.77","BackendType":[1]}',
        '{"PublicIP":"10.168.0.77","BackendType":"vxlan","BackendData":null}',
        '{"PublicIP":"10.168.0.77","BackendType":"vxlan","BackendData":{"VNI":"1","VtepMAC":"zz"}}',
        '{"PublicIP":"10.168.0.77","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"zz:zz:zz:zz:zz:zz"}}',
        '{"PublicIP":"10.168.0.77","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"ff:ff:ff:ff:ff:ff"}}',
        '{"PublicIP":"10.168.0.77","BackendType":"host-gw","BackendData":[[[[{}]]]]}',
        '{"PublicIP":"0.0.0.0"}', '{"PublicIP":"255.255.255.255"}', '{"PublicIP":"224.0.0.1"}',
        '{"PublicIP":"127.0.0.1"}', '{"publicip":"10.168.0.78","PUBLICIPV6":null}',
        f'{{"PublicIP":"{h1_ip}"}}',  # a real host's address on another subnet
        '{"PublicIP":"10.168.0.79","BackendType":"' + "x" * 100_000 + '"}',
    ]
    used = set(stored(tb))
    free = [s for s in (IPv4Network(f"100.96.{i}.0/24") for i in range(190, 255)) if s not in used]
    pairs = [(key_of(tb, s), v) for s, v in zip(free, values)]
    bad_keys = ["not-a-key", "100.96.188.7-24", "100.96.189.0-33", "100.96.187.0-24&zz-64", "10.9.0.0-24"]
    pairs += [(f"{tb.prefix_key}/subnets/{k}", '{"PublicIP":"10.168.0.80"}') for k in bad_keys]
    return pairs


def _removal_lines(host, since: int, subnets) -> list[str]:
    text = host.daemon_log_text()[since:]
    return [ln for ln in text.splitlines()
            if re.search(r"event=(peer|route)_removed", ln) and any(f"subnet={s} " in ln + " " for s in subnets)]


@every_backend
def test_fuzzed_lease_values_remove_no_good_peer(bed):
    tb = bed.tb
    bed.wait_converged()
    real = [subnet_of(h) for h in bed.hosts]
    good = {h.name: tables(h, bed.backend) for h in bed.hosts} if bed.backend != "udp" else {}
    offsets = {h.name: len(h.daemon_log_text()) for h in bed.hosts}
    ping = Ping(bed.ctrs[0], bed.ctrs[1].ip, count=60, interval=0.2)
    pairs = fuzzed_leases(tb)
    for k, v in pairs:
        tb.etcdctl("put", k, v)
    time.sleep(3.0)  # every watch has delivered the batch by now (events arrive in well under a second)
    for h in bed.hosts:
        assert h.daemon.poll() is None, f"{h.name} died on bad input: {h.daemon_log_text()[-3000:]}"
        assert _removal_lines(h, offsets[h.name], real) == [], f"{h.name} removed a good peer"
        if good:
            now = tables(h, bed.backend)
            for s in real:
                for table in ("routes", "neigh"):
                    key = str(s) if table == "routes" else str(s.network_address)
                    if table in good[h.name]:
                        assert now[table].get(key) == good[h.name][table].get(key), (h.name, table, s)
            if "fdb" in good[h.name]:
                assert good[h.name]["fdb"] <= now["fdb"], h.name
    sent, got, _ = ping.finish()
    assert got >= sent - 3, f"{got}/{sent} while bad leases arrived"
    bed.ping_all()
    for k, _ in pairs:
        tb.etcdctl("del", k)
    bed.wait_converged(timeout=30)
    skipped = sum(h.daemon_log_text()[offsets[h.name]:].count("event=lease_skipped") for h in bed.hosts)
    assert skipped > 0
    print(f"{bed.backend}: {len(pairs)} fuzzed leases, {skipped} skips logged, no good peer removed")


# ----------------------------------------------------------------------------------------------------------------
# 4. a host vanishes without a word (defined last: that host stays dead)


@every_backend
def test_vanished_host_lease_expires_entries_removed_everywhere(bed):
    tb = bed.tb
    h4 = tb.add_host()
    bed.hosts.append(h4)
    bed.start(h4, env={"FASTFLANNEL_SUBNET_TTL": str(VANISH_TTL_S)})
    h4.wait_subnet_env(timeout=60)
    c4 = h4.add_container()
    gone = subnet_of(h4)
    bed.wait_converged(timeout=30)
    bed.ping_all([bed.ctrs[0], c4])
    ping = Ping(bed.ctrs[0], bed.ctrs[1].ip, count=75, interval=0.2)  # between survivors: must not suffer
    h4.daemon.send_signal(signal.SIGSTOP)  # frozen: no keep-alive, no goodbye
    t0 = time.monotonic()
    h4.stop_daemon(signal.SIGKILL)
    bed.hosts.remove(h4)
    wait_for(lambda: gone not in stored(tb), timeout=VANISH_TTL_S + 10, what=f"lease {gone} expired")
    expired = time.monotonic() - t0
    bed.wait_converged(timeout=15)  # every survivor holds exactly the remaining leases
    removed = time.monotonic() - t0
    if bed.backend == "udp":
        src = bed.ctrs[0]
        wait_for(lambda: "errno 101" in src.run([sys.executable, "-c", _CONNECT, str(c4.ip)], check=False).stdout,
                 what="ICMP net unreachable for the vanished host's subnet")
        st = fastpath_stats(bed.hosts[0])
        assert st["tx_drop_no_route"] >= 1 and st["tx_icmp_unreach"] >= 1, st
    else:
        for h in bed.hosts:
            t = tables(h, bed.backend)
            assert str(gone) not in t["routes"], (h.name, t)
            if bed.backend == "vxlan":
                assert str(gone.network_address) not in t["neigh"]
                assert not any(f[1] == str(h4.ip) for f in t["fdb"]), t["fdb"]
    sent, got, _ = ping.finish()
    assert got >= sent - 3, f"{got}/{sent} between surviving hosts"
    print(f"{bed.backend}: vanished host's lease (TTL {VANISH_TTL_S} s) gone after {expired:.1f} s, "
          f"entries removed everywhere after {removed:.1f} s")


# ----------------------------------------------------------------------------------------------------------------
# 5. a 3-member etcd cluster loses its leader


LEADER_TTL_S = 15


def test_etcd_leader_killed_daemons_keep_working_and_renewing(make_cluster):
    b = make_cluster("host-gw", etcd_members=3, env={"FASTFLANNEL_SUBNET_TTL": str(LEADER_TTL_S)})
    tb = b.tb
    for h in b.hosts:
        assert h.daemon_command()[3].count(",") == 2  # every endpoint given to the daemons
    held = stored(tb)
    ids = {h.name: held[subnet_of(h)][1] for h in b.hosts}
    ping = Ping(b.ctrs[0], b.ctrs[1].ip, count=200, interval=0.2)
    leader = tb.etcd_leader()
    leader.kill()
    t_kill = time.monotonic()
    new_leader = tb.etcd_leader(timeout=20)
    assert new_leader is not leader
    # a lease written after the kill still reaches every daemon
    extra = free_subnets(tb, start=150)[0]
    tb.etcdctl("put", key_of(tb, extra), fake_lease("host-gw", "10.168.0.99"))
    b.wait_converged(timeout=20)
    # renewing: leases of TTL 15 s survive well beyond a TTL after the election only if keep-alives succeed
    time.sleep(max(0.0, LEADER_TTL_S + 5 - (time.monotonic() - t_kill)))
    after = stored(tb)
    for h in b.hosts:
        s = subnet_of(h)
        assert s in after and after[s][1] == ids[h.name], f"{h.name} lost lease {s}: {after}"
        assert lease_ttl(tb, ids[h.name]) > 0
        log = h.daemon_log_text()
        assert "event=lease_lost" not in log and h.daemon.poll() is None, log[-3000:]
    sent, got, _ = ping.finish()
    assert got >= sent - 3, f"{got}/{sent} across the leader kill"
    failovers = sum(h.daemon_log_text().count("event=etcd_failover") for h in b.hosts)
    print(f"leader {leader.name} killed: new leader {new_leader.name}; ping {got}/{sent}; "
          f"{failovers} client failovers logged")
    leader.start()
    tb.etcdctl("del", key_of(tb, extra))
    b.wait_converged(timeout=20)
