# SPDX-License-Identifier: Apache-2.0
"""The per-packet rules of the data path in pure Python (the twin's, and the oracle the tests build packets with).

outbound (TUN -> UDP): malformed -> drop; destination outside the network or no route -> count ``no_route``
and, unless the offender is ICMP (RFC 792), a non-first fragment, or has an IP header of 60 bytes or more,
write an ICMP net-unreachable back into the TUN (flannel ``send_net_unreachable``); TTL <= 1 -> drop; else
TTL - 1 with the RFC 1624 checksum update and send to ``(next_hop, port)``.

inbound (UDP -> TUN): outer source not a current peer -> drop (``check_peer_source``); malformed -> drop;
inner destination outside our subnet -> drop (``check_inner_dest``); TTL <= 1 -> drop; else TTL - 1 and
write to the TUN.

"Malformed" is: shorter than 20 bytes, longer than 65535, version != 4, IHL < 5, IHL beyond the data, or an
IPv4 total length that differs from the number of bytes received (truncated or padded).
"""
from __future__ import annotations

from fastflannel.datapath.contract import (
    FRAG_OFFSET_MASK,
    ICMP_DEST_UNREACH,
    ICMP_NET_UNREACH,
    ICMP_TTL,
    ICMP_ECHO_REQUEST,
    IPPROTO_ICMP,
    IPV4_HDR_ICMP_LIMIT,
    IPV4_HDR_MIN,
    IPV4_MAX,
)


def ip_checksum(data: bytes) -> int:
    """Return the Internet checksum (RFC 1071) of ``data`` (zero-padded to an even length)."""
    if len(data) % 2:
        data = bytes(data) + b"\0"
    s = sum(int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ttl_decrement(pkt: bytearray) -> None:
    """Decrement the TTL of the IPv4 header in ``pkt`` and patch its checksum (RFC 1624 eqn. 3, HC' = ~(~HC + ~m + m'))."""
    old = (pkt[8] << 8) | pkt[9]  # the 16-bit word holding TTL and protocol
    new = old - 0x100
    s = (~((pkt[10] << 8) | pkt[11]) & 0xFFFF) + (~old & 0xFFFF) + new
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    hc = ~s & 0xFFFF
    pkt[8] -= 1
    pkt[10] = hc >> 8
    pkt[11] = hc & 0xFF


def icmp_allowed(pkt: bytes) -> bool:
    """Tell whether flannel would answer this (well-formed) offender with an ICMP error."""
    ihl = (pkt[0] & 0x0F) * 4
    frag = ((pkt[6] << 8) | pkt[7]) & FRAG_OFFSET_MASK
    return pkt[9] != IPPROTO_ICMP and frag == 0 and ihl < IPV4_HDR_ICMP_LIMIT


def icmp_echo_request(pkt: bytes) -> bool:
    """Tell whether this (well-formed) offender is an ICMP echo request that may get a net-unreachable (RFC 1122
    3.2.2 forbids ICMP errors only about ICMP error messages; the caller rate-limits: ICMP_ECHO_UNREACH_GAP_NS)."""
    ihl = (pkt[0] & 0x0F) * 4
    frag = ((pkt[6] << 8) | pkt[7]) & FRAG_OFFSET_MASK
    return (pkt[9] == IPPROTO_ICMP and frag == 0 and ihl < IPV4_HDR_ICMP_LIMIT and len(pkt) > ihl
            and pkt[ihl] == ICMP_ECHO_REQUEST)


def icmp_net_unreachable(offender: bytes, tun_ip: int) -> bytes:
    """Build flannel's ICMP net-unreachable for ``offender``: IP header + 8 payload bytes, zero-padded."""
    ihl = (offender[0] & 0x0F) * 4
    quote = bytes(offender[:ihl + 8]).ljust(ihl + 8, b"\0")
    icmp = bytearray(8) + quote
    icmp[0] = ICMP_DEST_UNREACH
    icmp[1] = ICMP_NET_UNREACH
    ck = ip_checksum(icmp)
    icmp[2:4] = ck.to_bytes(2, "big")
    total = IPV4_HDR_MIN + len(icmp)
    iph = bytearray(IPV4_HDR_MIN)
    iph[0] = 0x45
    iph[2:4] = total.to_bytes(2, "big")
    iph[8] = ICMP_TTL
    iph[9] = IPPROTO_ICMP
    iph[12:16] = tun_ip.to_bytes(4, "big")
    iph[16:20] = offender[12:16]
    iph[10:12] = ip_checksum(iph).to_bytes(2, "big")
    return bytes(iph + icmp)


def malformed(pkt: bytes) -> bool:
    """Tell whether ``pkt`` is not one complete IPv4 packet (short, truncated, padded, wrong version or IHL)."""
    n = len(pkt)
    if n < IPV4_HDR_MIN or n > IPV4_MAX or pkt[0] >> 4 != 4:
        return True
    ihl = (pkt[0] & 0x0F) * 4
    if ihl < IPV4_HDR_MIN or ihl > n:
        return True
    return ((pkt[2] << 8) | pkt[3]) != n


__all__ = ["ip_checksum", "ttl_decrement", "icmp_allowed", "icmp_net_unreachable", "malformed"]
