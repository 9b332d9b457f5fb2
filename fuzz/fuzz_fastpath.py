# SPDX-License-Identifier: Apache-2.0
"""Coverage-guided fuzzing (atheris/libFuzzer) of the fast path's per-packet rules: Cython against the Python twin.

Run: ``make fuzz`` (60 s by default; ``FUZZ_SECONDS=600 make fuzz``), or directly
``.venv/bin/python fuzz/fuzz_fastpath.py -max_total_time=60 fuzz/corpus``. Not part of ``make test``.

Each input: byte 0 picks the inbound switches and the source (a peer or a stranger), byte 1 the geometry, the rest
is one packet given to process_outbound and process_inbound of both implementations. A difference in verdict,
output bytes, next hop or any counter raises (libFuzzer then writes the input as ``crash-*``). The Python twin is
instrumented (coverage feedback); the compiled loop is not, so its coverage comes from the twin's branches.
"""
from __future__ import annotations

import sys
from ipaddress import IPv4Address, IPv4Network

import atheris

with atheris.instrument_imports():
    from fastflannel.datapath import twin as _fastpath_py  # noqa: F401  (instrumented: the twin's branches guide the search)
    from fastflannel.datapath.fastpath import FastPath, FastPathOptions

PEER, STRANGER = IPv4Address("192.0.2.2"), IPv4Address("192.0.2.3")
GEOMETRIES = [  # (network, subnet_len, own subnet, routed subnets)
    (IPv4Network("10.244.0.0/16"), 24, IPv4Network("10.244.1.0/24"), ["10.244.2.0/24", "10.244.255.0/24"]),
    (IPv4Network("10.0.0.0/8"), 20, IPv4Network("10.0.16.0/20"), ["10.255.240.0/20", "10.0.0.0/20"]),
    (IPv4Network("172.16.0.0/12"), 28, IPv4Network("172.16.0.16/28"), ["172.31.255.240/28"]),
]


def _make(impl: str, geo: int, check_peer: bool, check_dest: bool) -> FastPath:
    network, slen, own, routed = GEOMETRIES[geo % len(GEOMETRIES)]
    fp = FastPath(0, 0, network=network, subnet_len=slen, own_subnet=own, tun_ip=own.network_address, mtu=1472,
                  options=FastPathOptions(implementation=impl, check_peer_source=check_peer,
                                          check_inner_dest=check_dest))
    for r in routed:
        fp.set_route(IPv4Network(r), PEER)
    return fp


def test_one(data: bytes) -> None:
    if len(data) < 2:
        return
    flags, geo, pkt = data[0], data[1], data[2:]
    src = STRANGER if flags & 4 else PEER
    out = []
    for impl in ("cython", "python"):
        fp = _make(impl, geo, bool(flags & 1), bool(flags & 2))
        try:
            out.append((fp.process_outbound(pkt), fp.process_inbound(src, pkt), fp.stats()))
        finally:
            fp.close()
    if out[0] != out[1]:
        raise AssertionError(f"cython and python disagree on {pkt.hex()}:\n{out[0]}\n{out[1]}")


def main() -> None:
    atheris.Setup(sys.argv, test_one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
