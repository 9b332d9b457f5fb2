# SPDX-License-Identifier: Apache-2.0
"""Keep ``fastflannel bench`` and the pytest-benchmark suite from rotting. No speed assertions (design rule 11).

- The arithmetic of the bench (counter deltas, derived per-packet figures, interleaving, summaries) runs
  everywhere.
- ``fastflannel bench --quick --modes host-gw,udp --seconds 1`` runs for real (netns + etcd), and the JSON
  it writes must hold every field with sane values (throughput > 0, fast-path counters for udp), plus the PNG
  when matplotlib is importable.
- ``pytest bench --benchmark-disable`` runs every benchmark body once (a subprocess, as ``make bench-smoke``).
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fastflannel.lab.bench import (
    MODE_SPECS,
    counter_delta,
    fastpath_figures,
    format_table,
    kernel_figures,
    ratios,
    rotation,
    summarize,
)

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------------------------------
# pure parts


def test_rotation_interleaves_every_mode_once_per_rep() -> None:
    modes = ["host-gw", "vxlan", "udp", "udp-python"]
    orders = [rotation(modes, r) for r in range(4)]
    assert orders[0] == modes
    assert orders[1] == ["vxlan", "udp", "udp-python", "host-gw"]
    for o in orders:
        assert sorted(o) == sorted(modes)
    assert {o[0] for o in orders} == set(modes)  # each mode goes first once in 4 reps
    assert rotation([], 3) == []


def test_counter_delta_and_figures_per_packet_design() -> None:
    # sender: 100 data packets read from the TUN one by one and sent in 10 sendmmsg batches;
    # receiver: 100 received in 10 recvmmsg batches, written one by one; 50 ACKs the other way.
    before = {"tx_packets": 5, "tx_bytes": 500, "rx_packets": 0, "rx_bytes": 0, "polls": 1, "tx_syscalls": 7,
              "rx_syscalls": 0, "tx_batches": 1, "rx_batches": 0, "tx_drop_no_route": 0}
    sender_after = {"tx_packets": 105, "tx_bytes": 500 + 100 * 1400, "tx_syscalls": 7 + 110, "tx_batches": 11,
                    "rx_packets": 50, "rx_bytes": 50 * 52, "rx_syscalls": 55, "rx_batches": 5, "polls": 21,
                    "tx_drop_no_route": 0}
    receiver = {"tx_packets": 50, "tx_bytes": 50 * 52, "tx_syscalls": 55, "tx_batches": 5, "rx_packets": 100,
                "rx_bytes": 100 * 1400, "rx_syscalls": 110, "rx_batches": 10, "polls": 20, "rx_drop_ttl": 1}
    d_sender = counter_delta(before, sender_after)
    assert d_sender["tx_packets"] == 100 and d_sender["polls"] == 20
    payload = 100 * 1348
    f = fastpath_figures([d_sender, receiver], payload)
    assert f["packets_delivered"] == 150
    assert f["copies_per_packet"] == pytest.approx(4.0)  # TUN->user, user->socket, socket->user, user->TUN
    assert f["bytes_copied"] == 2 * (100 * 1400 + 50 * 52) * 2
    assert f["bytes_copied_per_byte"] == pytest.approx(f["bytes_copied"] / payload)
    assert f["syscalls_per_packet"] == pytest.approx((110 + 55 + 55 + 110 + 20 + 20) / 150)
    assert f["packets_per_batch"] == pytest.approx(300 / 30)
    assert f["sender_tx_syscalls_per_packet"] == pytest.approx(1.1)
    assert f["receiver_rx_packets_per_batch"] == pytest.approx(10.0)
    assert f["drops"] == 1
    empty = fastpath_figures([{}, {}], 0)
    assert math.isnan(empty["syscalls_per_packet"]) and math.isnan(empty["bytes_copied_per_byte"])
    assert kernel_figures()["copies_per_packet"] == 0.0


def test_offload_figures() -> None:
    # sender: 2 TSO reads split into 90 segments, sent as 3 GSO messages; receiver: 3 GRO receives of 90 datagrams,
    # written as 2 coalesced writes of 44 and 2 single packets
    sender = {"tx_packets": 90, "tx_bytes": 90 * 1472, "tx_syscalls": 6, "tx_batches": 1, "tx_tso_reads": 2,
              "tx_tso_segments": 90, "tx_gso_sends": 3}
    receiver = {"rx_packets": 90, "rx_bytes": 90 * 1472, "rx_syscalls": 7, "rx_batches": 2, "rx_gro_receives": 3,
                "rx_gro_datagrams": 90, "rx_coalesced_writes": 2, "rx_coalesced_packets": 88}
    f = fastpath_figures([sender, receiver], 90 * 1420)
    assert f["segments_per_tun_read"] == pytest.approx(45.0)
    assert f["datagrams_per_receive"] == pytest.approx(30.0)
    assert f["packets_per_coalesced_write"] == pytest.approx(44.0)
    plain = fastpath_figures([{"tx_packets": 5, "tx_batches": 1}, {"rx_packets": 5, "rx_batches": 1}], 5000)
    assert math.isnan(plain["segments_per_tun_read"]) and math.isnan(plain["datagrams_per_receive"])
    assert math.isnan(plain["packets_per_coalesced_write"])


def test_summary_ratios_and_table() -> None:
    runs = [
        {"mode": "vxlan", "tcp1_gbps": 10.0, "rtt_p50_ms": 0.1, **kernel_figures()},
        {"mode": "vxlan", "tcp1_gbps": 12.0, "rtt_p50_ms": 0.2, **kernel_figures()},
        {"mode": "udp", "tcp1_gbps": 1.0, "rtt_p50_ms": 0.3, "syscalls_per_packet": 2.5},
        {"mode": "udp", "tcp1_gbps": float("nan"), "rtt_p50_ms": 0.5, "syscalls_per_packet": 2.7},
    ]
    s = summarize(runs, ["vxlan", "udp"])
    assert s["vxlan"]["tcp1_gbps"] == {"median": 11.0, "min": 10.0, "max": 12.0, "n": 2}
    assert s["udp"]["tcp1_gbps"]["n"] == 1  # NaN is left out
    assert "packets_per_batch" not in s["vxlan"]  # NaN for a kernel path
    r = ratios(s)
    assert r["udp"]["tcp1_gbps"] == pytest.approx(1.0 / 11.0)
    assert "syscalls_per_packet" not in r["udp"]  # the reference is 0
    table = format_table(s, ["vxlan", "udp"])
    assert "TCP 1 stream" in table and "ratio to vxlan" in table and "x0.09" in table
    assert set(MODE_SPECS) == {"host-gw", "vxlan", "udp", "udp-plain", "udp-python", "wireguard"}
    assert MODE_SPECS["udp-python"]["env"] == {"FASTFLANNEL_NO_EXTENSIONS": "1"}
    assert MODE_SPECS["udp"]["env"] == {}  # the default path: offloads on
    assert MODE_SPECS["udp-plain"]["env"] == {"FASTFLANNEL_UDP_TUN_OFFLOAD": "0", "FASTFLANNEL_UDP_GRO": "0"}


# ------------------------------------------------------------------------------------------------------------------
# the real thing


def _run(cmd: list, timeout: float, **kw) -> subprocess.CompletedProcess:
    """Run ``cmd``; on timeout send SIGTERM (the bench then tears its testbeds down) before giving up."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, **kw)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} did not finish in {timeout} s; output:\n{out[-5000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


