# SPDX-License-Identifier: Apache-2.0
"""Check the packet helpers of the fast path against slow references: checksum, TTL patch, ICMP, validation.

Packets are built with tests/helpers/packets.py (its own RFC 1071 sum, not the code under test).
"""
from __future__ import annotations

from ipaddress import IPv4Address

from hypothesis import given, settings
from hypothesis import strategies as st
from packets import checksum, ipv4_packet

from fastflannel.datapath.contract import ICMP_TTL
from fastflannel.datapath.twin_rules import (
    icmp_allowed,
    icmp_net_unreachable,
    ip_checksum,
    malformed,
    ttl_decrement,
)


@given(st.binary(max_size=200))
def test_checksum_matches_reference(data: bytes) -> None:
    assert ip_checksum(data) == checksum(data)


headers = st.builds(
    lambda src, dst, proto, ttl, ident, frag, tos, opts: ipv4_packet(
        str(IPv4Address(src)), str(IPv4Address(dst)), proto=proto, ttl=ttl, ident=ident, frag=frag, tos=tos,
        options=opts),
    st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 255), st.integers(2, 255),
    st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.integers(0, 255), st.binary(max_size=40))


@given(headers)
@settings(max_examples=500)
def test_ttl_decrement_equals_recomputation(pkt: bytes) -> None:
    """RFC 1624 eqn. 3 must give exactly the checksum a full recomputation gives."""
    p = bytearray(pkt)
    ttl_decrement(p)
    assert p[8] == pkt[8] - 1
    ihl = (p[0] & 15) * 4
    ref = bytearray(p[:ihl])
    ref[10:12] = b"\0\0"
    assert int.from_bytes(p[10:12], "big") == checksum(bytes(ref))
    assert ip_checksum(bytes(p[:ihl])) == 0  # the header verifies
    assert p[:8] == pkt[:8] and p[12:] == pkt[12:]


def test_ttl_decrement_checksum_edge_cases() -> None:
    """Headers whose checksum is 0x0000 or 0xFFFF-ish before/after the patch (the RFC 1141 -0 trap)."""
    for ttl in (2, 3, 0x80, 0xFF):
        for ident in range(0, 0x10000, 0x101):
            pkt = ipv4_packet("0.0.0.0", "0.0.0.0", proto=0, ttl=ttl, ident=ident, payload=b"")
            p = bytearray(pkt)
            ttl_decrement(p)
            assert ip_checksum(bytes(p[:20])) == 0


def test_icmp_net_unreachable_layout() -> None:
    off = ipv4_packet("10.244.1.5", "10.244.9.9", proto=6, payload=bytes(range(30)))
    icmp = icmp_net_unreachable(off, int(IPv4Address("10.244.1.0")))
    assert len(icmp) == 20 + 8 + 20 + 8
    assert icmp[0] == 0x45 and int.from_bytes(icmp[2:4], "big") == len(icmp)
    assert icmp[8] == ICMP_TTL and icmp[9] == 1
    assert icmp[12:16] == IPv4Address("10.244.1.0").packed and icmp[16:20] == off[12:16]
    assert icmp[4:8] == b"\0\0\0\0"  # id 0, no fragment bits, as flannel
    assert ip_checksum(icmp[:20]) == 0
    assert icmp[20] == 3 and icmp[21] == 0 and icmp[24:28] == b"\0\0\0\0"
    assert ip_checksum(icmp[20:]) == 0
    assert icmp[28:] == off[:28]


def test_icmp_quote_is_zero_padded_for_short_offenders() -> None:
    off = ipv4_packet("10.244.1.5", "10.244.9.9", payload=b"abc")
    icmp = icmp_net_unreachable(off, 1)
    assert icmp[28:] == off + b"\0" * 5
    assert ip_checksum(icmp[20:]) == 0


def test_icmp_allowed_rules() -> None:
    assert icmp_allowed(ipv4_packet("1.1.1.1", "2.2.2.2"))
    assert not icmp_allowed(ipv4_packet("1.1.1.1", "2.2.2.2", proto=1))  # RFC 792: no ICMP about ICMP
    assert not icmp_allowed(ipv4_packet("1.1.1.1", "2.2.2.2", frag=0x0001))  # non-first fragment
    assert icmp_allowed(ipv4_packet("1.1.1.1", "2.2.2.2", frag=0x2000))  # MF set, offset 0: first fragment
    assert icmp_allowed(ipv4_packet("1.1.1.1", "2.2.2.2", options=b"\1" * 36))  # IHL 56 bytes
    assert not icmp_allowed(ipv4_packet("1.1.1.1", "2.2.2.2", options=b"\1" * 40))  # IHL 60 bytes


def test_malformed_rules() -> None:
    good = ipv4_packet("1.1.1.1", "2.2.2.2")
    assert not malformed(good)
    assert malformed(good[:19])  # short
    assert malformed(good[:-1])  # truncated: total length > bytes
    assert malformed(good + b"\0")  # padded: total length < bytes
    assert malformed(b"\x65" + good[1:])  # version 6
    assert malformed(b"\x44" + good[1:])  # IHL 4
    assert malformed(b"\x4f" + good[1:])  # IHL 60 > 28 bytes
    assert malformed(b"")
