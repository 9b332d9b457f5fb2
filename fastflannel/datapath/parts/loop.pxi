# SPDX-License-Identifier: Apache-2.0
"""The per-packet loop: one batch per burst, read phase -> pure process phase -> sendmmsg / TUN writes.

Counting is count.pxi's (shared with the process_* test entry points: ff_tx_decide / ff_rx_decide are the
process phase with its accounting, what those entry points run). Shared by both loops: ff_wait_writable and ff_io_error (what a write-side site does after a failed
syscall). No Python objects; every function returns 0, 1 (stop seen) or -errno.
"""


cdef int ff_wait_writable(ff_state *st, int fd) noexcept nogil:
    """Wait until ``fd`` is writable (1) or stop was asked (0); -errno on a poll failure."""
    cdef pollfd fds[2]
    cdef int r
    fds[0].fd = fd
    fds[0].events = POLLOUT
    fds[1].fd = st.stop_fd
    fds[1].events = POLLIN
    while True:
        fds[0].revents = 0
        fds[1].revents = 0
        r = poll(fds, 2, -1)
        if r < 0:
            if errno == EINTR:
                continue
            return -errno
        if fds[1].revents:
            return 0
        if fds[0].revents & POLLNVAL:
            return -EBADF
        return 1


cdef enum:
    FF_IO_RETRY = 0  # EINTR, or EAGAIN and the fd became writable: issue the syscall again
    FF_IO_DROP = 1  # a per-packet error (EPERM, ENETUNREACH, EMSGSIZE, EIO...): the site counts its drop
    FF_IO_STOP = 2  # stop was asked (rc 1), poll failed (rc -errno) or errno is fatal (rc -errno)


cdef inline int ff_io_error(ff_state *st, int fd, int wait_counter, uint64_t *syscalls, int *rc) noexcept nogil:
    """Decide what a write-side site does after its syscall on ``fd`` failed (call it first: it reads errno).

    EINTR: FF_IO_RETRY. EAGAIN: count ``wait_counter`` and the poll in ``syscalls``, wait until ``fd`` is
    writable (FF_IO_RETRY) or stop/poll failure (FF_IO_STOP, rc 1 or -errno). Fatal errno: FF_IO_STOP, rc
    -errno. Anything else: FF_IO_DROP, rc -errno. rc is 0 on FF_IO_RETRY. Read sites, where EAGAIN means
    "nothing more to read", do not use this.
    """
    cdef int e = errno
    cdef int r
    rc[0] = 0
    if e == EINTR:
        return FF_IO_RETRY
    if e == EAGAIN:
        ff_add(&st.c[wait_counter], 1)
        syscalls[0] += 1
        r = ff_wait_writable(st, fd)
        if r <= 0:
            rc[0] = r if r < 0 else 1
            return FF_IO_STOP
        return FF_IO_RETRY
    rc[0] = -e
    return FF_IO_STOP if ff_fatal(e) else FF_IO_DROP


cdef unsigned int ff_tx_process(ff_state *st, unsigned int count, unsigned int *nicmp) noexcept nogil:
    """Decide every read slot: fill msgs[0:nsend] for sendmmsg, icmp[0:nicmp] for the TUN; return nsend."""
    cdef ff_io *io = &st.tx
    cdef unsigned int i, nsend = 0, ni = 0
    cdef ff_verdict v
    cdef uint32_t nh = 0, pid = 0
    cdef size_t ilen = 0
    cdef uint8_t *p
    ff_check(count <= st.batch)
    for i in range(count):
        p = io.bufs + <size_t>i * FF_SLOT
        v = ff_out_one(st, p, io.lens[i], &nh, &pid, io.icmp + <size_t>ni * FF_ICMP_MAX, &ilen)
        if v == V_SEND:
            io.iov[nsend].iov_base = p
            io.iov[nsend].iov_len = io.lens[i]
            io.addrs[nsend].sin_addr.s_addr = htonl(nh)
            io.pids[nsend] = pid
            nsend += 1
        elif v == V_ICMP:
            io.icmp_lens[ni] = <uint32_t>ilen
            ni += 1
    nicmp[0] = ni
    return nsend


cdef inline unsigned int ff_tx_decide(ff_state *st, unsigned int count, unsigned int *nicmp) noexcept nogil:
    """The tx process phase of a burst of ``count`` read slots, with its accounting (batch, drops); return nsend."""
    ff_tx_batch(st, count)
    return ff_tx_process(st, count, nicmp)


