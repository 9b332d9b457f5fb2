# SPDX-License-Identifier: Apache-2.0
"""The adaptive priority of a real-time loop (issue 12): both implementations.

A SCHED_FIFO loop woken on a small-packet sender's CPU preempts it at every packet, so a one-way stream of small
packets is served one packet per wake-up. After ``demote_after`` one-packet wake-ups in a row from one source, each
less than THIN_GAP_NS after the last, the loop runs as an ordinary thread; after PRIO_IDLE_MS without a packet it
is real-time again.

- The row policy: the C loop's ``ff_thin_next`` (through ``_fastpath.thin_next``) against the twin's ``thin_next``
  on hypothesis-made wake-up sequences, and its properties (alternating sources never build a row; a slow stream
  never does; a burst or nothing ends it).
- The loop: one-way single packets demote it (counted, and the thread's policy seen as SCHED_OTHER), an idle
  interval makes it SCHED_FIFO again (counted); request/response (a packet each way in turn) never demotes it;
  demote_after 0 never does; the option is bounded.
"""
from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import List, Tuple

import pytest
from fastpath_rig import PEER, REMOTE, Rig, make
from hypothesis import given, settings
from hypothesis import strategies as st
from impls import HAVE_CYTHON, IMPLS, NO_CYTHON_REASON
from packets import ipv4_packet

from fastflannel.datapath import fastpath, twin, twin_wait
from fastflannel.datapath.contract import MAX_DEMOTE_AFTER, THIN_GAP_NS, THIN_NONE, THIN_TUN, THIN_UDP

WAKES = st.lists(st.tuples(st.sampled_from([THIN_NONE, THIN_TUN, THIN_UDP]), st.integers(0, 3 * THIN_GAP_NS)),
                 max_size=80)
ROOT = os.geteuid() == 0


@pytest.mark.skipif(not HAVE_CYTHON, reason=NO_CYTHON_REASON or "-")
@settings(max_examples=300, deadline=None)
@given(WAKES, st.integers(0, MAX_DEMOTE_AFTER))
def test_row_policy_c_equals_twin(wakes: List[Tuple[int, int]], start: int) -> None:
    c = fastpath.implementation_module("cython")
    tc = tp = start
    last = THIN_TUN
    for src, gap in wakes:
        tc = c.thin_next(tc, src, last, gap)
        tp = twin.thin_next(tp, src, last, gap)
        assert tc == tp
        last = src


@settings(max_examples=300, deadline=None)
@given(WAKES)
def test_row_policy_properties(wakes: List[Tuple[int, int]]) -> None:
    thin, last = 0, THIN_NONE
    for src, gap in wakes:
        before = thin
        thin = twin.thin_next(thin, src, last, gap)
        if src == THIN_NONE:
            assert thin == 0  # nothing, a burst or both directions end the row
        elif src == last and gap < THIN_GAP_NS:
            assert thin == min(before + 1, MAX_DEMOTE_AFTER)
        else:
            assert thin == 1  # another source, or too slow: a new row
        last = src
    # request/response alternates sources: however fast, the row never passes 1
    thin, last = 0, THIN_NONE
    for i in range(100):
        src = THIN_TUN if i % 2 else THIN_UDP
        thin = twin.thin_next(thin, src, last, 1_000)
        last = src
        assert thin <= 1


def _loop_thread(name: str = "") -> threading.Thread:
    (loop,) = [t for t in threading.enumerate() if t.name.startswith("fastpath-" + name)]
    return loop


def _send_one(rig: Rig) -> None:
    """One packet TUN -> peer, waited for at the peer, then a pause that lets the loop sleep again (its own wake-up)."""
    rig.tun.send(ipv4_packet("10.244.1.5", "10.244.2.7", payload=b"s" * 32))
    assert rig.peer.recvfrom(2048)[0][20:] == b"s" * 32
    t = time.perf_counter_ns() + 20_000
    while time.perf_counter_ns() < t:
        pass


def _stream_until_demoted(rig: Rig, limit_s: float = 20.0) -> int:
    """Send single packets (``_send_one``) until the loop is demoted or ``limit_s`` passed; packets sent."""
    n = 0
    deadline = time.monotonic() + limit_s
    while rig.fp.stats()["prio_demotions"] == 0 and time.monotonic() < deadline:
        _send_one(rig)
        n += 1
    return n


@contextlib.contextmanager
def _running(impl: str, monkeypatch: pytest.MonkeyPatch, priority: str, demote_after: int,  # type: ignore[no-untyped-def]
             threads: int = 1):
    """A started rig with a route to PEER; yields (rig, the loop thread, or the tx loop's with 2 threads). The
    Python loop cannot wake within THIN_GAP_NS of its last wake-up reliably: the gap is widened for it only (C
    keeps the contract's)."""
    if impl == "python":
        monkeypatch.setattr(twin_wait, "THIN_GAP_NS", 10**9)
    rig = Rig(impl, threads=threads, loop_priority=priority, demote_after=demote_after)
    try:
        rig.fp.set_route(REMOTE, PEER)
        rig.fp.start()
        yield rig, _loop_thread("tx")
        rig.fp.check()
    finally:
        rig.close()


