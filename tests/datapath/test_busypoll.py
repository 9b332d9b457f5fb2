# SPDX-License-Identifier: Apache-2.0
"""The loop's wake-up counters and its busy-poll window (issue 12), both implementations.

- The window policy: the C loop's ``ff_busy_next`` (through ``_fastpath.busy_window_next``) against the twin's
  ``busy_window_next`` on hypothesis-made event sequences, and the policy's properties (bounded, backs off on
  misses down to a floor that is never 0, restored after a short sleep, off at 0).
- The loop: every sleep is counted (``polls_slept``); with the window on, every sleep is preceded by a window
  that ran out (``busy_misses == polls_slept``), windows that found data are hits; and an idle loop does not
  spin: over an idle interval no poll of any kind is made and the process uses next to no CPU.
"""
from __future__ import annotations

import os
import threading
import time
from typing import List, Tuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from fastpath_rig import PEER, REMOTE, Rig, make
from impls import HAVE_CYTHON, IMPLS, NO_CYTHON_REASON
from packets import ipv4_packet

from fastflannel.datapath import fastpath, twin
from fastflannel.datapath.contract import BUSY_FLOOR_SHIFT, BUSY_HIT, BUSY_MISS, BUSY_WOKE

MAX_NS = 200_000
EVENTS = st.lists(st.tuples(st.sampled_from([BUSY_HIT, BUSY_MISS, BUSY_WOKE]), st.integers(0, 10 * MAX_NS)),
                  max_size=60)


@pytest.mark.skipif(not HAVE_CYTHON, reason=NO_CYTHON_REASON or "-")
@settings(max_examples=200, deadline=None)
@given(EVENTS, st.sampled_from([0, 1, 8, MAX_NS, 10_000_000]))
def test_window_policy_c_equals_twin(events: List[Tuple[int, int]], max_ns: int) -> None:
    c = fastpath.implementation_module("cython")
    wc = wp = max_ns
    for ev, slept in events:
        wc = c.busy_window_next(wc, max_ns, ev, slept)
        wp = twin.busy_window_next(wp, max_ns, ev, slept)
        assert wc == wp


