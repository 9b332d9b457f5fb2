# SPDX-License-Identifier: Apache-2.0
"""The control plane end to end: real fastflanneld processes on simulated hosts, a real etcd.

The host-gw backend is used here because its kernel state *is* the daemon's view of the cluster: one route
per remote lease. So "host X sees lease Y" is read back as "host X has a route for Y via Y's PublicIP".
"""
from __future__ import annotations

import json
import re
import signal
import time
from ipaddress import IPv4Address, IPv4Network

import pytest

from cluster import free_subnets
from waiting import wait_for
from fastflannel.lease import LeaseAttrs

pytestmark = [pytest.mark.netns, pytest.mark.etcd]

NETWORK = "100.96.0.0/16"
HOSTGW = {"Network": NETWORK, "Backend": {"Type": "host-gw"}}


def leases(tb) -> dict:
    """Return {subnet: raw JSON value} read back with etcdctl."""
    out = tb.etcdctl("get", "--prefix", f"{tb.prefix_key}/subnets", "-w", "json")
    kvs = json.loads(out).get("kvs", [])
    import base64

    res = {}
    for kv in kvs:
        key = base64.b64decode(kv["key"]).decode()
        res[key.rsplit("/", 1)[1]] = base64.b64decode(kv["value"]).decode()
    return res


def peer_routes(host) -> dict:
    """Return {dst: gateway} of the host's routes inside the overlay network (the daemon's view)."""
    out = host.run(["ip", "-j", "-4", "route", "show", "table", "main"]).stdout
    res = {}
    for r in json.loads(out or "[]"):
        dst = r.get("dst", "")
        if "/" in dst and IPv4Network(dst).subnet_of(IPv4Network(NETWORK)) and r.get("gateway"):
            res[dst] = r["gateway"]
    return res


def subnet_of(host) -> str:
    return str(IPv4Network(host.wait_subnet_env()["FLANNEL_SUBNET"], strict=False))


@pytest.fixture
def cluster(make_cluster):
    """Three host-gw daemons, converged (no containers: these tests read the control plane)."""
    return make_cluster("host-gw", config=HOSTGW, containers=False).tb


