# SPDX-License-Identifier: Apache-2.0
"""Where a TCP stream's CPU goes, per Gbit: the kernel's copies against everything else (issue 13's accounting).

``python -m fastflannel.lab.copycost --modes vxlan,udp --seconds 8 --reps 3`` brings up a 2-host testbed per mode
(``bench.ModeCluster``), and in interleaved rounds runs one iperf3 stream while ``perf record -a`` samples the whole
machine. From ``perf report`` (flat, by command and symbol) it derives core-seconds per Gbit delivered:

- ``busy``: every sample but the idle task's (all commands, kernel and user);
- ``copies_daemon``: the kernel's user-memory copies (``_copy_from_iter``, ``_copy_to_iter`` and kin) in the
  fastflanneld processes: the TUN read, the UDP send, the UDP receive, the TUN write of the udp backend;
- ``copies_app``: the same in iperf3 (its send and receive, which every backend pays);
- ``user_copies_daemon``: libc memcpy/memmove in the daemons (the split and the coalescing);
- ``user_daemon``: every user-space sample of the daemons (our loop, libc, Python): what a forwarder whose own code
  were free would save. ``busy - user_daemon`` is therefore a floor for any user-space TUN + UDP forwarder that
  makes the same system calls: the kernel's work on its behalf (copies, the extra stack passes, syscalls, wake-ups)
  stays. ``--streams 4`` measures four streams.

The udp backend's CPU target (<= 1.3x VXLAN's core-s per Gbit) leaves 0.3x VXLAN's ``busy`` for everything the udp
backend adds; ``copies_daemon`` alone is measured against that budget (docs/benchmarks.md, "Copy cost").
Needs ``perf`` (Debian ``linux-perf``) and root.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, List, Sequence

KERNEL_COPY_SYMBOLS = ("_copy_from_iter", "_copy_to_iter", "copy_user_enhanced_fast_string", "rep_movs_alternative",
                       "copy_user_generic_unrolled", "_copy_from_user", "_copy_to_user", "__pi_memcpy")
USER_COPY_PREFIXES = ("__memmove", "__memcpy", "memcpy", "memmove")
DAEMON_COMMS = ("python", "fastflanneld", "python3")
IDLE_COMMS = ("swapper",)

_LINE = re.compile(r"^\s*([\d.]+)%\s+(\S+)\s+\[([k.])\]\s+(\S+)")


def parse_perf_report(text: str) -> List[tuple]:
    """Rows ``(percent, comm, 'k'|'.', symbol)`` of ``perf report --sort comm,sym -g none -q`` output."""
    rows = []
    for line in text.splitlines():
        m = _LINE.match(line)
        if m:
            rows.append((float(m.group(1)), m.group(2), m.group(3), m.group(4)))
    return rows


def shares(rows: Sequence[tuple]) -> Dict[str, float]:
    """Fractions of all samples: busy, copies_daemon, copies_app (iperf3), user_copies_daemon."""
    out = {"busy": 0.0, "copies_daemon": 0.0, "copies_app": 0.0, "user_copies_daemon": 0.0, "user_daemon": 0.0}
    for pct, comm, space, sym in rows:
        f = pct / 100.0
        if comm in IDLE_COMMS:
            continue
        out["busy"] += f
        if space == "." and comm in DAEMON_COMMS:
            out["user_daemon"] += f
        if space == "k" and sym in KERNEL_COPY_SYMBOLS:
            if comm in DAEMON_COMMS:
                out["copies_daemon"] += f
            elif comm == "iperf3":
                out["copies_app"] += f
        elif space == "." and comm in DAEMON_COMMS and sym.startswith(USER_COPY_PREFIXES):
            out["user_copies_daemon"] += f
    return out


def per_gbit(fractions: Dict[str, float], cpus: int, seconds: float, gbps: float) -> Dict[str, float]:
    """Core-seconds per Gbit delivered for each fraction of ``cpus`` x ``seconds`` sampled at ``gbps``."""
    gbit = gbps * seconds
    return {k: v * cpus * seconds / gbit if gbit else float("nan") for k, v in fractions.items()}


def ceiling_gbps(floor_per_gbit: float, cpus: int) -> float:
    """The rate at which ``floor_per_gbit`` core-s/Gbit would use all ``cpus``: an upper bound if CPU is the limit."""
    return cpus / floor_per_gbit if floor_per_gbit > 0 else float("inf")


def top_daemon_kernel(rows: Sequence[tuple], n: int) -> List[tuple]:
    """The ``n`` kernel symbols with the most samples in the daemons: ``(percent of all samples, symbol)``."""
    acc: Dict[str, float] = {}
    for pct, comm, space, sym in rows:
        if space == "k" and comm in DAEMON_COMMS:
            acc[sym] = acc.get(sym, 0.0) + pct
    return sorted(((p, s) for s, p in acc.items()), reverse=True)[:n]


def _measure(mc, seconds: float, data: str, streams: int = 1, top: int = 0) -> Dict[str, float]:
    res: Dict[str, object] = {}
    t = threading.Thread(target=lambda: res.update(r=mc._iperf(seconds=seconds + 3, streams=streams)))
    t.start()
    time.sleep(1.5)
    subprocess.run(["perf", "record", "-a", "-o", data, "--", "sleep", f"{seconds:g}"],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    t.join()
    rep = subprocess.run(["perf", "report", "-i", data, "--no-children", "--sort", "comm,sym", "-g", "none", "-q",
                          "--percent-limit", "0"], capture_output=True, text=True, check=True).stdout
    r = res["r"]
    rows = parse_perf_report(rep)
    for pct, sym in top_daemon_kernel(rows, top):
        print(f"    {pct:6.2f}%  {sym}")
    fr = shares(rows)
    out = per_gbit(fr, os.cpu_count() or 1, seconds, r.gbps)
    out["gbps"] = r.gbps
    out["util"] = fr["busy"]  # fraction of all CPUs busy while it ran
    return out


def main(argv=None) -> int:
    from fastflannel.lab.bench import ModeCluster

    ap = argparse.ArgumentParser(prog="python -m fastflannel.lab.copycost", description=__doc__.splitlines()[0])
    ap.add_argument("--modes", default="vxlan,udp")
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--streams", type=int, default=1, help="parallel iperf3 streams")
    ap.add_argument("--top", type=int, default=0, help="print the daemons' N busiest kernel symbols per round")
    ap.add_argument("--out", default="", help="write the rounds as JSON here")
    ns = ap.parse_args(argv)
    if shutil.which("perf") is None or os.geteuid() != 0:
        print("copycost needs root and perf (apt install linux-perf)", file=sys.stderr)
        return 2
    modes = [m for m in ns.modes.split(",") if m]
    rounds: Dict[str, List[Dict[str, float]]] = {m: [] for m in modes}
    with contextlib.ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        clusters = {}
        for m in modes:
            clusters[m] = ModeCluster(m, lambda s: print(s, flush=True))
            clusters[m].up(stack)
        for rep in range(ns.reps):
            for m in modes[rep % len(modes):] + modes[:rep % len(modes)]:
                f = _measure(clusters[m], ns.seconds, os.path.join(tmp, f"{m}.data"), ns.streams, ns.top)
                rounds[m].append(f)
                print(f"rep {rep + 1} {m}: " + ", ".join(f"{k} {v:.4g}" for k, v in f.items()), flush=True)
    keys = ("gbps", "util", "busy", "copies_daemon", "copies_app", "user_copies_daemon", "user_daemon")
    print("\nmedians, core-s per Gbit (gbps: Gb/s; util: fraction of all CPUs busy)\n" + "mode".ljust(10)
          + "".join(k.rjust(20) for k in keys))
    med = {m: {k: statistics.median(r[k] for r in rounds[m]) for k in keys} for m in modes}
    for m in modes:
        print(m.ljust(10) + "".join(f"{med[m][k]:20.4f}" for k in keys))
    if "vxlan" in med:
        budget = 0.3 * med["vxlan"]["busy"]
        for m in modes:
            if m != "vxlan":
                print(f"{m}: the daemons' kernel copies {med[m]['copies_daemon']:.4f} core-s/Gbit = "
                      f"{med[m]['copies_daemon'] / budget:.2f}x the 1.3x budget ({budget:.4f}); busy "
                      f"{med[m]['busy'] / med['vxlan']['busy']:.2f}x VXLAN's")
                floor = med[m]["busy"] - med[m]["user_daemon"]
                cpus = os.cpu_count() or 1
                print(f"{m}: without any user-space work in the daemons {floor:.4f} core-s/Gbit = "
                      f"{floor / med['vxlan']['busy']:.2f}x VXLAN's; at that cost all {cpus} CPUs carry "
                      f"{ceiling_gbps(floor, cpus):.2f} Gb/s = {ceiling_gbps(floor, cpus) / med['vxlan']['gbps']:.2f}x "
                      f"VXLAN's measured {med['vxlan']['gbps']:.2f} Gb/s")
    if ns.out:
        with open(ns.out, "w") as fh:
            json.dump({"rounds": rounds, "medians": med}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
