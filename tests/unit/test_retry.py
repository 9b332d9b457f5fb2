# SPDX-License-Identifier: Apache-2.0
"""Back-off and once-per-state logging of the daemon's retry loops (issue 14), each failure mode held for a while:
attempts and log lines are counted, and CPU is read from /proc for this process over the interval. Bounds are
generous for a contended machine but a hot loop (or a line per attempt) breaks them."""
from __future__ import annotations

import logging
import threading
import time
from ipaddress import IPv4Network

import pytest

from fastflannel.errors import FatalBackendError, TrafficError
from fastflannel.retry import Backoff, FailureLog, run_periodic

HOLD_S = 2.0


def cpu_s() -> float:
    """User+system CPU seconds of this process (all threads), from /proc."""
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    import os

    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def hold(target, seconds: float = HOLD_S):
    """Run ``target(stop)`` on a thread for ``seconds``; return the CPU seconds the process used meanwhile."""
    stop = threading.Event()
    t = threading.Thread(target=target, args=(stop,), daemon=True)
    c0 = cpu_s()
    t.start()
    time.sleep(seconds)
    stop.set()
    t.join(5)
    assert not t.is_alive()
    return cpu_s() - c0


def lines(caplog, needle: str) -> int:
    return sum(needle in r.getMessage() for r in caplog.records)


def test_backoff_doubles_to_cap_and_resets():
    b = Backoff(0.5, 4.0)
    assert [b.next() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0] and b.failing
    b.reset()
    assert b.next() == 0.5
    j = Backoff(1.0, 8.0, jitter=0.2)
    assert all(0.8 <= j.next() / d <= 1.2 for d in (1, 2, 4, 8, 8))
    with pytest.raises(ValueError):
        Backoff(0, 1)


def test_failure_log_once_per_state(caplog):
    caplog.set_level(logging.INFO)
    f = FailureLog(logging.getLogger("t"), "thing_failed", "thing_ok", op="x")
    assert f.failed("boom") and not f.failed("boom") and not f.failed("other text")
    assert f.ok() and not f.ok()
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs == ["event=thing_failed op=x error='boom' action=retry_with_backoff",
                    "event=thing_ok op=x failed_attempts=3"]


def test_run_periodic_backs_off_while_failing(caplog):
    calls = []

    def step():
        calls.append(time.monotonic())
        raise TrafficError("iptables-restore: exit 1")

    f = FailureLog(logging.getLogger("t"), "resync_failed", "resync_ok")
    cpu = hold(lambda stop: run_periodic(stop, 0.05, step, f, cap=0.8, errors=(TrafficError,)))
    # a fixed 0.05 s period would be ~40 attempts; 0.05, 0.05, 0.1, 0.2, 0.4, 0.8 ... is about 6
    assert 3 <= len(calls) <= 9, len(calls)
    assert lines(caplog, "event=resync_failed") == 1
    assert cpu < 0.5 * HOLD_S


def test_iptables_resync_failure_logs_once_and_backs_off(caplog, monkeypatch):
    from fastflannel.kernel import iptables

    tm = iptables.TrafficManager(IPv4Network("10.5.0.0/16"), IPv4Network("10.5.1.0/24"), masq=True, forward=True,
                                 resync_s=0.05, random_fully=False)
    calls = []

    def failing(argv, netns=None, input=None):
        calls.append(argv[0])
        raise TrafficError(f"{argv[0]}: Permission denied (you must be root)")

    monkeypatch.setattr(iptables, "_run_cmd", failing)
    monkeypatch.setattr(iptables, "RESYNC_BACKOFF_MAX_S", 0.8)
    cpu = hold(tm.run)
    assert 2 <= len(calls) <= 12, calls  # each pass is one iptables-save (check) at most
    assert lines(caplog, "event=iptables_resync_failed") == 1
    assert cpu < 0.5 * HOLD_S


class _Manager:
    """watch_leases yielding an empty batch every 10 ms (a live watch)."""

    def watch_leases(self, own, stop):
        while not stop.is_set():
            time.sleep(0.01)
            yield []


