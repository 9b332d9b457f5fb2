# SPDX-License-Identifier: Apache-2.0
"""Build IPv4/UDP/TCP packets for tests: the one packet builder of the suite.

Written from the RFCs, independent of the code under test: the checksums here are the slow, obvious RFC 1071
sum, never ``fastflannel.datapath`` code, so a test that compares the data path's output with packets built here
checks the data path against something it does not share. Pure functions of bytes; no sockets, no root.
"""
from __future__ import annotations

from ipaddress import IPv4Address

PROTO_ICMP, PROTO_TCP, PROTO_UDP = 1, 6, 17
TCP_FIN, TCP_SYN, TCP_RST, TCP_PSH, TCP_ACK = 0x01, 0x02, 0x04, 0x08, 0x10
IP_DF = 0x4000


def checksum(data: bytes) -> int:
    """Return the RFC 1071 Internet checksum of ``data``: 32-bit accumulation, one fold at the end."""
    if len(data) % 2:
        data += b"\0"
    total = 0
    for i in range(0, len(data), 2):
        total += data[i] * 256 + data[i + 1]
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return 0xFFFF - total


def _addr(a: str | bytes | IPv4Address) -> bytes:
    if isinstance(a, bytes):
        if len(a) != 4:
            raise ValueError(f"an IPv4 address is 4 bytes, got {len(a)}")
        return a
    return IPv4Address(a).packed


def ipv4_packet(src: str | bytes, dst: str | bytes, *, proto: int = PROTO_UDP, ttl: int = 64,
                payload: bytes = b"payload!", options: bytes = b"", frag: int = 0, ident: int = 0x1234,
                tos: int = 0) -> bytes:
    """Return an IPv4 packet with a correct header checksum (``options`` zero-padded to 4 bytes).

    ``frag`` is the 16-bit flags+offset field (``IP_DF`` for don't-fragment); ``payload`` is everything after
    the IP header (use ``udp_datagram``/``tcp_segment`` for a transport header).
    """
    options = options + b"\0" * (-len(options) % 4)
    ihl = 20 + len(options)
    h = bytearray(ihl)
    h[0] = 0x40 | (ihl // 4)
    h[1] = tos
    h[2:4] = (ihl + len(payload)).to_bytes(2, "big")
    h[4:6] = ident.to_bytes(2, "big")
    h[6:8] = frag.to_bytes(2, "big")
    h[8] = ttl
    h[9] = proto
    h[12:16] = _addr(src)
    h[16:20] = _addr(dst)
    h[20:] = options
    h[10:12] = checksum(bytes(h)).to_bytes(2, "big")
    return bytes(h) + payload


def _pseudo_header(src: bytes, dst: bytes, proto: int, length: int) -> bytes:
    return src + dst + bytes([0, proto]) + length.to_bytes(2, "big")


def udp_datagram(src: str | bytes, dst: str | bytes, sport: int, dport: int, payload: bytes, *,
                 csum: bool = True) -> bytes:
    """Return a UDP header + ``payload``; the checksum (over the pseudo header of src/dst) or 0 when not ``csum``."""
    length = 8 + len(payload)
    u = bytearray(sport.to_bytes(2, "big") + dport.to_bytes(2, "big") + length.to_bytes(2, "big") + b"\0\0")
    u += payload
    if csum:
        c = checksum(_pseudo_header(_addr(src), _addr(dst), PROTO_UDP, length) + bytes(u))
        u[6:8] = (c or 0xFFFF).to_bytes(2, "big")  # RFC 768: a computed 0 is sent as all ones
    return bytes(u)


def udp_packet(src: str | bytes, dst: str | bytes, sport: int, dport: int, payload: bytes, *, ttl: int = 64,
               ident: int = 1, csum: bool = True) -> bytes:
    """Return an IPv4/UDP packet ``src:sport -> dst:dport`` carrying ``payload``."""
    return ipv4_packet(src, dst, proto=PROTO_UDP, ttl=ttl, ident=ident,
                       payload=udp_datagram(src, dst, sport, dport, payload, csum=csum))


def tcp_segment(src: str | bytes, dst: str | bytes, payload: bytes, *, seq: int, ack: int = 777,
                flags: int = TCP_ACK, options: bytes = b"", sport: int = 40000, dport: int = 5201,
                window: int = 65000, csum: bool = True) -> bytes:
    """Return a TCP header (with ``options``, length a multiple of 4) + ``payload``; checksum unless not ``csum``."""
    if len(options) % 4:
        raise ValueError(f"TCP options must be a multiple of 4 bytes, got {len(options)}")
    doff = 20 + len(options)
    t = bytearray(20) + options
    t[0:2] = sport.to_bytes(2, "big")
    t[2:4] = dport.to_bytes(2, "big")
    t[4:8] = (seq & 0xFFFFFFFF).to_bytes(4, "big")
    t[8:12] = ack.to_bytes(4, "big")
    t[12] = (doff // 4) << 4
    t[13] = flags
    t[14:16] = window.to_bytes(2, "big")
    t += payload
    if csum:
        c = checksum(_pseudo_header(_addr(src), _addr(dst), PROTO_TCP, len(t)) + bytes(t))
        t[16:18] = c.to_bytes(2, "big")
    return bytes(t)


def tcp_packet(src: str | bytes, dst: str | bytes, payload: bytes, *, seq: int, ack: int = 777,
               flags: int = TCP_ACK, options: bytes = b"", sport: int = 40000, dport: int = 5201,
               ttl: int = 63, ident: int = 1, frag: int = IP_DF, csum: bool = True) -> bytes:
    """Return an IPv4/TCP packet (DF set by default, as a TCP stack sends)."""
    seg = tcp_segment(src, dst, payload, seq=seq, ack=ack, flags=flags, options=options, sport=sport,
                      dport=dport, csum=csum)
    return ipv4_packet(src, dst, proto=PROTO_TCP, ttl=ttl, ident=ident, frag=frag, payload=seg)


def transport_checksum_ok(packet: bytes) -> bool:
    """Return True if the UDP/TCP checksum of an IPv4 ``packet`` verifies (a UDP checksum of 0 means none)."""
    ihl = (packet[0] & 0xF) * 4
    proto = packet[9]
    body = packet[ihl:int.from_bytes(packet[2:4], "big")]
    if proto == PROTO_UDP and body[6:8] == b"\0\0":
        return True
    return checksum(_pseudo_header(packet[12:16], packet[16:20], proto, len(body)) + body) == 0
