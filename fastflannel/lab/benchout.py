# SPDX-License-Identifier: Apache-2.0
"""``fastflannel bench`` output: the metric list, summaries (median, min-max), ratios to VXLAN, the text table,
the JSON file and the PNG chart, plus what the figures depend on (machine, code). Pure functions except the
writers; ``fastflannel.lab.bench`` runs the measurements."""
from __future__ import annotations

import json
import math
import os
import platform
import statistics
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

# (key, label, unit, digits, higher_is_better)
METRICS: List[tuple] = [
    # request/response and latency (issue 12's table)
    ("rr_tps", "TCP ping-pong 64 B (sockperf)", "trans/s", 0, True),
    ("rr_lat_p50_us", "  sockperf one-way latency p50", "us", 0, False),
    ("rr_lat_p99_us", "  sockperf one-way latency p99", "us", 0, False),
    ("rr_polls_per_trans", "  polls per transaction (both daemons)", "", 2, False),
    ("rr_sleeps_per_trans", "  polls that slept per transaction", "", 2, False),
    ("rr_demotions", "  loop demotions to SCHED_OTHER (both daemons)", "", 0, False),
    ("rtt_p50_ms", "RTT p50 (ping, 10 ms)", "ms", 3, False),
    ("rtt_p99_ms", "RTT p99 (ping, 10 ms)", "ms", 3, False),
    ("flood_offered_kpps", "64 B flood: offered (sendmmsg)", "kpps", 1, True),
    ("flood_kpps", "64 B flood: delivered", "kpps", 1, True),
    ("flood_loss_pct", "64 B flood: loss", "%", 1, False),
    ("flood_loss_tun_queue_pct", "  lost at the sender's TUN queue", "%", 1, False),
    ("flood_loss_receiver_rcvbuf_pct", "  lost at the receiver's UDP rcvbuf", "%", 1, False),
    ("flood_loss_fastpath_pct", "  dropped by the fast path", "%", 1, False),
    ("flood_loss_backlog_pct", "  lost in a softnet backlog (machine)", "%", 1, False),
    ("flood_loss_other_pct", "  lost elsewhere (veth, sockets, unaccounted)", "%", 1, False),
    ("flood_demotions", "  loop demotions to SCHED_OTHER (both daemons)", "", 0, False),
    ("udp64_kpps", "iperf3 UDP 64 B delivered", "kpps", 1, True),
    ("udp64_loss_pct", "iperf3 UDP 64 B loss", "%", 1, False),
    ("idle_cpu_pct", "daemon CPU idle (max of 2)", "% core", 2, False),
    ("ping_cpu_pct", "daemon CPU, ping every 10 ms (max)", "% core", 2, False),
    # throughput (issue 13's table)
    ("tcp1_gbps", "TCP 1 stream", "Gb/s", 2, True),
    ("tcp4_gbps", "TCP 4 streams", "Gb/s", 2, True),
    ("tcp1_retransmits", "TCP 1 stream retransmits", "", 0, False),
    ("tcp4_retransmits", "TCP 4 streams retransmits", "", 0, False),
    ("tun_tx_dropped", "  TUN queue drops (TCP 1 stream)", "", 0, False),
    ("udp_rcvbuf_errors", "  UDP rcvbuf drops (TCP 1 stream)", "", 0, False),
    ("cpu_s_per_gbit", "CPU core-s/Gbit (daemons+iperf3+softirq)", "s", 3, False),
    ("cpu4_s_per_gbit", "  same, 4 streams", "s", 3, False),
    ("machine_cpu_s_per_gbit", "  whole machine busy/Gbit (contended)", "s", 3, False),
    ("cpu_s_per_gb", "CPU s/GB (daemons+softirq)", "s/GB", 2, False),
    ("daemon_cpu_s_per_gb", "  daemons' CPU s/GB", "s/GB", 2, False),
    ("softirq_s_per_gb", "  softirq s/GB", "s/GB", 2, False),
    ("syscalls_per_packet", "syscalls per packet", "", 2, False),
    ("sender_tx_syscalls_per_packet", "  sender tx syscalls/packet", "", 2, False),
    ("receiver_rx_syscalls_per_packet", "  receiver rx syscalls/packet", "", 2, False),
    ("packets_per_batch", "packets per batch", "", 1, True),
    ("segments_per_tun_read", "  segments per TUN read (TSO)", "", 1, True),
    ("datagrams_per_receive", "  datagrams per UDP receive (GRO)", "", 1, True),
    ("packets_per_coalesced_write", "  packets per coalesced TUN write", "", 1, True),
    ("sender_tx_packets_per_batch", "  sender tx packets/batch", "", 1, True),
    ("receiver_rx_packets_per_batch", "  receiver rx packets/batch", "", 1, True),
    ("copies_per_packet", "user/kernel copies per packet", "", 2, False),
    ("bytes_copied_per_byte", "bytes copied per byte delivered", "", 2, False),
]