class _Network:
    def __init__(self, exc):
        self.exc, self.calls = exc, 0
        self.lease = None
        self.reconcile_interval = 0.05

    def handle_events(self, events):
        pass

    def reconcile(self, leases):
        self.calls += 1
        raise self.exc


def test_reconcile_failure_backs_off_and_logs_once(caplog, monkeypatch):
    import fastflannel.backend as backend

    monkeypatch.setattr(backend, "RECONCILE_BACKOFF_MAX_S", 0.8)
    net = _Network(OSError("netlink: No buffer space available"))
    cpu = hold(lambda stop: backend.run_network(net, _Manager(), stop))
    assert 2 <= net.calls <= 9, net.calls
    recs = [r for r in caplog.records if "event=reconcile_failed" in r.getMessage()]
    assert len(recs) == 1 and recs[0].exc_info  # once, with the traceback
    assert cpu < 0.5 * HOLD_S


def test_fatal_backend_error_is_not_retried():
    import fastflannel.backend as backend

    net = _Network(FatalBackendError("udp fast path loop died"))
    with pytest.raises(FatalBackendError):
        backend.run_network(net, _Manager(), threading.Event())
    assert net.calls == 1


def test_vxlan_link_watcher_backs_off_and_logs_once(caplog, monkeypatch):
    import fastflannel.backend.vxlan as vx

    monkeypatch.setattr(vx, "LINK_WATCH_BACKOFF_S", 0.05)
    monkeypatch.setattr(vx, "LINK_WATCH_BACKOFF_MAX_S", 0.8)

    class NL:
        calls = 0

        def link_events(self, stop, ready=None):
            NL.calls += 1
            if NL.calls % 2:
                raise OSError(105, "No buffer space available")
            return iter(())  # a stream that ends by itself: must not be re-opened in a hot loop

    class Spec:
        name = "flannel.1"

    class Dev:
        spec = Spec()

    net = vx.VxlanNetwork.__new__(vx.VxlanNetwork)
    net.netlink, net.device, net.watch_ready, net._lock = NL(), Dev(), threading.Event(), threading.RLock()

    def run(stop):
        net._watch_stop = stop
        net._watch()

    cpu = hold(run)
    assert 2 <= NL.calls <= 9, NL.calls
    assert lines(caplog, "event=vxlan_link_watch_failed") == 1
    assert cpu < 0.5 * HOLD_S


def test_nftables_resync_failure_logs_once_and_backs_off(caplog, monkeypatch):
    from fastflannel.kernel import nftables

    tm = nftables.NftTrafficManager([(IPv4Network("10.5.0.0/16"), IPv4Network("10.5.1.0/24"))], masq=True,
                                    forward=True, resync_s=0.05)
    calls = []

    def failing(*args, **kw):
        calls.append(1)
        raise TrafficError("nft: Operation not permitted")

    monkeypatch.setattr(tm, "check", failing)
    monkeypatch.setattr(nftables, "RESYNC_BACKOFF_MAX_S", 0.8)
    cpu = hold(tm.run)
    assert 2 <= len(calls) <= 12, calls
    assert lines(caplog, "event=nftables_resync_failed") == 1
    assert cpu < 0.5 * HOLD_S


def test_entry_failures_once_per_state_and_bounded():
    from fastflannel.retry import EntryFailures

    f = EntryFailures()
    assert f.is_new("a", "ENETUNREACH") and not f.is_new("a", "ENETUNREACH")
    assert f.is_new("a", "EEXIST")  # failing differently is a new state
    f.ok("a")
    assert f.is_new("a", "EEXIST")  # and so is failing again after it worked
    assert f.is_new("b", "x") and len(f) == 2
    f.retain(["b"])  # "a" is no longer tried: forgotten, so the table never outgrows one pass
    assert len(f) == 1 and f.is_new("a", "EEXIST") and not f.is_new("b", "x")
