# SPDX-License-Identifier: Apache-2.0
"""Property tests of the offload core: TSO split (TUN reads) and TCP coalescing (TUN writes).

The Cython functions (``_fastpath.gso_split``/``gro_coalesce``, the code the loop runs) are compared with the
pure-Python reference in ``twin_offload.py``, and both with the invariants: split then coalesce gives back the
original super-packet, every checksum is valid (checked with tests/helpers' RFC 1071 sum, not the data path's),
seq/id/flags are right.
"""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from packets import checksum as ip_checksum
from vnet import ACK, DST, FIN, PSH, SRC, VNET, tcp_checksum, tcp_packet, tso_read

from fastflannel.datapath import twin as ref

cy = pytest.importorskip("fastflannel.datapath._fastpath")
if getattr(cy, "IMPLEMENTATION", None) != "cython":  # pragma: no cover
    pytest.skip("Cython fast path not built", allow_module_level=True)


def check_segment(seg: bytes, mss: int) -> None:
    assert ip_checksum(seg[:20]) == 0, "IP header checksum"
    assert int.from_bytes(seg[2:4], "big") == len(seg)
    assert tcp_checksum(seg) == int.from_bytes(seg[36:38], "big"), "TCP checksum"
    doff = (seg[32] >> 4) * 4
    assert len(seg) - 20 - doff <= mss


options_st = st.sampled_from([b"", bytes([1, 1, 8, 10]) + bytes(8), bytes([2, 4, 5, 0xb4])])
flags_st = st.sampled_from([ACK, ACK | PSH, ACK | FIN, ACK | PSH | FIN])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(0, 65535 - 40 - 12), mss=st.integers(256, 1460), seq=st.integers(0, 2**32 - 1),
       ip_id=st.integers(0, 65535), flags=flags_st, options=options_st, bogus=st.booleans(), data=st.data())
def test_split_matches_reference_and_invariants(n, mss, seq, ip_id, flags, options, bogus, data) -> None:
    n = min(n, 65535 - 40 - len(options))
    payload = data.draw(st.binary(min_size=min(n, 64), max_size=min(n, 64))) * (n // 64 + 1)
    payload = payload[:n]
    buf = tso_read(payload, mss, seq, flags, ip_id, options, bogus)
    segs = cy.gso_split(buf)
    assert segs == ref.gso_split(buf)
    assert len(segs) == max(1, -(-n // mss))
    got = b""
    for i, s in enumerate(segs):
        check_segment(s, mss)
        hdr = 40 + len(options)
        assert int.from_bytes(s[4:6], "big") == (ip_id + i) & 0xFFFF
        assert int.from_bytes(s[24:28], "big") == (seq + i * mss) & 0xFFFFFFFF
        last = i == len(segs) - 1
        assert s[33] == (flags if last else flags & ~(FIN | PSH))
        assert s[hdr - len(options):hdr] == options
        got += s[hdr:]
    assert got == payload


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(nseg=st.integers(1, 44), last=st.integers(1, 1448), mss=st.integers(500, 1448),
       seq=st.integers(0, 2**32 - 1), psh=st.booleans(), options=options_st)
def test_split_then_coalesce_gives_back_the_original(nseg, last, mss, seq, psh, options) -> None:
    last = min(last, mss)
    n = (nseg - 1) * mss + last
    payload = bytes((i * 7) & 0xFF for i in range(n))
    flags = ACK | (PSH if psh else 0)
    buf = tso_read(payload, mss, seq, flags, 100, options, False)
    segs = cy.gso_split(buf)
    writes = cy.gro_coalesce(segs)
    assert writes == ref.gro_coalesce(segs)
    assert len(writes) == 1
    hdr = VNET.unpack_from(writes[0])
    out = writes[0][10:]
    if nseg == 1:
        assert hdr == (0, 0, 0, 0, 0, 0)
        assert out == segs[0]
        return
    assert hdr == (1, 1, 40 + len(options), mss, 20, 16)
    orig = buf[10:]
    # the same super-packet: headers (but the checksum field) and payload
    assert out[:36] == orig[:10] + out[10:12] + orig[12:36]
    assert ip_checksum(out[:20]) == 0
    assert out[38:] == orig[38:]
    # partial checksum = folded pseudo-header sum: splitting it again yields the same segments
    assert cy.gso_split(writes[0]) == segs


def test_coalesce_keeps_flows_apart_and_refuses_bad_packets() -> None:
    a = [tcp_packet(bytes(100), 1000 + 100 * i) for i in range(3)]
    b = [tcp_packet(bytes(100), 5000 + 100 * i, sport=40001) for i in range(2)]
    bad = tcp_packet(bytes(100), 1300)
    bad[40] ^= 0xFF  # payload changed after the checksum: must not be merged
    fin = tcp_packet(bytes(100), 1300, flags=ACK | FIN)
    gap = tcp_packet(bytes(100), 9999)
    pkts = [bytes(p) for p in (a[0], b[0], a[1], b[1], a[2], bad, fin, gap)]
    writes = cy.gro_coalesce(pkts)
    assert writes == ref.gro_coalesce(pkts)
    counts = []
    for w in writes:
        h = VNET.unpack_from(w)
        counts.append((len(w) - 10 - 40) // 100 if h[1] == 1 else 1)
    assert counts == [3, 2, 1, 1, 1]
    assert writes[2][10:] == bytes(bad) and writes[3][10:] == bytes(fin)


def test_coalesce_psh_and_short_segment_close_the_run() -> None:
    p = [tcp_packet(bytes(100), 0), tcp_packet(bytes(100), 100, flags=ACK | PSH), tcp_packet(bytes(100), 200),
         tcp_packet(bytes(50), 300), tcp_packet(bytes(100), 350)]
    writes = cy.gro_coalesce([bytes(x) for x in p])
    assert writes == ref.gro_coalesce([bytes(x) for x in p])
    assert [len(w) - 50 for w in writes] == [200, 150, 100]
    assert writes[0][10 + 33] == ACK | PSH


def test_none_with_needs_csum_is_completed() -> None:
    pkt = tcp_packet(b"hello world", 5, csum=False)
    pseudo = SRC + DST + bytes([0, 6]) + (len(pkt) - 20).to_bytes(2, "big")
    pkt[36:38] = (~ip_checksum(pseudo) & 0xFFFF).to_bytes(2, "big")
    buf = VNET.pack(1, 0, 0, 0, 20, 16) + bytes(pkt)
    (out,) = cy.gso_split(buf)
    assert out == ref.gso_split(buf)[0]
    assert tcp_checksum(out) == int.from_bytes(out[36:38], "big")


@pytest.mark.parametrize("mod", [cy, ref], ids=["cython", "python"])
def test_split_refuses_unusable_headers(mod) -> None:
    good = tso_read(bytes(3000), 1000, 0, ACK, 1, b"", False)
    for bad in (good[:5], VNET.pack(1, 4, 0, 1000, 20, 16) + good[10:],  # TCPV6
                VNET.pack(1, 1, 0, 0, 20, 16) + good[10:],  # gso_size 0
                VNET.pack(1, 1, 0, 1000, 24, 16) + good[10:],  # csum_start != IHL
                VNET.pack(1, 1, 0, 10, 20, 16) + good[10:]):  # 300 segments
        with pytest.raises(ValueError):
            mod.gso_split(bad)
