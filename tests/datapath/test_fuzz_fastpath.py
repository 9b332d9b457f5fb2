# SPDX-License-Identifier: Apache-2.0
"""Fuzz the fast path's per-packet handling (issue 6, bad input): the Cython loop against its Python twin.

test_fastpath.py already holds the basic oracle (well-formed packets with a little damage, one geometry, two
routes). This file adds what that one does not reach:
- header fields drawn on purpose: every IHL 0..15 against every length, total length off by a little or by a
  lot, version != 4, fragments (MF, DF, offsets; first vs non-first), TTL 0, 1 and 2, IP options up to the full
  40 bytes (IHL 15: the 60-byte header at which flanneld stops sending ICMP), ICMP offenders;
- raw random bytes with a plausible first byte (0x40..0x4F), so the random input gets past the version check;
- random network geometries (network prefix 8..20, subnet length up to +12 bits), random own subnet, random
  route tables and peers, and both inbound check switches;
- the outputs checked for themselves, not only for agreement: a "send"/"write" packet is the input with TTL - 1
  and a valid header checksum; an "icmp" packet is a valid ICMP net-unreachable quoting the offender, to its
  source, and never about ICMP, a non-first fragment or a 60-byte header.

Python-only properties run without the extension too (no crash, verdicts and counters consistent). Examples per
property: ``FASTFLANNEL_FUZZ_EXAMPLES`` (default 300; the figure in the issue's note used 20,000).
"""
from __future__ import annotations

import os
from collections import Counter
from ipaddress import IPv4Address, IPv4Network
from typing import List, Tuple

import pytest
from impls import HAVE_CYTHON, NO_CYTHON_REASON
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastflannel.datapath.twin import ip_checksum
from fastflannel.datapath.fastpath import COUNTER_NAMES, FastPath, FastPathOptions

