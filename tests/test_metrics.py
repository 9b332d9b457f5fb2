# SPDX-License-Identifier: Apache-2.0
"""``/metrics`` (Prometheus text format) and systemd readiness.

Tier 0: the ``Metrics`` object counts the package's ``event=`` log records and reads fast-path counters at scrape
time (a fake network). Tier 2+3: real daemons on the udp backend; ``/metrics`` is scraped from inside a host's
namespace while pings and UDP datagrams cross hosts, and the packet counters move by at least the amounts sent;
lease renewals, a lease loss and its re-acquisition are counted. A daemon started with ``NOTIFY_SOCKET`` sends
``READY=1`` to a unix datagram socket only once subnet.env exists (a filesystem socket, not network traffic).
"""
from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import sys
import time
from ipaddress import IPv4Address, IPv4Interface

import pytest

from fastflannel.metrics import Metrics

HEALTHZ_PORT = 8472


def parse_metrics(text: str) -> dict:
    """Return {'name{labels}': value} for every sample line of a text exposition."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        out[key] = float(value)
    return out


def test_events_from_log_records():
    m = Metrics()
    pkg = logging.getLogger("fastflannel")
    level = pkg.level
    pkg.setLevel(logging.INFO)  # as the daemon runs without -v
    detach = m.install("fastflannel")
    try:
        mlog = logging.getLogger("fastflannel.subnet.manager")
        mlog.info("event=lease_acquired subnet=%s public_ip=%s", "10.1.2.0/24", "10.0.0.1")
        mlog.info("event=lease_renewed subnet=10.1.2.0/24 lease_id=1 ttl=5")
        mlog.info("event=lease_renewed subnet=10.1.2.0/24 lease_id=1 ttl=5")
        mlog.warning("event=lease_lost subnet=10.1.2.0/24 public_ip=10.0.0.1 action=reacquire")
        mlog.warning("event=lease_reacquired subnet=10.1.2.0/24 lease_id=2 ttl=5")
        mlog.warning("event=store_unavailable op=watch prefix=/x error='down' action=retry")
        logging.getLogger("fastflannel.daemon").info("event=network_registered subnet=10.1.2.0/24")
        blog = logging.getLogger("fastflannel.backend.vxlan")
        blog.info("event=peer_added mode=vxlan subnet=10.1.3.0/24 public_ip=10.0.0.2")
        blog.error("event=peer_failed type=added subnet=10.1.4.0/24 public_ip=10.0.0.3 error=EEXIST")
        logging.getLogger("fastflannel.backend").error("event=route_failed subnet=x error=y")
        mid = parse_metrics(m.render()[2].decode())
        assert mid["fastflannel_etcd_unavailable"] == 1
        mlog.info("event=store_available op=watch prefix=/x revision=9")
        logging.getLogger("fastflannel.subnet.etcd").info("event=etcd_failover op=get endpoint=http://b:2379")
        detach()
        logging.getLogger("fastflannel.subnet.manager").info("event=lease_renewed after detach: not counted")
    finally:
        detach()
        pkg.setLevel(level)
    status, ctype, body = m.render()
    assert status == 200 and ctype.startswith("text/plain; version=0.0.4")
    v = parse_metrics(body.decode())
    assert v['fastflannel_lease_events_total{event="acquired"}'] == 1
    assert v['fastflannel_lease_events_total{event="renewed"}'] == 2
    assert v['fastflannel_lease_events_total{event="lost"}'] == 1
    assert v['fastflannel_lease_events_total{event="reacquired"}'] == 1
    assert v['fastflannel_peer_events_total{event="added"}'] == 1
    assert v['fastflannel_peer_events_total{event="removed"}'] == 0
    assert v['fastflannel_kernel_programming_errors_total{event="peer_failed"}'] == 1
    assert v['fastflannel_kernel_programming_errors_total{event="route_failed"}'] == 1
    assert v['fastflannel_etcd_reconnects_total{reason="recovered"}'] == 1
    assert v['fastflannel_etcd_reconnects_total{reason="failover"}'] == 1
    assert v["fastflannel_etcd_unavailable"] == 0
    assert not any(k.startswith("fastflannel_udp_") for k in v)  # no udp network registered


class _FakeFastPath:
    def peers(self):
        return {IPv4Address("10.0.0.2"): 1, IPv4Address("10.0.0.3"): 2}


class _FakeNetwork:
    fastpath = _FakeFastPath()

    def stats(self):
        return {"tx_packets": 10, "tx_bytes": 840, "tx_batches": 4, "rx_packets": 7, "rx_bytes": 588,
                "rx_batches": 7, "tx_drop_no_route": 3, "rx_drop_unknown_peer": 2, "polls": 50}


def test_fastpath_counters_read_at_scrape_time():
    m = Metrics()
    m.set_network(_FakeNetwork())
    v = parse_metrics(m.render()[2].decode())
    assert v['fastflannel_udp_packets_total{direction="tx"}'] == 10
    assert v['fastflannel_udp_bytes_total{direction="rx"}'] == 588
    assert v['fastflannel_udp_batches_total{direction="tx"}'] == 4
    assert v['fastflannel_udp_drops_total{direction="tx",reason="no_route"}'] == 3
    assert v['fastflannel_udp_drops_total{direction="rx",reason="unknown_peer"}'] == 2
    assert v['fastflannel_udp_fastpath_events_total{counter="polls"}'] == 50
    assert v['fastflannel_udp_peer_routes{peer="10.0.0.3"}'] == 2
    assert v["fastflannel_udp_peers"] == 2


# ------------------------------------------------------------------------------------------------------------------
# end to end


def scrape(host) -> dict:
    code = (f"import urllib.request;r=urllib.request.urlopen('http://127.0.0.1:{HEALTHZ_PORT}/metrics',timeout=5);"
            "print(r.headers['Content-Type']);print(r.read().decode())")
    out = host.run([sys.executable, "-c", code]).stdout
    ctype, _, body = out.partition("\n")
    assert ctype.startswith("text/plain; version=0.0.4"), ctype
    return parse_metrics(body)


UDP_SENDER = """
import socket, sys, time
dst, n = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(n):
    s.sendto(b"x" * 100, (dst, 9999))
    if i % 50 == 49:
        time.sleep(0.01)  # stay inside the receive buffers of a busy 2-core VM
