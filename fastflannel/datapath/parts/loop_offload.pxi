# SPDX-License-Identifier: Apache-2.0
"""The offload loop (st.vnet / st.gro): TUN reads of TSO super-packets split and sent as UDP_SEGMENT runs, UDP_GRO
receives split and coalesced into GSO TUN writes. The per-packet bursts (loop.pxi) stay as they were."""


cdef int ff_send_slow(ff_state *st, unsigned int m, uint64_t *syscalls, uint64_t *packets,
                      uint64_t *nbytes) noexcept nogil:
    """Send GSO message m one datagram at a time (GSO refused); 0, 1 (stop) or -errno."""
    cdef ff_io *io = &st.tx
    cdef uint8_t *base = <uint8_t *>io.giov[m].iov_base
    cdef size_t left = io.giov[m].iov_len, seg = io.gseglen[m], l
    cdef ssize_t w
    cdef int a, rc
    while left > 0:
        l = left if left < seg else seg
        w = sendto(st.udp_fd, base, l, MSG_DONTWAIT, &io.gaddrs[m], sizeof(sockaddr_in))
        syscalls[0] += 1
        if w < 0:
            a = ff_io_error(st, st.udp_fd, C_TX_SEND_WAITS, syscalls, &rc)
            if a == FF_IO_RETRY:
                continue
            if a == FF_IO_STOP:
                return rc
            ff_tx_drop_send(st, io.gpids[m], 1)
        else:
            ff_tx_sent(st, io.gpids[m], 1, l, packets, nbytes)
        base += l
        left -= l
    return 0


cdef int ff_tx_flush(ff_state *st, int *stage, uint64_t *syscalls) noexcept nogil:
    """sendmmsg the queued messages (UDP_SEGMENT cmsg on multi-segment ones); 0, 1 (stop) or -errno."""
    cdef ff_io *io = &st.tx
    cdef unsigned int m, sent = 0, k
    cdef int r, a, rc
    cdef cmsghdr *cm
    cdef uint16_t segsz
    cdef uint64_t packets = 0, nbytes = 0, gsends = 0
    for m in range(io.ngmsg):
        if io.gsegs[m] > 1 and st.gso:
            io.gmsgs[m].msg_hdr.msg_control = io.gcmsg + <size_t>m * FF_CMSG
            io.gmsgs[m].msg_hdr.msg_controllen = CMSG_SPACE(sizeof(uint16_t))
            cm = CMSG_FIRSTHDR(&io.gmsgs[m].msg_hdr)
            cm.cmsg_level = FF_SOL_UDP
            cm.cmsg_type = FF_UDP_SEGMENT
            cm.cmsg_len = CMSG_LEN(sizeof(uint16_t))
            segsz = <uint16_t>io.gseglen[m]
            memcpy(CMSG_DATA(cm), &segsz, sizeof(uint16_t))
        else:
            io.gmsgs[m].msg_hdr.msg_control = NULL
            io.gmsgs[m].msg_hdr.msg_controllen = 0
    r = 0
    while sent < io.ngmsg:
        if io.gsegs[sent] > 1 and not st.gso:
            r = ff_send_slow(st, sent, syscalls, &packets, &nbytes)
            if r != 0:
                break
            sent += 1
            continue
        r = sendmmsg(st.udp_fd, io.gmsgs + sent, io.ngmsg - sent, MSG_DONTWAIT)
        syscalls[0] += 1
        if r < 0:
            r = 0
            a = ff_io_error(st, st.udp_fd, C_TX_SEND_WAITS, syscalls, &rc)
            if a == FF_IO_RETRY:
                continue
            if a == FF_IO_STOP:
                r = rc
                break
            if rc == -EIO and io.gsegs[sent] > 1 and st.gso:  # no TX checksum offload under us: GSO off, resend
                st.gso = 0
                ff_add(&st.c[C_TX_GSO_ERRORS], 1)
                continue
            ff_tx_drop_send(st, io.gpids[sent], io.gsegs[sent])
            sent += 1
            continue
        for k in range(sent, sent + <unsigned int>r):
            ff_tx_sent(st, io.gpids[k], io.gsegs[k], io.giov[k].iov_len, &packets, &nbytes)
            if io.gsegs[k] > 1 and st.gso:
                gsends += 1
        sent += <unsigned int>r
        r = 0
    ff_tx_done(st, 0, packets, nbytes)  # the caller adds the syscalls
    ff_add(&st.c[C_TX_GSO_SENDS], gsends)
    io.ngmsg = 0
    io.arena_used = 0
    if r < 0:
        stage[0] = S_UDP_SEND
    return r


