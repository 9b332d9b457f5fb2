# SPDX-License-Identifier: Apache-2.0
"""``python -m fastflannel.lab.rssprobe`` for real, briefly: two daemons, each with its own environment, sampled
and summarised (no memory assertion: the probe's figures are for reading side by side, docs/soak.md)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.netns
@pytest.mark.etcd
def test_rssprobe_runs_one_daemon_per_variant_and_writes_the_summary(tmp_path: Path) -> None:
    out = tmp_path / "probe.json"
    r = subprocess.run([sys.executable, "-m", "fastflannel.lab.rssprobe", "--backend", "host-gw", "--minutes", "0.3",
                        "--interval", "4", "--churn-s", "3", "--warmup-min", "0", "--json", str(out),
                        "--variant", "now=", "--variant", "notrim=FASTFLANNEL_HEAP_TRIM_S=0"],
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    data = json.loads(out.read_text())
    assert [row["daemon"] for row in data["summary"]] == ["now", "notrim"]
    assert len(data["samples"]) >= 3
    for row in data["summary"]:  # both daemons ran for the whole probe: a dead one would read -1 and drop out
        assert row["rss_first_mib"] > 10 and row["rss_last_mib"] > 10, data["summary"]
    assert all(s["now"] > 0 and s["notrim"] > 0 for s in data["samples"]), data["samples"]
    assert "| notrim |" in r.stdout
    r = subprocess.run([sys.executable, "-m", "fastflannel.lab.rssprobe", "--variant", "bad"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "expected NAME=" in r.stderr
