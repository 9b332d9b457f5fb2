# SPDX-License-Identifier: Apache-2.0
"""UDP coalescing on the TUN write side (USO): runs of one flow's datagrams written as one UDP GSO packet.

The Cython ``gro_coalesce`` (the loop's ff_gro_add/ff_gro_finish) is compared with the pure-Python reference
(``twin_offload.gro_coalesce``), and both with what the kernel makes of a write: :func:`kernel_segments` cuts a
VIRTIO_NET_HDR_GSO_UDP_L4 packet as the kernel's UDP GSO does (written here from the virtio/UDP GSO rules, not from
the data path), and every flow's datagrams must come back in order with their bytes. The last test writes the
coalesced packets into a real TUN and reads the datagrams from a socket.
"""
from __future__ import annotations

import os
import socket
import struct
import time
from typing import Dict, List, Tuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from netns_enter import in_netns, ip
from packets import checksum, ipv4_packet, udp_datagram, udp_packet
from vnet import VNET, tcp_packet

from fastflannel.datapath import twin as ref
from fastflannel.datapath.contract import USO_SEGS

cy = pytest.importorskip("fastflannel.datapath._fastpath")
if getattr(cy, "IMPLEMENTATION", None) != "cython":  # pragma: no cover
    pytest.skip("Cython fast path not built", allow_module_level=True)

SRC, DST = "10.244.2.5", "10.244.1.7"
GSO_UDP_L4 = 5


def kernel_segments(write: bytes) -> List[bytes]:
    """The IPv4 packets the kernel delivers for one TUN write (virtio_net_hdr + packet)."""
    flags, gso_type, hdr_len, gso_size, cstart, coff = VNET.unpack_from(write)
    ip = write[10:]
    if gso_type == 0:
        assert flags == 0 and len(ip) == int.from_bytes(ip[2:4], "big")
        return [ip]
    if gso_type == 1:  # a TCP run: the TSO split (tested against its invariants in test_offload.py)
        return ref.gso_split(write)
    assert (flags, gso_type, hdr_len, cstart, coff) == (1, GSO_UDP_L4, 28, 20, 6)
    assert int.from_bytes(ip[2:4], "big") == len(ip) and checksum(ip[:20]) == 0
    assert int.from_bytes(ip[24:26], "big") == len(ip) - 20
    pseudo = ip[12:20] + bytes([0, 17]) + (len(ip) - 20).to_bytes(2, "big")
    assert int.from_bytes(ip[26:28], "big") == (~checksum(pseudo) & 0xFFFF), "partial = folded pseudo-header sum"
    payload = ip[28:]
    assert 1 < -(-len(payload) // gso_size) <= USO_SEGS
    out = []
    for i in range(0, len(payload), gso_size):
        piece = payload[i:i + gso_size]
        h = bytearray(ip[:28])
        h[2:4] = (28 + len(piece)).to_bytes(2, "big")
        h[10:12] = b"\0\0"
        h[10:12] = checksum(bytes(h[:20])).to_bytes(2, "big")
        h[24:26] = (8 + len(piece)).to_bytes(2, "big")
        h[26:28] = b"\0\0"
        c = checksum(bytes(h[12:20]) + bytes([0, 17]) + (8 + len(piece)).to_bytes(2, "big") + bytes(h[20:]) + piece)
        h[26:28] = (c or 0xFFFF).to_bytes(2, "big")
        out.append(bytes(h) + piece)
    return out


def flows(packets: List[bytes]) -> Dict[Tuple[int, bytes], List[bytes]]:
    """Per flow (protocol, addresses and ports): the packets' transport payloads, in order."""
    out: Dict[Tuple[int, bytes], List[bytes]] = {}
    for p in packets:
        hl = 28 if p[9] == 17 else 20 + (p[32] >> 4) * 4
        out.setdefault((p[9], p[12:24]), []).append(p[hl:])
    return out


datagram_st = st.tuples(st.integers(0, 2), st.sampled_from([1, 36, 36, 36, 100, 1400]), st.sampled_from([64, 64, 63]),
                        st.sampled_from(["ok", "ok", "ok", "nocsum", "bad", "tcp"]))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=st.lists(datagram_st, min_size=1, max_size=300), uso=st.booleans())
def test_udp_runs_match_reference_and_give_back_every_datagram(spec, uso) -> None:
    pkts = []
    for i, (flow, size, ttl, kind) in enumerate(spec):
        if kind == "tcp":
            pkts.append(bytes(tcp_packet(bytes([i & 0xFF]) * size, 1000 + i)))
            continue
        p = bytearray(udp_packet(SRC, DST, 40000 + flow, 5000, bytes([i & 0xFF]) * size, ttl=ttl, ident=i,
                                 csum=kind != "nocsum"))
        if kind == "bad":
            p[-1] ^= 0x5A  # payload changed after the checksum: written as is, never merged
        pkts.append(bytes(p))
    writes = cy.gro_coalesce(pkts, uso)
    assert writes == ref.gro_coalesce(pkts, uso)
    delivered = [seg for w in writes for seg in kernel_segments(w)]
    assert flows(delivered) == flows(pkts)
    if not uso:
        assert all(VNET.unpack_from(w)[1] != GSO_UDP_L4 for w in writes)


raw_st = st.tuples(st.sampled_from([17, 17, 6, 1]), st.sampled_from([0, 0, 0x4000, 0x2000, 0x0001]),
                   st.binary(min_size=0, max_size=120), st.booleans())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=st.lists(raw_st, min_size=1, max_size=80))
