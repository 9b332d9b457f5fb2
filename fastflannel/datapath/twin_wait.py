# SPDX-License-Identifier: Apache-2.0
"""How the twin's loop waits for work, in pure Python: the mirror of the C ``ff_wait`` (parts/run.pxi).

A look without waiting; if nothing is ready, the busy-poll window (``busy_window_next``, the C ``ff_busy_next``);
then a sleep in ``poll()``. A real-time loop classifies each wake-up before it sleeps and runs as an ordinary
thread after ``demote_after`` one-packet wake-ups in a row from one source (``thin_next``, the C
``ff_thin_next``), real-time again after PRIO_IDLE_MS idle. The counters are the loop's (``COUNTER_NAMES``).
"""
from __future__ import annotations

import os
import select
import time
from typing import List, Optional, Tuple

from fastflannel.datapath.contract import (
    BUSY_FLOOR_SHIFT,
    BUSY_HIT,
    BUSY_MISS,
    BUSY_WOKE,
    COUNTER_INDEX,
    MAX_DEMOTE_AFTER,
    PRIO_IDLE_MS,
    ROLE_BOTH,
    ROLE_RX,
    ROLE_TX,
    THIN_GAP_NS,
    THIN_NONE,
    THIN_TUN,
    THIN_UDP,
)

_POLLS = COUNTER_INDEX["polls"]
_POLLS_SLEPT = COUNTER_INDEX["polls_slept"]
_BUSY_POLLS = COUNTER_INDEX["busy_polls"]
_BUSY_HITS = COUNTER_INDEX["busy_hits"]
_BUSY_MISSES = COUNTER_INDEX["busy_misses"]
_PRIO_DEMOTIONS = COUNTER_INDEX["prio_demotions"]
_PRIO_RESTORES = COUNTER_INDEX["prio_restores"]
_TX_PACKETS = COUNTER_INDEX["tx_packets"]
_RX_PACKETS = COUNTER_INDEX["rx_packets"]


def busy_window_next(window: int, max_ns: int, event: int, slept_ns: int = 0) -> int:
    """Return the busy-poll window (ns) after ``event``; the C loop's ff_busy_next is the same policy.

    BUSY_HIT (data came within the window) keeps it; BUSY_MISS (it ran out, the loop sleeps) halves it, down to
    ``max_ns >> BUSY_FLOOR_SHIFT``; BUSY_WOKE (a sleep of ``slept_ns`` ended) restores ``max_ns`` if the full
    window would have caught that wake-up. ``max_ns`` 0: busy-polling is off, the window is 0.
    """
    if max_ns <= 0:
        return 0
    if event == BUSY_MISS:
        return max(window >> 1, max_ns >> BUSY_FLOOR_SHIFT)
    if event == BUSY_WOKE and slept_ns < max_ns:
        return max_ns
    return window


def thin_next(thin: int, src: int, last_src: int, gap_ns: int) -> int:
    """Return the thin wake-ups in a row after one that moved ``src``; the C loop's ff_thin_next is the same policy.

    A thin wake-up moved exactly one packet from one source (THIN_TUN, THIN_UDP): it extends the row when the
    previous one came from the same source less than THIN_GAP_NS before, else starts a row of 1; THIN_NONE (nothing,
    a burst, or both directions) ends the row. The row is capped at MAX_DEMOTE_AFTER."""
    if src == THIN_NONE:
        return 0
    if src == last_src and gap_ns < THIN_GAP_NS:
        return thin + 1 if thin < MAX_DEMOTE_AFTER else thin
    return 1


class LoopSched:
    """One loop's scheduling state (the C ff_sched): its real-time policy and the thin wake-up row."""

    def __init__(self, role: int = ROLE_BOTH) -> None:
        self.role = role  # a one-direction loop counts only its own direction
        self.rt = realtime_policy()
        self.demoted = False
        self.thin = 0
        self.last_src = THIN_NONE
        self.last_wake = 0
        self.gap = 0
        self.tx0 = self.rx0 = 0


