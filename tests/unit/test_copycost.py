# SPDX-License-Identifier: Apache-2.0
"""The copy-cost accounting of lab/copycost.py on a perf report excerpt (no perf, no root)."""
from __future__ import annotations

import math

import pytest

from fastflannel.lab.copycost import ceiling_gbps, parse_perf_report, top_daemon_kernel, per_gbit, shares

REPORT = """
     8.79%  python           [k] _copy_from_iter
     4.84%  iperf3           [k] _copy_from_iter
     4.41%  python           [k] _copy_to_iter
     3.37%  iperf3           [k] _copy_to_iter
     4.98%  swapper          [k] pv_native_safe_halt
     1.86%  python           [.] __memmove_avx_unaligned_erms
     2.46%  python           [.] __pyx_f_11fastflannel_8datapath_9_fastpath_ff_gro_add
    69.29%  iperf3           [k] tcp_sendmsg_locked
# a comment line perf prints
"""


def test_shares_split_copies_by_who_pays_them() -> None:
    rows = parse_perf_report(REPORT)
    assert len(rows) == 8 and rows[0] == (8.79, "python", "k", "_copy_from_iter")
    s = shares(rows)
    assert s["busy"] == pytest.approx(1 - 0.0498)
    assert s["copies_daemon"] == pytest.approx(0.0879 + 0.0441)
    assert s["copies_app"] == pytest.approx(0.0484 + 0.0337)
    assert s["user_copies_daemon"] == pytest.approx(0.0186)  # ff_gro_add is our code, not a libc copy
    assert s["user_daemon"] == pytest.approx(0.0186 + 0.0246)  # all of the daemons' user space, no kernel row


def test_per_gbit_is_core_seconds_over_gigabits() -> None:
    # 10 % of 2 CPUs for 8 s = 1.6 core-s, over 4 Gb/s x 8 s = 32 Gbit
    assert per_gbit({"x": 0.10}, cpus=2, seconds=8, gbps=4.0)["x"] == pytest.approx(0.05)
    assert math.isnan(per_gbit({"x": 0.10}, cpus=2, seconds=8, gbps=0.0)["x"])  # nothing delivered


def test_ceiling_is_the_rate_that_fills_every_cpu() -> None:
    assert ceiling_gbps(0.25, cpus=2) == pytest.approx(8.0)
    assert ceiling_gbps(0.0, cpus=2) == float("inf")


def test_top_daemon_kernel_keeps_only_the_daemons_kernel_rows() -> None:
    top = top_daemon_kernel(parse_perf_report(REPORT), 5)
    assert top == [(8.79, "_copy_from_iter"), (4.41, "_copy_to_iter")]  # iperf3, user space and idle left out
