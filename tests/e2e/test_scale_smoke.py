# SPDX-License-Identifier: Apache-2.0
"""Smoke run of the scale benchmark (``python -m fastflannel.lab.scale``), so it does not rot: 100 leases programmed by
one vxlan daemon (300 kernel entries read back; leases written live and before a restart; one reconcile timed) and
by one udp daemon, and one lease propagated to 3 daemons.
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


@pytest.mark.parametrize("backend, mode", [("vxlan", "live"), ("vxlan", "restart"), ("udp", "live")])
def test_programming_smoke(backend, mode):
    res = scale.run_programming(backend, 100, mode=mode, timeout=60, reconcile=backend == "vxlan", log_fn=print)
    assert res["ok"] and res["programmed"] == 100, res
    assert res["rss_kb_after"] > 0, res
    if mode == "live":
        assert res["fds_after"] <= res["fds_before"] + 2, res
    if backend == "vxlan":
        assert res["reconcile_cpu_s"] > 0, res  # the reconcile ran against the 300 entries the daemon left


def test_logged_added_counts_lines_and_summaries():
    text = ("event=peer_added subnet=a\nevent=peers_programmed backend=udp events=100 added=98 removed=2 failed=0\n"
            "event=peer_added subnet=b\n")
    assert scale._logged_added(text) == 100


def test_propagation_smoke():
    res = scale.run_propagation(3, reps=1, log_fn=print)
    assert all(math.isfinite(v) for v in res["latency_s"][0]), res