cdef int ff_tx_burst_vnet(ff_state *st, int *stage, unsigned int *got) noexcept nogil:
    """Offload mode: read up to FF_TX_READS virtio packets, split TSO ones, apply the rules per segment, send runs
    of equal segments to one peer as one UDP_SEGMENT message; 0, 1 (stop seen) or -errno. got: TUN reads."""
    cdef ff_io *io = &st.tx
    cdef unsigned int reads = 0, i, m
    cdef int nseg, tso, r, e
    cdef ssize_t n
    cdef uint8_t *p
    cdef uint8_t zero[FF_VNET]
    cdef iovec wv[2]
    cdef uint32_t nh = 0, pid = 0, l
    cdef size_t ilen = 0
    cdef ff_verdict v
    cdef uint64_t syscalls = 0, pkts = 0
    cdef bint opn = False
    memset(zero, 0, FF_VNET)
    got[0] = 0
    io.ngmsg = 0
    io.arena_used = 0
    while reads < FF_TX_READS:
        if FF_ARENA - io.arena_used < FF_SEG_ROOM or FF_TXMSG_MAX - io.ngmsg < FF_SEGS_MAX:
            r = ff_tx_flush(st, stage, &syscalls)
            opn = False
            if r != 0:
                ff_add(&st.c[C_TX_SYSCALLS], syscalls)
                return r
        n = read(st.tun_fd, io.rbuf, FF_RBUF)
        syscalls += 1
        if n < 0:
            e = errno
            if e == EINTR:
                continue
            if e == EAGAIN:
                break
            if ff_fatal(e):
                ff_add(&st.c[C_TX_SYSCALLS], syscalls)
                stage[0] = S_TUN_READ
                return -e
            ff_add(&st.c[C_TX_READ_ERRORS], 1)
            break
        reads += 1
        nseg = ff_gso_split(io.rbuf, <size_t>n, io.arena + io.arena_used, FF_ARENA - io.arena_used, io.lens,
                            FF_SEGS_MAX, &tso)
        if nseg < 0:
            ff_add(&st.c[C_TX_DROP_MALFORMED], 1)
            pkts += 1
            continue
        pkts += <uint64_t>nseg
        if tso:
            ff_add(&st.c[C_TX_TSO_READS], 1)
            ff_add(&st.c[C_TX_TSO_SEGMENTS], <uint64_t>nseg)
        p = io.arena + io.arena_used
        for i in range(<unsigned int>nseg):
            l = io.lens[i]
            v = ff_out_one(st, p, l, &nh, &pid, io.icmp, &ilen)
            if v == V_SEND:
                m = io.ngmsg - 1
                if (opn and st.gso and io.gaddrs[m].sin_addr.s_addr == htonl(nh) and io.gpids[m] == pid
                        and l <= io.gseglen[m]
                        and io.gsegs[m] < FF_GSO_SEGS and io.giov[m].iov_len + l <= FF_GSO_BYTES
                        and <uint8_t *>io.giov[m].iov_base + io.giov[m].iov_len == p):
                    io.giov[m].iov_len += l
                    io.gsegs[m] += 1
                    if l < io.gseglen[m]:
                        opn = False  # a short segment ends the message
                else:
                    m = io.ngmsg
                    io.ngmsg += 1
                    io.giov[m].iov_base = p
                    io.giov[m].iov_len = l
                    io.gaddrs[m].sin_addr.s_addr = htonl(nh)
                    io.gpids[m] = pid
                    io.gsegs[m] = 1
                    io.gseglen[m] = l
                    opn = True
            elif v == V_ICMP:
                wv[0].iov_base = zero
                wv[0].iov_len = FF_VNET
                wv[1].iov_base = io.icmp
                wv[1].iov_len = ilen
                syscalls += 1
                if writev(st.tun_fd, wv, 2) < 0:
                    ff_add(&st.c[C_TX_DROP_ICMP_WRITE], 1)
            p += l
        io.arena_used += <size_t>(p - (io.arena + io.arena_used))
        ff_check(io.arena_used <= FF_ARENA and io.ngmsg <= FF_TXMSG_MAX)
    got[0] = reads
    if reads:
        ff_tx_batch(st, pkts)
    r = 0
    if io.ngmsg:
        r = ff_tx_flush(st, stage, &syscalls)
    ff_add(&st.c[C_TX_SYSCALLS], syscalls)
    return r


cdef int ff_tun_write1(ff_state *st, const uint8_t *buf, size_t n, int *stage, uint64_t *syscalls) noexcept nogil:
    """Write one buffer to the TUN, waiting while it is full; 0 written, 2 dropped, 1 stop, -errno fatal."""
    cdef ssize_t w
    cdef int a, rc
    while True:
        w = write(st.tun_fd, buf, n)
        syscalls[0] += 1
        if w >= 0:
            return 0
        a = ff_io_error(st, st.tun_fd, C_RX_TUN_WRITE_WAITS, syscalls, &rc)
        if a == FF_IO_RETRY:
            continue
        if a == FF_IO_STOP:
            stage[0] = S_TUN_WRITE
            return rc
        return 2


