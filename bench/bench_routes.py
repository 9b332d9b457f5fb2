# SPDX-License-Identifier: Apache-2.0
"""Benchmark the udp fast path's route lookup with 1, 256 and 65,536 routes (Cython vs the Python twin).

Network 10.0.0.0/8 with SubnetLen 24: the table has 65,536 slots whatever the number of routes, and a lookup is
one index computation ``(dst - network) >> 8``, so the cost per packet should not grow with the number of routes
(flanneld's C proxy walks a linear list with move-to-front instead). Two entry points:

- ``test_lookup_batch``: ``process_outbound_batch`` over 256 64-byte packets whose destinations cycle through
  every routed subnet (the loop's TX stage: validate, look up, TTL/checksum patch, count; no I/O);
- ``test_lookup_single``: ``FastPath.process_outbound`` on one packet (includes the Python call and the copy
  it returns, so it mostly measures the entry point, not the lookup).

No speed assertions (design rule 11): the figures go to the terminal summary and docs/benchmarks.md.
"""
from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network
from typing import Dict, Tuple

import pytest
from conftest import IMPLS

from fastflannel.datapath.twin import ip_checksum
from fastflannel.datapath.fastpath import FastPath, FastPathOptions

NETWORK = IPv4Network("10.0.0.0/8")
SUBNET_LEN = 24
OWN = IPv4Network("10.0.0.0/24")
ROUTES = [1, 256, 65536]
BATCH = 256
N_PEERS = 1024  # next hops are spread over this many peers (a big cluster shares hosts across subnets)


def packet(dst: IPv4Address, size: int = 64, ident: int = 0) -> bytes:
    h = bytearray(20)
    h[0] = 0x45
    h[2:4] = size.to_bytes(2, "big")
    h[4:6] = (ident & 0xFFFF).to_bytes(2, "big")
    h[8] = 64
    h[9] = 17
    h[12:16] = IPv4Address("10.0.0.5").packed
    h[16:20] = dst.packed
    h[10:12] = ip_checksum(h).to_bytes(2, "big")
    return bytes(h) + bytes(size - 20)


def routed_subnet(i: int) -> IPv4Network:
    """The i-th routed subnet: 10.0.1.0/24, 10.0.2.0/24, ... (slot 0 is our own subnet)."""
    return IPv4Network((int(NETWORK.network_address) + ((i + 1) << (32 - SUBNET_LEN)), SUBNET_LEN))


_CACHE: Dict[Tuple[str, int], FastPath] = {}


def fastpath(impl: str, n_routes: int) -> FastPath:
    """Return an idle FastPath of ``impl`` holding ``n_routes`` routes (built once per session)."""
    key = (impl, n_routes)
    if key not in _CACHE:
        fp = FastPath(0, 0, network=NETWORK, subnet_len=SUBNET_LEN, own_subnet=OWN,
                      tun_ip=IPv4Address("10.0.0.0"), mtu=1472,
                      options=FastPathOptions(implementation=impl))
        for i in range(min(n_routes, (1 << (SUBNET_LEN - NETWORK.prefixlen)) - 1)):
            fp.set_route(routed_subnet(i), IPv4Address(int(IPv4Address("192.168.0.1")) + i % N_PEERS))
        _CACHE[key] = fp
    return _CACHE[key]


@pytest.fixture(scope="module", autouse=True)
def _close_cached():  # type: ignore[no-untyped-def]
    yield
    for fp in _CACHE.values():
        fp.close()
    _CACHE.clear()


def batch_for(n_routes: int) -> list:
    # destinations cycle over every routed subnet (strided so consecutive packets hit distant slots)
    n = min(n_routes, 65535)
    stride = 40503 if n > BATCH else 1  # odd, coprime with powers of two: a permutation of the slots
    return [packet(routed_subnet((k * stride) % n).network_address + 7, 64, k) for k in range(BATCH)]


def record(benchmark, pps, impl: str, packets: int, n_routes: int) -> None:  # type: ignore[no-untyped-def]
    benchmark.extra_info["routes"] = n_routes
    if benchmark.stats is not None:  # None with --benchmark-disable (the smoke run)
        benchmark.extra_info["pps"] = pps(benchmark.group, impl, packets, benchmark.stats.stats.mean)


@pytest.mark.parametrize("n_routes", ROUTES)
@pytest.mark.parametrize("impl", IMPLS)
def test_lookup_batch(benchmark, pps, impl: str, n_routes: int) -> None:  # type: ignore[no-untyped-def]
    benchmark.group = f"route lookup batch {n_routes} routes"
    fp = fastpath(impl, n_routes)
    pkts = batch_for(n_routes)
    assert fp.process_outbound_batch(pkts) == BATCH  # every destination is routed
    benchmark(fp.process_outbound_batch, pkts)
    record(benchmark, pps, impl, BATCH, n_routes)


@pytest.mark.parametrize("n_routes", ROUTES)
@pytest.mark.parametrize("impl", IMPLS)
def test_lookup_single(benchmark, pps, impl: str, n_routes: int) -> None:  # type: ignore[no-untyped-def]
    benchmark.group = f"route lookup single {n_routes} routes"
    fp = fastpath(impl, n_routes)
    pkt = packet(routed_subnet(n_routes - 1 if n_routes < 65536 else 65534).network_address + 7)
    verdict, _data, nh = fp.process_outbound(pkt)
    assert verdict == "send" and nh is not None
    benchmark(fp.process_outbound, pkt)
    record(benchmark, pps, impl, 1, n_routes)