def test_three_hosts_distinct_subnets_flannel_format(cluster):
    tb = cluster
    subnets = [subnet_of(h) for h in tb.hosts]
    assert len(set(subnets)) == 3
    stored = leases(tb)
    for h, s in zip(tb.hosts, subnets):
        key = s.replace("/", "-")
        assert key in stored
        # Flannel's exact JSON, byte for byte
        assert stored[key] == f'{{"PublicIP":"{h.ip}","PublicIPv6":null,"BackendType":"host-gw"}}'
        net = IPv4Network(s)
        # subnet.env byte for byte (flannel WriteSubnetFile)
        assert h.subnet_file.read_text() == (
            f"FLANNEL_NETWORK={NETWORK}\nFLANNEL_SUBNET={net.network_address + 1}/{net.prefixlen}\n"
            f"FLANNEL_MTU={tb.mtu}\nFLANNEL_IPMASQ=false\n"
        )
        assert oct(h.subnet_file.stat().st_mode & 0o777) == "0o644"
    # every host has a route to the two others via their public IPs
    for h in tb.hosts:
        want = {s: str(o.ip) for o, s in zip(tb.hosts, subnets) if o is not h}
        wait_for(lambda: peer_routes(h) == want, what=f"routes on {h.name}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_restart_keeps_subnet(cluster, sig):
    h = cluster.hosts[0]
    before = subnet_of(h)
    rc = h.stop_daemon(sig)
    if sig == signal.SIGTERM:
        assert rc == 0, h.daemon_log_text()
    h.subnet_file.unlink()  # the lease must be found again by PublicIP, not from the file
    h.start_daemon()
    assert subnet_of(h) == before
    assert len(leases(cluster)) == 3


def test_key_deleted_others_see_removal_owner_reacquires(cluster):
    tb = cluster
    victim, other = tb.hosts[0], tb.hosts[1]
    s = subnet_of(victim)
    wait_for(lambda: s in peer_routes(other), what="route before delete")
    tb.etcdctl("del", f"{tb.prefix_key}/subnets/{s.replace('/', '-')}")
    # the owner puts the same subnet back; in between, the others may have removed and re-added it
    wait_for(lambda: s.replace("/", "-") in leases(tb), timeout=30, what="owner re-acquires its subnet")
    assert subnet_of(victim) == s
    wait_for(lambda: s in peer_routes(other), timeout=30, what="route restored on the other host")
    log = victim.daemon_log_text()
    assert "lease_lost" in log, log[-3000:]
    assert victim.daemon.poll() is None


def test_removal_is_seen(cluster):
    """A lease removed for good (its daemon stopped, its key deleted): every other host drops its route."""
    tb = cluster
    gone = tb.hosts[2]
    s = subnet_of(gone)
    assert gone.stop_daemon(signal.SIGTERM) == 0
    tb.etcdctl("del", f"{tb.prefix_key}/subnets/{s.replace('/', '-')}")
    for h in tb.hosts[:2]:
        wait_for(lambda: s not in peer_routes(h), what=f"route removed on {h.name}")


def test_garbage_value_removes_nothing(cluster):
    tb = cluster
    h = tb.hosts[0]
    want = wait_for(lambda: len(peer_routes(h)) == 2 and peer_routes(h), what="initial routes")
    bad, good_subnet = free_subnets(tb, 2)
    tb.etcdctl("put", f"{tb.prefix_key}/subnets/{str(bad).replace('/', '-')}", "this is not json")
    tb.etcdctl("put", f"{tb.prefix_key}/subnets/not-a-key", '{"PublicIP":"10.168.0.9","PublicIPv6":null}')
    time.sleep(2.0)
    assert peer_routes(h) == want
    # a good lease added afterwards still arrives: the watch survived the garbage
    good = LeaseAttrs(IPv4Address("10.168.0.9"), "host-gw").to_json()
    tb.etcdctl("put", f"{tb.prefix_key}/subnets/{str(good_subnet).replace('/', '-')}", good)
    wait_for(lambda: peer_routes(h).get(str(good_subnet)) == "10.168.0.9", what="good lease after garbage")
    assert all(k in peer_routes(h) for k in want)
    assert str(bad.network_address) in h.daemon_log_text()  # the skip is logged


def test_etcd_outage(cluster):
    tb = cluster
    subnets = {h.name: subnet_of(h) for h in tb.hosts}
    before = {h.name: peer_routes(h) for h in tb.hosts}
    tb.etcd[0].stop()
    time.sleep(20)
    for h in tb.hosts:
        assert h.daemon.poll() is None, h.daemon_log_text()[-3000:]
        assert peer_routes(h) == before[h.name]  # the data plane stays
    tb.etcd[0].start()
    wait_for(lambda: len(leases(tb)) == 3, timeout=30, what="leases after etcd restart")
    stored = leases(tb)
    for h in tb.hosts:
        assert subnets[h.name].replace("/", "-") in stored
    # reconnected: a new lease (on a subnet no host holds) still reaches every daemon
    (fresh,) = free_subnets(tb)
    tb.etcdctl("put", f"{tb.prefix_key}/subnets/{str(fresh).replace('/', '-')}",
               LeaseAttrs(IPv4Address("10.168.0.99"), "host-gw").to_json())
    for h in tb.hosts:
        wait_for(lambda: str(fresh) in peer_routes(h), timeout=30, what=f"watch reconnected on {h.name}")
        log = h.daemon_log_text()
        assert "Traceback" not in log, log[-4000:]
        # one line per state change, not a storm: 20 s of outage must not produce hundreds of lines
        assert len(re.findall(r"unavailable", log)) < 20, log[-4000:]


def test_bad_config_exits_1_with_one_line(make_testbed):
    tb = make_testbed(1)
    tb.put_config({"Network": NETWORK, "SubnetLen": 40})
    h = tb.hosts[0]
    p = h.start_daemon()
    assert p.wait(30) == 1
    errors = [line for line in h.daemon_log_text().splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "SubnetLen" in errors[0], h.daemon_log_text()


def test_race_for_two_subnets_and_out_of_subnets(make_testbed):
    tb = make_testbed(3)
    # /28 split into /30s, SubnetMin..Max leave exactly two subnets
    tb.put_config({"Network": "100.96.0.0/28", "SubnetLen": 30, "SubnetMin": "100.96.0.4",
                   "SubnetMax": "100.96.0.8", "Backend": {"Type": "host-gw"}})
    a, b, c = tb.hosts
    a.start_daemon()
    b.start_daemon()
    sa, sb = subnet_of(a), subnet_of(b)
    assert sa != sb and {sa, sb} == {"100.96.0.4/30", "100.96.0.8/30"}
    p = c.start_daemon()
    assert p.wait(30) == 1
    assert "out of subnets" in c.daemon_log_text()
