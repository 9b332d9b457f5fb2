# SPDX-License-Identifier: Apache-2.0
"""Smoke run of the scale benchmark (``python -m fastflannel.lab.scale``), so it does not rot: 100 leases programmed by
one vxlan daemon (300 kernel entries read back) and by one udp daemon, and one lease propagated to 3 daemons.
No timing assertion (the figures are for docs/scale.md and vary with the shared machine); only completeness.
"""
from __future__ import annotations

import math

import pytest

from fastflannel.lab import scale

pytestmark = [pytest.mark.netns, pytest.mark.etcd]


@pytest.fixture(autouse=True)
def _tiers(make_testbed):  # make_testbed skips with a reason without root/netns/etcd
    yield


@pytest.mark.parametrize("backend", ["vxlan", "udp"])
def test_programming_smoke(backend):
    res = scale.run_programming(backend, 100, timeout=60, log_fn=print)
    assert res["ok"] and res["programmed"] == 100, res
    assert res["rss_kb_after"] > 0 and res["fds_after"] <= res["fds_before"] + 2, res


def test_propagation_smoke():
    res = scale.run_propagation(3, reps=1, log_fn=print)
    assert all(math.isfinite(v) for v in res["latency_s"][0]), res