@pytest.mark.netns
@pytest.mark.etcd
@pytest.mark.slow
def test_bench_quick_host_gw_and_udp(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    r = _run([sys.executable, "-m", "fastflannel.lab.cli", "bench", "--quick", "--modes", "host-gw,udp",
              "--seconds", "1", "--out", str(out)], timeout=150)
    assert r.returncode == 0, r.stdout[-5000:]
    assert "rep 1/1" in r.stdout and "ratio to" not in r.stdout  # no vxlan in this run: no ratio table
    data = json.loads((out / "latest.json").read_text())
    assert list(out.glob("bench-*.json")), "the timestamped JSON is missing"
    assert data["settings"]["modes"] == ["host-gw", "udp"] and data["settings"]["reps"] == 1
    assert data["machine"]["nproc"] >= 1 and data["machine"]["kernel"]
    assert data["errors"] == {} and data["interrupted"] is False and data["wall_s"] > 0
    runs = {row["mode"]: row for row in data["runs"]}
    assert set(runs) == {"host-gw", "udp"}
    for mode, row in runs.items():
        assert row["tcp1_gbps"] > 0 and row["tcp4_gbps"] > 0, (mode, row)
        assert row["tcp1_bytes"] > 0
        assert row["udp64_kpps"] > 0 and 0 <= row["udp64_loss_pct"] <= 100, (mode, row)
        assert 0 < row["rtt_p50_ms"] <= row["rtt_p99_ms"], (mode, row)
        # the total is the sum of its parts (each part divided by the same GB delivered)
        assert row["cpu_s_per_gb"] == pytest.approx(row["daemon_cpu_s_per_gb"] + row["softirq_s_per_gb"]), row
    assert runs["host-gw"]["copies_per_packet"] == 0 and runs["host-gw"]["syscalls_per_packet"] == 0
    udp = runs["udp"]
    assert set(udp["fastpath_deltas"]) == {"h1", "h2"}
    for name, d in udp["fastpath_deltas"].items():
        for key in ("tx_packets", "tx_bytes", "tx_syscalls", "tx_batches", "rx_packets", "rx_bytes",
                    "rx_syscalls", "rx_batches"):
            assert d[key] > 0, (name, key, d)  # TCP both ways: data one way, ACKs the other, on both hosts
    assert udp["fastpath_deltas"]["h1"]["tx_bytes"] > udp["fastpath_deltas"]["h1"]["rx_bytes"]  # h1 is the sender
    assert udp["syscalls_per_packet"] > 0 and udp["packets_per_batch"] >= 1
    assert udp["copies_per_packet"] > 0 and udp["bytes_copied_per_byte"] > 1
    assert udp["cpu_s_per_gb"] > 0
    # the udp daemons forward every packet; host-gw's only watch etcd
    assert runs["host-gw"]["daemon_cpu_s"] < udp["daemon_cpu_s"], (runs["host-gw"], udp)
    assert isinstance(udp["tun_tx_dropped"], int) and isinstance(udp["udp_rcvbuf_errors"], int), udp
    # request/response, the flood, light-load and idle CPU (issue 12)
    for mode, row in runs.items():
        assert row["rr_tps"] > 0 and 0 < row["rr_lat_p50_us"] <= row["rr_lat_p99_us"], (mode, row)
        lb = row["flood"]
        assert lb["sent"] > 0 and row["flood_offered_kpps"] > 0 and row["flood_kpps"] > 0, (mode, lb)
        assert lb["delivered"] + lb["lost"] >= lb["sent"] and sum(lb["places"].values()) == lb["lost"], (mode, lb)
    assert udp["rr_polls_per_trans"] > 0 and "rr_sleeps_per_trans" in udp
    assert 0 <= udp["idle_cpu_pct"] < 100 and 0 <= udp["ping_cpu_pct"] < 100
    for name, d in udp["fastpath_deltas"].items():
        assert "polls_slept" in d and "tx_drop_tun_queue" in d and "rx_drop_udp_rcvbuf" in d, (name, d)
    for mode in ("host-gw", "udp"):
        assert data["summary"][mode]["tcp1_gbps"]["n"] == 1
    if importlib.util.find_spec("matplotlib") is not None:
        png = out / "bench.png"
        assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert "matplotlib is not installed" in r.stdout


def test_benchmark_suite_smoke() -> None:
    """Every pytest-benchmark body runs once (no timing): ``make bench-smoke``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    r = _run([sys.executable, "-m", "pytest", "bench", "--benchmark-disable", "-q", "-p", "no:cacheprovider"],
             timeout=180, env=env)
    assert r.returncode == 0, r.stdout[-5000:]
    assert " passed" in r.stdout