def realtime_policy() -> Optional[Tuple[int, int]]:
    """The calling thread's (SCHED_FIFO/SCHED_RR policy, priority), or None if it is an ordinary thread."""
    policy = os.sched_getscheduler(0)
    if policy not in (os.SCHED_FIFO, os.SCHED_RR):
        return None
    return policy, os.sched_getparam(0).sched_priority


def set_policy(policy: int, priority: int) -> None:
    try:
        os.sched_setscheduler(0, policy, os.sched_param(priority))
    except OSError:  # refused: the thread stays as it is (as ff_spin)
        pass


def wait(poller: "select.poll", window: int, sched: LoopSched, c: List[int], busy_ns: int,
         demote_after: int) -> Tuple[list, int]:
    """Mirror of the C ff_wait: look without waiting; if nothing is ready busy-poll up to ``window`` ns
    (yielding between looks), then sleep. Return the events and the next window; count in ``c`` as the C loop
    does. A real-time loop with ``demote_after`` set adapts its priority as ff_thin_account/ff_thin_woke do."""
    adapt = sched.rt is not None and demote_after > 0
    events = poller.poll(0)
    c[_POLLS] += 1
    if events:
        return events, window
    if window > 0:
        t0 = time.monotonic_ns()
        rt = None if sched.demoted else sched.rt
        if rt is not None:  # spin as an ordinary thread (ff_spin says why), real-time again before sleeping
            set_policy(os.SCHED_OTHER, 0)
        try:
            while True:
                os.sched_yield()
                events = poller.poll(0)
                c[_BUSY_POLLS] += 1
                if events or time.monotonic_ns() - t0 >= window:
                    break
        finally:
            if rt is not None:
                set_policy(*rt)
        if events:
            c[_BUSY_HITS] += 1
            return events, busy_window_next(window, busy_ns, BUSY_HIT)
        c[_BUSY_MISSES] += 1
        window = busy_window_next(window, busy_ns, BUSY_MISS)
    c[_POLLS] += 1  # counted before: a reader sees a sleeping loop as asleep
    c[_POLLS_SLEPT] += 1
    t0 = time.monotonic_ns()
    if adapt:
        _thin_account(sched, c, demote_after)
    if adapt and sched.demoted:
        events = poller.poll(PRIO_IDLE_MS)
        if not events:  # idle: real-time again before the long sleep
            assert sched.rt is not None
            try:
                os.sched_setscheduler(0, sched.rt[0], os.sched_param(sched.rt[1]))
            except OSError:
                pass
            else:
                sched.demoted = False
                sched.thin = 0
                c[_PRIO_RESTORES] += 1
            c[_POLLS] += 1
            c[_POLLS_SLEPT] += 1
            events = poller.poll()
    else:
        events = poller.poll()
    if adapt:
        now = time.monotonic_ns()
        sched.gap, sched.last_wake = now - sched.last_wake, now
        sched.tx0, sched.rx0 = c[_TX_PACKETS], c[_RX_PACKETS]
    if busy_ns > 0:
        window = busy_window_next(window, busy_ns, BUSY_WOKE, time.monotonic_ns() - t0)
    return events, window


def _thin_account(sched: LoopSched, c: List[int], demote_after: int) -> None:
    """Before sleeping: classify what moved since the wake-up; demote after ``demote_after`` thin ones in a row."""
    dtx = c[_TX_PACKETS] - sched.tx0 if sched.role != ROLE_RX else 0  # the other direction is another thread's
    drx = c[_RX_PACKETS] - sched.rx0 if sched.role != ROLE_TX else 0
    src = THIN_TUN if (dtx, drx) == (1, 0) else THIN_UDP if (dtx, drx) == (0, 1) else THIN_NONE
    sched.thin = thin_next(sched.thin, src, sched.last_src, sched.gap)
    sched.last_src = src
    if not sched.demoted and sched.thin >= demote_after:
        try:
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
        except OSError:
            return
        sched.demoted = True
        c[_PRIO_DEMOTIONS] += 1
