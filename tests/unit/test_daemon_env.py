# SPDX-License-Identifier: Apache-2.0
"""The daemon's timing knobs from the environment (daemon.lease_timing, daemon.lease_resync_period): defaults,
values, and a StartupError that names the variable for a bad one."""
from __future__ import annotations

import pytest

from fastflannel.daemon import StartupError, lease_resync_period, lease_timing
from fastflannel.options import DaemonOptions
from fastflannel.subnet.manager import DEFAULT_RESYNC_S, DEFAULT_TTL_S


def test_lease_resync_period(monkeypatch):
    monkeypatch.delenv("FASTFLANNEL_LEASE_RESYNC_S", raising=False)
    assert lease_resync_period() == DEFAULT_RESYNC_S == 60.0
    monkeypatch.setenv("FASTFLANNEL_LEASE_RESYNC_S", "3600")
    assert lease_resync_period() == 3600.0
    for bad in ("hourly", "0", "-1"):
        monkeypatch.setenv("FASTFLANNEL_LEASE_RESYNC_S", bad)
        with pytest.raises(StartupError, match="FASTFLANNEL_LEASE_RESYNC_S"):
            lease_resync_period()


def test_lease_ttl_and_renew_margin(monkeypatch):
    opts = DaemonOptions()
    monkeypatch.delenv("FASTFLANNEL_SUBNET_TTL", raising=False)
    ttl, margin = lease_timing(opts)
    assert ttl == DEFAULT_TTL_S == 86400 and margin == opts.subnet_lease_renew_margin * 60.0
    monkeypatch.setenv("FASTFLANNEL_SUBNET_TTL", "6")
    assert lease_timing(opts) == (6, 3.0)  # the margin is capped at half a short TTL
    for bad in ("1", "day"):
        monkeypatch.setenv("FASTFLANNEL_SUBNET_TTL", bad)
        with pytest.raises(StartupError, match="FASTFLANNEL_SUBNET_TTL"):
            lease_timing(opts)
