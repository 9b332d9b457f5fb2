# SPDX-License-Identifier: Apache-2.0
"""Allocation and release of the C state's buffers (PyMem_Raw*, before any loop runs / after all returned)."""


cdef int ff_io_alloc(ff_io *io, unsigned int batch, uint16_t port_be) noexcept nogil:
    cdef unsigned int i
    io.bufs_size = <size_t>batch * FF_SLOT
    io.bufs = ff_pages(io.bufs_size)
    io.lens = <uint32_t *>ff_calloc(batch if batch > FF_SEGS_MAX else FF_SEGS_MAX, sizeof(uint32_t))
    io.srcs = <uint32_t *>ff_calloc(batch, sizeof(uint32_t))
    io.pids = <uint32_t *>ff_calloc(batch, sizeof(uint32_t))
    io.msgs = <mmsghdr *>ff_calloc(batch, sizeof(mmsghdr))
    io.iov = <iovec *>ff_calloc(batch, sizeof(iovec))
    io.addrs = <sockaddr_in *>ff_calloc(batch, sizeof(sockaddr_in))
    io.icmp = <uint8_t *>ff_malloc(<size_t>batch * FF_ICMP_MAX)
    io.icmp_lens = <uint32_t *>ff_calloc(batch, sizeof(uint32_t))
    if (io.bufs == NULL or io.lens == NULL or io.srcs == NULL or io.pids == NULL or io.msgs == NULL or io.iov == NULL
            or io.addrs == NULL or io.icmp == NULL or io.icmp_lens == NULL):
        return -ENOMEM
    if ff_offload_alloc(io, batch, port_be) < 0:
        return -ENOMEM
    for i in range(batch):
        io.iov[i].iov_base = io.bufs + <size_t>i * FF_SLOT
        io.iov[i].iov_len = FF_SLOT
        io.addrs[i].sin_family = AF_INET
        io.addrs[i].sin_port = port_be
        io.msgs[i].msg_hdr.msg_name = &io.addrs[i]
        io.msgs[i].msg_hdr.msg_namelen = sizeof(sockaddr_in)
        io.msgs[i].msg_hdr.msg_iov = &io.iov[i]
        io.msgs[i].msg_hdr.msg_iovlen = 1
    return 0


cdef int ff_offload_alloc(ff_io *io, unsigned int batch, uint16_t port_be) noexcept nogil:
    """The offload-mode buffers (allocated in every mode; ``ff_prefault`` touches only those the mode uses)."""
    cdef int i
    io.rbuf = ff_pages(FF_RBUF)
    io.arena = ff_pages(FF_ARENA)
    io.gmsgs = <mmsghdr *>ff_calloc(FF_TXMSG_MAX, sizeof(mmsghdr))
    io.giov = <iovec *>ff_calloc(FF_TXMSG_MAX, sizeof(iovec))
    io.gaddrs = <sockaddr_in *>ff_calloc(FF_TXMSG_MAX, sizeof(sockaddr_in))
    io.gcmsg = <uint8_t *>ff_calloc(FF_TXMSG_MAX, FF_CMSG)
    io.gsegs = <uint32_t *>ff_calloc(FF_TXMSG_MAX, sizeof(uint32_t))
    io.gseglen = <uint32_t *>ff_calloc(FF_TXMSG_MAX, sizeof(uint32_t))
    io.gpids = <uint32_t *>ff_calloc(FF_TXMSG_MAX, sizeof(uint32_t))
    io.rcmsg = <uint8_t *>ff_calloc(batch, FF_CMSG)
    io.wslots = ff_pages(<size_t>FF_WSLOTS * FF_WSLOT)
    io.items = <ff_item *>ff_calloc(FF_WSLOTS, sizeof(ff_item))
    if (io.rbuf == NULL or io.arena == NULL or io.gmsgs == NULL or io.giov == NULL or io.gaddrs == NULL
            or io.gcmsg == NULL or io.gsegs == NULL or io.gseglen == NULL or io.gpids == NULL or io.rcmsg == NULL
            or io.wslots == NULL
            or io.items == NULL):
        return -ENOMEM
    for i in range(FF_TXMSG_MAX):
        io.gaddrs[i].sin_family = AF_INET
        io.gaddrs[i].sin_port = port_be
        io.gmsgs[i].msg_hdr.msg_name = &io.gaddrs[i]
        io.gmsgs[i].msg_hdr.msg_namelen = sizeof(sockaddr_in)
        io.gmsgs[i].msg_hdr.msg_iov = &io.giov[i]
        io.gmsgs[i].msg_hdr.msg_iovlen = 1
    return 0


cdef void ff_prefault(ff_state *st) noexcept nogil:
    """Touch every page of the packet buffers this configuration's loops use, once, before any loop runs.

    Untouched pages cost nothing until the first packet lands in them, so without this the resident size grows
    with the heaviest burst seen so far: each deeper one (a longer recvmmsg batch, a bigger GRO datagram, one more
    pending TUN write) faults in pages no earlier burst reached (2 hosts, four rounds of iperf3: 46 -> 54 MiB).
    Paying the whole footprint at start makes the daemon's memory what it will be under any load (about 9 MiB at
    batch 64), visible at once to the operator sizing a memory limit, and flat afterwards. The
    buffers a mode never reads or writes (the per-packet slots in TUN offload mode's tx, the offload arenas in
    per-packet mode) stay untouched.
    """
    if st.vnet:
        memset(st.tx.rbuf, 0, FF_RBUF)  # one TUN read of a super-packet
        memset(st.tx.arena, 0, FF_ARENA)  # its segments
        memset(st.rx.wslots, 0, <size_t>FF_WSLOTS * FF_WSLOT)  # pending (coalesced) TUN writes
    else:
        memset(st.tx.bufs, 0, st.tx.bufs_size)  # TUN reads, one packet per slot
    memset(st.rx.bufs, 0, st.rx.bufs_size)  # recvmmsg slots (GRO datagrams up to 64 KiB, or garbage ones of any size)


cdef void ff_io_free(ff_io *io) noexcept nogil:
    ff_pages_free(io.rbuf, FF_RBUF)
    ff_pages_free(io.arena, FF_ARENA)
    ff_free(io.gmsgs)
    ff_free(io.giov)
    ff_free(io.gaddrs)
    ff_free(io.gcmsg)
    ff_free(io.gsegs)
    ff_free(io.gseglen)
    ff_free(io.gpids)
    ff_free(io.rcmsg)
    ff_pages_free(io.wslots, <size_t>FF_WSLOTS * FF_WSLOT)
    ff_free(io.items)
    ff_pages_free(io.bufs, io.bufs_size)
    ff_free(io.lens)
    ff_free(io.srcs)
    ff_free(io.pids)
    ff_free(io.msgs)
    ff_free(io.iov)
    ff_free(io.addrs)
    ff_free(io.icmp)
    ff_free(io.icmp_lens)
    memset(io, 0, sizeof(ff_io))


cdef void ff_state_free(ff_state *st) noexcept nogil:
    cdef uint32_t i
    if st == NULL:
        return
    ff_io_free(&st.tx)
    ff_io_free(&st.rx)
    ff_free(st.table)
    ff_free(st.table_pid)
    ff_free(st.peers.keys)
    ff_free(st.peers.pids)
    for i in range(st.peer_chunks):
        if st.ptx != NULL:
            ff_free(st.ptx[i])
        if st.prx != NULL:
            ff_free(st.prx[i])
    ff_free(st.ptx)
    ff_free(st.prx)
    if st.stop_fd >= 0:
        close(st.stop_fd)
    ff_free(st)
