# SPDX-License-Identifier: Apache-2.0
"""Kernel backends (vxlan, host-gw) end to end: real fastflanneld on three simulated hosts, a real etcd.

Every test reads the kernel back with iproute2 (``ip -j``, ``bridge -j``), an independent tool, and compares it
with what Flannel programs for the leases stored in etcd (flannel-compat.md sections 5, 6, 8, 10).

One testbed per backend is shared by the tests of that backend (module scope, parametrized indirectly, so
pytest runs every vxlan test, tears that world down, then every host-gw test). The tests that modify the world
keep it usable for the next one: the interop test adds a fourth (Flannel-style, hand-configured) host whose
lease stays; the restart, link-deletion and masquerade tests leave every daemon running; the lease-removal test,
which stops host3 for good, is defined last.
"""
from __future__ import annotations

import re
import signal
import subprocess
import time
from ipaddress import IPv4Network

import pytest

from cluster import (
    NETWORK,
    VXLAN_DEV,
    At,
    fdbs,
    ipj,
    leases,
    link_exists,
    neighs,
    network_wide_routes,
    overlay_routes,
    random_mac,
    raw_lease,
    subnet_of,
    tables,
    vxlan_link,
)
from peer_transfer import tcp_transfer
from waiting import wait_for

from fastflannel.lab.measure import IperfServer, iperf, ping_rtt, transfer_checksum

pytestmark = [pytest.mark.netns, pytest.mark.etcd]

BACKENDS = ["vxlan", "host-gw"]
REMOVED_S = 10.0  # a removed lease's entries are gone everywhere: liveness, the watch delivers in well under 1 s
RESTORE_S = 30.0  # a deleted flannel.1 is back: liveness; *who* restored it is checked in the log


def ping_ok(src, dst_ip, count: int = 3) -> bool:
    return ping_rtt(src, dst_ip, count=count, interval=0.1, timeout=10).received == count


both = pytest.mark.parametrize("bed", BACKENDS, indirect=True)


# ----------------------------------------------------------------------------------------------------------------
# 1. the data path


@both
def test_containers_reach_each_other(bed):
    """Ping both ways between containers on every pair of hosts; 20 MB over TCP with matching sha256; iperf3."""
    c1, c2, c3 = bed.ctrs
    for a, b in ((c1, c2), (c2, c3), (c3, c1)):
        for src, dst in ((a, b), (b, a)):
            r = ping_rtt(src, dst.ip, count=3, interval=0.1, timeout=10)
            assert r.received == 3, f"{bed.backend}: {src.name}@{src.host.name} -> {dst.ip}: {r}"
    res = transfer_checksum(c1, c2, size_mb=20, timeout=60)
    assert res["sent_bytes"] == res["recv_bytes"] == str(20 << 20), res
    assert res["sent_sha256"] == res["recv_sha256"], res
    with IperfServer(c3):
        r = iperf(c1, c3.ip, seconds=2)
    assert r.bits_per_second > 0 and r.bytes > 0, r
    print(f"{bed.backend}: iperf3 {c1.host.name} -> {c3.host.name}: {r.gbps:.2f} Gbit/s, {r.retransmits} retr")


# ----------------------------------------------------------------------------------------------------------------
# 2. interop with a host configured exactly as flanneld configures it


