# SPDX-License-Identifier: Apache-2.0
"""Check the suite's packet builder (tests/helpers/packets.py) against published vectors and its own verifier."""
from __future__ import annotations

import pytest
from packets import (
    IP_DF,
    PROTO_TCP,
    TCP_ACK,
    TCP_PSH,
    checksum,
    ipv4_packet,
    tcp_packet,
    transport_checksum_ok,
    udp_packet,
)


def test_ipv4_header_checksum_matches_published_example() -> None:
    # The worked example of the IPv4 header checksum (192.168.0.1 -> 192.168.0.199, UDP, DF, TTL 64): 0xb861.
    hdr = ipv4_packet("192.168.0.1", "192.168.0.199", ttl=64, ident=0, frag=IP_DF, payload=bytes(0x73 - 20))[:20]
    assert hdr.hex() == "45000073000040004011b861c0a80001c0a800c7"
    assert checksum(hdr) == 0


def test_rfc1071_checksum_of_odd_length_pads_with_zero() -> None:
    assert checksum(b"\x01") == checksum(b"\x01\x00") == 0xFEFF
    assert checksum(b"") == 0xFFFF


def test_udp_and_tcp_checksums_verify_and_a_flipped_bit_does_not() -> None:
    u = udp_packet("10.5.1.7", "10.5.2.9", 40000, 9999, b"hello")
    assert len(u) == 20 + 8 + 5 and u[9] == 17
    assert transport_checksum_ok(u)
    t = tcp_packet("10.5.1.7", "10.5.2.9", b"x" * 100, seq=2**32 + 5, flags=TCP_ACK | TCP_PSH,
                   options=bytes([1, 1, 8, 10]) + bytes(8))
    assert t[9] == PROTO_TCP and int.from_bytes(t[24:28], "big") == 5  # seq wraps modulo 2**32
    assert (t[32] >> 4) * 4 == 32  # data offset counts the options
    assert transport_checksum_ok(t)
    bad = bytearray(t)
    bad[-1] ^= 1
    assert not transport_checksum_ok(bytes(bad))


def test_options_padding_and_bad_lengths() -> None:
    p = ipv4_packet("1.2.3.4", "5.6.7.8", options=b"\x01", payload=b"")
    assert p[0] == 0x46 and len(p) == 24 and checksum(p[:24]) == 0
    with pytest.raises(ValueError):
        tcp_packet("1.2.3.4", "5.6.7.8", b"", seq=0, options=b"\x01")
    with pytest.raises(ValueError):
        ipv4_packet(b"\x01\x02\x03", "5.6.7.8")
