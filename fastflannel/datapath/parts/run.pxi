# SPDX-License-Identifier: Apache-2.0
"""The control channel (ff_ctl: commands applied between batches, SYNCs echoed) and the poll loop (ff_run) that
Proxy.run() calls inside its one ``with nogil``."""


cdef int ff_ctl(ff_state *st, int ctl_fd, int *stage) noexcept nogil:
    """Apply up to FF_CTL_BURST queued commands, echoing SYNCs; 0 or -errno."""
    cdef ff_command cmd
    cdef ssize_t n
    cdef int k, r
    for k in range(FF_CTL_BURST):
        n = recv(ctl_fd, &cmd, sizeof(cmd), MSG_DONTWAIT)
        if n < 0:
            if errno == EINTR:
                continue
            if errno == EAGAIN:
                return 0
            stage[0] = S_CTL
            return -errno
        if n == 0:  # Python closed its end while the loop runs: nobody can steer or stop us but the eventfd
            stage[0] = S_CTL
            return -EPIPE
        if n != sizeof(cmd):
            continue
        if cmd.cmd == CMD_SYNC:
            send(ctl_fd, &cmd, sizeof(cmd), MSG_DONTWAIT)  # Python waits for it; its queue has room
            continue
        ff_add_shared(&st.c[C_CTL_COMMANDS], 1)
        r = ff_apply(st, cmd.cmd, cmd.arg, cmd.value, cmd.pid)
        if r < 0:
            stage[0] = S_PEERS
            return r
    return 0


cdef inline int64_t ff_now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


cdef int64_t ff_busy_next(int64_t window, int64_t max_ns, int event, int64_t slept_ns) noexcept nogil:
    """The busy-poll window after ``event`` (twin.busy_window_next is the same policy, tested against this one).

    BUSY_HIT keeps the window; BUSY_MISS halves it, down to max >> BUSY_FLOOR_SHIFT; BUSY_WOKE (a sleep of
    ``slept_ns`` ended) restores the full window if the full window would have caught that wake-up.
    """
    cdef int64_t floor = max_ns >> BUSY_FLOOR_SHIFT
    if max_ns <= 0:
        return 0
    if event == BUSY_MISS:
        window >>= 1
        return window if window > floor else floor
    if event == BUSY_WOKE and slept_ns < max_ns:
        return max_ns
    return window


cdef unsigned int ff_thin_next(unsigned int thin, int src, int last_src, int64_t gap_ns) noexcept nogil:
    """Thin wake-ups in a row after one that moved ``src`` (twin.thin_next is the same policy, tested against it).

    A thin wake-up moved exactly one packet from one source (THIN_TUN, THIN_UDP). It extends the row when the
    previous one came from the same source less than THIN_GAP_NS before; otherwise it starts a row of 1, and a
    wake-up that moved nothing, a burst, or both directions ends the row (0). Request/response alternates sources
    (a request read from the TUN, its answer received from the socket), so only one-way single packets at >= 10
    kpps build a row: a small-packet stream that a real-time loop would serve one preemption per packet."""
    if src == THIN_NONE:
        return 0
    if src == last_src and gap_ns < THIN_GAP_NS:
        return thin + 1 if thin < <unsigned int>FF_MAX_DEMOTE_AFTER else thin
    return 1


cdef struct ff_sched:
    int rt_policy  # SCHED_FIFO/SCHED_RR the loop thread runs at, or -1 (an ordinary thread)
    sched_param rt_param
    bint demoted  # dropped to SCHED_OTHER after st.demote_after thin wake-ups; real-time again when idle
    unsigned int thin  # thin wake-ups in a row (ff_thin_next)
    int last_src  # THIN_* of the last wake-up
    int64_t last_wake_ns
    int64_t gap_ns  # between the last two wake-ups
    uint64_t tx0, rx0  # tx_packets, rx_packets when the loop last woke
    int role  # ROLE_*: a one-direction loop counts only its own direction


cdef void ff_sched_init(ff_sched *s, int role) noexcept nogil:
    """Remember the loop thread's real-time policy (set before the loop started: FastPathOptions.loop_priority)."""
    memset(s, 0, sizeof(ff_sched))
    s.role = role
    s.rt_policy = sched_getscheduler(0)
    if (s.rt_policy != SCHED_FIFO and s.rt_policy != SCHED_RR) or sched_getparam(0, &s.rt_param) != 0:
        s.rt_policy = -1