@both
def test_interop_with_flannel_configured_host(bed):
    tb = bed.tb
    used = set(leases(tb))
    subnet = next(s for s in (IPv4Network(f"100.96.{i}.0/24") for i in [200, *range(201, 255)]) if s not in used)
    net, gw_ip = subnet.network_address, subnet.network_address + 1
    f4 = tb.add_host()
    bed.interop, bed.interop_subnet = f4, subnet

    def ip(*args: str) -> None:
        f4.run(["ip", *args])

    # the "container" side: the subnet's first address on a bridge, as docker0 holds it (no dummy module here)
    ip("link", "add", "docker0", "type", "bridge")
    ip("addr", "add", f"{gw_ip}/24", "dev", "docker0")
    ip("link", "set", "docker0", "up")
    if bed.backend == "vxlan":
        mac = random_mac()
        ip("link", "add", VXLAN_DEV, "type", "vxlan", "id", "1", "dev", "eth0", "local", str(f4.ip),
           "dstport", "8472", "nolearning")
        ip("link", "set", VXLAN_DEV, "address", mac)
        ip("link", "set", VXLAN_DEV, "mtu", "1450")
        ip("addr", "add", f"{net}/32", "dev", VXLAN_DEV)
        ip("link", "set", VXLAN_DEV, "up")
        value = (f'{{"PublicIP":"{f4.ip}","PublicIPv6":null,"BackendType":"vxlan",'
                 f'"BackendData":{{"VNI":1,"VtepMAC":"{mac}"}}}}')
    else:
        value = f'{{"PublicIP":"{f4.ip}","PublicIPv6":null,"BackendType":"host-gw"}}'
    tb.etcdctl("put", f"{tb.prefix_key}/subnets/{str(subnet).replace('/', '-')}", value)

    # what flanneld does for each remote lease, read from etcd
    for s, v in leases(tb).items():
        if s == subnet:
            continue
        if bed.backend == "vxlan":
            peer_mac, n = v["BackendData"]["VtepMAC"], str(s.network_address)
            ip("neigh", "replace", n, "lladdr", peer_mac, "dev", VXLAN_DEV, "nud", "permanent")
            f4.run(["bridge", "fdb", "replace", peer_mac, "dev", VXLAN_DEV, "dst", v["PublicIP"], "self", "permanent"])
            ip("route", "replace", str(s), "via", n, "dev", VXLAN_DEV, "onlink")
        else:
            ip("route", "replace", str(s), "via", v["PublicIP"], "dev", "eth0")

    # every fastflannel host programs Flannel's entries for the hand-made lease
    bed.wait_converged()
    far = At(f4, gw_ip)
    for c in bed.ctrs:
        assert ping_ok(c, gw_ip), f"{bed.backend}: {c.name}@{c.host.name} -> interop {gw_ip}"
        r = f4.run(["ping", "-n", "-c", "3", "-i", "0.1", "-W", "2", "-I", str(gw_ip), str(c.ip)], check=False)
        assert r.returncode == 0 and " 0% packet loss" in r.stdout, f"interop {gw_ip} -> {c.ip}: {r.stdout}"
    c1 = bed.ctrs[0]
    there = tcp_transfer(c1, far, gw_ip, size=2 << 20)
    assert there["sent"] == there["recv"] and there["peer"] == str(c1.ip), there
    back = tcp_transfer(far, c1, c1.ip, size=2 << 20, src_ip=str(gw_ip))
    assert back["sent"] == back["recv"] and back["peer"] == str(gw_ip), back


# ----------------------------------------------------------------------------------------------------------------
# 3. kernel state, read back


@both
def test_kernel_state_matches_flannel(bed):
    tb = bed.tb
    bed.wait_converged()
    stored = leases(tb)
    for h in bed.hosts:
        own = subnet_of(h)
        lease = stored[own]
        if bed.backend == "host-gw":
            assert raw_lease(tb, own) == f'{{"PublicIP":"{h.ip}","PublicIPv6":null,"BackendType":"host-gw"}}'
            assert not link_exists(h, VXLAN_DEV), f"host-gw created {VXLAN_DEV} on {h.name}"
            routes = overlay_routes(h)
            for s, v in stored.items():
                if s != own:
                    assert routes[str(s)] == (v["PublicIP"], "eth0", ()), (h.name, s, routes)
            assert len(routes) == len(stored) - 1, routes
            continue
        link = vxlan_link(h)
        assert link is not None, f"no {VXLAN_DEV} on {h.name}"
        data = link["linkinfo"]["info_data"]
        assert link["linkinfo"]["info_kind"] == "vxlan"
        assert (data["id"], data["port"], data["learning"], data["local"], data["link"]) == \
            (1, 8472, False, str(h.ip), "eth0"), data
        assert not data.get("group") and not data.get("l2miss") and not data.get("l3miss"), data
        assert link["mtu"] == 1450 and "UP" in link["flags"], link
        assert raw_lease(tb, own) == (f'{{"PublicIP":"{h.ip}","PublicIPv6":null,"BackendType":"vxlan",'
                                      f'"BackendData":{{"VNI":1,"VtepMAC":"{link["address"]}"}}}}')
        addrs = [(a["local"], a["prefixlen"]) for a in ipj(h, "-4", "addr", "show", "dev", VXLAN_DEV)[0]["addr_info"]]
        assert addrs == [(str(own.network_address), 32)], addrs
        assert lease["BackendData"]["VtepMAC"] == link["address"]
        n, f, routes = neighs(h), fdbs(h), overlay_routes(h)
        for s, v in stored.items():
            if s == own:
                continue
            peer_mac, gw = v["BackendData"]["VtepMAC"], str(s.network_address)
            assert n[gw] == (peer_mac, ("PERMANENT",)), (h.name, s, n)
            assert (peer_mac, v["PublicIP"], ("self",), "permanent") in f, (h.name, s, f)
            assert routes[str(s)] == (gw, VXLAN_DEV, ("onlink",)), (h.name, s, routes)
        assert len(n) == len(f) == len(routes) == len(stored) - 1, (n, f, routes)
        assert network_wide_routes(h) == [], "Flannel's vxlan installs no route for the whole Network"


