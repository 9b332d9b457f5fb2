# SPDX-License-Identifier: Apache-2.0
"""Benchmark the control plane's pure parts at cluster scale: lease diffing and subnet allocation.

- ``LeaseWatcher.reset`` with 10,000 leases: a cold start (nothing known, 10,000 Added), a resync where nothing
  changed (the common case after an etcd watch is re-established: 0 events) and one where 1% of the leases changed
  attributes, 1% vanished and 1% are new.
- ``LeaseWatcher.update`` with a batch of 10,000 Added events, and a batch of 10,000 Removed events.
- ``pick_subnet`` in a nearly full /8 (SubnetLen 24: 65,535 candidate /24s, all but 10 leased); flanneld tests
  every candidate against every lease (O(candidates x leases)), our allocator walks merged intervals.

No speed assertions (design rule 11).
"""
from __future__ import annotations

import random
from ipaddress import IPv4Address, IPv4Network
from typing import List

import pytest

from fastflannel.config import parse_config
from fastflannel.lease import Event, EventType, Lease, LeaseAttrs, LeaseWatcher
from fastflannel.subnet.allocator import free_candidates, pick_subnet

N_LEASES = 10_000
NETWORK = IPv4Network("10.0.0.0/8")


def make_leases(n: int, offset: int = 0, vtep: str = "aa:bb:cc:00:00:") -> List[Lease]:
    out = []
    for i in range(offset, offset + n):
        subnet = IPv4Network((int(NETWORK.network_address) + ((i + 1) << 8), 24))
        attrs = LeaseAttrs(public_ip=IPv4Address(int(IPv4Address("192.168.0.0")) + i + 1), backend_type="vxlan",
                           backend_data={"VNI": 1, "VtepMAC": f"{vtep}{i % 256:02x}"})
        out.append(Lease(subnet=subnet, attrs=attrs))
    return out


BASE = make_leases(N_LEASES)
OWN = IPv4Network("10.255.255.0/24")


def changed_snapshot() -> List[Lease]:
    """BASE with 1% changed attributes, 1% removed and 1% new leases."""
    pct = N_LEASES // 100
    snap = list(BASE[pct:])  # the first 1% vanished
    for k in range(pct, 2 * pct):  # the next 1% changed VtepMAC
        old = snap[k]
        snap[k] = Lease(old.subnet, LeaseAttrs(old.attrs.public_ip, "vxlan", {"VNI": 1, "VtepMAC": "de:ad:be:ef:00:01"}))
    snap.extend(make_leases(pct, offset=N_LEASES))
    return snap


def test_reset_cold(benchmark) -> None:  # type: ignore[no-untyped-def]
    def run():  # type: ignore[no-untyped-def]
        return LeaseWatcher(OWN).reset(BASE)

    events = benchmark(run)
    assert len(events) == N_LEASES


def test_reset_unchanged(benchmark) -> None:  # type: ignore[no-untyped-def]
    w = LeaseWatcher(OWN)
    w.reset(BASE)
    snapshot = list(BASE)
    events = benchmark(w.reset, snapshot)
    assert events == []


def test_reset_changed_1pct(benchmark) -> None:  # type: ignore[no-untyped-def]
    snap = changed_snapshot()

    def setup():  # type: ignore[no-untyped-def]
        w = LeaseWatcher(OWN)
        w.reset(BASE)
        return (w,), {}

    def run(w):  # type: ignore[no-untyped-def]
        return w.reset(snap)

    events = benchmark.pedantic(run, setup=setup, rounds=20)
    pct = N_LEASES // 100
    assert len(events) == 3 * pct


def test_update_added(benchmark) -> None:  # type: ignore[no-untyped-def]
    events = [Event(EventType.ADDED, lease) for lease in BASE]

    def setup():  # type: ignore[no-untyped-def]
        return (LeaseWatcher(OWN),), {}

    out = benchmark.pedantic(lambda w: w.update(events), setup=setup, rounds=20)
    assert len(out) == N_LEASES


def test_update_removed(benchmark) -> None:  # type: ignore[no-untyped-def]
    events = [Event(EventType.REMOVED, lease) for lease in BASE]

    def setup():  # type: ignore[no-untyped-def]
        w = LeaseWatcher(OWN)
        w.reset(BASE)
        return (w,), {}

    out = benchmark.pedantic(lambda w: w.update(events), setup=setup, rounds=20)
    assert len(out) == N_LEASES


@pytest.fixture(scope="module")
def nearly_full_slash8():  # type: ignore[no-untyped-def]
    config = parse_config('{"Network": "10.0.0.0/8", "SubnetLen": 24, "Backend": {"Type": "vxlan"}}')
    lo, hi = int(config.subnet_min), int(config.subnet_max)
    every = [IPv4Network((a, 24)) for a in range(lo, hi + 1, 256)]
    rng = random.Random(1)
    free = set(rng.sample(range(len(every)), 10))
    taken = [n for i, n in enumerate(every) if i not in free]
    rng.shuffle(taken)  # leases come back from etcd in key order, not address order; do not help the sort
    return config, taken, {every[i] for i in free}


def test_pick_subnet_nearly_full_slash8(benchmark, nearly_full_slash8) -> None:  # type: ignore[no-untyped-def]
    config, taken, free = nearly_full_slash8
    rng = random.Random(7)
    got = benchmark(pick_subnet, config, taken, rng)
    assert got in free
    assert len(free_candidates(config, taken)) == len(free)
    benchmark.extra_info["leases"] = len(taken)


def test_pick_subnet_empty_slash8(benchmark) -> None:  # type: ignore[no-untyped-def]
    config = parse_config('{"Network": "10.0.0.0/8", "SubnetLen": 24, "Backend": {"Type": "vxlan"}}')
    got = benchmark(pick_subnet, config, [], random.Random(7))
    assert got.prefixlen == 24
