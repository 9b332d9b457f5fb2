# SPDX-License-Identifier: Apache-2.0
# cython: language_level=3, embedsignature=True
"""Forward udp-backend packets between a TUN fd and a UDP socket in nogil loops (the fast path).

Design notes (docs/fastpath.md has the measurements):
- One ``Proxy`` owns the C state (``ff_state``): config, counters, the flat route table indexed by
  ``(dst - network) >> (32 - subnet_len)``, the peer set and one batch of buffers per direction, all allocated
  with PyMem_Raw* before any loop runs and freed by close()/__dealloc__ after the loops returned.
- ``run(role)`` holds the only ``with nogil:``. The loop helpers below are ``noexcept nogil``, return 0 or
  -errno and touch no Python object; run() turns a negative result into a typed FastPathError.
- A loop serves tx (TUN -> UDP), rx (UDP -> TUN) or both; it polls {stop eventfd, its ctl socket, its data fd}.
  Each wake-up handles at most one batch per data fd, so stop and ctl are serviced at least once per batch.
- Routes and peers change only through fixed ``ff_command`` structs on a SOCK_SEQPACKET socketpair per loop,
  applied by the loop between batches (flannel's design): the table has one writer, the hot path no lock.
  apply() waits for the loop to echo a SYNC, so a route is in effect when set_route() returns.
- Batch shape (wireguard-go): read phase fills slots, a pure process phase decides per slot, a send phase
  does sendmmsg / TUN writes. TUN/UDP offloads later replace the read and send phases only.
"""
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_RawCalloc, PyMem_RawFree, PyMem_RawMalloc
# EWOULDBLOCK == EAGAIN on Linux (asm-generic/errno.h): testing EAGAIN covers both.
from libc.errno cimport (
    EAGAIN,
    EBADF,
    EBADFD,
    EFAULT,
    EINTR,
    EINVAL,
    EISDIR,
    ENODEV,
    ENOMEM,
    ENOTSOCK,
    EPIPE,
    ETIMEDOUT,
    errno,
)
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset
from posix.unistd cimport close, read, write

from fastflannel.includes.fastpath cimport ff_add, ff_add_shared, ff_load
from fastflannel.includes.system cimport (
    AF_INET,
    EFD_CLOEXEC,
    EFD_NONBLOCK,
    MSG_DONTWAIT,
    MSG_TRUNC,
    POLLERR,
    POLLHUP,
    POLLIN,
    POLLNVAL,
    POLLOUT,
    eventfd,
    htonl,
    htons,
    ntohl,
    poll,
    pollfd,
    recv,
    recvmmsg,
    send,
    sendmmsg,
)

import socket as _socket
import time as _time

from fastflannel import _fastpath_py as _py
from fastflannel._fastpath_py import (
    COUNTER_NAMES,
    FastPathError,
    fastpath_error,
)

IMPLEMENTATION = "cython"

cdef enum:
    IPV4_HDR_MIN = 20  # bytes, IHL 5
    IPV4_MAX = 65535  # largest IPv4 total length
    IPV4_HDR_ICMP_LIMIT = 60  # flannel: no ICMP error about offenders whose header is >= 20 + MAX_IPOPTLEN
    IPPROTO_ICMP = 1
    ICMP_DEST_UNREACH = 3  # RFC 792
    ICMP_NET_UNREACH = 0
    ICMP_TTL = 8  # flannel send_net_unreachable
    FRAG_OFFSET_MASK = 0x1FFF
    CMD_SYNC = 99  # ctl only: echoed back by the loop once every earlier command is applied

SYNC_TIMEOUT_S = 5.0

cdef uint32_t CMD_SET_ROUTE = _py.CMD_SET_ROUTE
cdef uint32_t CMD_DEL_ROUTE = _py.CMD_DEL_ROUTE
cdef uint32_t CMD_PEER_ADD = _py.CMD_PEER_ADD
cdef uint32_t CMD_PEER_DEL = _py.CMD_PEER_DEL
cdef int ROLE_BOTH = _py.ROLE_BOTH
cdef int ROLE_TX = _py.ROLE_TX
cdef int ROLE_RX = _py.ROLE_RX

_VERDICTS = {
    V_SEND: _py.SEND, V_ICMP: _py.ICMP, V_WRITE: _py.WRITE, V_DROP_MALFORMED: _py.DROP_MALFORMED,
    V_DROP_NO_ROUTE: _py.DROP_NO_ROUTE, V_DROP_TTL: _py.DROP_TTL, V_DROP_UNKNOWN_PEER: _py.DROP_UNKNOWN_PEER,
    V_DROP_FOREIGN_DEST: _py.DROP_FOREIGN_DEST,
}

