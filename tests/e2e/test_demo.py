# SPDX-License-Identifier: Apache-2.0
"""`fastflannel demo`: ends with the table and exit 0, and leaves nothing behind, also after Ctrl-C halfway."""
from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

import pytest

from fastflannel.lab.testbed import list_netns

pytestmark = [pytest.mark.netns, pytest.mark.etcd]

DEMO = [sys.executable, "-m", "fastflannel.lab.cli", "demo"]


def _prefixes(output: str) -> set:
    return set(re.findall(r"testbed (ff[0-9a-z]{5})", output))


def _leftovers(prefixes: set) -> list:
    return [ns for ns in list_netns() if any(ns.startswith(p + "-") for p in prefixes)]


def test_demo_prints_table_and_cleans_up(make_testbed):
    make_testbed  # noqa: B018 - requested for its tier checks (root, netns, etcd)
    r = subprocess.run(DEMO + ["--backends", "host-gw,vxlan", "--seconds", "1"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = r.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("backend"))
    rows = {line.split()[0]: line.split() for line in lines[header + 2:] if line.strip()}
    assert set(rows) == {"host-gw", "vxlan"}
    assert rows["vxlan"][1] == "yes" and rows["vxlan"][-1] == "1450"
    assert rows["host-gw"][-1] == "1500"
    assert float(rows["vxlan"][4]) > 0  # TCP Gb/s measured
    assert "leased FLANNEL_SUBNET=100.96." in r.stdout  # the textbook addressing
    prefixes = _prefixes(r.stdout)
    assert len(prefixes) == 2
    assert _leftovers(prefixes) == []


def test_demo_ctrl_c_halfway_leaves_nothing(make_testbed):
    make_testbed  # noqa: B018
    p = subprocess.Popen(DEMO + ["--backends", "vxlan,host-gw", "--seconds", "5"], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
    out = []
    try:
        deadline = time.monotonic() + 120
        assert p.stdout is not None
        for line in p.stdout:  # interrupt while the first cluster is up and measuring
            out.append(line)
            if "iperf3 TCP" in line or time.monotonic() > deadline:
                break
        p.send_signal(signal.SIGINT)
        rest, _ = p.communicate(timeout=120)
        out.append(rest)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)
    text = "".join(out)
    assert p.returncode == 130, text[-3000:]
    assert "interrupted" in text
    prefixes = _prefixes(text)
    assert prefixes, text[-2000:]
    assert _leftovers(prefixes) == [], text[-2000:]
