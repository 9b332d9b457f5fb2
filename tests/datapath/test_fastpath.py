# SPDX-License-Identifier: Apache-2.0
"""Test the fast path (tier 1): both implementations, socketpairs standing in for the TUN, UDP on loopback.

Every test runs over ["cython", "python"]; the cython cases skip with a reason if the extension is not built.
The oracle tests feed hypothesis-made packets to both implementations and require identical output bytes and
identical counters. Loop tests use 127.0.0.0/8 only: the peer socket sits on 127.0.0.2, a stranger on 127.0.0.3.
"""
from __future__ import annotations

import errno
import os
import socket
import time
from ipaddress import IPv4Address, IPv4Network
from typing import Iterator, List, Tuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from fastpath_rig import NETWORK, OTHER, PEER, PEER2, REMOTE, STRANGER, TIMEOUT, TUN_IP, Rig, make
from impls import HAVE_CYTHON, IMPLS, needs_cython
from packets import ipv4_packet

from fastflannel.datapath import fastpath
from fastflannel.datapath.contract import batch_bucket
from fastflannel.datapath.fastpath import COUNTER_NAMES, PEER_COUNTER_NAMES, FastPath, FastPathError, FastPathOptions
from fastflannel.lab.soak import proc_sample

BUCKETS = ("le_1", "le_4", "le_16", "le_64", "gt_64")


