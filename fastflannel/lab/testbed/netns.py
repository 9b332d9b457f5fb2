# SPDX-License-Identifier: Apache-2.0
"""Network namespaces: listing, ownership markers, killing what runs inside, deleting, stale-run cleanup."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fastflannel.lab.testbed.base import _OWNED_PREFIXES, MARKER_DIR, CommandError, LogFn, TestbedError, _as_logfn, _ip


def list_netns() -> list[str]:
    """Return the names of all named network namespaces (``ip netns list``), ids stripped."""
    proc = _ip("netns", "list", check=False)
    if proc.returncode != 0:
        return []
    return [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]


def owned_prefixes() -> frozenset[str]:
    """Return the prefixes of every Testbed this process has created (open or closed)."""
    return frozenset(_OWNED_PREFIXES)


def _proc_start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22 (starttime), counting from after the comm field


def pid_alive(pid: int, start_time: str | None = None) -> bool:
    """Return True if ``pid`` exists (and, if given, still has the recorded /proc start time: not recycled)."""
    now = _proc_start_time(pid)
    return now is not None and (start_time is None or now == start_time)


def _netns_pids(netns: str) -> list[int]:
    proc = _ip("netns", "pids", netns, check=False)
    if proc.returncode != 0:
        return []
    return [int(p) for p in proc.stdout.split() if p.isdigit()]


def _kill_netns_processes(netns: str, log: Callable[[str], Any]) -> None:
    """SIGKILL whatever still runs inside ``netns`` (a namespace we own), then wait briefly for it to go."""
    pids = [p for p in _netns_pids(netns) if p != os.getpid()]
    for pid in pids:
        log(f"testbed: killing leftover pid {pid} in {netns}")
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 2.0
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if _running(p)]
        if pids:
            time.sleep(0.05)


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _delete_netns(netns: str) -> None:
    proc = _ip("netns", "del", netns, check=False)
    if proc.returncode != 0 and netns in list_netns():
        raise CommandError(proc.returncode, ["ip", "netns", "del", netns], proc.stdout, proc.stderr)


def cleanup_stale(prefix_glob: str = "ff", *, include_unowned: bool = False, log: LogFn = None,
                  dry_run: bool = False) -> list[str]:
    """Remove namespaces, processes and temp dirs left by testbed runs whose owner process is dead.

    A run is stale when ``MARKER_DIR/<prefix>.pid`` names a pid that no longer exists (or was recycled: the process
    start time differs). ``prefix_glob`` selects markers (``<prefix_glob>*.pid``). With ``include_unowned``,
    namespaces that look like testbed namespaces (``ff`` + 5 base36 + ``-``) but have no marker at all are removed
    too. Return the namespaces removed (or that would be, with ``dry_run``).
    """
    logf = _as_logfn(log)
    removed: list[str] = []
    all_ns = list_netns()
    owned_by_marker: set[str] = set()
    markers = sorted(MARKER_DIR.glob(f"{prefix_glob}*.pid")) if MARKER_DIR.is_dir() else []
    for marker in markers:
        prefix = marker.name[: -len(".pid")]
        try:
            info = json.loads(marker.read_text())
            pid = int(info["pid"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            logf(f"testbed: cleanup: unreadable marker {marker}: {e}")
            continue
        mine = [ns for ns in all_ns if ns.startswith(prefix + "-")]
        owned_by_marker.update(mine)
        if pid_alive(pid, info.get("start_time")):
            continue
        logf(f"testbed: cleanup: run {prefix} (owner pid {pid} is gone): namespaces {mine}")
        removed.extend(mine)
        if dry_run:
            continue
        remove_namespaces(mine, log=logf)
        workdir = info.get("workdir")
        if workdir and not info.get("keep_workdir") and Path(workdir).name.startswith(prefix + "-"):
            shutil.rmtree(workdir, ignore_errors=True)
        if not any(ns.startswith(prefix + "-") for ns in list_netns()):
            marker.unlink(missing_ok=True)
    if include_unowned:
        pat = re.compile(r"^(ff[0-9a-z]{5})-")
        orphans = [ns for ns in all_ns if ns not in owned_by_marker and (m := pat.match(ns))
                   and m.group(1).startswith(prefix_glob.rstrip("*"))
                   and not (MARKER_DIR / f"{m.group(1)}.pid").exists()]
        if orphans:
            logf(f"testbed: cleanup: namespaces without an owner marker: {orphans}")
            removed.extend(orphans)
            if not dry_run:
                remove_namespaces(orphans, log=logf)
    return removed


def remove_namespaces(namespaces: Sequence[str], *, log: LogFn = None) -> None:
    """Kill every process inside the given namespaces, then delete them (deepest names first, underlay last).

    Failures are logged, not raised; callers check ``list_netns()`` afterwards if they must know.
    """
    logf = _as_logfn(log)
    for ns in sorted(namespaces, key=lambda s: (s.endswith("-ul"), -s.count("-"))):
        _kill_netns_processes(ns, logf)
    for ns in sorted(namespaces, key=lambda s: (s.endswith("-ul"), -s.count("-"))):
        try:
            _delete_netns(ns)
        except TestbedError as e:
            logf(f"testbed: cleanup: {e}")