_C_SLOTS = {
    "tx_packets": C_TX_PACKETS, "tx_bytes": C_TX_BYTES, "tx_syscalls": C_TX_SYSCALLS, "tx_batches": C_TX_BATCHES,
    "tx_drop_malformed": C_TX_DROP_MALFORMED, "tx_drop_no_route": C_TX_DROP_NO_ROUTE,
    "tx_drop_ttl": C_TX_DROP_TTL, "tx_drop_send": C_TX_DROP_SEND, "tx_icmp_unreach": C_TX_ICMP_UNREACH,
    "tx_drop_icmp_write": C_TX_DROP_ICMP_WRITE, "tx_send_waits": C_TX_SEND_WAITS,
    "tx_read_errors": C_TX_READ_ERRORS, "rx_packets": C_RX_PACKETS, "rx_bytes": C_RX_BYTES,
    "rx_syscalls": C_RX_SYSCALLS, "rx_batches": C_RX_BATCHES, "rx_drop_unknown_peer": C_RX_DROP_UNKNOWN_PEER,
    "rx_drop_foreign_dest": C_RX_DROP_FOREIGN_DEST, "rx_drop_malformed": C_RX_DROP_MALFORMED,
    "rx_drop_ttl": C_RX_DROP_TTL, "rx_drop_tun_write": C_RX_DROP_TUN_WRITE,
    "rx_tun_write_waits": C_RX_TUN_WRITE_WAITS, "rx_recv_errors": C_RX_RECV_ERRORS, "polls": C_POLLS,
    "ctl_commands": C_CTL_COMMANDS,
}
if tuple(_C_SLOTS) != COUNTER_NAMES or list(_C_SLOTS.values()) != list(range(FF_NCOUNTERS)):
    raise ImportError("fastflannel._fastpath counter layout differs from _fastpath_py.COUNTER_NAMES; rebuild")


# ---------------------------------------------------------------------------------------------------------
# packet helpers (byte offsets, explicit big-endian; no pointer casts onto packet memory)