cdef void ff_thin_account(ff_state *st, ff_sched *s) noexcept nogil:
    """Before a real-time loop sleeps: classify what it moved since it woke, and demote it to SCHED_OTHER after
    st.demote_after thin wake-ups in a row (a FIFO loop woken on its producer's CPU preempts it at every packet,
    so a small-packet stream is served one packet per wake-up; as an ordinary thread the producer fills the queue
    and the loop reads bursts). A refused switch leaves the thread as it is and counts nothing."""
    cdef sched_param other
    cdef uint64_t dtx = ff_load(&st.c[C_TX_PACKETS]) - s.tx0
    cdef uint64_t drx = ff_load(&st.c[C_RX_PACKETS]) - s.rx0
    cdef int src = THIN_NONE
    if s.role == ROLE_TX:  # the other direction is another thread's
        drx = 0
    elif s.role == ROLE_RX:
        dtx = 0
    if dtx == 1 and drx == 0:
        src = THIN_TUN
    elif drx == 1 and dtx == 0:
        src = THIN_UDP
    s.thin = ff_thin_next(s.thin, src, s.last_src, s.gap_ns)
    s.last_src = src
    if not s.demoted and s.thin >= st.demote_after:
        other.sched_priority = 0
        if sched_setscheduler(0, SCHED_OTHER, &other) == 0:
            s.demoted = True
            ff_add_shared(&st.c[C_PRIO_DEMOTIONS], 1)


cdef void ff_thin_woke(ff_state *st, ff_sched *s) noexcept nogil:
    """After a sleep: note the wake-up's time and the packet counters it starts from."""
    cdef int64_t now = ff_now_ns()
    s.gap_ns = now - s.last_wake_ns
    s.last_wake_ns = now
    s.tx0 = ff_load(&st.c[C_TX_PACKETS])
    s.rx0 = ff_load(&st.c[C_RX_PACKETS])


cdef int ff_spin(ff_state *st, pollfd *fds, int nfds, int64_t *window, const ff_sched *s) noexcept nogil:
    """Busy-poll up to ``window`` ns, yielding the CPU between looks; poll()'s result (0: the window ran out).

    A real-time loop spins as an ordinary thread: a SCHED_FIFO thread's sched_yield() yields to no ordinary task, so
    its spin would keep the very application whose answer it waits for off the CPU (both loops of a 2-core machine
    spinning at once leave no CPU at all). It is real-time again before it returns, so the wake-up from the sleep
    that follows still preempts ordinary tasks at once. A refused switch leaves the thread as it is."""
    cdef sched_param other
    cdef int r, e
    cdef int64_t t0 = ff_now_ns()
    if s.rt_policy >= 0 and not s.demoted:
        other.sched_priority = 0
        sched_setscheduler(0, SCHED_OTHER, &other)
    while True:
        sched_yield()
        r = poll(fds, nfds, 0)
        ff_add_shared(&st.c[C_BUSY_POLLS], 1)
        if r != 0 or ff_now_ns() - t0 >= window[0]:
            break
    if s.rt_policy >= 0 and not s.demoted:
        e = errno  # a failed poll()'s errno is what ff_run reports
        sched_setscheduler(0, s.rt_policy, &s.rt_param)
        ff_set_errno(e)
    if r > 0:
        ff_add_shared(&st.c[C_BUSY_HITS], 1)
        window[0] = ff_busy_next(window[0], st.busy_ns, BUSY_HIT, 0)
    elif r == 0:
        ff_add_shared(&st.c[C_BUSY_MISSES], 1)
        window[0] = ff_busy_next(window[0], st.busy_ns, BUSY_MISS, 0)
    return r