def test_fuzz_well_formed_ip_with_random_transport_bytes(raw) -> None:
    """What the loop hands ff_gro_add (IPv4 that passed the malformed check) with any transport bytes: C and
    Python agree, nothing crashes, and every flow's packets come back in order."""
    pkts = []
    for i, (proto, frag, body, fix) in enumerate(raw):
        if fix and proto == 17 and len(body) >= 8:  # a plausible UDP header over the random bytes, half the time
            body = (body[:4] + (len(body)).to_bytes(2, "big") + b"\0\0" + body[8:])
        pkts.append(ipv4_packet(SRC, DST, proto=proto, frag=frag, payload=body, ident=i))
    writes = cy.gro_coalesce(pkts)
    assert writes == ref.gro_coalesce(pkts)
    delivered = [seg for w in writes for seg in kernel_segments(w)]

    def udp(p: bytes) -> bool:
        return p[9] == 17 and len(p) >= 24

    def udp_flows(ps: List[bytes]) -> Dict[bytes, List[bytes]]:
        out: Dict[bytes, List[bytes]] = {}
        for p in ps:
            if udp(p):
                out.setdefault(p[12:24], []).append(p[28:])
        return out

    assert udp_flows(delivered) == udp_flows(pkts)
    assert [p for p in delivered if not udp(p)] == [p for p in pkts if not udp(p)]  # the rest as it came


@pytest.mark.parametrize("spec", [[(0, 1, 64, "ok"), (0, 36, 64, "ok"), (0, 1, 64, "ok"), (0, 1, 64, "ok")],
                                  [(0, 1, 64, "ok"), (0, 1, 64, "bad"), (0, 1, 64, "ok")]],
                         ids=["older-run-must-not-take-a-later-datagram", "a-datagram-that-cannot-join-closes-the-run"])
def test_udp_run_order_regressions(spec) -> None:
    """The two reorderings the property test found while the UDP runs were written, kept as fixed cases."""
    test_udp_runs_match_reference_and_give_back_every_datagram.hypothesis.inner_test(spec=spec, uso=True)


def test_a_run_stops_at_the_segment_limit_a_short_datagram_and_a_header_change() -> None:
    same = [udp_packet(SRC, DST, 4000, 53, bytes(36), ident=i) for i in range(USO_SEGS + 3)]
    writes = cy.gro_coalesce(same)
    assert writes == ref.gro_coalesce(same)
    assert [len(kernel_segments(w)) for w in writes] == [USO_SEGS, 3]
    mixed = [udp_packet(SRC, DST, 4000, 53, bytes(36)), udp_packet(SRC, DST, 4000, 53, bytes(20)),
             udp_packet(SRC, DST, 4000, 53, bytes(36)), udp_packet(SRC, DST, 4000, 53, bytes(36), ttl=9),
             udp_packet(SRC, DST, 4000, 53, bytes(36), ttl=9)]
    writes = cy.gro_coalesce(mixed)
    assert writes == ref.gro_coalesce(mixed)
    assert [len(kernel_segments(w)) for w in writes] == [2, 1, 2]  # short closes; a new TTL starts a new run
    big = [udp_packet(SRC, DST, 4000, 53, bytes(1400)) for _ in range(50)]  # 65535 bytes hold 46 of them
    assert [len(kernel_segments(w)) for w in cy.gro_coalesce(big)] == [46, 4]


def test_fragments_and_options_are_written_as_they_came() -> None:
    frag = bytearray(udp_packet(SRC, DST, 4000, 53, bytes(36)))
    frag[6] = 0x20  # more fragments
    frag[10:12] = b"\0\0"
    frag[10:12] = checksum(bytes(frag[:20])).to_bytes(2, "big")
    opts = ipv4_packet(SRC, DST, options=b"\x01\x01\x01\x01", payload=udp_datagram(SRC, DST, 4000, 53, bytes(36)))
    pkts = [bytes(frag), bytes(frag), opts, opts]  # a fragment, and IHL 6: never merged
    writes = cy.gro_coalesce(pkts)
    assert writes == ref.gro_coalesce(pkts) == [bytes(10) + p for p in pkts]


@pytest.mark.netns
def test_coalesced_udp_writes_reach_a_socket_as_the_original_datagrams(fresh_netns: str) -> None:
    from fastflannel.kernel.tun import open_tun_offload, uso_supported

    if os.geteuid() != 0:
        pytest.skip("needs root")
    with in_netns(fresh_netns):
        fd, name = open_tun_offload("fftun%d")
    try:
        if not uso_supported(fd):
            pytest.skip("this kernel takes no UDP GSO writes on a TUN (Linux < 6.2)")
        ip(fresh_netns, "addr", "add", f"{DST}/24", "dev", name)
        ip(fresh_netns, "link", "set", name, "up")
        ip(fresh_netns, "route", "add", "10.244.2.0/24", "dev", name)
        with in_netns(fresh_netns):
            rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        rx.bind((DST, 5000))
        pkts = [udp_packet(SRC, DST, 40000 + (i % 3), 5000, struct.pack("!I", i) * (9 + i % 3), ident=i)
                for i in range(600)]
        writes = cy.gro_coalesce(pkts)
        assert len(writes) < len(pkts) // 10 and any(VNET.unpack_from(w)[1] == GSO_UDP_L4 for w in writes)
        for w in writes:
            os.write(fd, w)
        got: Dict[int, List[bytes]] = {}
        deadline = time.monotonic() + 10  # liveness bound only
        rx.settimeout(0.5)
        while sum(map(len, got.values())) < len(pkts) and time.monotonic() < deadline:
            try:
                data, (_, sport) = rx.recvfrom(2048)
            except socket.timeout:
                continue
            got.setdefault(sport, []).append(data)
        want: Dict[int, List[bytes]] = {}
        for p in pkts:
            want.setdefault(int.from_bytes(p[20:22], "big"), []).append(p[28:])
        assert got == want
        rx.close()
    finally:
        os.close(fd)