cdef inline uint32_t ld32(const uint8_t *p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | <uint32_t>p[3]


cdef inline void st32(uint8_t *p, uint32_t v) noexcept nogil:
    p[0] = <uint8_t>(v >> 24)
    p[1] = <uint8_t>(v >> 16)
    p[2] = <uint8_t>(v >> 8)
    p[3] = <uint8_t>v


cdef inline uint32_t ip_mask(int plen) noexcept nogil:
    if plen <= 0:
        return 0
    return <uint32_t>(0xFFFFFFFFu << (32 - plen))


cdef uint16_t ff_cksum(const uint8_t *p, size_t n) noexcept nogil:
    """Return the Internet checksum (RFC 1071) of p[0:n]; only used for the small ICMP packet."""
    cdef uint64_t s = 0
    cdef size_t i = 0
    while i + 1 < n:
        s += (<uint32_t>p[i] << 8) | p[i + 1]
        i += 2
    if n & 1:
        s += <uint32_t>p[n - 1] << 8
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return <uint16_t>(~s & 0xFFFF)


cdef inline bint ff_malformed(const uint8_t *p, size_t n) noexcept nogil:
    """Tell whether p[0:n] is not one complete IPv4 packet; reads nothing before checking n."""
    cdef size_t ihl
    if n < IPV4_HDR_MIN or n > IPV4_MAX or (p[0] >> 4) != 4:
        return True
    ihl = (p[0] & 0x0F) * 4
    if ihl < IPV4_HDR_MIN or ihl > n:
        return True
    return ((<size_t>p[2] << 8) | p[3]) != n


cdef inline void ff_ttl_dec(uint8_t *p) noexcept nogil:
    """Decrement TTL and patch the header checksum: RFC 1624 eqn. 3, HC' = ~(~HC + ~m + m')."""
    cdef uint32_t old = (<uint32_t>p[8] << 8) | p[9]
    cdef uint32_t new = old - 0x100
    cdef uint32_t hc = (<uint32_t>p[10] << 8) | p[11]
    cdef uint32_t s = (~hc & 0xFFFF) + (~old & 0xFFFF) + new
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    hc = ~s & 0xFFFF
    p[8] -= 1
    p[10] = <uint8_t>(hc >> 8)
    p[11] = <uint8_t>hc


cdef size_t ff_icmp_unreach(const ff_state *st, const uint8_t *off, size_t n, uint8_t *out) noexcept nogil:
    """Build flannel's ICMP net-unreachable about ``off`` into ``out``; return its length, 0 if none is due."""
    cdef size_t ihl = (off[0] & 0x0F) * 4
    cdef size_t quote = ihl + 8, have, total
    cdef uint16_t ck
    if off[9] == IPPROTO_ICMP:  # RFC 792: no ICMP about ICMP
        return 0
    if (((<uint32_t>off[6] << 8) | off[7]) & FRAG_OFFSET_MASK) != 0:  # only about first fragments
        return 0
    if ihl >= IPV4_HDR_ICMP_LIMIT:
        return 0
    total = IPV4_HDR_MIN + 8 + quote
    memset(out, 0, total)
    have = n if n < quote else quote
    memcpy(out + IPV4_HDR_MIN + 8, off, have)  # offender header + 8 bytes, zero-padded
    out[IPV4_HDR_MIN] = ICMP_DEST_UNREACH
    out[IPV4_HDR_MIN + 1] = ICMP_NET_UNREACH
    ck = ff_cksum(out + IPV4_HDR_MIN, 8 + quote)
    out[IPV4_HDR_MIN + 2] = <uint8_t>(ck >> 8)
    out[IPV4_HDR_MIN + 3] = <uint8_t>ck
    out[0] = 0x45
    out[2] = <uint8_t>(total >> 8)
    out[3] = <uint8_t>total
    out[8] = ICMP_TTL
    out[9] = IPPROTO_ICMP
    st32(out + 12, st.tun_ip)
    memcpy(out + 16, off + 12, 4)
    ck = ff_cksum(out, IPV4_HDR_MIN)
    out[10] = <uint8_t>(ck >> 8)
    out[11] = <uint8_t>ck
    return total


cdef ff_verdict ff_out_one(ff_state *st, uint8_t *p, size_t n, uint32_t *nh, uint8_t *icmp,
                           size_t *icmp_len) noexcept nogil:
    """Apply the TUN -> UDP rules to p[0:n] in place; count drops (not sends)."""
    cdef uint32_t dst, hop = 0
    if ff_malformed(p, n):
        ff_add(&st.c[C_TX_DROP_MALFORMED], 1)
        return V_DROP_MALFORMED
    dst = ld32(p + 16)
    if (dst & st.net_mask) == st.net:
        hop = st.table[(dst - st.net) >> st.shift]
    if hop == 0:
        ff_add(&st.c[C_TX_DROP_NO_ROUTE], 1)
        icmp_len[0] = ff_icmp_unreach(st, p, n, icmp)
        if icmp_len[0]:
            ff_add(&st.c[C_TX_ICMP_UNREACH], 1)
            return V_ICMP
        return V_DROP_NO_ROUTE
    if p[8] <= 1:
        ff_add(&st.c[C_TX_DROP_TTL], 1)
        return V_DROP_TTL
    ff_ttl_dec(p)
    nh[0] = hop
    return V_SEND


cdef inline uint32_t ff_hash(uint32_t k, uint32_t cap) noexcept nogil:
    cdef uint32_t h = k * 0x9E3779B1u  # Fibonacci hashing
    return (h ^ (h >> 15)) & (cap - 1)


cdef inline bint ff_peer_has(const ff_peers *ps, uint32_t k) noexcept nogil:
    cdef uint32_t i = ff_hash(k, ps.cap)
    while ps.keys[i] != 0:
        if ps.keys[i] == k:
            return True
        i = (i + 1) & (ps.cap - 1)
    return False


cdef ff_verdict ff_in_one(ff_state *st, uint32_t src, uint8_t *p, size_t n) noexcept nogil:
    """Apply the UDP -> TUN rules to p[0:n] from ``src`` in place; count drops (not writes)."""
    if st.check_peer and not ff_peer_has(&st.peers, src):
        ff_add(&st.c[C_RX_DROP_UNKNOWN_PEER], 1)
        return V_DROP_UNKNOWN_PEER
    if ff_malformed(p, n):
        ff_add(&st.c[C_RX_DROP_MALFORMED], 1)
        return V_DROP_MALFORMED
    if st.check_dest and (ld32(p + 16) & st.own_mask) != st.own_net:
        ff_add(&st.c[C_RX_DROP_FOREIGN_DEST], 1)
        return V_DROP_FOREIGN_DEST
    if p[8] <= 1:
        ff_add(&st.c[C_RX_DROP_TTL], 1)
        return V_DROP_TTL
    ff_ttl_dec(p)
    return V_WRITE


# ---------------------------------------------------------------------------------------------------------
# peer set (owned by the rx loop, or by Python while no rx loop runs)

cdef int ff_peer_insert(ff_peers *ps, uint32_t k) noexcept nogil:
    cdef uint32_t i = ff_hash(k, ps.cap)
    while ps.keys[i] != 0:
        if ps.keys[i] == k:
            return 0
        i = (i + 1) & (ps.cap - 1)
    ps.keys[i] = k
    ps.count += 1
    return 0


cdef int ff_peer_add(ff_peers *ps, uint32_t k) noexcept nogil:
    cdef uint32_t *old
    cdef uint32_t old_cap, i
    if k == 0 or ff_peer_has(ps, k):
        return 0
    if (ps.count + 1) * 2 > ps.cap:  # keep the load <= 1/2: short probes
        old = ps.keys
        old_cap = ps.cap
        ps.keys = <uint32_t *>PyMem_RawCalloc(old_cap * 2, sizeof(uint32_t))
        if ps.keys == NULL:
            ps.keys = old
            return -ENOMEM
        ps.cap = old_cap * 2
        ps.count = 0
        for i in range(old_cap):
            if old[i] != 0:
                ff_peer_insert(ps, old[i])
        PyMem_RawFree(old)
    return ff_peer_insert(ps, k)


cdef void ff_peer_del(ff_peers *ps, uint32_t k) noexcept nogil:
    cdef uint32_t mask = ps.cap - 1
    cdef uint32_t i = ff_hash(k, ps.cap), j, home
    while ps.keys[i] != k:
        if ps.keys[i] == 0:
            return
        i = (i + 1) & mask
    ps.keys[i] = 0
    ps.count -= 1
    j = i
    while True:  # backward-shift deletion: no tombstones, probes stay short
        j = (j + 1) & mask
        if ps.keys[j] == 0:
            return
        home = ff_hash(ps.keys[j], ps.cap)
        if ((j - home) & mask) >= ((j - i) & mask):
            ps.keys[i] = ps.keys[j]
            ps.keys[j] = 0
            i = j


cdef int ff_apply(ff_state *st, uint32_t cmd, uint32_t arg, uint32_t value) noexcept nogil:
    """Apply one route/peer command; 0 or -errno."""
    if cmd == CMD_SET_ROUTE:
        if arg < st.table_size:
            st.table[arg] = value
    elif cmd == CMD_DEL_ROUTE:
        if arg < st.table_size:
            st.table[arg] = 0
    elif cmd == CMD_PEER_ADD:
        return ff_peer_add(&st.peers, value)
    elif cmd == CMD_PEER_DEL:
        ff_peer_del(&st.peers, value)
    return 0


# ---------------------------------------------------------------------------------------------------------
# the loop (no Python objects below this line until Proxy)

cdef inline bint ff_fatal(int e) noexcept nogil:
    """Tell whether errno ``e`` means the fd is gone or wrong (same set as _fastpath_py.FATAL_ERRNOS)."""
    return (e == EBADF or e == EBADFD or e == ENOTSOCK or e == EFAULT or e == EINVAL or e == ENOMEM
            or e == EPIPE or e == ENODEV or e == EISDIR)


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


cdef unsigned int ff_tx_process(ff_state *st, unsigned int count, unsigned int *nicmp) noexcept nogil:
    """Decide every read slot: fill msgs[0:nsend] for sendmmsg, icmp[0:nicmp] for the TUN; return nsend."""
    cdef ff_io *io = &st.tx
    cdef unsigned int i, nsend = 0, ni = 0
    cdef ff_verdict v
    cdef uint32_t nh = 0
    cdef size_t ilen = 0
    cdef uint8_t *p
    for i in range(count):
        p = io.bufs + <size_t>i * FF_SLOT
        v = ff_out_one(st, p, io.lens[i], &nh, io.icmp + <size_t>ni * FF_ICMP_MAX, &ilen)
        if v == V_SEND:
            io.iov[nsend].iov_base = p
            io.iov[nsend].iov_len = io.lens[i]
            io.addrs[nsend].sin_addr.s_addr = htonl(nh)
            nsend += 1
        elif v == V_ICMP:
            io.icmp_lens[ni] = <uint32_t>ilen
            ni += 1
    nicmp[0] = ni
    return nsend


cdef int ff_tx_burst(ff_state *st, int *stage, unsigned int *got) noexcept nogil:
    """Drain up to one batch from the TUN, process it, send it; 0, 1 (stop seen) or -errno. got: packets read."""
    cdef ff_io *io = &st.tx
    cdef unsigned int count = 0, nsend, nicmp = 0, sent = 0, i
    cdef ssize_t n
    cdef int r, e
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
    ff_add(&st.c[C_TX_BATCHES], 1)
    nsend = ff_tx_process(st, count, &nicmp)
    for i in range(nicmp):
        syscalls += 1
        if write(st.tun_fd, io.icmp + <size_t>i * FF_ICMP_MAX, io.icmp_lens[i]) < 0:
            ff_add(&st.c[C_TX_DROP_ICMP_WRITE], 1)
    while sent < nsend:
        r = sendmmsg(st.udp_fd, io.msgs + sent, nsend - sent, MSG_DONTWAIT)
        syscalls += 1
        if r < 0:
            e = errno
            if e == EINTR:
                continue
            if e == EAGAIN:
                ff_add(&st.c[C_TX_SEND_WAITS], 1)
                syscalls += 1
                r = ff_wait_writable(st, st.udp_fd)
                if r <= 0:
                    ff_add(&st.c[C_TX_SYSCALLS], syscalls)
                    stage[0] = S_UDP_SEND
                    return r if r < 0 else 1
                continue
            if ff_fatal(e):
                ff_add(&st.c[C_TX_SYSCALLS], syscalls)
                stage[0] = S_UDP_SEND
                return -e
            ff_add(&st.c[C_TX_DROP_SEND], 1)  # this datagram only (EPERM, ENETUNREACH, EMSGSIZE...)
            sent += 1
            continue
        for i in range(sent, sent + <unsigned int>r):
            packets += 1
            nbytes += io.iov[i].iov_len
        sent += <unsigned int>r
    ff_add(&st.c[C_TX_SYSCALLS], syscalls)
    ff_add(&st.c[C_TX_PACKETS], packets)
    ff_add(&st.c[C_TX_BYTES], nbytes)
    return 0


cdef unsigned int ff_rx_process(ff_state *st, unsigned int count) noexcept nogil:
    """Decide every received slot: lens[i] stays > 0 for the ones to write to the TUN; return how many."""
    cdef ff_io *io = &st.rx
    cdef unsigned int i, nwrite = 0
    for i in range(count):
        if ff_in_one(st, io.srcs[i], io.bufs + <size_t>i * FF_SLOT, io.lens[i]) == V_WRITE:
            nwrite += 1
        else:
            io.lens[i] = 0
    return nwrite


cdef int ff_rx_burst(ff_state *st, int *stage, unsigned int *got) noexcept nogil:
    """Receive up to one batch with recvmmsg, process it, write it to the TUN; 0, 1 (stop seen) or -errno.
    got: datagrams received."""
    cdef ff_io *io = &st.rx
    cdef unsigned int i, count
    cdef int r, e
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
    ff_add(&st.c[C_RX_BATCHES], 1)
    for i in range(count):
        io.lens[i] = io.msgs[i].msg_len
        if io.msgs[i].msg_hdr.msg_flags & MSG_TRUNC:
            io.lens[i] = IPV4_MAX + 1  # cannot happen with FF_SLOT buffers; counted as malformed if it does
        io.srcs[i] = ntohl(io.addrs[i].sin_addr.s_addr) if io.addrs[i].sin_family == AF_INET else 0
    ff_rx_process(st, count)
    for i in range(count):
        if io.lens[i] == 0:
            continue
        while True:
            w = write(st.tun_fd, io.bufs + <size_t>i * FF_SLOT, io.lens[i])
            syscalls += 1
            if w >= 0:
                packets += 1
                nbytes += io.lens[i]
                break
            e = errno
            if e == EINTR:
                continue
            if e == EAGAIN:
                ff_add(&st.c[C_RX_TUN_WRITE_WAITS], 1)
                syscalls += 1
                r = ff_wait_writable(st, st.tun_fd)
                if r <= 0:
                    ff_add(&st.c[C_RX_SYSCALLS], syscalls)
                    stage[0] = S_TUN_WRITE
                    return r if r < 0 else 1
                continue
            if ff_fatal(e):
                ff_add(&st.c[C_RX_SYSCALLS], syscalls)
                stage[0] = S_TUN_WRITE
                return -e
            ff_add(&st.c[C_RX_DROP_TUN_WRITE], 1)
            break
    ff_add(&st.c[C_RX_SYSCALLS], syscalls)
    ff_add(&st.c[C_RX_PACKETS], packets)
    ff_add(&st.c[C_RX_BYTES], nbytes)
    return 0


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
        r = ff_apply(st, cmd.cmd, cmd.arg, cmd.value)
        if r < 0:
            stage[0] = S_PEERS
            return r
    return 0


cdef int ff_run(ff_state *st, int role, int ctl_fd, int *stage, int *bad_fd) noexcept nogil:
    """Serve ``role`` until the stop eventfd is readable (0) or a fd fails (-errno, stage/bad_fd set).

    While a data fd keeps returning packets the loop reads it again without poll() (flannel's trick: an
    occasional EAGAIN is cheaper than a poll() per burst), but at most FF_SPIN bursts in a row: then poll()
    runs (it returns at once when data is waiting) and stop and ctl are serviced.
    """
    cdef pollfd fds[4]
    cdef int nfds = 2, i_tun = -1, i_udp = -1, r, i, spin = 0
    cdef bint tun_ready, udp_ready
    cdef unsigned int got_tx = 0, got_rx = 0
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
            for i in range(nfds):
                fds[i].revents = 0
            r = poll(fds, nfds, -1)
            ff_add_shared(&st.c[C_POLLS], 1)
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
            r = ff_tx_burst(st, stage, &got_tx)
            if r != 0:
                return r if r < 0 else 0
        if udp_ready:
            r = ff_rx_burst(st, stage, &got_rx)
            if r != 0:
                return r if r < 0 else 0
        if (got_tx != 0 or got_rx != 0) and spin < st.spin:
            spin += 1
        else:
            spin = 0


# ---------------------------------------------------------------------------------------------------------
# memory

cdef int ff_io_alloc(ff_io *io, unsigned int batch, uint16_t port_be) noexcept nogil:
    cdef unsigned int i
    io.bufs = <uint8_t *>PyMem_RawMalloc(<size_t>batch * FF_SLOT)
    io.lens = <uint32_t *>PyMem_RawCalloc(batch, sizeof(uint32_t))
    io.srcs = <uint32_t *>PyMem_RawCalloc(batch, sizeof(uint32_t))
    io.msgs = <mmsghdr *>PyMem_RawCalloc(batch, sizeof(mmsghdr))
    io.iov = <iovec *>PyMem_RawCalloc(batch, sizeof(iovec))
    io.addrs = <sockaddr_in *>PyMem_RawCalloc(batch, sizeof(sockaddr_in))
    io.icmp = <uint8_t *>PyMem_RawMalloc(<size_t>batch * FF_ICMP_MAX)
    io.icmp_lens = <uint32_t *>PyMem_RawCalloc(batch, sizeof(uint32_t))
    if (io.bufs == NULL or io.lens == NULL or io.srcs == NULL or io.msgs == NULL or io.iov == NULL
            or io.addrs == NULL or io.icmp == NULL or io.icmp_lens == NULL):
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


cdef void ff_io_free(ff_io *io) noexcept nogil:
    PyMem_RawFree(io.bufs)
    PyMem_RawFree(io.lens)
    PyMem_RawFree(io.srcs)
    PyMem_RawFree(io.msgs)
    PyMem_RawFree(io.iov)
    PyMem_RawFree(io.addrs)
    PyMem_RawFree(io.icmp)
    PyMem_RawFree(io.icmp_lens)
    memset(io, 0, sizeof(ff_io))


cdef void ff_state_free(ff_state *st) noexcept nogil:
    if st == NULL:
        return
    ff_io_free(&st.tx)
    ff_io_free(&st.rx)
    PyMem_RawFree(st.table)
    PyMem_RawFree(st.peers.keys)
    if st.stop_fd >= 0:
        close(st.stop_fd)
    PyMem_RawFree(st)


_STAGES = {
    S_POLL: "poll on fd {fd}", S_TUN_READ: "read from tun fd {tun}", S_UDP_SEND: "send on udp fd {udp}",
    S_UDP_RECV: "recv on udp fd {udp}", S_TUN_WRITE: "write to tun fd {tun}", S_CTL: "ctl channel",
    S_PEERS: "peer set",
}


cdef class Proxy:
    """Own the C state of one fast path and run its nogil loop(s); same surface as _fastpath_py.Proxy.

    Addresses are host-order ints. The caller keeps tun_fd and udp_fd; the Proxy owns its eventfd, its ctl
    socketpairs and all C memory, released by close() (or __dealloc__) once no loop runs.
    """

    def __cinit__(self, int tun_fd, int udp_fd, uint32_t net, int net_plen, int subnet_len, uint32_t own_net,
                  int own_plen, uint32_t tun_ip, int mtu, int port, bint check_peer_source,
                  bint check_inner_dest, unsigned int batch, *, unsigned int spin=8):
        cdef ff_state *st
        self._ctl = [None, None, None]
        self._ctl_fd[0] = self._ctl_fd[1] = self._ctl_fd[2] = -1
        self._running = set()
        self._closed = False
        self._seq = 0
        if not 0 <= net_plen < subnet_len <= 32 or batch < 1 or not 0 < port < 65536:
            raise ValueError("invalid fast path configuration")
        st = <ff_state *>PyMem_RawCalloc(1, sizeof(ff_state))
        if st == NULL:
            raise MemoryError()
        self.st = st
        st.stop_fd = -1
        st.tun_fd = tun_fd
        st.udp_fd = udp_fd
        st.net_mask = ip_mask(net_plen)
        st.net = net & st.net_mask
        st.own_mask = ip_mask(own_plen)
        st.own_net = own_net & st.own_mask
        st.tun_ip = tun_ip
        st.shift = <uint32_t>(32 - subnet_len)
        st.table_size = 1u << (subnet_len - net_plen)
        st.port_be = htons(<uint16_t>port)
        st.check_peer = check_peer_source
        st.check_dest = check_inner_dest
        st.batch = batch
        st.spin = spin
        st.table = <uint32_t *>PyMem_RawCalloc(st.table_size, sizeof(uint32_t))
        st.peers.cap = FF_PEERS_MIN
        st.peers.keys = <uint32_t *>PyMem_RawCalloc(FF_PEERS_MIN, sizeof(uint32_t))
        if (st.table == NULL or st.peers.keys == NULL or ff_io_alloc(&st.tx, batch, st.port_be) < 0
                or ff_io_alloc(&st.rx, batch, st.port_be) < 0):
            raise MemoryError(f"cannot allocate the fast path's buffers (batch {batch}, {st.table_size} routes)")
        st.stop_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        if st.stop_fd < 0:
            raise fastpath_error(errno, "cannot create the fast path's stop eventfd")

    def __dealloc__(self):
        # run() holds a reference to self, so no loop can be running here
        self._close_fds()
        ff_state_free(self.st)
        self.st = NULL

    cdef _check_idle(self):
        if self._running:
            raise RuntimeError("process_* entry points are for a FastPath whose loop is not running")
        if self.st == NULL:
            raise ValueError("FastPath is closed")

    # --- control ---

    cdef int _apply_direct(self, uint32_t cmd, uint32_t arg, uint32_t value) except -1:
        cdef int r = ff_apply(self.st, cmd, arg, value)
        if r < 0:
            raise fastpath_error(-r, "fast path peer set")
        return 0

    def apply(self, cmds):
        """Apply route/peer commands: directly while no loop serves them, else over the ctl channel.

        Returns once every command is in effect (the loop echoed a SYNC); raises FastPathError if the loop
        does not answer within SYNC_TIMEOUT_S or stops running meanwhile.
        """
        cdef ff_command c
        cdef int role
        if self.st == NULL:
            raise ValueError("FastPath is closed")
        pending = {}
        for cmd, arg, value in cmds:
            if cmd not in (CMD_SET_ROUTE, CMD_DEL_ROUTE, CMD_PEER_ADD, CMD_PEER_DEL):
                raise ValueError(f"unknown command {cmd}")
            if ROLE_BOTH in self._running:
                role = ROLE_BOTH
            elif cmd in (CMD_SET_ROUTE, CMD_DEL_ROUTE):
                role = ROLE_TX
            else:
                role = ROLE_RX
            if role not in self._running:
                self._apply_direct(cmd, arg, value)
                continue
            memset(&c, 0, sizeof(c))
            c.cmd = cmd
            c.arg = arg
            c.value = value
            pending.setdefault(role, []).append(PyBytes_FromStringAndSize(<char *>&c, sizeof(c)))
        for role, msgs in pending.items():
            sock = self._ctl[role]
            for m in msgs:
                sock.send(m)
            self._sync(role)

    def _sync(self, int role):
        cdef ff_command c
        cdef bytes got
        self._seq += 1
        memset(&c, 0, sizeof(c))
        c.cmd = CMD_SYNC
        c.seq = self._seq
        sock = self._ctl[role]
        sock.send(PyBytes_FromStringAndSize(<char *>&c, sizeof(c)))
        deadline = _time.monotonic() + SYNC_TIMEOUT_S
        while True:
            try:
                got = sock.recv(sizeof(c))
            except _socket.timeout:
                if role not in self._running:
                    raise fastpath_error(EPIPE, f"{_py.ROLE_NAMES[role]} loop stopped before applying routes")
                if _time.monotonic() > deadline:
                    raise fastpath_error(ETIMEDOUT, f"{_py.ROLE_NAMES[role]} loop did not apply routes in time")
                continue
            if PyBytes_GET_SIZE(got) == sizeof(c):
                memcpy(&c, PyBytes_AS_STRING(got), sizeof(c))
                if c.cmd == CMD_SYNC and c.seq == self._seq:
                    return

    def mark_running(self, int role):
        """Record that a loop for ``role`` is about to start, and make its ctl socketpair."""
        if self.st == NULL:
            raise ValueError("FastPath is closed")
        if role in self._running or self._ctl[role] is not None:
            raise RuntimeError(f"{_py.ROLE_NAMES[role]} loop already started")
        py_end, loop_end = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)
        py_end.settimeout(0.05)
        loop_end.setblocking(False)
        self._ctl[role] = py_end
        self._ctl_fd[role] = loop_end.detach()
        self._running.add(role)

    def running(self):
        """Tell whether any loop is still inside run()."""
        return bool(self._running)

    def stop(self):
        """Ask every loop to return: make the stop eventfd readable (idempotent, non-blocking)."""
        cdef uint64_t one = 1
        if self.st != NULL and self.st.stop_fd >= 0:
            write(self.st.stop_fd, &one, sizeof(one))

    cdef _close_fds(self):
        cdef int i
        for i in range(3):
            if self._ctl[i] is not None:
                self._ctl[i].close()
                self._ctl[i] = None
            if self._ctl_fd[i] >= 0:
                close(self._ctl_fd[i])
                self._ctl_fd[i] = -1

    def close(self):
        """Free the C state and close the eventfd and ctl sockets; the loops must have returned. Idempotent."""
        if self.st == NULL:
            return
        if self._running:
            raise RuntimeError("close() while a loop thread is running; stop() and join it first")
        self._close_fds()
        ff_state_free(self.st)
        self.st = NULL

    def stats(self):
        """Return a snapshot of the counters (relaxed atomic loads; safe while the loops run)."""
        cdef int i
        if self.st == NULL:
            raise ValueError("FastPath is closed")
        return {name: ff_load(&self.st.c[i]) for i, name in enumerate(COUNTER_NAMES)}

    # --- per-packet entry points (GIL held, no loop running) ---

    def process_outbound(self, bytes packet not None):
        """Apply the TUN -> UDP rules to one packet; (verdict, bytes to send or write back, next hop)."""
        cdef Py_ssize_t n = PyBytes_GET_SIZE(packet)
        cdef uint8_t *p
        cdef uint32_t nh = 0
        cdef size_t ilen = 0
        cdef ff_verdict v
        self._check_idle()
        p = self.st.tx.bufs
        if n <= IPV4_MAX:
            memcpy(p, PyBytes_AS_STRING(packet), n)
        v = ff_out_one(self.st, p, n, &nh, self.st.tx.icmp, &ilen)
        if v == V_SEND:
            ff_add(&self.st.c[C_TX_PACKETS], 1)
            ff_add(&self.st.c[C_TX_BYTES], n)
            return _py.SEND, PyBytes_FromStringAndSize(<char *>p, n), nh
        if v == V_ICMP:
            return _py.ICMP, PyBytes_FromStringAndSize(<char *>self.st.tx.icmp, ilen), None
        return _VERDICTS[v], None, None

    def process_inbound(self, uint32_t src, bytes datagram not None):
        """Apply the UDP -> TUN rules to one datagram from ``src``; (verdict, bytes to write to the TUN)."""
        cdef Py_ssize_t n = PyBytes_GET_SIZE(datagram)
        cdef uint8_t *p
        cdef ff_verdict v
        self._check_idle()
        p = self.st.rx.bufs
        if n <= IPV4_MAX:
            memcpy(p, PyBytes_AS_STRING(datagram), n)
        v = ff_in_one(self.st, src, p, n)
        if v == V_WRITE:
            ff_add(&self.st.c[C_RX_PACKETS], 1)
            ff_add(&self.st.c[C_RX_BYTES], n)
            return _py.WRITE, PyBytes_FromStringAndSize(<char *>p, n)
        return _VERDICTS[v], None

    def process_outbound_batch(self, packets):
        """Run the loop's TX process phase over ``packets`` (copied into the slots as a read would); no I/O.

        Returns how many would be sent. Counts as the loop does, less the syscalls.
        """
        cdef ff_state *st
        cdef unsigned int count = 0, total = 0
        cdef Py_ssize_t n
        cdef bytes b
        self._check_idle()
        st = self.st
        seq = list(packets)
        for b in seq:
            n = PyBytes_GET_SIZE(b)
            if n > IPV4_MAX:
                n = IPV4_MAX + 1
            else:
                memcpy(st.tx.bufs + <size_t>count * FF_SLOT, PyBytes_AS_STRING(b), n)
            st.tx.lens[count] = <uint32_t>n
            count += 1
            if count == st.batch:
                total += self._tx_phase(count)
                count = 0
        if count or not seq:
            total += self._tx_phase(count)
        return total

    cdef unsigned int _tx_phase(self, unsigned int count):
        cdef unsigned int nicmp = 0, nsend, i
        cdef uint64_t nbytes = 0
        nsend = ff_tx_process(self.st, count, &nicmp)
        for i in range(nsend):
            nbytes += self.st.tx.iov[i].iov_len
        ff_add(&self.st.c[C_TX_BATCHES], 1)
        ff_add(&self.st.c[C_TX_PACKETS], nsend)
        ff_add(&self.st.c[C_TX_BYTES], nbytes)
        return nsend

    def process_inbound_batch(self, uint32_t src, datagrams):
        """Run the loop's RX process phase over ``datagrams`` from ``src``; no I/O. Returns how many pass."""
        cdef ff_state *st
        cdef unsigned int count = 0, total = 0
        cdef Py_ssize_t n
        cdef bytes b
        self._check_idle()
        st = self.st
        seq = list(datagrams)
        for b in seq:
            n = PyBytes_GET_SIZE(b)
            if n > IPV4_MAX:
                n = IPV4_MAX + 1
            else:
                memcpy(st.rx.bufs + <size_t>count * FF_SLOT, PyBytes_AS_STRING(b), n)
            st.rx.lens[count] = <uint32_t>n
            st.rx.srcs[count] = src
            count += 1
            if count == st.batch:
                total += self._rx_phase(count)
                count = 0
        if count or not seq:
            total += self._rx_phase(count)
        return total

    cdef unsigned int _rx_phase(self, unsigned int count):
        cdef unsigned int nwrite, i
        cdef uint64_t nbytes = 0
        nwrite = ff_rx_process(self.st, count)
        for i in range(count):
            nbytes += self.st.rx.lens[i]
        ff_add(&self.st.c[C_RX_BATCHES], 1)
        ff_add(&self.st.c[C_RX_PACKETS], nwrite)
        ff_add(&self.st.c[C_RX_BYTES], nbytes)
        return nwrite

    # --- the loop ---

    def run(self, int role):
        """Forward until stop(); raise FastPathError (also the right OSError subclass) if a fd fails.

        Called once per role, each in its own thread, after mark_running(role). Holds the only ``with nogil``.
        """
        cdef int rc, stage = S_NONE, bad_fd = -1
        cdef int ctl_fd
        cdef ff_state *st = self.st
        if st == NULL or role not in self._running:
            raise RuntimeError("run() without mark_running() or after close()")
        ctl_fd = self._ctl_fd[role]
        try:
            with nogil:
                rc = ff_run(st, role, ctl_fd, &stage, &bad_fd)
        finally:
            self._running.discard(role)
        if rc < 0:
            where = _STAGES.get(stage, "loop").format(fd=bad_fd, tun=st.tun_fd, udp=st.udp_fd)
            raise fastpath_error(-rc, f"{_py.ROLE_NAMES[role]} loop: {where}")