@settings(max_examples=200, deadline=None)
@given(EVENTS)
def test_window_policy_properties(events: List[Tuple[int, int]]) -> None:
    w = MAX_NS
    floor = MAX_NS >> BUSY_FLOOR_SHIFT
    for ev, slept in events:
        before = w
        w = twin.busy_window_next(w, MAX_NS, ev, slept)
        assert floor <= w <= MAX_NS  # bounded, and never 0 while the window is on
        if ev == BUSY_MISS:
            assert w == max(before // 2, floor)
        elif ev == BUSY_WOKE and slept < MAX_NS:
            assert w == MAX_NS
        else:
            assert w == before
    assert twin.busy_window_next(5, 0, BUSY_WOKE, 0) == 0  # off


def _process_cpu() -> float:
    return time.process_time()  # all threads of this process: the loops are ours


def _counters(rig: Rig) -> dict:
    s = rig.fp.stats()
    return {k: s[k] for k in ("polls", "polls_slept", "busy_polls", "busy_hits", "busy_misses")}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("threads", [1, 2])
def test_busy_window_backs_off_when_idle(impl: str, threads: int) -> None:
    window_us = 10_000  # the largest window: the easiest to see if it did not stop
    rig = Rig(impl, threads=threads, busy_poll_us=window_us)
    try:
        rig.fp.set_route(REMOTE, PEER)
        rig.fp.start()
        n = 20
        for i in range(n):  # back to back, 1 ms apart: well inside a 10 ms window
            rig.tun.send(ipv4_packet("10.244.1.5", "10.244.2.7", payload=bytes([i]) * 32))
            rig.peer.recvfrom(2048)
            time.sleep(0.001)
        rig.wait_for(lambda: rig.fp.stats()["tx_packets"] == n, "tx")
        # every window ends: after the last packet the loop spins at most one window, then sleeps
        rig.wait_for(lambda: _counters(rig)["polls_slept"] == _counters(rig)["busy_misses"]
                     and _counters(rig)["busy_misses"] >= 1, "the loops to sleep")
        time.sleep(3 * window_us / 1e6)
        idle0, cpu0 = _counters(rig), _process_cpu()
        time.sleep(0.5)
        idle1, cpu1 = _counters(rig), _process_cpu()
        assert idle1 == idle0, f"the loop polled while idle: {idle0} -> {idle1}"
        assert cpu1 - cpu0 < 0.1, f"{cpu1 - cpu0:.3f} s of CPU in 0.5 s idle: something spins"
        s = rig.fp.stats()
        assert s["polls_slept"] == s["busy_misses"]  # every sleep came after a window that ran out
        assert s["busy_hits"] >= 1  # packets 1 ms apart land inside a 10 ms window
        assert s["busy_polls"] >= s["busy_hits"] + s["busy_misses"]
        rig.fp.check()
    finally:
        rig.close()


@pytest.mark.parametrize("impl", IMPLS)
def test_window_off_sleeps_at_once(impl: str) -> None:
    rig = Rig(impl, threads=1, busy_poll_us=0)
    try:
        rig.fp.set_route(REMOTE, PEER)
        rig.fp.start()
        for i in range(5):
            rig.tun.send(ipv4_packet("10.244.1.5", "10.244.2.7", payload=bytes([i]) * 32))
            rig.peer.recvfrom(2048)
        rig.wait_for(lambda: rig.fp.stats()["tx_packets"] == 5, "tx")
        s = rig.fp.stats()
        assert s["busy_polls"] == s["busy_hits"] == s["busy_misses"] == 0
        assert s["polls_slept"] >= 1  # it slept at least before the first packet
        assert s["polls"] >= 2 * s["polls_slept"]  # each sleep is a look without waiting, then the blocking poll
    finally:
        rig.close()


@pytest.mark.parametrize("bad", [-1, fastpath.MAX_BUSY_POLL_US + 1])
def test_busy_poll_option_is_bounded(bad: int) -> None:
    with pytest.raises(ValueError, match="busy_poll_us"):
        make("python", busy_poll_us=bad)


def test_loop_priority_parse() -> None:
    assert fastpath.parse_loop_priority("") == fastpath.parse_loop_priority("inherit") == ("", 0)
    assert fastpath.parse_loop_priority("nice:-5") == ("nice", -5)
    assert fastpath.parse_loop_priority(" fifo:1 ") == ("fifo", 1)
    for bad in ("nice", "nice:x", "nice:-21", "fifo:0", "fifo:100", "rr:5"):
        with pytest.raises(ValueError, match="expected"):
            fastpath.parse_loop_priority(bad)


@pytest.mark.parametrize("impl", IMPLS)
def test_loop_threads_get_their_priority(impl: str) -> None:
    import os
    import threading

    rig = Rig(impl, threads=2, loop_priority="nice:7")
    try:
        rig.fp.start()
        loops = [t for t in threading.enumerate() if t.name.startswith("fastpath-")]
        assert len(loops) == 2

        def nices() -> list:
            return [os.getpriority(os.PRIO_PROCESS, t.native_id) for t in loops]

        rig.wait_for(lambda: nices() == [7, 7], "the loop threads' nice value")
        assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) != 7  # only the loops
    finally:
        rig.close()


