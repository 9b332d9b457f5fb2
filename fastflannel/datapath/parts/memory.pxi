# SPDX-License-Identifier: Apache-2.0
"""Allocation and release of the C state's buffers (PyMem_Raw*, before any loop runs / after all returned)."""


cdef int ff_io_alloc(ff_io *io, unsigned int batch, uint16_t port_be) noexcept nogil:
    cdef unsigned int i
    io.bufs = <uint8_t *>PyMem_RawMalloc(<size_t>batch * FF_SLOT)
    io.lens = <uint32_t *>PyMem_RawCalloc(batch if batch > FF_SEGS_MAX else FF_SEGS_MAX, sizeof(uint32_t))
    io.srcs = <uint32_t *>PyMem_RawCalloc(batch, sizeof(uint32_t))
    io.pids = <uint32_t *>PyMem_RawCalloc(batch, sizeof(uint32_t))
    io.msgs = <mmsghdr *>PyMem_RawCalloc(batch, sizeof(mmsghdr))
    io.iov = <iovec *>PyMem_RawCalloc(batch, sizeof(iovec))
    io.addrs = <sockaddr_in *>PyMem_RawCalloc(batch, sizeof(sockaddr_in))
    io.icmp = <uint8_t *>PyMem_RawMalloc(<size_t>batch * FF_ICMP_MAX)
    io.icmp_lens = <uint32_t *>PyMem_RawCalloc(batch, sizeof(uint32_t))
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
    """The offload-mode buffers (large ones are malloc'd lazily by the kernel: untouched pages cost nothing)."""
    cdef int i
    io.rbuf = <uint8_t *>PyMem_RawMalloc(FF_RBUF)
    io.arena = <uint8_t *>PyMem_RawMalloc(FF_ARENA)
    io.gmsgs = <mmsghdr *>PyMem_RawCalloc(FF_TXMSG_MAX, sizeof(mmsghdr))
    io.giov = <iovec *>PyMem_RawCalloc(FF_TXMSG_MAX, sizeof(iovec))
    io.gaddrs = <sockaddr_in *>PyMem_RawCalloc(FF_TXMSG_MAX, sizeof(sockaddr_in))
    io.gcmsg = <uint8_t *>PyMem_RawCalloc(FF_TXMSG_MAX, FF_CMSG)
    io.gsegs = <uint32_t *>PyMem_RawCalloc(FF_TXMSG_MAX, sizeof(uint32_t))
    io.gseglen = <uint32_t *>PyMem_RawCalloc(FF_TXMSG_MAX, sizeof(uint32_t))
    io.gpids = <uint32_t *>PyMem_RawCalloc(FF_TXMSG_MAX, sizeof(uint32_t))
    io.rcmsg = <uint8_t *>PyMem_RawCalloc(batch, FF_CMSG)
    io.wslots = <uint8_t *>PyMem_RawMalloc(<size_t>FF_WSLOTS * FF_WSLOT)
    io.items = <ff_item *>PyMem_RawCalloc(FF_WSLOTS, sizeof(ff_item))
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


cdef void ff_io_free(ff_io *io) noexcept nogil:
    PyMem_RawFree(io.rbuf)
    PyMem_RawFree(io.arena)
    PyMem_RawFree(io.gmsgs)
    PyMem_RawFree(io.giov)
    PyMem_RawFree(io.gaddrs)
    PyMem_RawFree(io.gcmsg)
    PyMem_RawFree(io.gsegs)
    PyMem_RawFree(io.gseglen)
    PyMem_RawFree(io.gpids)
    PyMem_RawFree(io.rcmsg)
    PyMem_RawFree(io.wslots)
    PyMem_RawFree(io.items)
    PyMem_RawFree(io.bufs)
    PyMem_RawFree(io.lens)
    PyMem_RawFree(io.srcs)
    PyMem_RawFree(io.pids)
    PyMem_RawFree(io.msgs)
    PyMem_RawFree(io.iov)
    PyMem_RawFree(io.addrs)
    PyMem_RawFree(io.icmp)
    PyMem_RawFree(io.icmp_lens)
    memset(io, 0, sizeof(ff_io))


cdef void ff_state_free(ff_state *st) noexcept nogil:
    cdef uint32_t i
    if st == NULL:
        return
    ff_io_free(&st.tx)
    ff_io_free(&st.rx)
    PyMem_RawFree(st.table)
    PyMem_RawFree(st.table_pid)
    PyMem_RawFree(st.peers.keys)
    PyMem_RawFree(st.peers.pids)
    for i in range(st.peer_chunks):
        if st.ptx != NULL:
            PyMem_RawFree(st.ptx[i])
        if st.prx != NULL:
            PyMem_RawFree(st.prx[i])
    PyMem_RawFree(st.ptx)
    PyMem_RawFree(st.prx)
    if st.stop_fd >= 0:
        close(st.stop_fd)
    PyMem_RawFree(st)
