# SPDX-License-Identifier: Apache-2.0
"""TCP packets and TUN reads with a virtio_net_hdr (TSO super-packets) for the offload tests.

Checksums come from tests/helpers/packets.py (the slow RFC 1071 sum), not from the data path under test.
"""
from __future__ import annotations

import struct

from packets import checksum

VNET = struct.Struct("=BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset (host order)
ACK, PSH, FIN = 0x10, 0x08, 0x01
SRC, DST = bytes([10, 5, 1, 7]), bytes([10, 5, 2, 9])


def tcp_checksum(ip: bytes, ihl: int = 20) -> int:
    """The TCP checksum of IPv4 packet ``ip`` computed in full (pseudo header included), its field taken as 0."""
    seg = bytearray(ip[ihl:])
    seg[16:18] = b"\0\0"
    return checksum(bytes(ip[12:20]) + bytes([0, 6]) + len(seg).to_bytes(2, "big") + bytes(seg))


def tcp_packet(payload: bytes, seq: int, flags: int = ACK, ip_id: int = 1, options: bytes = b"", ttl: int = 63,
               ack: int = 777, sport: int = 40000, dport: int = 5201, csum: bool = True) -> bytearray:
    """An IPv4/TCP packet SRC -> DST (DF set), its TCP checksum computed unless not ``csum``."""
    doff = 20 + len(options)
    ip = bytearray(20)
    ip[0] = 0x45
    ip[2:4] = (20 + doff + len(payload)).to_bytes(2, "big")
    ip[4:6] = ip_id.to_bytes(2, "big")
    ip[6] = 0x40  # DF
    ip[8] = ttl
    ip[9] = 6
    ip[12:16] = SRC
    ip[16:20] = DST
    ip[10:12] = checksum(bytes(ip)).to_bytes(2, "big")
    tcp = bytearray(20) + options
    tcp[0:2] = sport.to_bytes(2, "big")
    tcp[2:4] = dport.to_bytes(2, "big")
    tcp[4:8] = (seq & 0xFFFFFFFF).to_bytes(4, "big")
    tcp[8:12] = ack.to_bytes(4, "big")
    tcp[12] = (doff // 4) << 4
    tcp[13] = flags
    tcp[14:16] = (65000).to_bytes(2, "big")
    pkt = ip + tcp + payload
    if csum:
        pkt[36:38] = tcp_checksum(bytes(pkt)).to_bytes(2, "big")
    return pkt


def tso_read(payload: bytes, mss: int, seq: int, flags: int, ip_id: int, options: bytes,
             bogus_hdr_len: bool) -> bytes:
    """What a TUN with TSO4 hands us for a forwarded super-packet: partial checksum, maybe a wrong hdr_len."""
    pkt = tcp_packet(payload, seq, flags, ip_id, options, csum=False)
    plen = len(pkt) - 20
    pseudo = SRC + DST + bytes([0, 6]) + plen.to_bytes(2, "big")
    pkt[36:38] = (~checksum(pseudo) & 0xFFFF).to_bytes(2, "big")  # folded pseudo sum, not complemented
    hdr_len = min(len(pkt), 20 + 20 + len(options) + mss) if bogus_hdr_len else 40 + len(options)
    return VNET.pack(1, 1, hdr_len, mss, 20, 16) + bytes(pkt)