cdef int ff_wait(ff_state *st, pollfd *fds, int nfds, int64_t *window, ff_sched *s) noexcept nogil:
    """poll() the loop's fds: a look without waiting first; if nothing is ready, busy-poll up to ``window`` ns
    (ff_spin), then sleep. Returns poll()'s result; counts polls, sleeps, window hits/misses.

    An idle loop costs one window per wake-up, then sleeps: the window starts only when a burst just ended.
    A real-time loop with st.demote_after set classifies each wake-up before it sleeps (ff_thin_account); a
    demoted one sleeps at most PRIO_IDLE_MS first, and if nothing came is real-time again before it sleeps on."""
    cdef int i, r, e
    cdef int64_t t0, t1
    cdef bint adapt = s.rt_policy >= 0 and st.demote_after > 0
    for i in range(nfds):
        fds[i].revents = 0
    r = poll(fds, nfds, 0)
    ff_add_shared(&st.c[C_POLLS], 1)
    if r != 0:
        return r
    if window[0] > 0:
        r = ff_spin(st, fds, nfds, window, s)
        if r != 0:
            return r
    ff_add_shared(&st.c[C_POLLS], 1)  # counted before: a reader sees a sleeping loop as asleep
    ff_add_shared(&st.c[C_POLLS_SLEPT], 1)
    t0 = ff_now_ns() if st.busy_ns > 0 else 0
    if adapt:
        ff_thin_account(st, s)
    if adapt and s.demoted:
        r = poll(fds, nfds, PRIO_IDLE_MS)
        if r == 0:  # idle: real-time again, so the next wake-up preempts ordinary tasks at once
            if sched_setscheduler(0, s.rt_policy, &s.rt_param) == 0:
                s.demoted = False
                s.thin = 0
                ff_add_shared(&st.c[C_PRIO_RESTORES], 1)
            ff_add_shared(&st.c[C_POLLS], 1)
            ff_add_shared(&st.c[C_POLLS_SLEPT], 1)
            r = poll(fds, nfds, -1)
    else:
        r = poll(fds, nfds, -1)
    if adapt:
        e = errno
        ff_thin_woke(st, s)
        ff_set_errno(e)
    if st.busy_ns > 0:
        t1 = ff_now_ns()
        window[0] = ff_busy_next(window[0], st.busy_ns, BUSY_WOKE, t1 - t0)
    return r


cdef int ff_run(ff_state *st, int role, int ctl_fd, int *stage, int *bad_fd) noexcept nogil:
    """Serve ``role`` until the stop eventfd is readable (0) or a fd fails (-errno, stage/bad_fd set).

    While a data fd keeps returning packets the loop reads it again without poll() (flannel's trick: an
    occasional EAGAIN is cheaper than a poll() per burst), but at most FF_SPIN bursts in a row: then poll()
    runs (it returns at once when data is waiting) and stop and ctl are serviced. When nothing is ready the
    loop busy-polls for a bounded, adaptive window (st.busy_ns, ff_wait) before it sleeps in poll().
    """
    cdef pollfd fds[4]
    cdef int nfds = 2, i_tun = -1, i_udp = -1, r, i
    cdef unsigned int spin = 0
    cdef bint tun_ready, udp_ready
    cdef unsigned int got_tx = 0, got_rx = 0
    cdef int64_t window = st.busy_ns  # this loop's own window: no sharing between loop threads
    cdef ff_sched sched
    ff_sched_init(&sched, role)
    fds[0].fd = st.stop_fd
    fds[0].events = POLLIN
    fds[1].fd = ctl_fd
    fds[1].events = POLLIN
    if role != ROLE_RX:
        i_tun = nfds
        fds[nfds].fd = st.tun_fd
        fds[nfds].events = POLLIN
        nfds += 1
    if role != ROLE_TX:
        i_udp = nfds
        fds[nfds].fd = st.udp_fd
        fds[nfds].events = POLLIN
        nfds += 1
    while True:
        if spin == 0:
            r = ff_wait(st, fds, nfds, &window, &sched)
            if r < 0:
                if errno == EINTR:
                    continue
                stage[0] = S_POLL
                return -errno
            for i in range(nfds):
                if fds[i].revents & POLLNVAL:
                    stage[0] = S_POLL
                    bad_fd[0] = fds[i].fd
                    return -EBADF
            if fds[0].revents:
                return 0
            if fds[1].revents:
                r = ff_ctl(st, ctl_fd, stage)
                if r < 0:
                    return r
            tun_ready = i_tun >= 0 and fds[i_tun].revents != 0
            udp_ready = i_udp >= 0 and fds[i_udp].revents != 0
            if tun_ready and not (fds[i_tun].revents & POLLIN):
                # POLLERR/POLLHUP without data: the device (or the socketpair standing in) is gone
                stage[0] = S_TUN_READ
                return -EPIPE
        else:  # spinning: only the fds that returned data last time
            tun_ready = got_tx != 0
            udp_ready = got_rx != 0
        got_tx = got_rx = 0
        if tun_ready:
            if st.vnet:
                r = ff_tx_burst_vnet(st, stage, &got_tx)
            else:
                r = ff_tx_burst(st, stage, &got_tx)
            if r != 0:
                return r if r < 0 else 0
        if udp_ready:
            if st.vnet or st.gro:
                r = ff_rx_burst_gro(st, stage, &got_rx)
            else:
                r = ff_rx_burst(st, stage, &got_rx)
            if r != 0:
                return r if r < 0 else 0
        if (got_tx != 0 or got_rx != 0) and spin < st.spin:
            spin += 1
        else:
            spin = 0