"""

UDP_RECEIVER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 9999))
s.settimeout(10)
got = 0
try:
    while got < int(sys.argv[1]):
        s.recv(2048)
        got += 1
except OSError:
    pass
print(got)
"""


@pytest.mark.netns
@pytest.mark.etcd
def test_metrics_scraped_while_traffic_flows(make_testbed, tmp_path):
    from e2e import wait_for

    tb = make_testbed(3)
    tb.put_config({"Network": "100.96.0.0/16", "Backend": {"Type": "udp"}})
    for i, h in enumerate(tb.hosts):
        # h1: a 6 s lease, kept alive every 2 s, so renewals show up in seconds
        h.start_daemon(f"--healthz-port={HEALTHZ_PORT}", env={"FASTFLANNEL_SUBNET_TTL": "6"} if i == 0 else {})
    a, b, _ = [h.add_container() for h in tb.hosts]
    ha, hb = tb.hosts[0], tb.hosts[1]
    wait_for(lambda: a.ping(b.ip, count=1, timeout=2), timeout=30, what="first ping a -> b")
    v = wait_for(lambda: (lambda x: x if x['fastflannel_peer_events_total{event="added"}'] >= 2 else None)(scrape(ha)),
                 what="two peers counted on h1")
    assert v['fastflannel_lease_events_total{event="acquired"}'] == 1
    assert v["fastflannel_ready"] == 1
    assert v["fastflannel_udp_peers"] == 2
    assert sum(val for k, val in v.items() if k.startswith("fastflannel_udp_peer_routes{")) == 2

    before_a, before_b = scrape(ha), scrape(hb)
    n_ping = 20
    res = a.ping_verbose(b.ip, count=n_ping, timeout=30)
    assert res.returncode == 0, res.stdout
    n_udp = 300
    recv = b.popen([sys.executable, "-c", UDP_RECEIVER, str(n_udp)], stdout=subprocess.PIPE, text=True)
    time.sleep(0.5)
    a.run([sys.executable, "-c", UDP_SENDER, str(b.ip), str(n_udp)])
    got = int(recv.communicate(timeout=30)[0].strip() or 0)
    assert got >= n_udp * 0.9, f"only {got}/{n_udp} datagrams arrived"
    after_a, after_b = scrape(ha), scrape(hb)

    def delta(after, before, key):
        return after[key] - before.get(key, 0)

    tx = 'fastflannel_udp_packets_total{direction="tx"}'
    rx = 'fastflannel_udp_packets_total{direction="rx"}'
    # h1 sent n_ping echo requests and n_udp datagrams and received n_ping replies; h2 the mirror image
    assert delta(after_a, before_a, tx) >= n_ping + n_udp
    assert delta(after_a, before_a, rx) >= n_ping
    assert delta(after_b, before_b, rx) >= n_ping + got
    assert delta(after_b, before_b, tx) >= n_ping
    # bytes: each inner packet is at least its payload plus IPv4 + ICMP/UDP headers
    assert delta(after_a, before_a, 'fastflannel_udp_bytes_total{direction="tx"}') >= n_ping * 84 + n_udp * 128
    assert delta(after_a, before_a, 'fastflannel_udp_batches_total{direction="tx"}') >= 1
    assert 'fastflannel_udp_drops_total{direction="rx",reason="unknown_peer"}' in after_b

    # lease events on h1: renewals tick; deleting its key counts a loss and a re-acquisition
    wait_for(lambda: scrape(ha)['fastflannel_lease_events_total{event="renewed"}'] >= 2, timeout=20,
             what="lease renewals counted")
    subnet = ha.read_subnet_env()["FLANNEL_SUBNET"]
    net = str(IPv4Interface(subnet).network)
    tb.etcdctl("del", f"{tb.prefix_key}/subnets/{net.replace('/', '-')}")
    v = wait_for(lambda: (lambda x: x if x['fastflannel_lease_events_total{event="reacquired"}'] >= 1 else None)(
        scrape(ha)), timeout=30, what="lease re-acquired and counted")
    assert v['fastflannel_lease_events_total{event="lost"}'] >= 1
    log = ha.daemon_log_text()
    assert re.search(r"event=lease_renewed subnet=\S+ lease_id=\w+ ttl=\d+", log), log[-2000:]


@pytest.mark.netns
@pytest.mark.etcd
def test_systemd_ready_after_subnet_env(make_testbed, tmp_path):
    """Type=notify: READY=1 arrives on NOTIFY_SOCKET, and only after subnet.env is complete."""
    tb = make_testbed(1)
    tb.put_config({"Network": "100.96.0.0/16", "Backend": {"Type": "host-gw"}})
    h = tb.hosts[0]
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        os.chmod(path, 0o777)
        sock.settimeout(30)
        h.start_daemon(env={"NOTIFY_SOCKET": str(path)})
        msg = sock.recv(4096)
        assert msg == b"READY=1"
        env = h.read_subnet_env()  # already there when READY=1 arrives
        assert env["FLANNEL_SUBNET"].startswith("100.96.") and env["FLANNEL_IPMASQ"] == "false"
        assert h.daemon.poll() is None