@pytest.fixture(params=IMPLS)
def impl(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def rig(impl: str, request: pytest.FixtureRequest) -> Iterator[Rig]:
    r = Rig(impl, threads=request.param)
    try:
        yield r
    finally:
        r.close()


# --- configuration ---------------------------------------------------------------------------------------

def test_implementation_selection() -> None:
    assert fastpath.IMPLEMENTATION in ("cython", "python")
    if os.environ.get("FASTFLANNEL_NO_EXTENSIONS", "") not in ("", "0"):
        assert fastpath.IMPLEMENTATION == "python"
    elif HAVE_CYTHON:
        assert fastpath.IMPLEMENTATION == "cython"


@pytest.mark.parametrize("kwargs, match", [
    (dict(network=IPv4Network("10.0.0.0/8"), subnet_len=31, own_subnet=IPv4Network("10.0.0.0/31")), "2097152|entries"),
    (dict(network=NETWORK, subnet_len=16, own_subnet=NETWORK), "longer"),
    (dict(network=NETWORK, subnet_len=24, own_subnet=IPv4Network("10.9.1.0/24")), "inside"),
    (dict(network=NETWORK, subnet_len=24, own_subnet=IPv4Network("10.244.1.0/25")), "inside"),
])
def test_config_rejected(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        FastPath(0, 0, tun_ip=TUN_IP, mtu=1472, **kwargs)


def test_largest_table_accepted(impl: str) -> None:
    with FastPath(0, 0, network=IPv4Network("10.0.0.0/8"), subnet_len=30, own_subnet=IPv4Network("10.0.0.4/30"),
                  tun_ip=IPv4Address("10.0.0.4"), mtu=1472, options=FastPathOptions(implementation=impl)) as fp:
        fp.set_route(IPv4Network("10.255.255.252/30"), PEER)
        pkt = ipv4_packet("10.0.0.5", "10.255.255.253")
        assert fp.process_outbound(pkt)[0] == "send"


def test_route_validation_and_mirror(impl: str) -> None:
    with make(impl) as fp:
        with pytest.raises(ValueError, match="not a /24"):
            fp.set_route(IPv4Network("10.245.0.0/24"), PEER)
        with pytest.raises(ValueError, match="not a /24"):
            fp.set_route(IPv4Network("10.244.2.0/25"), PEER)
        with pytest.raises(ValueError, match="peer"):
            fp.set_route(REMOTE, IPv4Address("0.0.0.0"))
        fp.set_route(REMOTE, PEER)
        fp.set_route(REMOTE, PEER)  # idempotent
        fp.set_route(OTHER, PEER)
        assert fp.routes() == {REMOTE: PEER, OTHER: PEER}
        assert fp.peers() == {PEER: 2}
        fp.set_route(OTHER, STRANGER)
        assert fp.peers() == {PEER: 1, STRANGER: 1}
        fp.del_route(REMOTE)
        fp.del_route(REMOTE)  # idempotent
        assert fp.routes() == {OTHER: STRANGER} and fp.peers() == {STRANGER: 1}
        # the peer refcount drives the source check
        assert fp.process_inbound(PEER, ipv4_packet("10.244.3.1", "10.244.1.1"))[0] == "drop:unknown_peer"
        assert fp.process_inbound(STRANGER, ipv4_packet("10.244.3.1", "10.244.1.1"))[0] == "write"
    fp.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        fp.set_route(REMOTE, PEER)


# --- per-packet rules, one implementation at a time --------------------------------------------------------

def test_outbound_rules(impl: str) -> None:
    with make(impl) as fp:
        fp.set_route(REMOTE, PEER)
        pkt = ipv4_packet("10.244.1.5", "10.244.2.7", ttl=64)
        verdict, out, nh = fp.process_outbound(pkt)
        assert verdict == "send" and nh == PEER and out is not None
        assert out[8] == 63 and out[:8] == pkt[:8] and out[12:] == pkt[12:]
        assert fp.process_outbound(ipv4_packet("10.244.1.5", "10.244.2.7", ttl=1)) == ("drop:ttl", None, None)
        v, icmp, nh = fp.process_outbound(ipv4_packet("10.244.1.5", "10.244.3.7"))
        assert v == "icmp" and nh is None and icmp is not None and icmp[16:20] == IPv4Address("10.244.1.5").packed
        assert icmp[12:16] == TUN_IP.packed
        assert fp.process_outbound(ipv4_packet("10.244.1.5", "192.0.2.1"))[0] == "icmp"  # outside the network
        assert fp.process_outbound(ipv4_packet("10.244.1.5", "10.244.3.7", proto=1)) == ("drop:no_route", None, None)
        assert fp.process_outbound(pkt[:-1]) == ("drop:malformed", None, None)
        s = fp.stats()
        assert (s["tx_packets"], s["tx_bytes"], s["tx_drop_ttl"], s["tx_drop_no_route"], s["tx_icmp_unreach"],
                s["tx_drop_malformed"]) == (1, len(pkt), 1, 3, 2, 1)


def test_echo_request_to_unleased_subnet_gets_a_rate_limited_net_unreachable(impl: str) -> None:
    """Issue 14: an echo request to a subnet no host holds is answered with Destination Net Unreachable (at most
    one per ICMP_ECHO_UNREACH_GAP_NS); never an ICMP error about an ICMP error (RFC 1122 3.2.2) or an echo reply;
    TCP/UDP keep their unreachable on every packet."""
    from fastflannel.datapath.contract import ICMP_ECHO_UNREACH_GAP_NS

    echo = ipv4_packet("10.244.1.5", "10.244.3.7", proto=1, payload=b"\x08\x00\xf7\xff\x00\x00\x00\x00")
    with make(impl) as fp:
        v, icmp, _ = fp.process_outbound(echo)
        assert v == "icmp" and icmp[20:22] == b"\x03\x00" and icmp[28:] == echo[:28]
        assert fp.process_outbound(echo) == ("drop:no_route", None, None)  # within the gap: rate-limited
        time.sleep(ICMP_ECHO_UNREACH_GAP_NS / 1e9 + 0.01)
        assert fp.process_outbound(echo)[0] == "icmp"
        for icmp_type in (0, 3, 11):  # echo reply, destination unreachable, time exceeded: never
            time.sleep(ICMP_ECHO_UNREACH_GAP_NS / 1e9 + 0.01)
            other = ipv4_packet("10.244.1.5", "10.244.3.7", proto=1, payload=bytes([icmp_type]) + b"\0" * 7)
            assert fp.process_outbound(other) == ("drop:no_route", None, None), icmp_type
        udp = ipv4_packet("10.244.1.5", "10.244.3.7")
        assert [fp.process_outbound(udp)[0] for _ in range(3)] == ["icmp"] * 3  # not rate-limited
        assert fp.stats()["tx_icmp_unreach"] == 5


def test_inbound_rules(impl: str) -> None:
    with make(impl) as fp:
        fp.set_route(REMOTE, PEER)
        pkt = ipv4_packet("10.244.2.7", "10.244.1.5", ttl=2)
        verdict, out = fp.process_inbound(PEER, pkt)
        assert verdict == "write" and out is not None and out[8] == 1
        assert fp.process_inbound(STRANGER, pkt) == ("drop:unknown_peer", None)
        assert fp.process_inbound(PEER, ipv4_packet("10.244.2.7", "10.244.3.5")) == ("drop:foreign_dest", None)
        assert fp.process_inbound(PEER, ipv4_packet("10.244.2.7", "8.8.8.8")) == ("drop:foreign_dest", None)
        assert fp.process_inbound(PEER, ipv4_packet("10.244.2.7", "10.244.1.5", ttl=1)) == ("drop:ttl", None)
        assert fp.process_inbound(PEER, b"\x60" + pkt[1:]) == ("drop:malformed", None)
        assert fp.process_inbound(PEER, b"") == ("drop:malformed", None)
        s = fp.stats()
        assert (s["rx_packets"], s["rx_bytes"], s["rx_drop_unknown_peer"], s["rx_drop_foreign_dest"],
                s["rx_drop_ttl"], s["rx_drop_malformed"]) == (1, len(pkt), 1, 2, 1, 2)


def test_inbound_checks_can_be_switched_off(impl: str) -> None:
    with make(impl, check_peer_source=False, check_inner_dest=False) as fp:
        assert fp.process_inbound(STRANGER, ipv4_packet("10.244.2.7", "8.8.8.8"))[0] == "write"
        assert fp.process_inbound(STRANGER, b"\x45")[0] == "drop:malformed"  # validation has no switch


def test_batch_entry_points(impl: str) -> None:
    with make(impl) as fp:
        fp.set_route(REMOTE, PEER)
        good = ipv4_packet("10.244.1.5", "10.244.2.7")
        assert fp.process_outbound_batch([good, good[:10], good]) == 2
        assert fp.process_inbound_batch(PEER, [ipv4_packet("10.244.2.7", "10.244.1.5")] * 3) == 3
        s = fp.stats()
        assert s["tx_packets"] == 2 and s["tx_drop_malformed"] == 1 and s["tx_batches"] == 1
        assert s["rx_packets"] == 3 and s["rx_batches"] == 1
    with make(impl, batch=2) as fp:
        fp.set_route(REMOTE, PEER)
        assert fp.process_outbound_batch([good] * 5) == 5
        assert fp.stats()["tx_batches"] == 3


def test_stats_keys(impl: str) -> None:
    with make(impl) as fp:
        s = fp.stats()
    assert list(s) == list(COUNTER_NAMES) and all(v == 0 for v in s.values())
    for key in ("tx_packets", "tx_bytes", "tx_syscalls", "tx_batches", "tx_drop_no_route", "tx_drop_ttl",
                "tx_drop_malformed", "tx_icmp_unreach", "rx_packets", "rx_bytes", "rx_syscalls", "rx_batches",
                "rx_drop_unknown_peer", "rx_drop_foreign_dest", "rx_drop_malformed", "rx_drop_ttl",
                "rx_drop_tun_write"):
        assert key in s


def test_peer_counters_rules(impl: str) -> None:
    """Per-peer counters: tx by next hop, rx by outer source, drops by reason; a deleted peer's counters vanish,
    a returning peer starts from 0; unknown sources accepted with the check off land under 0.0.0.0."""
    with make(impl) as fp:
        fp.set_route(REMOTE, PEER)
        fp.set_route(OTHER, PEER2)
        fp.set_route(IPv4Network("10.244.4.0/24"), PEER2)
        to_remote = ipv4_packet("10.244.1.5", "10.244.2.7", payload=b"a" * 10)
        to_other = ipv4_packet("10.244.1.5", "10.244.3.7", payload=b"b" * 30)
        to_4 = ipv4_packet("10.244.1.5", "10.244.4.7", payload=b"c" * 50)
        for pkt in (to_remote, to_other, to_other, to_4):
            assert fp.process_outbound(pkt)[0] == "send"
        assert fp.process_outbound(ipv4_packet("10.244.1.5", "10.244.2.7", ttl=1))[0] == "drop:ttl"  # total only
        back = ipv4_packet("10.244.2.7", "10.244.1.5", payload=b"d" * 20)
        assert fp.process_inbound(PEER, back)[0] == "write"
        assert fp.process_inbound(PEER, ipv4_packet("10.244.2.7", "10.244.9.9"))[0] == "drop:foreign_dest"
        assert fp.process_inbound(PEER2, ipv4_packet("10.244.3.7", "10.244.1.5", ttl=1))[0] == "drop:ttl"
        assert fp.process_inbound(PEER2, b"\x45\x00")[0] == "drop:malformed"
        assert fp.process_inbound(STRANGER, back)[0] == "drop:unknown_peer"  # no peer: the total only
        ps = fp.peer_stats()
        assert set(ps) == {PEER, PEER2} and list(ps[PEER]) == list(PEER_COUNTER_NAMES)
        assert ps[PEER] == {"tx_packets": 1, "tx_bytes": len(to_remote), "tx_drop_send": 0, "rx_packets": 1,
                            "rx_bytes": len(back), "rx_drop_foreign_dest": 1, "rx_drop_malformed": 0,
                            "rx_drop_ttl": 0}
        assert ps[PEER2] == {"tx_packets": 3, "tx_bytes": 2 * len(to_other) + len(to_4), "tx_drop_send": 0,
                             "rx_packets": 0, "rx_bytes": 0, "rx_drop_foreign_dest": 0, "rx_drop_malformed": 1,
                             "rx_drop_ttl": 1}
        fp.del_route(OTHER)  # PEER2 keeps a route: its counters stay
        assert fp.peer_stats()[PEER2]["tx_packets"] == 3
        fp.del_route(IPv4Network("10.244.4.0/24"))  # its last route: it vanishes
        assert set(fp.peer_stats()) == {PEER}
        fp.set_route(OTHER, PEER2)  # back, with fresh counters (its id may be reused)
        assert fp.peer_stats()[PEER2]["tx_packets"] == 0
        fp.set_route(REMOTE, PEER2)  # REMOTE moves: PEER's last route, PEER2 counts what goes to REMOTE now
        assert fp.process_outbound(to_remote)[2] == PEER2
        assert set(fp.peer_stats()) == {PEER2} and fp.peer_stats()[PEER2]["tx_packets"] == 1
    with make(impl, check_peer_source=False) as fp:
        fp.set_route(REMOTE, PEER)
        assert fp.process_inbound(STRANGER, back)[0] == "write"
        assert fp.process_inbound(PEER, back)[0] == "write"
        ps = fp.peer_stats()
        assert ps[IPv4Address(0)]["rx_packets"] == 1 and ps[PEER]["rx_packets"] == 1
    with pytest.raises(ValueError, match="closed"):
        fp.peer_stats()


def test_batch_histogram(impl: str) -> None:
    """process_*_batch counts one burst per loop-sized chunk, in buckets <=1, <=4, <=16, <=64, >64 (not cumulative)."""
    assert [batch_bucket(n) for n in (0, 1, 2, 4, 5, 16, 17, 64, 65, 4096)] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    with make(impl, batch=100) as fp:
        fp.set_route(REMOTE, PEER)
        good = ipv4_packet("10.244.1.5", "10.244.2.7")
        for n in (1, 3, 4, 10, 40, 64, 65, 100, 150):  # 150: chunks of 100 and 50
            fp.process_outbound_batch([good] * n)
        fp.process_inbound_batch(PEER, [ipv4_packet("10.244.2.7", "10.244.1.5")] * 2)
        s = fp.stats()
    assert [s[f"tx_batch_{b}"] for b in BUCKETS] == [1, 2, 1, 3, 3]
    assert s["tx_batch_packets"] == 1 + 3 + 4 + 10 + 40 + 64 + 65 + 100 + 150 == s["tx_packets"]
    assert [s[f"rx_batch_{b}"] for b in BUCKETS] == [0, 1, 0, 0, 0] and s["rx_batch_packets"] == 2
    check_histogram(s)


# --- the oracle: cython and python agree on bytes and counters ----------------------------------------------

ADDRS = st.one_of(
    st.sampled_from(["10.244.1.5", "10.244.2.7", "10.244.3.9", "10.244.255.255", "10.244.0.0", "10.245.0.1",
                     "192.0.2.1", "0.0.0.0", "255.255.255.255"]),
    st.integers(0, 2**32 - 1).map(lambda i: str(IPv4Address(i))),
)
WELL_FORMED = st.builds(
    lambda src, dst, proto, ttl, frag, opts, payload: ipv4_packet(src, dst, proto=proto, ttl=ttl, frag=frag,
                                                                  options=opts, payload=payload),
    ADDRS, ADDRS, st.sampled_from([1, 6, 17, 47, 255]), st.integers(0, 255),
    st.sampled_from([0, 0x2000, 0x4000, 0x0001, 0x1FFF, 0x3FFF]), st.binary(max_size=40),
    st.binary(max_size=64))


@st.composite
def packets(draw) -> bytes:  # type: ignore[no-untyped-def]
    """Draw well-formed packets, and damaged ones: truncated, padded, random bytes, wrong version/IHL."""
    pkt = draw(WELL_FORMED)
    damage = draw(st.sampled_from(["none", "none", "none", "truncate", "pad", "random", "byte0", "length"]))
    if damage == "truncate":
        pkt = pkt[:draw(st.integers(0, len(pkt)))]
    elif damage == "pad":
        pkt += draw(st.binary(min_size=1, max_size=8))
    elif damage == "random":
        pkt = draw(st.binary(max_size=80))
    elif damage == "byte0":
        pkt = bytes([draw(st.integers(0, 255))]) + pkt[1:]
    elif damage == "length":
        pkt = pkt[:2] + draw(st.integers(0, 0xFFFF)).to_bytes(2, "big") + pkt[4:]
    return pkt


def _pair(**opts: object) -> Tuple[FastPath, FastPath]:
    pair = (make("cython", **opts), make("python", **opts))
    for fp in pair:
        fp.set_route(REMOTE, PEER)
        fp.set_route(IPv4Network("10.244.255.0/24"), STRANGER)
    return pair


oracle_settings = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@needs_cython
@oracle_settings
@given(st.lists(packets(), min_size=1, max_size=8))
def test_oracle_outbound(pkts: List[bytes]) -> None:
    c, p = _pair()
    with c, p:
        for pkt in pkts:
            assert c.process_outbound(pkt) == p.process_outbound(pkt), pkt.hex()
        assert c.stats() == p.stats()
        assert c.peer_stats() == p.peer_stats()
        assert c.process_outbound_batch(pkts) == p.process_outbound_batch(pkts)
        assert c.stats() == p.stats()
        assert c.peer_stats() == p.peer_stats()
        check_histogram(c.stats())
        check_peer_sums(c)


@needs_cython
@oracle_settings
@given(st.lists(st.tuples(st.sampled_from([PEER, STRANGER, IPv4Address("127.0.0.9")]), packets()),
                min_size=1, max_size=8), st.booleans(), st.booleans())
def test_oracle_inbound(items: List[Tuple[IPv4Address, bytes]], check_peer: bool, check_dest: bool) -> None:
    c, p = _pair(check_peer_source=check_peer, check_inner_dest=check_dest)
    with c, p:
        for src, pkt in items:
            assert c.process_inbound(src, pkt) == p.process_inbound(src, pkt), pkt.hex()
        assert c.stats() == p.stats()
        assert c.peer_stats() == p.peer_stats()
        src = items[0][0]
        assert c.process_inbound_batch(src, [x for _, x in items]) == p.process_inbound_batch(src, [x for _, x in items])
        assert c.stats() == p.stats()
        assert c.peer_stats() == p.peer_stats()
        check_histogram(c.stats())
        check_peer_sums(c)


def check_histogram(s: dict) -> None:
    """The batch-size buckets add up to the batches, per direction."""
    for d in ("tx", "rx"):
        assert sum(s[f"{d}_batch_{b}"] for b in BUCKETS) == s[f"{d}_batches"], s


def check_peer_sums(fp: FastPath) -> None:
    """The per-peer counters (other bucket included) add up to the totals they break down."""
    s, ps = fp.stats(), fp.peer_stats()
    for name in PEER_COUNTER_NAMES:
        assert sum(p[name] for p in ps.values()) == s[name], (name, s, ps)


@needs_cython
@oracle_settings
@given(st.lists(st.tuples(st.booleans(), st.sampled_from([PEER, STRANGER, PEER2, IPv4Address("127.0.0.9")]),
                          packets()), min_size=1, max_size=12),
       st.lists(st.tuples(st.sampled_from(["10.244.2.0/24", "10.244.3.0/24", "10.244.255.0/24"]),
                          st.sampled_from([None, PEER, STRANGER, PEER2])), max_size=4),
       st.booleans(), st.integers(1, 4))
def test_oracle_peer_counters(items: List[Tuple[bool, IPv4Address, bytes]],
                              changes: List[Tuple[str, IPv4Address | None]], check_peer: bool, batch: int) -> None:
    """Both directions, route changes between packets (peers come, go and come back with fresh counters)."""
    c, p = _pair(check_peer_source=check_peer, batch=batch)
    with c, p:
        for i, (outbound, src, pkt) in enumerate(items):
            if i < len(changes):
                subnet, nh = changes[i]
                for fp in (c, p):
                    fp.del_route(IPv4Network(subnet)) if nh is None else fp.set_route(IPv4Network(subnet), nh)
                assert c.peers() == p.peers()
            if outbound:
                assert c.process_outbound(pkt) == p.process_outbound(pkt), pkt.hex()
            else:
                assert c.process_inbound(src, pkt) == p.process_inbound(src, pkt), pkt.hex()
            assert c.peer_stats() == p.peer_stats()
        outs = [x for o, _, x in items if o]
        assert c.process_outbound_batch(outs) == p.process_outbound_batch(outs)
        ins = [x for o, _, x in items if not o]
        assert c.process_inbound_batch(items[0][1], ins) == p.process_inbound_batch(items[0][1], ins)
        assert c.stats() == p.stats()
        assert c.peer_stats() == p.peer_stats()
        assert set(c.peer_stats()) - {IPv4Address(0)} == set(c.peers())


# --- the running loop ---------------------------------------------------------------------------------------

def test_forward_both_ways(rig: Rig) -> None:
    rig.fp.set_route(REMOTE, PEER)
    rig.fp.start()
    out = [ipv4_packet("10.244.1.5", "10.244.2.7", payload=bytes([i]) * (i * 20)) for i in range(50)]
    for pkt in out:
        rig.tun.send(pkt)
    for pkt in out:
        data, addr = rig.peer.recvfrom(70000)
        assert addr == ("127.0.0.1", rig.port)
        assert data[8] == 63 and data[12:] == pkt[12:]
    back = [ipv4_packet("10.244.2.7", "10.244.1.5", payload=bytes([i]) * i) for i in range(50)]
    for pkt in back:
        rig.from_peer(pkt)
    for pkt in back:
        data = rig.tun.recv(70000)
        assert data[8] == 63 and data[12:] == pkt[12:]
    rig.wait_for(lambda: rig.fp.stats()["tx_packets"] == 50 and rig.fp.stats()["rx_packets"] == 50, "counters")
    s = rig.fp.stats()
    assert s["tx_bytes"] == sum(map(len, out)) and s["rx_bytes"] == sum(map(len, back))
    assert s["tx_batches"] >= 1 and s["rx_batches"] >= 1 and s["tx_syscalls"] >= 2 and s["polls"] >= 2
    rig.fp.check()


def test_peer_counters_in_loop(rig: Rig) -> None:
    """Traffic to and from two peers: each peer's counters move by exactly what was sent to it / came from it."""
    peer2 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        peer2.bind((str(PEER2), rig.port))
        peer2.settimeout(TIMEOUT)
        rig.fp.set_route(REMOTE, PEER)
        rig.fp.set_route(OTHER, PEER2)
        rig.fp.start()
        n1, n2 = 37, 90
        to1 = [ipv4_packet("10.244.1.5", "10.244.2.7", payload=bytes(i % 200)) for i in range(n1)]
        to2 = [ipv4_packet("10.244.1.5", "10.244.3.7", payload=bytes(2 * i % 300)) for i in range(n2)]
        for i in range(max(n1, n2)):
            for lst in (to1, to2):
                if i < len(lst):
                    rig.tun.send(lst[i])
        for _ in range(n1):
            rig.peer.recvfrom(70000)
        for _ in range(n2):
            peer2.recvfrom(70000)
        from1 = [ipv4_packet("10.244.2.7", "10.244.1.5", payload=bytes(i)) for i in range(25)]
        from2 = [ipv4_packet("10.244.3.7", "10.244.1.5", payload=bytes(i + 1)) for i in range(15)]
        for pkt in from1:
            rig.from_peer(pkt)
        for pkt in from2:
            rig.from_peer(pkt, sender=peer2)
        rig.from_peer(ipv4_packet("10.244.3.7", "10.244.8.1"), sender=peer2)  # foreign destination: a drop of PEER2
        for _ in range(len(from1) + len(from2)):
            rig.tun.recv(70000)
        rig.wait_for(lambda: rig.fp.stats()["rx_packets"] == 40 and rig.fp.stats()["rx_drop_foreign_dest"] == 1,
                     "rx counted")
        ps = rig.fp.peer_stats()
        assert (ps[PEER]["tx_packets"], ps[PEER]["tx_bytes"]) == (n1, sum(map(len, to1)))
        assert (ps[PEER2]["tx_packets"], ps[PEER2]["tx_bytes"]) == (n2, sum(map(len, to2)))
        assert (ps[PEER]["rx_packets"], ps[PEER]["rx_bytes"]) == (len(from1), sum(map(len, from1)))
        assert (ps[PEER2]["rx_packets"], ps[PEER2]["rx_bytes"]) == (len(from2), sum(map(len, from2)))
        assert ps[PEER2]["rx_drop_foreign_dest"] == 1 and ps[PEER]["rx_drop_foreign_dest"] == 0
        s = rig.fp.stats()
        check_histogram(s)
        assert s["tx_batch_packets"] == n1 + n2 and s["rx_batch_packets"] == 41  # every packet read is in a burst
        check_peer_sums(rig.fp)
    finally:
        peer2.close()


@needs_cython
def test_peer_counters_in_offload_loop() -> None:
    """The offload loop (virtio headers on the TUN socketpair, a TSO super-packet split and sent with UDP_SEGMENT,
    UDP_GRO on the socket) counts per peer and per burst like the plain one."""
    from vnet import tso_read  # 10.5.1.7 -> 10.5.2.9

    tun_loop, tun = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    port = udp.getsockname()[1]
    peers = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]
    tun.settimeout(TIMEOUT)
    fp = FastPath(tun_loop.fileno(), udp.fileno(), network=IPv4Network("10.5.0.0/16"), subnet_len=24,
                  own_subnet=IPv4Network("10.5.1.0/24"), tun_ip=IPv4Address("10.5.1.0"), mtu=1472, port=port,
                  options=FastPathOptions(implementation="cython", tun_offload=True, udp_gro=True, threads=1))
    try:
        for s_, ip in zip(peers, (PEER, PEER2)):
            s_.bind((str(ip), port))
            s_.settimeout(TIMEOUT)
        fp.set_route(IPv4Network("10.5.2.0/24"), PEER)
        fp.set_route(IPv4Network("10.5.3.0/24"), PEER2)
        fp.start()
        payload = bytes(range(256)) * 40  # 10240 bytes: 8 segments of 1400 (last shorter)
        tun.send(tso_read(payload, 1400, seq=1000, flags=0x18, ip_id=7, options=b"", bogus_hdr_len=False))
        small = [ipv4_packet("10.5.1.7", "10.5.3.9", payload=bytes(i)) for i in range(5)]
        for pkt in small:
            tun.send(bytes(10) + pkt)
        got1 = [peers[0].recvfrom(70000)[0] for _ in range(8)]
        got2 = [peers[1].recvfrom(70000)[0] for _ in range(5)]
        for pkt in [ipv4_packet("10.5.2.9", "10.5.1.7", payload=bytes(i)) for i in range(6)]:
            peers[0].sendto(pkt, ("127.0.0.1", port))
        peers[1].sendto(ipv4_packet("10.5.3.9", "10.5.1.7", ttl=1), ("127.0.0.1", port))
        for _ in range(6):
            assert tun.recv(70000)[:10] == bytes(10)
        deadline = time.monotonic() + TIMEOUT
        while fp.stats()["rx_packets"] < 6 or fp.stats()["rx_drop_ttl"] < 1:
            fp.check()
            assert time.monotonic() < deadline, fp.stats()
            time.sleep(0.002)
        ps, s = fp.peer_stats(), fp.stats()
        assert (ps[PEER]["tx_packets"], ps[PEER]["tx_bytes"]) == (8, sum(map(len, got1)))
        assert (ps[PEER2]["tx_packets"], ps[PEER2]["tx_bytes"]) == (5, sum(map(len, small)))
        assert ps[PEER]["rx_packets"] == 6 and ps[PEER2]["rx_drop_ttl"] == 1 and ps[PEER2]["rx_packets"] == 0
        check_histogram(s)
        assert s["tx_tso_segments"] == 8 and s["tx_batch_packets"] == 13 and s["rx_batch_packets"] == 7
        check_peer_sums(fp)
    finally:
        fp.close()
        for s_ in (tun_loop, tun, udp, *peers):
            s_.close()


def test_inbound_drops_in_loop(rig: Rig) -> None:
    rig.fp.set_route(REMOTE, PEER)
    rig.fp.start()
    stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        stranger.bind((str(STRANGER), 0))
        rig.from_peer(ipv4_packet("10.244.2.7", "10.244.1.5"), sender=stranger)
        rig.from_peer(ipv4_packet("10.244.2.7", "10.244.7.5"))  # no open relay
        rig.from_peer(b"\x45\x00")
        rig.wait_for(lambda: rig.fp.stats()["rx_drop_malformed"] == 1 and rig.fp.stats()["rx_drop_unknown_peer"] == 1
                     and rig.fp.stats()["rx_drop_foreign_dest"] == 1, "drops")
        rig.from_peer(ipv4_packet("10.244.2.7", "10.244.1.5"))
        assert rig.tun.recv(70000)[16:20] == IPv4Address("10.244.1.5").packed
        rig.wait_for(lambda: rig.fp.stats()["rx_packets"] == 1, "rx_packets")  # counted after the write
    finally:
        stranger.close()


def test_route_update_while_running(rig: Rig) -> None:
    """No route -> ICMP net-unreachable; set_route -> forwarded; del_route -> ICMP again; all without a stop."""
    rig.fp.start()
    pkt = ipv4_packet("10.244.1.5", "10.244.2.7", proto=6, payload=b"0123456789")
    rig.tun.send(pkt)
    icmp = rig.tun.recv(200)
    assert icmp[9] == 1 and icmp[20:22] == b"\x03\x00" and icmp[28:] == pkt[:28]
    assert icmp[12:16] == TUN_IP.packed and icmp[16:20] == pkt[12:16]
    rig.fp.set_route(REMOTE, PEER)
    rig.tun.send(pkt)
    data, _ = rig.peer.recvfrom(70000)
    assert data[16:20] == pkt[16:20]
    rig.from_peer(ipv4_packet("10.244.2.7", "10.244.1.5"))  # the peer is now accepted
    assert rig.tun.recv(200)[12:16] == IPv4Address("10.244.2.7").packed
    rig.fp.del_route(REMOTE)
    rig.tun.send(pkt)
    assert rig.tun.recv(200)[20:22] == b"\x03\x00"
    rig.from_peer(ipv4_packet("10.244.2.7", "10.244.1.5"))  # and no longer
    rig.wait_for(lambda: rig.fp.stats()["rx_drop_unknown_peer"] == 1, "unknown peer drop")
    s = rig.fp.stats()
    assert s["tx_icmp_unreach"] == 2 and s["tx_packets"] == 1 and s["ctl_commands"] >= 4
    assert rig.fp.routes() == {}


def test_batched_route_update_while_running(rig: Rig) -> None:
    """update_routes: hundreds of routes (several ctl chunks) in one call while the loop runs; a bad change fails
    alone; every route is in effect when it returns; a batch of deletes takes every peer back out."""
    from fastflannel.datapath.fastpath import CTL_CHUNK

    rig.fp.start()
    subnets = [IPv4Network(f"10.244.{i}.0/24") for i in range(2, 255)]
    changes = [(s, IPv4Address(f"10.99.{i // 250}.{i % 250 + 1}")) for i, s in enumerate(subnets[:-1])]
    changes.insert(100, (IPv4Network("10.245.0.0/24"), PEER))  # outside the network
    changes.append((subnets[-1], PEER))
    before = rig.fp.stats()["ctl_commands"]
    errors = rig.fp.update_routes(changes)
    assert [i for i, e in enumerate(errors) if e is not None] == [100] and "not a /24" in str(errors[100])
    assert len(changes) * 2 > 3 * CTL_CHUNK  # a peer and a route command each: several round trips
    assert rig.fp.stats()["ctl_commands"] - before == 2 * (len(changes) - 1)
    assert len(rig.fp.routes()) == len(subnets) and len(rig.fp.peers()) == len(subnets)
    pkt = ipv4_packet("10.244.1.5", "10.244.254.7", proto=6, payload=b"batched")
    rig.tun.send(pkt)  # the last route of the batch is in effect when update_routes returns
    data, _ = rig.peer.recvfrom(70000)
    assert data[16:20] == pkt[16:20]
    assert rig.fp.update_routes([(s, None) for s in subnets]) == [None] * len(subnets)
    assert rig.fp.routes() == {} and rig.fp.peers() == {}
    rig.tun.send(pkt)
    assert rig.tun.recv(200)[20:22] == b"\x03\x00"  # net unreachable again


def test_batch_reuses_a_freed_peer_id_only_after_its_delete_is_synced(impl: str) -> None:
    """A peer id freed inside a batch is not handed to another peer in the same batch: the loop may still count
    under the old id until the batch's delete is applied (the per-peer counters would mix)."""
    with make(impl) as fp:
        fp.update_routes([(REMOTE, PEER)])
        old_id = fp._peer_ids[int(PEER)]
        assert fp.update_routes([(REMOTE, None), (OTHER, STRANGER)]) == [None, None]
        assert fp._peer_ids[int(STRANGER)] != old_id
        fp.update_routes([(REMOTE, PEER2)])  # a later batch may reuse it
        assert fp._peer_ids[int(PEER2)] == old_id
        assert fp.routes() == {OTHER: STRANGER, REMOTE: PEER2}


def test_no_icmp_about_icmp_in_loop(rig: Rig) -> None:
    rig.fp.start()
    rig.tun.send(ipv4_packet("10.244.1.5", "10.244.9.7", proto=1))
    rig.tun.send(ipv4_packet("10.244.1.5", "10.244.9.7", frag=5))
    rig.wait_for(lambda: rig.fp.stats()["tx_drop_no_route"] == 2, "no-route drops")
    rig.tun.settimeout(0.05)
    with pytest.raises(TimeoutError):
        rig.tun.recv(200)
    assert rig.fp.stats()["tx_icmp_unreach"] == 0


def test_stop_is_prompt(rig: Rig) -> None:
    rig.fp.start()
    time.sleep(0.05)  # the loop sits in poll()
    rig.fp.close()  # raises FastPathError(ETIMEDOUT) if a loop does not stop within JOIN_TIMEOUT_S (the hang check)
    assert not rig.fp._proxy.running()
    rig.fp.close()
    rig.fp.check()


def test_stop_under_load(impl: str) -> None:
    """close() returns promptly while the TUN keeps the loop busy (bursts are bounded; stop is in the poll set)."""
    r = Rig(impl)
    try:
        r.fp.set_route(REMOTE, PEER)
        r.fp.start()
        pkt = ipv4_packet("10.244.1.5", "10.244.2.7", payload=bytes(1000))
        r.tun.setblocking(False)
        for _ in range(2000):
            try:
                r.tun.send(pkt)
            except BlockingIOError:
                break
        r.fp.close()  # raises FastPathError(ETIMEDOUT) if a loop does not stop within JOIN_TIMEOUT_S
        assert not r.fp._proxy.running()
    finally:
        r.close()


def test_error_is_a_value(impl: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A loop that meets a fd it cannot use stops with a typed error; the process lives on.

    The "TUN" is a directory: poll() calls it readable, read() fails with EISDIR, which no loop can get past.
    """
    tun = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    fp = make(impl, tun, udp.fileno())
    try:
        fp.start()
        deadline = time.monotonic() + TIMEOUT
        while fp.stats()["tx_syscalls"] == 0 or not _dead(fp):
            assert time.monotonic() < deadline, "the loop did not fail"
            time.sleep(0.005)
        with pytest.raises(FastPathError) as ei:
            fp.check()
        assert ei.value.errno == errno.EISDIR
        assert isinstance(ei.value, IsADirectoryError)  # the builtin subclass for the errno, too
        assert f"tun fd {tun}" in str(ei.value)
        with pytest.raises(FastPathError):
            fp.set_route(REMOTE, PEER)  # steering a dead loop reports its error
    finally:
        fp.close()
        udp.close()
        os.close(tun)


def _dead(fp: FastPath) -> bool:
    try:
        fp.check()
    except FastPathError:
        return True
    return False


def test_stats_while_running(rig: Rig) -> None:
    rig.fp.set_route(REMOTE, PEER)
    rig.fp.start()
    seen = []
    for i in range(20):
        rig.tun.send(ipv4_packet("10.244.1.5", "10.244.2.7"))
        rig.peer.recvfrom(100)
        seen.append(rig.fp.stats()["tx_packets"])
    assert seen == sorted(seen) and seen[-1] >= 19


def test_process_refused_while_running(rig: Rig) -> None:
    rig.fp.start()
    with pytest.raises(RuntimeError):
        rig.fp.process_outbound(ipv4_packet("10.244.1.5", "10.244.2.7"))


@needs_cython
def test_debug_build_counts_the_c_buffers() -> None:
    """`make debug`: every C buffer of a Proxy is counted at allocation and release (conftest.py checks the balance
    around every test). On the release build, which counts nothing, check that it counts nothing (no skip: CI's
    FASTFLANNEL_REQUIRE_TIERS=1 makes a skip an error; `make test-debug` runs the counting half)."""
    ext = fastpath.implementation_module("cython")
    if not ext.debug_counters()["debug"]:
        fp = make("cython")
        fp.set_route(REMOTE, PEER)
        assert ext.debug_counters()["live"] == 0, "a release build counts no allocation"
        fp.close()
        return
    live = ext.debug_counters()["live"]
    fp = make("cython")
    fp.set_route(REMOTE, PEER)
    assert ext.debug_counters()["live"] > live  # the state, table, peer set, counter chunk, batch buffers
    fp.close()
    assert ext.debug_counters()["live"] == live


# ----------------------------------------------------------------------------------------------------------------
# memory: the loops' packet buffers are resident from the start, so the footprint does not grow with the bursts


def _rss_bytes() -> int:
    return int(proc_sample(os.getpid())["rss_kb"]) * 1024  # the soak's /proc reader


@needs_cython
@pytest.mark.parametrize("tun_offload", [False, True], ids=["per-packet", "offload"])
def test_packet_buffers_are_resident_once_built(tun_offload: bool) -> None:
    # both modes touch the batch's recvmmsg slots (64 KiB each: a GRO datagram or any garbage one fits) and as much
    # again for the TUN side (per-packet read slots, or the pending coalesced writes): untouched, those pages would
    # fault in one deeper burst at a time (docs/fastpath.md "Memory layout"). They are fresh mmap'd pages, so nothing
    # an earlier test left resident can stand in for the prefault.
    batch = 32
    floor = 2 * batch * 65536
    before = _rss_bytes()
    fp = make("cython", batch=batch, tun_offload=tun_offload)
    try:
        grown = _rss_bytes() - before
        assert grown >= 0.9 * floor, f"{grown / 2**20:.1f} MiB resident after building, expected >= {floor / 2**20:.0f}"
    finally:
        fp.close()