def test_daemon_defaults_and_environment() -> None:
    from fastflannel.backend import udp_options
    from fastflannel.backend.udp import fastpath_options

    o = fastpath_options(udp_options.UdpOptions.load(environ={}), threads=1)
    assert o.busy_poll_us == udp_options.BUSY_POLL_US == 0  # measured: spinning loses on shared CPUs
    assert o.loop_priority == udp_options.LOOP_PRIORITY == "fifo:1"  # measured: the wake-up lever that pays
    assert o.demote_after == udp_options.DEMOTE_AFTER > 0  # measured: floods batch, request/response keeps FIFO
    o = fastpath_options(udp_options.UdpOptions.load(environ={"FASTFLANNEL_UDP_BUSY_POLL_US": "50",
                                                              "FASTFLANNEL_UDP_LOOP_PRIORITY": "inherit",
                                                              "FASTFLANNEL_UDP_DEMOTE_AFTER": "0"}), 1)
    assert o.busy_poll_us == 50 and fastpath.parse_loop_priority(o.loop_priority) == ("", 0)
    assert o.demote_after == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_fifo_loop_forwards_and_is_realtime_when_allowed(impl: str) -> None:
    import os
    import threading

    rig = Rig(impl, threads=1, loop_priority="fifo:1")
    try:
        rig.fp.set_route(REMOTE, PEER)
        rig.fp.start()
        (loop,) = [t for t in threading.enumerate() if t.name.startswith("fastpath-")]
        rig.tun.send(ipv4_packet("10.244.1.5", "10.244.2.7", payload=b"rt"))
        assert rig.peer.recvfrom(2048)[0][20:] == b"rt"  # forwards whether or not the kernel granted SCHED_FIFO
        if os.geteuid() == 0:  # root has CAP_SYS_NICE: granted
            rig.wait_for(lambda: os.sched_getscheduler(loop.native_id) == os.SCHED_FIFO, "SCHED_FIFO")
        rig.fp.check()
    finally:
        rig.close()


def test_refused_priority_is_logged_and_the_loop_runs(monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    import os

    def refuse(*_a: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "sched_setscheduler", refuse)  # as without CAP_SYS_NICE
    rig = Rig("python", threads=1, loop_priority="fifo:1")
    try:
        with caplog.at_level("WARNING", logger="fastflannel"):
            rig.fp.set_route(REMOTE, PEER)
            rig.fp.start()
            rig.tun.send(ipv4_packet("10.244.1.5", "10.244.2.7", payload=b"still"))
            assert rig.peer.recvfrom(2048)[0][20:] == b"still"
        assert any("loop_priority_refused" in r.getMessage() and "fifo:1" in r.getMessage() for r in caplog.records)
        rig.fp.check()
    finally:
        rig.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="SCHED_FIFO needs CAP_SYS_NICE (root)")
@pytest.mark.parametrize("impl", IMPLS)
def test_realtime_loop_spins_as_an_ordinary_thread_and_sleeps_realtime(impl: str) -> None:
    # a FIFO thread's sched_yield() yields to no ordinary task: spinning at FIFO would starve the application whose
    # answer the window waits for. With a packet every millisecond the 10 ms window keeps hitting, so the loop spends
    # most of its time in it; once the traffic stops it must sleep at FIFO again (its wake-up preempts at once).
    rig = Rig(impl, threads=1, loop_priority="fifo:1", busy_poll_us=10_000)
    try:
        rig.fp.set_route(REMOTE, PEER)
        rig.fp.start()
        (loop,) = [t for t in threading.enumerate() if t.name.startswith("fastpath-")]
        seen = set()
        deadline = time.monotonic() + 10
        while os.SCHED_OTHER not in seen and time.monotonic() < deadline:
            rig.tun.send(ipv4_packet("10.244.1.5", "10.244.2.7", payload=b"spin"))
            assert rig.peer.recvfrom(2048)[0][20:] == b"spin"
            time.sleep(0.001)
            seen.add(os.sched_getscheduler(loop.native_id))
        assert os.SCHED_OTHER in seen, f"the loop never spun as an ordinary thread (policies seen: {seen})"
        slept = rig.fp.stats()["polls_slept"]
        rig.wait_for(lambda: rig.fp.stats()["polls_slept"] > slept, "the window ran out and the loop slept")
        rig.wait_for(lambda: os.sched_getscheduler(loop.native_id) == os.SCHED_FIFO, "asleep at SCHED_FIFO again")
        assert os.sched_getparam(loop.native_id).sched_priority == 1
        rig.fp.check()
    finally:
        rig.close()