# zero or undefined for the kernel reference: the absolute figures say it
NO_RATIO = {"tun_tx_dropped", "udp_rcvbuf_errors", "daemon_cpu_s_per_gb",
            "syscalls_per_packet", "sender_tx_syscalls_per_packet", "receiver_rx_syscalls_per_packet",
            "packets_per_batch", "sender_tx_packets_per_batch", "receiver_rx_packets_per_batch",
            "segments_per_tun_read", "datagrams_per_receive", "packets_per_coalesced_write",
            "copies_per_packet", "bytes_copied_per_byte", "tcp1_retransmits", "tcp4_retransmits", "udp64_loss_pct",
            "rr_polls_per_trans", "rr_sleeps_per_trans", "flood_loss_pct", "flood_loss_tun_queue_pct",
            "flood_loss_receiver_rcvbuf_pct", "flood_loss_fastpath_pct", "flood_loss_backlog_pct",
            "flood_loss_other_pct", "idle_cpu_pct", "ping_cpu_pct", "rr_demotions", "flood_demotions"}



def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v))


def summarize(runs: List[Dict[str, Any]], modes: Sequence[str]) -> Dict[str, Dict[str, Dict[str, float]]]:
    """Return {mode: {metric: {median, min, max, n}}} over the runs that produced the metric."""
    out: Dict[str, Dict[str, Dict[str, float]]] = {}
    for mode in modes:
        per: Dict[str, Dict[str, float]] = {}
        for key, *_ in METRICS:
            vals = [r[key] for r in runs if r["mode"] == mode and _finite(r.get(key))]
            if vals:
                per[key] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}
        out[mode] = per
    return out


def ratios(summary: Dict[str, Dict[str, Dict[str, float]]], ref: str = "vxlan") -> Dict[str, Dict[str, float]]:
    """Return {mode: {metric: median(mode) / median(ref)}} where both exist and the reference is non-zero."""
    base = summary.get(ref) or {}
    out: Dict[str, Dict[str, float]] = {}
    for mode, per in summary.items():
        r = {}
        for key, s in per.items():
            b = base.get(key)
            if b and b["median"]:
                r[key] = s["median"] / b["median"]
        out[mode] = r
    return out


def paired_ratios(runs: List[Dict[str, Any]], modes: Sequence[str], ref: str = "vxlan"
                  ) -> Dict[str, Dict[str, Dict[str, float]]]:
    """Return {mode: {metric: {median, min, max, n}}} of per-round ratios: each repetition's figure of ``mode``
    divided by ``ref``'s figure of the same repetition (the run next to it), then the median over repetitions.

    On a contended machine this is steadier than a ratio of medians: drift hits both runs of a round alike.
    """
    by_rep: Dict[Any, Dict[str, Dict[str, Any]]] = {}
    for r in runs:
        by_rep.setdefault(r.get("rep"), {})[r["mode"]] = r
    out: Dict[str, Dict[str, Dict[str, float]]] = {}
    for mode in modes:
        per: Dict[str, Dict[str, float]] = {}
        for key, *_ in METRICS:
            vals = []
            for rows in by_rep.values():
                a, b = rows.get(mode, {}).get(key), rows.get(ref, {}).get(key)
                if _finite(a) and _finite(b) and b:
                    vals.append(a / b)
            if vals:
                per[key] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}
        out[mode] = per
    return out


def _cell(s: Optional[Dict[str, float]], digits: int) -> str:
    if not s:
        return "-"
    med, lo, hi = s["median"], s["min"], s["max"]
    if s["n"] == 1 or lo == hi:
        return f"{med:.{digits}f}"
    return f"{med:.{digits}f} ({lo:.{digits}f}-{hi:.{digits}f})"