EXAMPLES = int(os.environ.get("FASTFLANNEL_FUZZ_EXAMPLES") or 300)
fuzz_settings = settings(max_examples=EXAMPLES, deadline=None,
                         suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
needs_cython = pytest.mark.skipif(not HAVE_CYTHON, reason=NO_CYTHON_REASON or "-")

TX_VERDICTS = {"send", "icmp", "drop:malformed", "drop:no_route", "drop:ttl"}
RX_VERDICTS = {"write", "drop:malformed", "drop:unknown_peer", "drop:foreign_dest", "drop:ttl"}


# --- the world: a geometry, an own subnet, a route table ----------------------------------------------------

@st.composite
def worlds(draw):  # type: ignore[no-untyped-def]
    """Draw (network, subnet_len, own_subnet, routes {subnet: peer}, peers list, check_peer, check_dest)."""
    plen = draw(st.integers(8, 20))
    subnet_len = draw(st.integers(plen + 1, min(30, plen + 12)))
    base = draw(st.integers(0, 2**32 - 1)) & ((0xFFFFFFFF << (32 - plen)) & 0xFFFFFFFF)
    network = IPv4Network((base, plen))
    n = 1 << (subnet_len - plen)

    def nth(i: int) -> IPv4Network:
        return IPv4Network((base + (i << (32 - subnet_len)), subnet_len))

    own_i = draw(st.integers(0, n - 1))
    peers = draw(st.lists(st.integers(1, 0xFFFFFFFE).map(IPv4Address), min_size=1, max_size=4, unique=True))
    idx = draw(st.lists(st.integers(0, n - 1).filter(lambda i: i != own_i), max_size=6, unique=True))
    routes = {nth(i): draw(st.sampled_from(peers)) for i in idx}
    return network, subnet_len, nth(own_i), routes, peers, draw(st.booleans()), draw(st.booleans())


def _addr_in(draw, world) -> int:  # type: ignore[no-untyped-def]
    """An address that hits the interesting places of the world: own subnet, a routed subnet, elsewhere."""
    network, _, own, routes, peers, _, _ = world
    where = draw(st.sampled_from(["own", "routed", "network", "outside", "edge"]))
    if where == "own":
        net = own
    elif where == "routed" and routes:
        net = draw(st.sampled_from(sorted(routes)))
    elif where == "network":
        net = network
    elif where == "edge":
        return draw(st.sampled_from([int(network.network_address), int(network.broadcast_address),
                                     int(own.network_address), int(own.broadcast_address), 0, 0xFFFFFFFF]))
    else:
        return draw(st.integers(0, 2**32 - 1))
    return int(net.network_address) + draw(st.integers(0, net.num_addresses - 1))


@st.composite
def headers(draw, world):  # type: ignore[no-untyped-def]
    """An IPv4 packet whose header fields are drawn on purpose, then possibly damaged."""
    opt_len = draw(st.sampled_from([0, 0, 0, 4, 8, 20, 36, 40]))
    options = draw(st.binary(min_size=opt_len, max_size=opt_len))
    payload = draw(st.binary(max_size=48))
    ihl = (20 + opt_len) // 4
    ttl = draw(st.sampled_from([0, 1, 2, 64, 255]))
    proto = draw(st.sampled_from([1, 6, 17, 0, 255]))
    flags = draw(st.sampled_from([0, 0x2000, 0x4000, 0x6000, 0x8000]))  # MF, DF, both, the reserved bit
    offset = draw(st.sampled_from([0, 0, 1, 7, 0x1FFF]))
    h = bytearray(20 + opt_len)
    h[0] = 0x40 | ihl
    h[1] = draw(st.integers(0, 255))
    h[2:4] = (len(h) + len(payload)).to_bytes(2, "big")
    h[4:6] = draw(st.integers(0, 0xFFFF)).to_bytes(2, "big")
    h[6:8] = (flags | offset).to_bytes(2, "big")
    h[8] = ttl
    h[9] = proto
    h[12:16] = _addr_in(draw, world).to_bytes(4, "big")
    h[16:20] = _addr_in(draw, world).to_bytes(4, "big")
    h[20:] = options
    h[10:12] = ip_checksum(bytes(h)).to_bytes(2, "big")
    pkt = bytearray(h + payload)
    damage = draw(st.sampled_from(["none", "none", "ihl", "total_len", "total_len_near", "version", "truncate",
                                   "pad", "bad_checksum"]))
    if damage == "ihl":
        pkt[0] = 0x40 | draw(st.integers(0, 15))
    elif damage == "total_len":
        pkt[2:4] = draw(st.integers(0, 0xFFFF)).to_bytes(2, "big")
    elif damage == "total_len_near":
        pkt[2:4] = max(0, min(0xFFFF, len(pkt) + draw(st.integers(-4, 4)))).to_bytes(2, "big")
    elif damage == "version":
        pkt[0] = (draw(st.integers(0, 15)) << 4) | (pkt[0] & 0x0F)
    elif damage == "truncate":
        pkt = pkt[:draw(st.integers(0, len(pkt)))]
    elif damage == "pad":
        pkt += draw(st.binary(min_size=1, max_size=8))
    elif damage == "bad_checksum":  # not checked on a forwarding path (the kernel never verifies it there either)
        pkt[10] ^= 0xFF
    ihl_now = (pkt[0] & 0x0F) * 4 if pkt else 0
    if len(pkt) > max(ihl_now, 9) and pkt[9] == 1 and pkt[ihl_now] == 8:
        # no echo requests here: their net-unreachable is rate-limited by the clock (one per 10 ms), so twin and
        # Cython could differ by timing; test_echo_request_to_unleased_subnet_... covers them. Outside the header:
        # its checksum stays valid.
        pkt[ihl_now] = 0
    return bytes(pkt)


@st.composite
def raw(draw):  # type: ignore[no-untyped-def]
    """Random bytes, often with a first byte that passes the version check."""
    data = draw(st.binary(max_size=96))
    if data and draw(st.booleans()):
        data = bytes([0x40 | (data[0] & 0x0F)]) + data[1:]
    return data


@st.composite
def cases(draw):  # type: ignore[no-untyped-def]
    world = draw(worlds())
    pkts = draw(st.lists(st.one_of(headers(world), raw()), min_size=1, max_size=10))
    sources = world[4] + [IPv4Address("127.0.0.9")]
    srcs = [draw(st.sampled_from(sources)) for _ in pkts]
    return world, pkts, srcs


def build(world, impl: str) -> FastPath:
    network, subnet_len, own, routes, _, check_peer, check_dest = world
    fp = FastPath(0, 0, network=network, subnet_len=subnet_len, own_subnet=own, tun_ip=own.network_address,
                  mtu=1472, options=FastPathOptions(implementation=impl, check_peer_source=check_peer,
                                                    check_inner_dest=check_dest, batch=4))
    for s, nh in routes.items():
        fp.set_route(s, nh)
    return fp


# --- checks of one implementation's answers ---------------------------------------------------------------

def check_forwarded(inp: bytes, out: bytes) -> None:
    """A forwarded packet is the input with TTL - 1 and a header checksum that verifies when the input's did."""
    ihl = (inp[0] & 0x0F) * 4
    assert len(out) == len(inp) and out[8] == inp[8] - 1 and inp[8] >= 2
    assert out[:8] == inp[:8] and out[9] == inp[9] and out[12:] == inp[12:]
    if ip_checksum(inp[:ihl]) == 0:
        assert ip_checksum(out[:ihl]) == 0, (inp.hex(), out.hex())


def check_icmp(world, inp: bytes, icmp: bytes) -> None:
    own = world[2]
    ihl = (inp[0] & 0x0F) * 4
    assert (inp[9] != 1 or inp[ihl] == 8) and ((inp[6] << 8 | inp[7]) & 0x1FFF) == 0 and ihl < 60, \
        "ICMP about a forbidden offender (ICMP: only about an echo request)"
    assert icmp[0] == 0x45 and int.from_bytes(icmp[2:4], "big") == len(icmp) and icmp[9] == 1
    assert ip_checksum(icmp[:20]) == 0 and ip_checksum(icmp[20:]) == 0
    assert icmp[12:16] == own.network_address.packed and icmp[16:20] == inp[12:16]
    assert icmp[20:22] == b"\x03\x00" and icmp[28:28 + ihl + 8] == inp[:ihl + 8].ljust(ihl + 8, b"\0")


def run_one(world, pkts: List[bytes], srcs: List[IPv4Address], impl: str) -> Tuple[list, dict]:
    answers: list = []
    with build(world, impl) as fp:
        for p, s in zip(pkts, srcs):
            v, out, nh = fp.process_outbound(p)
            assert v in TX_VERDICTS, v
            if v == "send":
                check_forwarded(p, out)
                assert nh in world[3].values()
            elif v == "icmp":
                check_icmp(world, p, out)
            else:
                assert out is None and nh is None
            answers.append(("out", v, out, nh))
            v2, out2 = fp.process_inbound(s, p)
            assert v2 in RX_VERDICTS, v2
            if v2 == "write":
                check_forwarded(p, out2)
                if world[6]:
                    assert IPv4Address(p[16:20]) in world[2]
                if world[5]:
                    assert s in world[3].values()
            answers.append(("in", v2, out2))
        answers.append(("batch", fp.process_outbound_batch(pkts), fp.process_inbound_batch(srcs[0], pkts)))
        st_ = fp.stats()
    assert list(st_) == list(COUNTER_NAMES)
    return answers, st_


def check_counters(answers: list, stats: dict, n: int) -> None:
    """The verdicts of the single-packet calls add up to the counters (the batch calls add their own)."""
    c = Counter(a[1] for a in answers if a[0] in ("out", "in"))
    drops_tx = stats["tx_drop_malformed"] + stats["tx_drop_no_route"] + stats["tx_drop_ttl"]
    drops_rx = (stats["rx_drop_malformed"] + stats["rx_drop_unknown_peer"] + stats["rx_drop_foreign_dest"]
                + stats["rx_drop_ttl"])
    assert stats["tx_packets"] + drops_tx == 2 * n  # each packet once alone and once in the batch
    assert stats["rx_packets"] + drops_rx == 2 * n
    assert stats["tx_icmp_unreach"] == 2 * c["icmp"] and stats["tx_packets"] >= c["send"]


# --- the properties ---------------------------------------------------------------------------------------

@fuzz_settings
@given(cases())
def test_python_twin_never_crashes_and_counts(case) -> None:  # type: ignore[no-untyped-def]
    world, pkts, srcs = case
    answers, stats = run_one(world, pkts, srcs, "python")
    check_counters(answers, stats, len(pkts))


@needs_cython
@fuzz_settings
@given(cases())
def test_cython_matches_twin_verdicts_bytes_counters(case) -> None:  # type: ignore[no-untyped-def]
    world, pkts, srcs = case
    a_c, s_c = run_one(world, pkts, srcs, "cython")
    a_p, s_p = run_one(world, pkts, srcs, "python")
    assert a_c == a_p
    assert s_c == s_p


@needs_cython
@fuzz_settings
@given(st.lists(raw(), min_size=1, max_size=20), worlds())
def test_random_bytes_identical_drops(data: List[bytes], world) -> None:  # type: ignore[no-untyped-def]
    peer = next(iter(world[3].values()), world[4][0])
    res = {}
    for impl in ("cython", "python"):
        with build(world, impl) as fp:
            res[impl] = ([fp.process_outbound(d) for d in data], [fp.process_inbound(peer, d) for d in data],
                         fp.stats())
    assert res["cython"] == res["python"]


# A few fixed cases whose outcome the rules define (docs/fastpath.md), so a shared mistake cannot hide.
OWN = IPv4Network("10.244.1.0/24")
WORLD = (IPv4Network("10.244.0.0/16"), 24, OWN, {IPv4Network("10.244.2.0/24"): IPv4Address("192.0.2.2")},
         [IPv4Address("192.0.2.2")], True, True)


def _pkt(ihl_words: int = 5, ttl: int = 64, frag: int = 0, proto: int = 17, dst: str = "10.244.2.7",
         src: str = "10.244.1.5", total_delta: int = 0, payload: bytes = b"12345678") -> bytes:
    h = bytearray(ihl_words * 4)
    h[0] = 0x40 | ihl_words
    h[2:4] = (len(h) + len(payload) + total_delta).to_bytes(2, "big")
    h[6:8] = frag.to_bytes(2, "big")
    h[8], h[9] = ttl, proto
    h[12:16], h[16:20] = IPv4Address(src).packed, IPv4Address(dst).packed
    h[10:12] = ip_checksum(bytes(h)).to_bytes(2, "big")
    return bytes(h) + payload


@pytest.mark.parametrize("impl", [pytest.param("cython", marks=needs_cython), "python"])
@pytest.mark.parametrize("pkt, out_verdict, in_verdict", [
    (_pkt(ttl=0), "drop:ttl", "drop:foreign_dest"),
    (_pkt(ttl=1), "drop:ttl", "drop:foreign_dest"),
    (_pkt(ttl=2), "send", "drop:foreign_dest"),
    (_pkt(ttl=1, dst="10.244.1.9"), "icmp", "drop:ttl"),  # no route beats TTL outbound (flanneld's order)
    (_pkt(ttl=2, dst="10.244.1.9"), "icmp", "write"),
    (_pkt(ihl_words=15, dst="10.244.9.9"), "drop:no_route", "drop:foreign_dest"),  # 60-byte header: no ICMP
    (_pkt(ihl_words=14, dst="10.244.9.9"), "icmp", "drop:foreign_dest"),
    (_pkt(frag=0x2000, dst="10.244.9.9"), "icmp", "drop:foreign_dest"),  # first fragment (MF): ICMP
    (_pkt(frag=0x2001, dst="10.244.9.9"), "drop:no_route", "drop:foreign_dest"),  # non-first: none
    (_pkt(proto=1, dst="10.244.9.9"), "drop:no_route", "drop:foreign_dest"),  # no ICMP about ICMP but echo
    (_pkt(total_delta=1), "drop:malformed", "drop:malformed"),
    (_pkt(total_delta=-1), "drop:malformed", "drop:malformed"),
    (_pkt()[:19], "drop:malformed", "drop:malformed"),
    (bytes([0x44]) + _pkt()[1:], "drop:malformed", "drop:malformed"),  # IHL 4
    (bytes([0x4F]) + _pkt()[1:], "drop:malformed", "drop:malformed"),  # IHL 15 beyond the 28 bytes
    (bytes([0x65]) + _pkt()[1:], "drop:malformed", "drop:malformed"),  # version 6
])
def test_defined_outcomes(impl: str, pkt: bytes, out_verdict: str, in_verdict: str) -> None:
    with build(WORLD, impl) as fp:
        assert fp.process_outbound(pkt)[0] == out_verdict
        assert fp.process_inbound(IPv4Address("192.0.2.2"), pkt)[0] == in_verdict
        assert fp.process_inbound(IPv4Address("192.0.2.3"), pkt)[0] == "drop:unknown_peer"
