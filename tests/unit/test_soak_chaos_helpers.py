# SPDX-License-Identifier: Apache-2.0
"""The pure parts of the soak and chaos tools (the runs themselves are long: ``make soak``, ``make chaos``)."""
from __future__ import annotations

import random

import pytest

from fastflannel.lab.chaos import FAULTS, PING_INTERVAL_S, PingStream, fault_plan
from fastflannel.lab.soak import build_parser, floor_delta, last_restart_s, slope_per_hour


def test_slope_per_hour_is_least_squares():
    assert slope_per_hour([(0, 10.0), (1800, 10.5), (3600, 11.0)]) == 1.0
    assert abs(slope_per_hour([(t, 50.0 + (0.3 if t % 20 else -0.3)) for t in range(0, 1800, 10)])) < 0.1
    assert slope_per_hour([(0, 1.0)]) == 0.0


def test_floor_delta_ignores_transients_but_not_a_raised_floor():
    assert floor_delta([10, 14, 10, 12, 10, 13, 10, 11]) == 0  # transient pipes/sockets
    assert floor_delta([10, 11, 10, 12, 13, 14, 13, 15]) == 3  # the floor rose: a leak


def test_fault_plan_is_seeded_and_covers_every_kind():
    a, b = fault_plan(random.Random(14), 20), fault_plan(random.Random(14), 20)
    assert a == b and set(a) == set(FAULTS) and len(a) == 20
    assert fault_plan(random.Random(15), 20) != a


def test_ping_stream_charges_losses_to_windows():
    p = PingStream.__new__(PingStream)
    # seq 1..10 every 0.1 s from t=100; 4-6 unanswered ("no answer yet"), 5 answered late after all
    p.events = [(100 + i * PING_INTERVAL_S, i, i not in (4, 5, 6)) for i in range(1, 11)]
    p.events.append((100 + 5 * PING_INTERVAL_S, 5, True))
    lost, sent, longest = p.lost_between(100.0, 102.0)
    assert (lost, sent) == (2, 10)
    assert p.lost_between(100.0, 100.35) == (0, 3, 0.0)


def test_daemon_restarts_leave_every_daemon_the_whole_slope_window():
    a = build_parser().parse_args(["--minutes", "60"])
    cutoff = last_restart_s(a.minutes, a.slope_window_min, a.warmup_min)
    assert cutoff == 27 * 60  # 60 - 30 (window) - 3 (warm-up)
    restarts = [k * a.daemon_restart_min * 60 for k in range(1, 10) if k * a.daemon_restart_min * 60 <= cutoff]
    assert restarts == [12 * 60, 24 * 60], "the default 60-minute soak restarts two daemons"
    assert last_restart_s(10, 30, 3) == 120  # a 10-minute soak judges its last 5 minutes: restarts only before 2 min


def test_rssprobe_variants_and_summary():
    from fastflannel.lab.rssprobe import parse_variant, summarize

    assert parse_variant("now=") == ("now", {})
    assert parse_variant("before=PYTHONPATH=/tmp/b,FASTFLANNEL_HEAP_TRIM_S=0") == (
        "before", {"PYTHONPATH": "/tmp/b", "FASTFLANNEL_HEAP_TRIM_S": "0"})
    for bad in ("now", "=X=1", "old=PYTHONPATH"):
        with pytest.raises(ValueError, match="--variant"):
            parse_variant(bad)
    # 1 MiB more every hour on "b", flat "a"; the warm-up sample (t=0) and a dead daemon's -1 are left out
    samples = [{"t": 0.0, "a": 99_000, "b": 1}] + [{"t": t, "a": 50_000, "b": 50_000 + t / 3600 * 1024}
                                                   for t in (600.0, 1800.0, 3600.0)] + [{"t": 3700.0, "a": -1, "b": -1}]
    rows = summarize(samples, ["a", "b"], warmup_s=300)
    assert [(r["daemon"], r["slope_mib_h"]) for r in rows] == [("a", 0.0), ("b", 1.0)]
    assert rows[1]["rss_first_mib"] == round((50_000 + 600 / 3600 * 1024) / 1024, 2)


def test_churn_step_alternates_put_and_delete_and_keeps_a_failed_delete():
    from fastflannel.lab.soak import churn_step

    class Tb:
        prefix_key, calls, fail = "/coreos.com/network", [], False

        def etcdctl(self, *args):
            if self.fail:
                raise RuntimeError("etcd down")
            self.calls.append(args[:2])

    tb, live = Tb(), []
    n = churn_step(tb, "udp", live, 0)
    assert n == 1 and live == ["/coreos.com/network/subnets/100.96.200.0-24"]
    tb.fail = True
    with pytest.raises(RuntimeError):
        churn_step(tb, "udp", live, n)
    assert live == ["/coreos.com/network/subnets/100.96.200.0-24"]  # retried at the next step
    tb.fail = False
    assert churn_step(tb, "udp", live, n) == 1 and live == []
    key = "/coreos.com/network/subnets/100.96.200.0-24"
    assert tb.calls == [("put", key), ("del", key)]