# ----------------------------------------------------------------------------------------------------------------
# 5. restart during traffic


_ICMP_SEQ = re.compile(r"bytes from .*? icmp_seq=(\d+)")


@both
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_restart_during_ping_loses_nothing(bed, sig):
    h1 = bed.hosts[0]
    src, dst = bed.ctrs[0], bed.ctrs[1]
    bed.wait_converged()
    before = {h.name: tables(h, bed.backend) for h in bed.hosts}
    # every netlink change on host1 while the daemon restarts: a delete-then-add would show up here
    mon = h1.popen(["ip", "-o", "monitor", "route", "neigh", "link"], stdout=subprocess.PIPE, text=True)
    fmon = h1.popen(["bridge", "monitor", "fdb"], stdout=subprocess.PIPE, text=True)
    # ping until well after the restart (however long a loaded machine makes it), then stop it with SIGINT: every
    # echo sent before the last reply must have been answered (no gap in icmp_seq), whatever the restart took
    ping = src.popen(["ping", "-n", "-i", "0.05", "-w", "120", "-W", "1", str(dst.ip)], stdout=subprocess.PIPE,
                     stderr=subprocess.STDOUT, text=True)
    try:
        head = ping.stdout.readline() + ping.stdout.readline()  # "PING ..." and the first reply: traffic flows
        assert "bytes from" in head, head
        t0 = time.monotonic()
        bed.restart(h1, sig)
        restart_s = time.monotonic() - t0
        assert ping.poll() is None, "the restart must happen while the ping runs"
        time.sleep(1.0)  # replies after the restarted daemon took over
        ping.send_signal(signal.SIGINT)
        out, _ = ping.communicate(timeout=30)
        out = head + out
    finally:
        for p in (ping, mon, fmon):
            if p.poll() is None:
                p.terminate()
    mon_out, _ = mon.communicate(timeout=10)
    fmon_out, _ = fmon.communicate(timeout=10)
    seqs = sorted(int(s) for s in _ICMP_SEQ.findall(out))
    assert seqs, out
    sent_before_last = seqs[-1]  # icmp_seq counts from 1
    missing = sorted(set(range(1, sent_before_last + 1)) - set(seqs))
    assert missing == [], f"{bed.backend} {sig.name}: no reply to icmp_seq {missing[:20]}: {out[-400:]}"
    got = len(seqs)
    after = {h.name: tables(h, bed.backend) for h in bed.hosts}
    assert after == before
    ours = [line for line in (mon_out + fmon_out).splitlines()
            if line.startswith("Deleted") and (VXLAN_DEV in line or str(NETWORK)[:6] in line)]
    assert ours == [], f"the restart removed kernel entries: {ours}"
    print(f"{bed.backend}: {sig.name} restart took {restart_s:.2f} s, {got} replies, none missing")


# ----------------------------------------------------------------------------------------------------------------
# 6. vxlan device deleted by hand


@pytest.mark.parametrize("bed", ["vxlan"], indirect=True)
def test_vxlan_device_deleted_is_restored(bed):
    h1 = bed.hosts[0]
    src, dst = bed.ctrs[0], bed.ctrs[1]
    bed.wait_converged()
    before = tables(h1, "vxlan")
    addr_before = ipj(h1, "-4", "addr", "show", "dev", VXLAN_DEV)[0]["addr_info"]
    since = len(h1.daemon_log_text())
    h1.run(["ip", "link", "del", VXLAN_DEV])
    t0 = time.monotonic()
    wait_for(lambda: tables(h1, "vxlan") == before, timeout=RESTORE_S, what="flannel.1 and its entries restored")
    restored_s = time.monotonic() - t0
    # the RTM_DELLINK watcher re-created it, not the periodic reconcile: its line comes first (no timing involved)
    log = h1.daemon_log_text()[since:]
    assert "event=vxlan_device_recreate" in log, log
    assert "event=vxlan_device_deleted" in log.split("event=vxlan_device_recreate", 1)[0], log
    link = vxlan_link(h1)
    assert link["address"] == before["mac"] and link["mtu"] == 1450 and "UP" in link["flags"], link
    wait_for(lambda: ipj(h1, "-4", "addr", "show", "dev", VXLAN_DEV)[0]["addr_info"] == addr_before,
             what="the /32 restored")
    assert ping_ok(src, dst.ip) and ping_ok(dst, src.ip), "traffic did not resume"
    # the other hosts still point at the same MAC: nothing changed there
    bed.wait_converged()
    assert h1.daemon.poll() is None
    print(f"vxlan: flannel.1 restored in {restored_s:.2f} s")


# ----------------------------------------------------------------------------------------------------------------
# 7. --ip-masq


