# SPDX-License-Identifier: Apache-2.0
"""The pure parts of the small-packet bench (fastflannel.lab.smallpkt, bench variants, paired ratios)."""
from __future__ import annotations

import json
import math

import pytest

from fastflannel.lab.bench import parse_variant
from fastflannel.lab.benchout import format_table, paired_ratios, summarize
from fastflannel.lab.smallpkt import loss_by_place, parse_netns_counters, parse_sockperf

SOCKPERF_OUT = """sockperf: [Total Run] RunTime=2.000 sec; Warm up time=400 msec; SentMessages=86934; ReceivedMessages=86933
sockperf: ========= Printing statistics for Server No: 0
sockperf: [Valid Duration] RunTime=1.550 sec; SentMessages=68362; ReceivedMessages=68360
sockperf: \x1b[2;35m====> avg-latency=11.321 (std-dev=33.702)\x1b[0m
sockperf: ---> <MAX> observation = 5494.476
sockperf: ---> percentile 99.999 = 4067.780
sockperf: ---> percentile 99.000 =   41.693
sockperf: ---> percentile 50.000 =    9.041
sockperf: ---> <MIN> observation =    7.990
"""


def test_parse_sockperf_takes_the_valid_duration_not_the_total_run() -> None:
    r = parse_sockperf(SOCKPERF_OUT)
    assert (r.seconds, r.sent, r.received) == (1.55, 68362, 68360)
    assert r.tps == pytest.approx(68360 / 1.55)
    assert r.p(50.0) == pytest.approx(9.041) and r.p(99.0) == pytest.approx(41.693)
    assert r.avg_us == pytest.approx(11.321)
    assert math.isnan(r.p(90.0))


def test_parse_sockperf_says_what_is_missing() -> None:
    with pytest.raises(ValueError, match="Valid Duration"):
        parse_sockperf("sockperf: ERROR: connect: Connection refused")


SNMP = """Ip: Forwarding DefaultTTL
Ip: 1 64
Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors InCsumErrors IgnoredMulti MemErrors
Udp: 100 2 7 50 5 1 0 0 0
UdpLite: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors InCsumErrors IgnoredMulti MemErrors
UdpLite: 0 0 0 0 0 0 0 0 0
"""
LINKS = json.dumps([
    {"ifname": "flannel0", "stats64": {"rx": {"packets": 10, "dropped": 1, "errors": 0},
                                       "tx": {"packets": 20, "dropped": 3, "errors": 0}}},
    {"ifname": "eth0", "stats": {"rx": {"packets": 7, "dropped": 0}, "tx": {"packets": 9, "dropped": 2}}},
])


def test_parse_netns_counters_reads_udp_mib_not_udplite_and_every_link() -> None:
    c = parse_netns_counters(SNMP, LINKS)
    assert c["udp.RcvbufErrors"] == 5 and c["udp.SndbufErrors"] == 1 and c["udp.InDatagrams"] == 100
    assert c["flannel0.tx_dropped"] == 3 and c["flannel0.rx_dropped"] == 1
    assert c["eth0.rx_packets"] == 7 and c["eth0.tx_dropped"] == 2
    assert parse_netns_counters("", "not json") == {}


def test_loss_by_place_accounts_every_datagram() -> None:
    # delivered is counted at the container's UDP layer, not eth0 (a coalesced UDP write crosses a veth once)
    delta = {"src": {"eth0.tx_dropped": 10},
             "dst": {"eth0.rx_packets": 9, "udp.InDatagrams": 50, "udp.RcvbufErrors": 650},
             "h1": {"flannel0.tx_dropped": 200, "udp.SndbufErrors": 5},
             "h2": {"udp.RcvbufErrors": 50, "flannel0.rx_dropped": 3}}
    lb = loss_by_place(1000, delta, fastpath_drops=2, backlog=4, tun="flannel0")
    assert lb["delivered"] == 700 and lb["lost"] == 300 and lb["loss_pct"] == pytest.approx(30.0)
    p = lb["places"]
    assert (p["sender_veth"], p["tun_queue"], p["sender_socket"], p["receiver_rcvbuf"], p["fastpath"],
            p["tun_write"], p["backlog"]) == (10, 200, 5, 50, 2, 3, 4)
    assert p["unaccounted"] == 300 - (10 + 200 + 5 + 50 + 2 + 3 + 4)
    assert sum(p.values()) == lb["lost"]
    assert lb["places_pct"]["tun_queue"] == pytest.approx(20.0)
    assert lb["app_rcvbuf"] == 650  # the sink's own overflow: delivered, not lost
    # no overlay device (host-gw): the TUN places are 0 whatever the counters say
    assert loss_by_place(1000, delta, 0, 0, tun="")["places"]["tun_queue"] == 0


def test_parse_variant() -> None:
    name, spec = parse_variant("udp-base=udp:PYTHONPATH=/tmp/b,FASTFLANNEL_UDP_SPIN=0")
    assert name == "udp-base" and spec["backend"] == "udp" and spec["user_space"]
    assert spec["env"] == {"PYTHONPATH": "/tmp/b", "FASTFLANNEL_UDP_SPIN": "0"}
    _, plain = parse_variant("p2=udp-plain:X=1")
    assert plain["env"]["FASTFLANNEL_UDP_GRO"] == "0" and plain["env"]["X"] == "1"  # the base mode's env kept
    for bad, msg in (("nomode", "NAME=MODE"), ("x=nosuch", "unknown mode"), ("udp=udp", "already a mode"),
                     ("x=udp:NOVALUE", "ENV=VALUE")):
        with pytest.raises(ValueError, match=msg):
            parse_variant(bad)


def test_paired_ratios_divide_within_a_round() -> None:
    # round 1 is slow for everyone, round 2 fast: per-round ratios are both 0.5, the ratio of medians is not
    runs = [{"mode": "vxlan", "rep": 1, "rr_tps": 1000.0}, {"mode": "udp", "rep": 1, "rr_tps": 500.0},
            {"mode": "vxlan", "rep": 2, "rr_tps": 4000.0}, {"mode": "udp", "rep": 2, "rr_tps": 2000.0},
            {"mode": "vxlan", "rep": 3, "rr_tps": 3000.0}, {"mode": "udp", "rep": 3, "rr_tps": 600.0}]
    pr = paired_ratios(runs, ["vxlan", "udp"])
    assert pr["udp"]["rr_tps"]["median"] == pytest.approx(0.5)
    assert pr["udp"]["rr_tps"]["min"] == pytest.approx(0.2) and pr["udp"]["rr_tps"]["n"] == 3
    assert pr["vxlan"]["rr_tps"]["median"] == pytest.approx(1.0)
    table = format_table(summarize(runs, ["vxlan", "udp"]), ["vxlan", "udp"], runs=runs)
    assert "median of per-round ratios" in table and "x0.50" in table
    assert "TCP 1 stream" not in table  # rows nobody measured are left out
