# SPDX-License-Identifier: Apache-2.0
"""The slow reference of the offloads: the TSO split and the TCP and UDP coalescing (fastpath research notes 1.3,
1.4).

The Cython loop's ff_gso_split / ff_gro_add / ff_gro_finish (parts/offload.pxi) do the same; tests/datapath/
test_offload.py compares the two. The pure-Python loop has no offload mode; this is only the reference.
"""
from __future__ import annotations

import struct
from typing import List, Sequence

from fastflannel.datapath.contract import (
    IPPROTO_TCP,
    IPPROTO_UDP,
    IPV4_HDR_MIN,
    IPV4_MAX,
    SEGS_MAX,
    TCP_ACK,
    TCP_FIN,
    TCP_PSH,
    USO_SEGS,
    VIRTIO_F_NEEDS_CSUM,
    VIRTIO_GSO_NONE,
    VIRTIO_GSO_TCPV4,
    VIRTIO_GSO_UDP_L4,
    VNET_HDR_LEN,
    WSLOTS,
)
from fastflannel.datapath.twin_rules import ip_checksum

_VNET = struct.Struct("=BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset


def tcp_checksum(ip: bytes, ihl: int = 20) -> int:
    """Return the TCP checksum of IPv4 packet ``ip`` computed in full (pseudo-header included), field as zero."""
    seg = bytearray(ip[ihl:])
    seg[16:18] = b"\0\0"
    pseudo = bytes(ip[12:20]) + bytes([0, IPPROTO_TCP]) + len(seg).to_bytes(2, "big")
    return ip_checksum(pseudo + bytes(seg))


def _fold_sum(data: bytes) -> int:
    """Folded (not complemented) one's-complement sum."""
    return ~ip_checksum(data) & 0xFFFF


def gso_split(buf: bytes) -> List[bytes]:
    """Split one TUN read (virtio_net_hdr + packet) into plain IPv4 packets (the tx loop's ff_gso_split).

    NONE: the packet, with its checksum completed if NEEDS_CSUM. TCPV4: hdr_len recomputed; per segment i: IP id
    + i, total length, header checksum; seq + i * gso_size; FIN/PSH only on the last; TCP checksum in full.
    Raises ValueError for what the loop counts as tx_drop_malformed.
    """
    if len(buf) < VNET_HDR_LEN:
        raise ValueError("shorter than a virtio_net_hdr")
    flags, gso_type, _hdr_len, gso_size, cs, co = _VNET.unpack_from(buf)
    pkt = bytearray(buf[VNET_HDR_LEN:])
    if gso_type == VIRTIO_GSO_NONE:
        if flags & VIRTIO_F_NEEDS_CSUM:
            if cs + co + 2 > len(pkt):
                raise ValueError("checksum offset outside the packet")
            # the field holds the folded pseudo-header sum: summing over it completes the checksum
            pkt[cs + co:cs + co + 2] = ip_checksum(bytes(pkt[cs:])).to_bytes(2, "big")
        return [bytes(pkt)]
    if gso_type != VIRTIO_GSO_TCPV4:
        raise ValueError(f"gso_type {gso_type} not supported")
    if len(pkt) < IPV4_HDR_MIN or pkt[0] >> 4 != 4 or pkt[9] != IPPROTO_TCP:
        raise ValueError("not an IPv4 TCP packet")
    ihl = (pkt[0] & 0x0F) * 4
    if ihl < IPV4_HDR_MIN or cs != ihl or len(pkt) < ihl + 20 or gso_size == 0:
        raise ValueError("bad header lengths")
    doff = (pkt[ihl + 12] >> 4) * 4
    hdr = ihl + doff
    if doff < 20 or hdr > len(pkt):
        raise ValueError("bad TCP data offset")
    payload = bytes(pkt[hdr:])
    nseg = max(1, -(-len(payload) // gso_size))
    if nseg > SEGS_MAX:
        raise ValueError("too many segments")
    seq0 = int.from_bytes(pkt[ihl + 4:ihl + 8], "big")
    id0 = int.from_bytes(pkt[4:6], "big")
    tflags = pkt[ihl + 13]
    out = []
    for i in range(nseg):
        data = payload[i * gso_size:(i + 1) * gso_size]
        o = bytearray(pkt[:hdr]) + data
        o[2:4] = len(o).to_bytes(2, "big")
        o[4:6] = ((id0 + i) & 0xFFFF).to_bytes(2, "big")
        o[10:12] = b"\0\0"
        o[10:12] = ip_checksum(bytes(o[:ihl])).to_bytes(2, "big")
        o[ihl + 4:ihl + 8] = ((seq0 + i * gso_size) & 0xFFFFFFFF).to_bytes(4, "big")
        if i != nseg - 1:
            o[ihl + 13] = tflags & ~(TCP_FIN | TCP_PSH) & 0xFF
        o[ihl + 16:ihl + 18] = tcp_checksum(bytes(o), ihl).to_bytes(2, "big")
        out.append(bytes(o))
    return out


def gro_candidate(p: bytes) -> bool:
    """IHL 5, TCP, not a fragment, TCP header inside, flags exactly ACK or ACK|PSH, payload > 0."""
    if len(p) < 40 or p[0] != 0x45 or p[9] != IPPROTO_TCP or (p[6] & 0x3F) or p[7]:
        return False
    doff = (p[32] >> 4) * 4
    if doff < 20 or 20 + doff >= len(p):
        return False
    return (p[33] & ~TCP_PSH) == TCP_ACK


def uso_candidate(p: bytes) -> bool:
    """IHL 5, UDP, not a fragment, the UDP length field covering the rest exactly, payload > 0, and a checksum
    that is absent (0) or verifies."""
    if len(p) < 29 or p[0] != 0x45 or p[9] != IPPROTO_UDP or (p[6] & 0x3F) or p[7]:
        return False
    if int.from_bytes(p[24:26], "big") != len(p) - 20:
        return False
    if p[26:28] == b"\0\0":
        return True
    pseudo = bytes(p[12:20]) + bytes([0, IPPROTO_UDP]) + (len(p) - 20).to_bytes(2, "big")
    return ip_checksum(pseudo + bytes(p[20:])) == 0


def gro_coalesce(packets: Sequence[bytes], uso: bool = True) -> List[bytes]:
    """Coalesce IPv4 packets for the TUN (the rx loop's ff_gro_add/ff_gro_finish); return the writes.

    Append only: a packet joins the newest pending item of its flow (protocol, addresses, ports, and for TCP the
    ACK number) if that item is open and the packet has the item's TOS, TTL and IP flags and the result fits 65535
    bytes. TCP: the same header length and options, the packet continues the sequence and is no larger than the
    first segment; a shorter or PSH segment closes the item. UDP (``uso``): a payload no larger than the first
    datagram's, at most USO_SEGS datagrams; a shorter one closes the item. Checksums are verified first (an
    invalid packet is written as is). Items of more than one packet get a NEEDS_CSUM/TCPV4 or NEEDS_CSUM/UDP_L4
    header and the folded pseudo-header sum in the checksum field; the rest a zero header.
    """
    items: List[dict] = []
    out: List[bytes] = []

    def flush() -> None:
        for it in items:
            ip = it["buf"]
            if it["count"] > 1:
                ip[2:4] = len(ip).to_bytes(2, "big")
                ip[10:12] = b"\0\0"
                ip[10:12] = ip_checksum(bytes(ip[:20])).to_bytes(2, "big")
                proto = it["key"][0]
                pseudo = bytes(ip[12:20]) + bytes([0, proto]) + (len(ip) - 20).to_bytes(2, "big")
                if proto == IPPROTO_UDP:
                    ip[24:26] = (len(ip) - 20).to_bytes(2, "big")
                    ip[26:28] = _fold_sum(pseudo).to_bytes(2, "big")
                    hdr = _VNET.pack(VIRTIO_F_NEEDS_CSUM, VIRTIO_GSO_UDP_L4, 28, it["gso"], 20, 6)
                else:
                    ip[36:38] = _fold_sum(pseudo).to_bytes(2, "big")
                    hdr = _VNET.pack(VIRTIO_F_NEEDS_CSUM, VIRTIO_GSO_TCPV4, it["hlen"], it["gso"], 20, 16)
            else:
                hdr = bytes(VNET_HDR_LEN)
            out.append(hdr + bytes(ip))
        items.clear()

    def start(p: bytes, key, hlen: int, pay: int, nxt: int, is_open: bool) -> None:
        if len(items) == WSLOTS:
            flush()
        items.append({"key": key, "hlen": hlen, "gso": pay, "next": nxt, "open": is_open, "count": 1,
                      "buf": bytearray(p)})

    for p in packets:
        p = bytes(p)
        if len(p) > IPV4_MAX:
            raise ValueError("packet longer than 65535 bytes")
        if gro_candidate(p) and tcp_checksum(p) == int.from_bytes(p[36:38], "big"):
            hlen = 20 + (p[32] >> 4) * 4
            pay = len(p) - hlen
            key = (IPPROTO_TCP, p[12:20], p[20:24], p[28:32])
            seq = int.from_bytes(p[24:28], "big")
            merged = False
            for it in reversed(items):
                if it["open"] and it["key"] == key:
                    h = it["buf"]
                    if (it["hlen"] == hlen and it["next"] == seq and pay <= it["gso"]
                            and len(h) + pay <= IPV4_MAX and h[1] == p[1] and h[8] == p[8] and h[6] == p[6]
                            and h[40:hlen] == p[40:hlen]):
                        h += p[hlen:]
                        it["next"] = (seq + pay) & 0xFFFFFFFF
                        it["count"] += 1
                        if pay < it["gso"]:
                            it["open"] = False
                        if p[33] & TCP_PSH:
                            h[33] |= TCP_PSH
                            it["open"] = False
                        merged = True
                    break
            if not merged:
                start(p, key, hlen, pay, (seq + pay) & 0xFFFFFFFF, not (p[33] & TCP_PSH))
        elif uso and uso_candidate(p):
            pay = len(p) - 28
            key = (IPPROTO_UDP, p[12:20], p[20:24], b"\0\0\0\0")
            merged = False
            for it in reversed(items):
                if it["open"] and it["key"] == key:
                    h = it["buf"]
                    if (pay <= it["gso"] and it["count"] < USO_SEGS and len(h) + pay <= IPV4_MAX
                            and h[1] == p[1] and h[8] == p[8] and h[6] == p[6]):
                        h += p[28:]
                        it["count"] += 1
                        if pay < it["gso"] or it["count"] == USO_SEGS:
                            it["open"] = False
                        merged = True
                    else:
                        it["open"] = False  # one open run per UDP flow: an older one never takes a later datagram
                    break
            if not merged:
                start(p, key, 28, pay, 0, True)
        else:
            if uso and p[9] == IPPROTO_UDP and len(p) >= 24:  # a datagram of an open run's flow that cannot join
                for it in items:  # it closes the run, or the next one would overtake it
                    if it["key"] == (IPPROTO_UDP, p[12:20], p[20:24], b"\0\0\0\0"):
                        it["open"] = False
            start(p, None, 0, 0, 0, False)
    flush()
    return out


__all__ = ["tcp_checksum", "gso_split", "gro_candidate", "uso_candidate", "gro_coalesce", "VNET_HDR_LEN"]