cdef int ff_tx_burst(ff_state *st, int *stage, unsigned int *got) noexcept nogil:
    """Drain up to one batch from the TUN, process it, send it; 0, 1 (stop seen) or -errno. got: packets read."""
    cdef ff_io *io = &st.tx
    cdef unsigned int count = 0, nsend, nicmp = 0, sent = 0, i
    cdef ssize_t n
    cdef int r, e, a, rc
    cdef uint64_t syscalls = 0, packets = 0, nbytes = 0
    while count < st.batch:
        n = read(st.tun_fd, io.bufs + <size_t>count * FF_SLOT, FF_SLOT)
        syscalls += 1
        if n < 0:
            e = errno
            if e == EINTR:
                continue
            if e == EAGAIN:
                break
            ff_add(&st.c[C_TX_SYSCALLS], syscalls)
            if ff_fatal(e):
                stage[0] = S_TUN_READ
                return -e
            ff_add(&st.c[C_TX_READ_ERRORS], 1)
            break
        io.lens[count] = <uint32_t>n
        count += 1
    got[0] = count
    if count == 0:
        ff_add(&st.c[C_TX_SYSCALLS], syscalls)
        return 0
    nsend = ff_tx_decide(st, count, &nicmp)
    for i in range(nicmp):
        syscalls += 1
        if write(st.tun_fd, io.icmp + <size_t>i * FF_ICMP_MAX, io.icmp_lens[i]) < 0:
            ff_add(&st.c[C_TX_DROP_ICMP_WRITE], 1)
    while sent < nsend:
        r = sendmmsg(st.udp_fd, io.msgs + sent, nsend - sent, MSG_DONTWAIT)
        syscalls += 1
        if r < 0:
            a = ff_io_error(st, st.udp_fd, C_TX_SEND_WAITS, &syscalls, &rc)
            if a == FF_IO_RETRY:
                continue
            if a == FF_IO_STOP:
                ff_add(&st.c[C_TX_SYSCALLS], syscalls)
                stage[0] = S_UDP_SEND
                return rc
            ff_tx_drop_send(st, io.pids[sent], 1)  # this datagram only (EPERM, ENETUNREACH, EMSGSIZE...)
            sent += 1
            continue
        ff_tx_count_sent(st, sent, sent + <unsigned int>r, &packets, &nbytes)
        sent += <unsigned int>r
    ff_tx_done(st, syscalls, packets, nbytes)
    return 0


cdef unsigned int ff_rx_process(ff_state *st, unsigned int count) noexcept nogil:
    """Decide every received slot: lens[i] stays > 0 for the ones to write to the TUN; return how many."""
    cdef ff_io *io = &st.rx
    cdef unsigned int i, nwrite = 0
    for i in range(count):
        if ff_in_one(st, io.srcs[i], io.bufs + <size_t>i * FF_SLOT, io.lens[i], &io.pids[i]) == V_WRITE:
            nwrite += 1
        else:
            io.lens[i] = 0
    return nwrite


cdef inline unsigned int ff_rx_decide(ff_state *st, unsigned int count) noexcept nogil:
    """The rx process phase of a burst of ``count`` received slots, with its accounting (batch, drops); return
    how many are to be written (their lens stay > 0)."""
    ff_rx_batch(st, count)
    return ff_rx_process(st, count)


cdef int ff_rx_burst(ff_state *st, int *stage, unsigned int *got) noexcept nogil:
    """Receive up to one batch with recvmmsg, process it, write it to the TUN; 0, 1 (stop seen) or -errno.
    got: datagrams received."""
    cdef ff_io *io = &st.rx
    cdef unsigned int i, count
    cdef int r, e, a, rc
    cdef ssize_t w
    cdef uint64_t syscalls = 1, packets = 0, nbytes = 0
    for i in range(st.batch):
        io.msgs[i].msg_hdr.msg_namelen = sizeof(io.addrs[0])
        io.msgs[i].msg_hdr.msg_flags = 0
    got[0] = 0
    r = recvmmsg(st.udp_fd, io.msgs, st.batch, MSG_DONTWAIT, NULL)
    if r <= 0:
        ff_add(&st.c[C_RX_SYSCALLS], 1)
        if r == 0:
            return 0
        e = errno
        if e == EAGAIN or e == EINTR:
            return 0
        if ff_fatal(e):
            stage[0] = S_UDP_RECV
            return -e
        ff_add(&st.c[C_RX_RECV_ERRORS], 1)  # e.g. a queued ICMP error (IP_RECVERR)
        return 0
    count = <unsigned int>r
    got[0] = count
    for i in range(count):
        io.lens[i] = io.msgs[i].msg_len
        if io.msgs[i].msg_hdr.msg_flags & MSG_TRUNC:
            io.lens[i] = IPV4_MAX + 1  # cannot happen with FF_SLOT buffers; counted as malformed if it does
        io.srcs[i] = ntohl(io.addrs[i].sin_addr.s_addr) if io.addrs[i].sin_family == AF_INET else 0
    ff_rx_decide(st, count)
    for i in range(count):
        if io.lens[i] == 0:
            continue
        while True:
            w = write(st.tun_fd, io.bufs + <size_t>i * FF_SLOT, io.lens[i])
            syscalls += 1
            if w >= 0:
                ff_rx_written(st, io.pids[i], 1, io.lens[i], &packets, &nbytes)
                break
            a = ff_io_error(st, st.tun_fd, C_RX_TUN_WRITE_WAITS, &syscalls, &rc)
            if a == FF_IO_RETRY:
                continue
            if a == FF_IO_STOP:
                ff_add(&st.c[C_RX_SYSCALLS], syscalls)
                stage[0] = S_TUN_WRITE
                return rc
            ff_add(&st.c[C_RX_DROP_TUN_WRITE], 1)
            break
    ff_rx_done(st, syscalls, packets, nbytes)
    return 0