def format_table(summary: Dict[str, Dict[str, Dict[str, float]]], modes: Sequence[str], ref: str = "vxlan",
                 runs: Optional[List[Dict[str, Any]]] = None) -> str:
    """Return the figures table (median with min-max; rows no mode measured are left out) and, if ``ref`` ran,
    the ratios to ``ref``: medians of per-round ratios (:func:`paired_ratios`) when ``runs`` is given, else
    ratios of medians."""
    lines: List[str] = []
    w0 = max(len(f"{label} [{unit}]") for _k, label, unit, *_ in METRICS) + 1
    cells = {m: {k: _cell(summary.get(m, {}).get(k), d) for k, _l, _u, d, _h in METRICS} for m in modes}
    widths = {m: max([len(m)] + [len(c) for c in cells[m].values()]) + 2 for m in modes}
    lines.append(f"{'median (min-max)':<{w0}}" + "".join(f"{m:>{widths[m]}}" for m in modes))
    lines.append("-" * len(lines[0]))
    for key, label, unit, digits, _h in METRICS:
        if all(cells[m][key] == "-" for m in modes):
            continue
        name = f"{label} [{unit}]" if unit else label
        lines.append(f"{name:<{w0}}" + "".join(f"{cells[m][key]:>{widths[m]}}" for m in modes))
    if runs is not None:
        rat = {m: {k: v["median"] for k, v in per.items()} for m, per in paired_ratios(runs, modes, ref).items()}
        title = f"ratio to {ref} (median of per-round ratios)"
    else:
        rat = ratios(summary, ref)
        title = f"ratio to {ref} (medians)"
    if summary.get(ref):
        lines.append("")
        lines.append(f"{title:<{w0}}" + "".join(f"{m:>{widths[m]}}" for m in modes))
        lines.append("-" * len(lines[-1]))
        for key, label, unit, _d, _h in METRICS:
            if key in NO_RATIO or not any(key in rat.get(m, {}) for m in modes):
                continue  # zero or undefined for the kernel reference: the absolute figures say it
            name = f"{label}" + (f" [{unit}]" if unit else "")
            vals = "".join(f"{('x%.2f' % rat[m][key]) if key in rat.get(m, {}) else '-':>{widths[m]}}" for m in modes)
            lines.append(f"{name:<{w0}}" + vals)
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------------
# machine description, output


def machine_info() -> Dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from fastflannel.datapath import fastpath

    return {"nproc": os.cpu_count(), "cpu_model": model, "kernel": platform.release(),
            "python": platform.python_version(), "fastpath_extension": fastpath.IMPLEMENTATION,
            "hostname": platform.node()}


def code_state() -> Dict[str, Any]:
    """Return what the udp figures depend on: the git commit, whether the tree is dirty, the extension's mtime."""
    import subprocess

    from fastflannel.datapath import fastpath

    root = Path(__file__).resolve().parent.parent
    state: Dict[str, Any] = {"git_commit": None, "git_dirty": None, "extension": None, "extension_mtime": None}
    try:
        state["git_commit"] = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                                             capture_output=True, text=True, timeout=10).stdout.strip() or None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout
        state["git_dirty"] = bool(dirty.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        mod = fastpath.implementation_module("cython")
        state["extension"] = getattr(mod, "__file__", None)
        state["extension_mtime"] = os.path.getmtime(mod.__file__) if state["extension"] else None
    except ImportError:
        pass
    return state


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def write_json(result: Dict[str, Any], out: Path, stamp: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"bench-{stamp}.json"
    text = json.dumps(_jsonable(result), indent=2, sort_keys=False) + "\n"
    path.write_text(text)
    (out / "latest.json").write_text(text)
    return path


def write_chart(summary: Dict[str, Dict[str, Dict[str, float]]], modes: Sequence[str], path: Path,
                title: str) -> Optional[str]:
    """Draw the main figures as bar charts with min-max whiskers; return None or why it was skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'fastflannel[bench]'): no PNG chart"
    panels = [("rr_tps", "TCP ping-pong 64 B (trans/s)"), ("rtt_p50_ms", "RTT p50 (ms)"),
              ("rtt_p99_ms", "RTT p99 (ms)"), ("flood_kpps", "64 B flood delivered (kpps)"),
              ("flood_loss_pct", "64 B flood loss (%)"), ("tcp1_gbps", "TCP 1 stream (Gb/s)"),
              ("tcp4_gbps", "TCP 4 streams (Gb/s)"), ("cpu_s_per_gbit", "CPU core-s per Gbit")]
    colors = {"host-gw": "#4c72b0", "vxlan": "#55a868", "udp": "#dd8452", "udp-plain": "#8172b3",
              "udp-python": "#c44e52", "wireguard": "#937860"}
    fig, axes = plt.subplots(2, 4, figsize=(16, 7.5))
    for ax, (key, label) in zip(axes.flat, panels):
        meds, los, his, names = [], [], [], []
        for m in modes:
            s = summary.get(m, {}).get(key)
            names.append(m)
            if s:
                meds.append(s["median"])
                los.append(s["median"] - s["min"])
                his.append(s["max"] - s["median"])
            else:
                meds.append(0.0)
                los.append(0.0)
                his.append(0.0)
        xs = range(len(names))
        ax.bar(xs, meds, yerr=[los, his], capsize=4, color=[colors.get(m, "#888888") for m in names])
        ax.set_xticks(list(xs))
        ax.set_xticklabels(names, rotation=20)
        ax.set_title(label, fontsize=10)
        ax.set_ylim(bottom=0, top=None if max(m + h for m, h in zip(meds, his)) > 0 else 1)
        for x, v in zip(xs, meds):
            ax.annotate(f"{v:.3g}", (x, v), ha="center", va="bottom", fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