cdef int ff_rx_flush(ff_state *st, int *stage, uint64_t *syscalls) noexcept nogil:
    """Write every pending slot (one virtio packet each); 0, 1 (stop) or -errno."""
    cdef ff_io *io = &st.rx
    cdef unsigned int k
    cdef size_t n
    cdef int r = 0
    cdef ff_item *it
    cdef uint64_t packets = 0, nbytes = 0, cw = 0, cp = 0
    for k in range(io.nout):
        it = &io.items[k]
        n = ff_gro_finish(io, k)
        r = ff_tun_write1(st, io.wslots + <size_t>k * FF_WSLOT, n, stage, syscalls)
        if r == 2:
            ff_add(&st.c[C_RX_DROP_TUN_WRITE], it.count)
            r = 0
            continue
        if r != 0:
            break
        ff_rx_written(st, it.pid, it.count, it.in_bytes, &packets, &nbytes)
        if it.count > 1:
            cw += 1
            cp += it.count
    io.nout = 0
    ff_rx_done(st, 0, packets, nbytes)  # the caller adds the syscalls
    ff_add(&st.c[C_RX_COALESCED_WRITES], cw)
    ff_add(&st.c[C_RX_COALESCED_PACKETS], cp)
    return r


cdef int ff_rx_burst_gro(ff_state *st, int *stage, unsigned int *got) noexcept nogil:
    """Offload mode: recvmmsg (UDP_GRO buffers when st.gro), split per segment size, apply the rules to every
    inner packet, then coalesce (st.vnet) or write each; 0, 1 (stop seen) or -errno."""
    cdef ff_io *io = &st.rx
    cdef unsigned int i, count
    cdef int r, e, gso
    cdef size_t total, seg, off, il
    cdef uint8_t *base
    cdef uint32_t src, pid = 0
    cdef cmsghdr *cm
    cdef uint64_t syscalls = 1, packets = 0, nbytes = 0, dgrams = 0
    got[0] = 0
    for i in range(st.batch):
        io.msgs[i].msg_hdr.msg_namelen = sizeof(io.addrs[0])
        io.msgs[i].msg_hdr.msg_flags = 0
        if st.gro:
            io.msgs[i].msg_hdr.msg_control = io.rcmsg + <size_t>i * FF_CMSG
            io.msgs[i].msg_hdr.msg_controllen = FF_CMSG
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
        ff_add(&st.c[C_RX_RECV_ERRORS], 1)
        return 0
    count = <unsigned int>r
    got[0] = count
    ff_add(&st.c[C_RX_BATCHES], 1)
    io.nout = 0
    r = 0
    for i in range(count):
        total = io.msgs[i].msg_len
        base = io.bufs + <size_t>i * FF_SLOT
        src = ntohl(io.addrs[i].sin_addr.s_addr) if io.addrs[i].sin_family == AF_INET else 0
        seg = total
        if st.gro:
            cm = CMSG_FIRSTHDR(&io.msgs[i].msg_hdr)
            while cm != NULL:
                if cm.cmsg_level == FF_SOL_UDP and cm.cmsg_type == FF_UDP_GRO:
                    memcpy(&gso, CMSG_DATA(cm), sizeof(int))
                    if gso > 0:
                        seg = <size_t>gso
                cm = CMSG_NXTHDR(&io.msgs[i].msg_hdr, cm)
        if io.msgs[i].msg_hdr.msg_flags & MSG_TRUNC:
            seg = total = IPV4_MAX + 1  # cannot happen with FF_SLOT buffers; counted as malformed if it does
        if seg == 0:
            seg = 1
        off = 0
        while True:
            il = total - off if total - off < seg else seg
            dgrams += 1
            if ff_in_one(st, src, base + off, il, &pid) == V_WRITE:
                if st.vnet:
                    if ff_gro_add(io, base + off, il, pid):
                        r = ff_rx_flush(st, stage, &syscalls)
                        if r != 0:
                            break
                        ff_gro_add(io, base + off, il, pid)
                else:
                    r = ff_tun_write1(st, base + off, il, stage, &syscalls)
                    if r == 2:
                        ff_add(&st.c[C_RX_DROP_TUN_WRITE], 1)
                        r = 0
                    elif r != 0:
                        break
                    else:
                        ff_rx_written(st, pid, 1, il, &packets, &nbytes)
            off += il
            if off >= total or total > IPV4_MAX:
                break
        if r != 0:
            break
    if r == 0 and st.vnet and io.nout:
        r = ff_rx_flush(st, stage, &syscalls)
    ff_count_batch(st, C_RX_BATCH_PACKETS, dgrams)
    if st.gro:
        ff_add(&st.c[C_RX_GRO_RECEIVES], count)
        ff_add(&st.c[C_RX_GRO_DATAGRAMS], dgrams)
    ff_rx_done(st, syscalls, packets, nbytes)
    return r
