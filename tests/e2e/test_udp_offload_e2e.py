# SPDX-License-Identifier: Apache-2.0
"""udp backend with offloads (TUN TSO + UDP GSO, UDP GRO + coalescing) against per-packet peers, end to end.

3 hosts, real etcd: h1 runs with FASTFLANNEL_UDP_TUN_OFFLOAD=1 FASTFLANNEL_UDP_GRO=1, h2 with the defaults (offloads
on since they became the default), h3 with both off (the per-packet path). TCP transfers with matching sha256 in both directions between mixed peers and between
two offload peers; the counters show TSO reads of >= 20 segments during bulk TCP.
"""
from __future__ import annotations

import pytest
from cluster import HEALTHZ_PORT, fastpath_stats, network_config, wait_ping

from fastflannel.lab.measure import transfer_checksum

pytestmark = [pytest.mark.netns, pytest.mark.etcd, pytest.mark.ext]

ON = {"FASTFLANNEL_UDP_TUN_OFFLOAD": "1", "FASTFLANNEL_UDP_GRO": "1"}
OFF = {"FASTFLANNEL_UDP_TUN_OFFLOAD": "0", "FASTFLANNEL_UDP_GRO": "0"}
DEFAULT: dict = {}


def _transfer_ok(a, b, size_mb=50):
    res = transfer_checksum(a, b, size_mb=size_mb)
    assert res["sent_bytes"] == res["recv_bytes"] == str(size_mb << 20)
    assert res["sent_sha256"] == res["recv_sha256"]


def test_offload_and_per_packet_peers_interoperate(make_testbed):
    tb = make_testbed(3)
    tb.put_config(network_config("udp"))
    for h, env in zip(tb.hosts, (ON, DEFAULT, OFF)):
        h.start_daemon(f"--healthz-port={HEALTHZ_PORT}", env=env)
    for h in tb.hosts:
        h.wait_subnet_env(timeout=60)
    cs = [h.add_container() for h in tb.hosts]
    for a in cs:
        for b in cs:
            if a is not b:
                wait_ping(a, b.ip)
    on1, on2, off3 = tb.hosts
    assert "tun_offload=True" in on1.daemon_log_text()
    assert "tun_offload=True udp_gso=True udp_gro=True" in on2.daemon_log_text()  # the default
    assert "tun_offload=False" in off3.daemon_log_text()
    before = fastpath_stats(on1)
    _transfer_ok(cs[0], cs[2])  # offload sender -> per-packet receiver
    _transfer_ok(cs[2], cs[0])  # per-packet sender -> offload receiver (GRO on h1, coalesced writes)
    _transfer_ok(cs[0], cs[1])  # offload both ways
    _transfer_ok(cs[1], cs[0])
    st = fastpath_stats(on1)
    d = {k: st[k] - before.get(k, 0) for k in st}
    assert d["tx_tso_reads"] > 0 and d["tx_tso_segments"] >= 20 * d["tx_tso_reads"], d
    assert d["tx_gso_sends"] > 0, d
    assert d["rx_gro_receives"] > 0 and d["rx_coalesced_writes"] > 0, d
    assert d["rx_coalesced_packets"] >= 2 * d["rx_coalesced_writes"], d
    assert d["tx_drop_send"] == 0 and d["rx_drop_malformed"] == 0 and d["rx_drop_tun_write"] == 0, d
    assert fastpath_stats(off3)["tx_tso_reads"] == 0