@pytest.mark.skipif(not ROOT, reason="SCHED_FIFO needs CAP_SYS_NICE (root)")
@pytest.mark.parametrize("impl", IMPLS)
def test_one_way_single_packets_demote_and_idle_restores(impl: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with _running(impl, monkeypatch, "fifo:1", 8) as (rig, loop):
        rig.wait_for(lambda: os.sched_getscheduler(loop.native_id) == os.SCHED_FIFO, "SCHED_FIFO at start")
        n = _stream_until_demoted(rig)
        s = rig.fp.stats()
        assert s["prio_demotions"] == 1, f"not demoted after {n} one-way single packets: {s}"
        assert n >= 8  # never before demote_after wake-ups
        # while packets keep coming (well inside the 2 ms idle bound) it is an ordinary thread
        seen = set()
        for _ in range(50):
            rig.tun.send(ipv4_packet("10.244.1.5", "10.244.2.7", payload=b"more"))
            rig.peer.recvfrom(2048)
            seen.add(os.sched_getscheduler(loop.native_id))
        assert os.SCHED_OTHER in seen, f"never seen as an ordinary thread after the demotion: {seen}"
        # idle: real-time again, counted, and it still forwards
        rig.wait_for(lambda: rig.fp.stats()["prio_restores"] >= 1
                     and os.sched_getscheduler(loop.native_id) == os.SCHED_FIFO, "the idle loop to be SCHED_FIFO again")
        assert os.sched_getparam(loop.native_id).sched_priority == 1
        rig.tun.send(ipv4_packet("10.244.1.5", "10.244.2.7", payload=b"after"))
        assert rig.peer.recvfrom(2048)[0][20:] == b"after"


@pytest.mark.skipif(not ROOT, reason="SCHED_FIFO needs CAP_SYS_NICE (root)")
@pytest.mark.parametrize("impl", IMPLS)
def test_request_response_never_demotes(impl: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with _running(impl, monkeypatch, "fifo:1", 8) as (rig, loop):
        for _ in range(300):  # a request out through the TUN, its answer in from the peer, in turn
            rig.tun.send(ipv4_packet("10.244.1.5", "10.244.2.7", payload=b"q"))
            rig.peer.recvfrom(2048)
            rig.from_peer(ipv4_packet("10.244.2.7", "10.244.1.5", payload=b"a"))
            assert rig.tun.recv(2048)[20:] == b"a"
        s = rig.fp.stats()
        assert s["tx_packets"] == s["rx_packets"] == 300
        assert s["prio_demotions"] == 0, s
        assert os.sched_getscheduler(loop.native_id) == os.SCHED_FIFO


@pytest.mark.skipif(not ROOT, reason="SCHED_FIFO needs CAP_SYS_NICE (root)")
@pytest.mark.parametrize("impl", IMPLS)
def test_one_direction_loops_count_their_own_direction(impl: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # two loop threads, each classifying only its own direction: a one-way stream through the TUN demotes the tx
    # loop; the rx loop, whose few datagrams make no row of 8, stays real-time
    with _running(impl, monkeypatch, "fifo:1", 8, threads=2) as (rig, tx):
        rx = _loop_thread("rx")
        rig.wait_for(lambda: os.sched_getscheduler(rx.native_id) == os.SCHED_FIFO, "the rx loop at SCHED_FIFO")
        for _ in range(4):
            rig.from_peer(ipv4_packet("10.244.2.7", "10.244.1.5", payload=b"a"))
            rig.tun.recv(2048)
        n = _stream_until_demoted(rig)
        assert rig.fp.stats()["prio_demotions"] == 1, f"the tx loop was not demoted after {n} packets"
        assert os.sched_getscheduler(rx.native_id) == os.SCHED_FIFO


@pytest.mark.skipif(not ROOT, reason="SCHED_FIFO needs CAP_SYS_NICE (root)")
@pytest.mark.parametrize("impl", IMPLS)
def test_demote_after_zero_keeps_the_loop_realtime(impl: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with _running(impl, monkeypatch, "fifo:1", 0) as (rig, loop):
        for _ in range(100):  # a one-way stream that would demote it 12 times over with demote_after 8
            _send_one(rig)
        assert rig.fp.stats()["tx_packets"] == 100
        assert rig.fp.stats()["prio_demotions"] == 0
        assert os.sched_getscheduler(loop.native_id) == os.SCHED_FIFO


@pytest.mark.parametrize("impl", IMPLS)
def test_an_ordinary_loop_is_never_switched(impl: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # demote_after applies to real-time loops only: an inherited priority is left alone (nothing to restore to)
    with _running(impl, monkeypatch, "", 1) as (rig, loop):
        before = os.sched_getscheduler(loop.native_id)
        for _ in range(50):
            _send_one(rig)
        s = rig.fp.stats()
        assert s["tx_packets"] == 50
        assert s["prio_demotions"] == s["prio_restores"] == 0
        assert os.sched_getscheduler(loop.native_id) == before


@pytest.mark.parametrize("bad", [-1, MAX_DEMOTE_AFTER + 1])
def test_demote_after_is_bounded(bad: int) -> None:
    with pytest.raises(ValueError, match="demote_after"):
        make("python", demote_after=bad)