def masq_rules_text(pod: IPv4Network, random_fully: bool) -> list[str]:
    c, cm = str(NETWORK), '-m comment --comment "flanneld masq"'
    masq = "-j MASQUERADE" + (" --random-fully" if random_fully else "")
    return [
        f"-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 {cm} -j RETURN",
        f"-A FLANNEL-POSTRTG -s {pod} -d {c} {cm} -j RETURN",
        f"-A FLANNEL-POSTRTG -s {c} -d {pod} {cm} -j RETURN",
        f"-A FLANNEL-POSTRTG ! -s {c} -d {pod} {cm} -j RETURN",
        f"-A FLANNEL-POSTRTG -s {c} ! -d 224.0.0.0/4 {cm} {masq}",
        f"-A FLANNEL-POSTRTG ! -s {c} -d {c} {cm} {masq}",
    ]


@both
def test_ip_masq_rules_and_masquerade(bed):
    tb, h1 = bed.tb, bed.hosts[0]
    for _ in range(3):
        bed.restart(h1, signal.SIGTERM, "--ip-masq")
    assert h1.read_subnet_env()["FLANNEL_IPMASQ"] == "true"
    save = h1.run(["iptables-save"]).stdout
    lines = [ln for ln in save.splitlines() if ln.startswith(("-A", ":FLANNEL"))]
    ours = [ln for ln in lines if "FLANNEL" in ln or "flanneld" in ln]
    version = h1.run(["iptables", "--version"]).stdout
    vm = re.search(r"v(\d+)\.(\d+)\.(\d+)", version)
    random_fully = tuple(int(x) for x in vm.groups()) >= (1, 6, 2)
    pod, c = subnet_of(h1), str(NETWORK)
    want = [
        ":FLANNEL-POSTRTG - [0:0]",
        '-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG',
        *masq_rules_text(pod, random_fully),
        ":FLANNEL-FWD - [0:0]",
        '-A FORWARD -m comment --comment "flanneld forward" -j FLANNEL-FWD',
        f'-A FLANNEL-FWD -s {c} -m comment --comment "flanneld forward" -j ACCEPT',
        f'-A FLANNEL-FWD -d {c} -m comment --comment "flanneld forward" -j ACCEPT',
    ]
    # every rule exactly once, chains in Flannel's order
    assert sorted(ours) == sorted(want), "\n".join(ours)
    # our chains hold exactly Flannel's rules in order; the built-in chains hold our jump once and nothing else
    for chain in ("FLANNEL-POSTRTG", "FLANNEL-FWD", "POSTROUTING", "FORWARD"):
        assert [ln for ln in lines if ln.startswith(f"-A {chain} ")] == \
            [ln for ln in want if ln.startswith(f"-A {chain} ")], save

    # container -> outside host: arrives from host1's address
    out = tb.add_outside_host()
    c1 = bed.ctrs[0]
    assert str(h1.ip) == "10.168.0.2"
    r = tcp_transfer(c1, out, out.ip, size=64 << 10)
    assert r["sent"] == r["recv"] and r["peer"] == "10.168.0.2", r
    # container -> container across hosts: not masqueraded, in both directions
    for a, b in ((c1, bed.ctrs[1]), (bed.ctrs[2], c1)):
        r = tcp_transfer(a, b, b.ip, size=64 << 10)
        assert r["sent"] == r["recv"] and r["peer"] == str(a.ip), (a.name, a.host.name, r)


# ----------------------------------------------------------------------------------------------------------------
# 4. a peer goes away for good (defined last: host3 stays down)


@both
def test_removed_lease_removes_entries_everywhere(bed):
    tb = bed.tb
    gone = bed.hosts[2]
    s = subnet_of(gone)
    bed.wait_converged()
    mac = leases(tb)[s].get("BackendData", {}).get("VtepMAC")
    assert gone.stop_daemon(signal.SIGTERM) == 0, gone.daemon_log_text()[-3000:]
    t0 = time.monotonic()
    tb.etcdctl("del", f"{tb.prefix_key}/subnets/{str(s).replace('/', '-')}")
    remaining = bed.hosts[:2]

    def gone_everywhere() -> bool:
        for h in remaining:
            t = tables(h, bed.backend)
            if str(s) in t["routes"]:
                return False
            if bed.backend == "vxlan":
                if str(s.network_address) in t["neigh"] or any(f[0] == mac or f[1] == str(gone.ip) for f in t["fdb"]):
                    return False
        return True

    wait_for(gone_everywhere, timeout=REMOVED_S, what=f"entries of {s} removed on every host")
    took = time.monotonic() - t0
    bed.wait_converged(remaining)  # and nothing else was touched
    assert ping_ok(bed.ctrs[0], bed.ctrs[1].ip)
    print(f"{bed.backend}: removal of {s} seen everywhere in {took:.2f} s")
