# SPDX-License-Identifier: Apache-2.0
"""``/metrics`` (Prometheus text format) and systemd readiness.

Tier 0: the ``Metrics`` object counts the package's ``event=`` log records and reads fast-path counters at scrape
time (a fake network). Tier 2+3: real daemons on the udp backend; ``/metrics`` is scraped from inside a host's
namespace while pings and UDP datagrams go from a container on h1 to containers on h2 and h3, and the packet
counters, in total and per peer (h1's tx to each of h2, h3; h2's and h3's rx from h1), move by at least the amounts
sent;
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

from fastflannel.service.metrics import Metrics

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
        from fastflannel.backend.peerlog import log_peers_summary

        log_peers_summary(blog, "vxlan", 100, 97, 2, 1, 0.5)  # a snapshot: one INFO line counts 97 + 2 peers
        log_peers_summary(blog, "vxlan", 3, 3, 0, 0, 0.1)  # a live batch: per-peer lines count, this is DEBUG
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
    assert v['fastflannel_peer_events_total{event="added"}'] == 1 + 97
    assert v['fastflannel_peer_events_total{event="removed"}'] == 2
    assert v['fastflannel_kernel_programming_errors_total{event="peer_failed"}'] == 1
    assert v['fastflannel_kernel_programming_errors_total{event="route_failed"}'] == 1
    assert v['fastflannel_etcd_reconnects_total{reason="recovered"}'] == 1
    assert v['fastflannel_etcd_reconnects_total{reason="failover"}'] == 1
    assert v["fastflannel_etcd_unavailable"] == 0
    assert not any(k.startswith("fastflannel_udp_") for k in v)  # no udp network registered


class _FakeFastPath:
    def peers(self):
        return {IPv4Address("10.0.0.2"): 1, IPv4Address("10.0.0.3"): 2}

    def peer_stats(self):
        zero = dict.fromkeys(("tx_packets", "tx_bytes", "tx_drop_send", "rx_packets", "rx_bytes",
                              "rx_drop_foreign_dest", "rx_drop_malformed", "rx_drop_ttl"), 0)
        return {IPv4Address("10.0.0.2"): {**zero, "tx_packets": 6, "tx_bytes": 500, "rx_packets": 7, "rx_bytes": 588,
                                          "rx_drop_ttl": 1},
                IPv4Address("10.0.0.3"): {**zero, "tx_packets": 4, "tx_bytes": 340, "tx_drop_send": 2},
                IPv4Address("0.0.0.0"): {**zero, "rx_packets": 1, "rx_bytes": 84}}


class _FakeNetwork:
    fastpath = _FakeFastPath()

    def stats(self):
        hist = {"tx_batch_packets": 10, "tx_batch_le_1": 1, "tx_batch_le_4": 2, "tx_batch_le_16": 0,
                "tx_batch_le_64": 1, "tx_batch_gt_64": 0, "rx_batch_packets": 7, "rx_batch_le_1": 7,
                "rx_batch_le_4": 0, "rx_batch_le_16": 0, "rx_batch_le_64": 0, "rx_batch_gt_64": 0}
        return {"tx_packets": 10, "tx_bytes": 840, "tx_batches": 4, "rx_packets": 7, "rx_bytes": 588,
                "rx_batches": 7, "tx_drop_no_route": 3, "rx_drop_unknown_peer": 2, "polls": 50, **hist}


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
    # per peer
    assert v['fastflannel_udp_peer_packets_total{direction="tx",peer="10.0.0.2"}'] == 6
    assert v['fastflannel_udp_peer_bytes_total{direction="tx",peer="10.0.0.3"}'] == 340
    assert v['fastflannel_udp_peer_packets_total{direction="rx",peer="10.0.0.2"}'] == 7
    assert v['fastflannel_udp_peer_packets_total{direction="rx",peer="other"}'] == 1
    assert v['fastflannel_udp_peer_drops_total{direction="tx",peer="10.0.0.3",reason="send"}'] == 2
    assert v['fastflannel_udp_peer_drops_total{direction="rx",peer="10.0.0.2",reason="ttl"}'] == 1
    assert v['fastflannel_udp_peer_drops_total{direction="rx",peer="10.0.0.2",reason="foreign_dest"}'] == 0
    # batch sizes: a histogram with cumulative le buckets; the per-bucket counters are not "other" events
    assert [v[f'fastflannel_udp_batch_size_bucket{{direction="tx",le="{le}"}}'] for le in
            ("1.0", "4.0", "16.0", "64.0", "+Inf")] == [1, 3, 3, 4, 4]
    assert v['fastflannel_udp_batch_size_count{direction="tx"}'] == 4 == v['fastflannel_udp_batches_total{direction="tx"}']
    assert v['fastflannel_udp_batch_size_sum{direction="tx"}'] == 10
    assert v['fastflannel_udp_batch_size_bucket{direction="rx",le="1.0"}'] == 7
    assert not any("batch_le" in k or "batch_packets" in k for k in v)


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
print("ready", flush=True)
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
    from waiting import wait_for

    tb = make_testbed(3)
    tb.put_config({"Network": "100.96.0.0/16", "Backend": {"Type": "udp"}})
    for i, h in enumerate(tb.hosts):
        # h1: a 6 s lease, kept alive every 2 s, so renewals show up in seconds
        h.start_daemon(f"--healthz-port={HEALTHZ_PORT}", env={"FASTFLANNEL_SUBNET_TTL": "6"} if i == 0 else {})
    a, b, c = [h.add_container() for h in tb.hosts]
    ha, hb, hc = tb.hosts
    wait_for(lambda: a.ping(b.ip, count=1, timeout=2), timeout=30, what="first ping a -> b")
    wait_for(lambda: a.ping(c.ip, count=1, timeout=2), timeout=30, what="first ping a -> c")
    v = wait_for(lambda: (lambda x: x if x['fastflannel_peer_events_total{event="added"}'] >= 2 else None)(scrape(ha)),
                 what="two peers counted on h1")
    assert v['fastflannel_lease_events_total{event="acquired"}'] == 1
    assert v["fastflannel_ready"] == 1
    assert v["fastflannel_udp_peers"] == 2
    assert sum(val for k, val in v.items() if k.startswith("fastflannel_udp_peer_routes{")) == 2

    before_a, before_b, before_c = scrape(ha), scrape(hb), scrape(hc)
    n_ping = 20
    n_udp = 300
    got = {}
    for dst in (b, c):
        res = a.ping_verbose(dst.ip, count=n_ping, timeout=30)
        assert res.returncode == 0, res.stdout
        recv = dst.popen([sys.executable, "-c", UDP_RECEIVER, str(n_udp)], stdout=subprocess.PIPE, text=True)
        assert recv.stdout.readline().strip() == "ready"  # bound before the first datagram is sent
        a.run([sys.executable, "-c", UDP_SENDER, str(dst.ip), str(n_udp)])
        got[dst.name] = int(recv.communicate(timeout=30)[0].strip() or 0)
        assert got[dst.name] >= n_udp * 0.9, f"only {got[dst.name]}/{n_udp} datagrams arrived at {dst}"
    after_a, after_b, after_c = scrape(ha), scrape(hb), scrape(hc)

    def delta(after, before, key):
        return after[key] - before.get(key, 0)

    tx = 'fastflannel_udp_packets_total{direction="tx"}'
    rx = 'fastflannel_udp_packets_total{direction="rx"}'
    # h1 sent n_ping echo requests and n_udp datagrams to each of h2, h3 and received n_ping replies from each;
    # h2 and h3 the mirror image
    assert delta(after_a, before_a, tx) >= 2 * (n_ping + n_udp)
    assert delta(after_a, before_a, rx) >= 2 * n_ping
    assert delta(after_b, before_b, rx) >= n_ping + got[b.name]
    assert delta(after_b, before_b, tx) >= n_ping
    # bytes: each inner packet is at least its payload plus IPv4 + ICMP/UDP headers
    assert delta(after_a, before_a, 'fastflannel_udp_bytes_total{direction="tx"}') >= 2 * (n_ping * 84 + n_udp * 128)
    assert delta(after_a, before_a, 'fastflannel_udp_batches_total{direction="tx"}') >= 1
    assert 'fastflannel_udp_drops_total{direction="rx",reason="unknown_peer"}' in after_b

    # per peer (keyed by PublicIP): h1's tx to each of h2 and h3, their rx from h1, h1's rx of the replies
    def peer(after, before, metric, d, host):
        return delta(after, before, f'fastflannel_udp_peer_{metric}_total{{direction="{d}",peer="{host.ip}"}}')

    for h, dst, after, before in ((hb, b, after_b, before_b), (hc, c, after_c, before_c)):
        assert peer(after_a, before_a, "packets", "tx", h) >= n_ping + n_udp, h
        assert peer(after_a, before_a, "bytes", "tx", h) >= n_ping * 84 + n_udp * 128, h
        assert peer(after_a, before_a, "packets", "rx", h) >= n_ping, h
        assert peer(after, before, "packets", "rx", ha) >= n_ping + got[dst.name], h
        assert peer(after, before, "bytes", "rx", ha) >= n_ping * 84 + got[dst.name] * 128, h
        assert peer(after, before, "packets", "tx", ha) >= n_ping, h
        assert after[f'fastflannel_udp_peer_drops_total{{direction="rx",peer="{ha.ip}",reason="ttl"}}'] == 0
    # h1 -> h2 traffic is not counted for h3 (nothing else talks to h3's peer h2 here)
    assert peer(after_c, before_c, "packets", "rx", hb) <= 2, "h3 saw traffic from h2"
    # batch sizes: a histogram whose count is the batches counter, with cumulative buckets
    for d in ("tx", "rx"):
        les = [after_a[f'fastflannel_udp_batch_size_bucket{{direction="{d}",le="{le}"}}']
               for le in ("1.0", "4.0", "16.0", "64.0", "+Inf")]
        assert les == sorted(les) and les[-1] == after_a[f'fastflannel_udp_batch_size_count{{direction="{d}"}}']
        assert les[-1] == after_a[f'fastflannel_udp_batches_total{{direction="{d}"}}']
        assert after_a[f'fastflannel_udp_batch_size_sum{{direction="{d}"}}'] >= les[-1]

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
