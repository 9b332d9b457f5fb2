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
    EIO,
    ETIMEDOUT,
    errno,
)
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy, memset
from posix.uio cimport iovec, writev
from posix.unistd cimport close, read, write

from fastflannel.datapath.includes.fastpath cimport ff_add, ff_add_shared, ff_fold, ff_load, ff_sum_native
from fastflannel.datapath.includes.system cimport (
    AF_INET,
    CMSG_DATA,
    CMSG_FIRSTHDR,
    CMSG_LEN,
    CMSG_NXTHDR,
    CMSG_SPACE,
    EFD_CLOEXEC,
    FF_SOL_UDP,
    FF_UDP_GRO,
    FF_UDP_SEGMENT,
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
    cmsghdr,
    sendmmsg,
    sendto,
    sockaddr_in,
)

import socket as _socket
import time as _time

from fastflannel.datapath import twin as _py
from fastflannel.datapath.twin import (
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
    IPPROTO_TCP = 6
    TCP_FIN = 0x01
    TCP_PSH = 0x08
    TCP_ACK = 0x10
    VIRTIO_F_NEEDS_CSUM = 1
    VIRTIO_GSO_NONE = 0
    VIRTIO_GSO_TCPV4 = 1

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
    "ctl_commands": C_CTL_COMMANDS, "tx_tso_reads": C_TX_TSO_READS, "tx_tso_segments": C_TX_TSO_SEGMENTS,
    "tx_gso_sends": C_TX_GSO_SENDS, "tx_gso_errors": C_TX_GSO_ERRORS, "rx_gro_receives": C_RX_GRO_RECEIVES,
    "rx_gro_datagrams": C_RX_GRO_DATAGRAMS, "rx_coalesced_writes": C_RX_COALESCED_WRITES,
    "rx_coalesced_packets": C_RX_COALESCED_PACKETS, "tx_batch_packets": C_TX_BATCH_PACKETS,
    "tx_batch_le_1": C_TX_BATCH_LE_1, "tx_batch_le_4": C_TX_BATCH_LE_4, "tx_batch_le_16": C_TX_BATCH_LE_16,
    "tx_batch_le_64": C_TX_BATCH_LE_64, "tx_batch_gt_64": C_TX_BATCH_GT_64, "rx_batch_packets": C_RX_BATCH_PACKETS,
    "rx_batch_le_1": C_RX_BATCH_LE_1, "rx_batch_le_4": C_RX_BATCH_LE_4, "rx_batch_le_16": C_RX_BATCH_LE_16,
    "rx_batch_le_64": C_RX_BATCH_LE_64, "rx_batch_gt_64": C_RX_BATCH_GT_64,
}
if tuple(_C_SLOTS) != COUNTER_NAMES or list(_C_SLOTS.values()) != list(range(FF_NCOUNTERS)):
    raise ImportError("fastflannel.datapath._fastpath counter layout differs from _fastpath_py.COUNTER_NAMES; rebuild")
if (len(_py.PEER_COUNTER_NAMES) != 8 or _py.PEER_CHUNK_SHIFT != FF_PEER_SHIFT
        or _py.BATCH_BUCKETS != (1, 4, 16, 64)):
    raise ImportError("fastflannel.datapath._fastpath per-peer/batch layout differs from _fastpath_py; rebuild")


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


cdef inline ff_peer_tx *ff_ptx(const ff_state *st, uint32_t pid) noexcept nogil:
    """The tx counter block of peer id ``pid`` (validated by ff_pid_ok when the command naming it was applied)."""
    return &st.ptx[pid >> FF_PEER_SHIFT][pid & (FF_PEER_CHUNK - 1)]


cdef inline ff_peer_rx *ff_prx(const ff_state *st, uint32_t pid) noexcept nogil:
    return &st.prx[pid >> FF_PEER_SHIFT][pid & (FF_PEER_CHUNK - 1)]


cdef inline uint32_t ff_pid_ok(const ff_state *st, uint32_t pid) noexcept nogil:
    """``pid`` if its counter blocks exist, else 0 (the "other" block, allocated with the state)."""
    if pid < st.peer_cap and st.ptx[pid >> FF_PEER_SHIFT] != NULL and st.prx[pid >> FF_PEER_SHIFT] != NULL:
        return pid
    return 0


cdef inline void ff_count_batch(ff_state *st, int base, uint64_t n) noexcept nogil:
    """Count one burst of ``n`` packets: c[base] += n (the sum), and its bucket (<=1, <=4, <=16, <=64, >64)."""
    cdef int b
    if n <= 1:
        b = 0
    elif n <= 4:
        b = 1
    elif n <= 16:
        b = 2
    elif n <= 64:
        b = 3
    else:
        b = 4
    ff_add(&st.c[base], n)
    ff_add(&st.c[base + 1 + b], 1)


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


cdef ff_verdict ff_out_one(ff_state *st, uint8_t *p, size_t n, uint32_t *nh, uint32_t *pid, uint8_t *icmp,
                           size_t *icmp_len) noexcept nogil:
    """Apply the TUN -> UDP rules to p[0:n] in place; count drops (not sends). SEND: nh, pid = next hop, peer id."""
    cdef uint32_t dst, hop = 0, idx = 0
    if ff_malformed(p, n):
        ff_add(&st.c[C_TX_DROP_MALFORMED], 1)
        return V_DROP_MALFORMED
    dst = ld32(p + 16)
    if (dst & st.net_mask) == st.net:
        idx = (dst - st.net) >> st.shift
        hop = st.table[idx]
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
    pid[0] = st.table_pid[idx]
    return V_SEND


cdef inline uint32_t ff_hash(uint32_t k, uint32_t cap) noexcept nogil:
    cdef uint32_t h = k * 0x9E3779B1u  # Fibonacci hashing
    return (h ^ (h >> 15)) & (cap - 1)


cdef inline bint ff_peer_get(const ff_peers *ps, uint32_t k, uint32_t *pid) noexcept nogil:
    """Tell whether ``k`` is a peer; if so set pid to its peer id."""
    cdef uint32_t i = ff_hash(k, ps.cap)
    while ps.keys[i] != 0:
        if ps.keys[i] == k:
            pid[0] = ps.pids[i]
            return True
        i = (i + 1) & (ps.cap - 1)
    return False


cdef ff_verdict ff_in_one(ff_state *st, uint32_t src, uint8_t *p, size_t n, uint32_t *pid_out) noexcept nogil:
    """Apply the UDP -> TUN rules to p[0:n] from ``src`` in place; count drops (not writes), in total and for the
    source's peer id, stored in pid_out (0: not a current peer, possible only with check_peer off)."""
    cdef uint32_t pid = 0
    if not ff_peer_get(&st.peers, src, &pid):  # looked up even with check_peer off: the per-peer counters need it
        if st.check_peer:
            ff_add(&st.c[C_RX_DROP_UNKNOWN_PEER], 1)
            return V_DROP_UNKNOWN_PEER
        pid = 0
    pid_out[0] = pid
    if ff_malformed(p, n):
        ff_add(&st.c[C_RX_DROP_MALFORMED], 1)
        ff_add(&ff_prx(st, pid).drop_malformed, 1)
        return V_DROP_MALFORMED
    if st.check_dest and (ld32(p + 16) & st.own_mask) != st.own_net:
        ff_add(&st.c[C_RX_DROP_FOREIGN_DEST], 1)
        ff_add(&ff_prx(st, pid).drop_foreign_dest, 1)
        return V_DROP_FOREIGN_DEST
    if p[8] <= 1:
        ff_add(&st.c[C_RX_DROP_TTL], 1)
        ff_add(&ff_prx(st, pid).drop_ttl, 1)
        return V_DROP_TTL
    ff_ttl_dec(p)
    return V_WRITE


# ---------------------------------------------------------------------------------------------------------
# peer set (owned by the rx loop, or by Python while no rx loop runs)

cdef int ff_peer_insert(ff_peers *ps, uint32_t k, uint32_t pid) noexcept nogil:
    cdef uint32_t i = ff_hash(k, ps.cap)
    while ps.keys[i] != 0:
        if ps.keys[i] == k:
            ps.pids[i] = pid
            return 0
        i = (i + 1) & (ps.cap - 1)
    ps.keys[i] = k
    ps.pids[i] = pid
    ps.count += 1
    return 0


cdef int ff_peer_add(ff_peers *ps, uint32_t k, uint32_t pid) noexcept nogil:
    cdef uint32_t *old
    cdef uint32_t *old_pids
    cdef uint32_t *new_pids
    cdef uint32_t old_cap, i, have = 0
    if k == 0:
        return 0
    if ff_peer_get(ps, k, &have):
        return ff_peer_insert(ps, k, pid)  # present: only its peer id changes
    if (ps.count + 1) * 2 > ps.cap:  # keep the load <= 1/2: short probes
        old = ps.keys
        old_pids = ps.pids
        old_cap = ps.cap
        new_pids = <uint32_t *>PyMem_RawCalloc(old_cap * 2, sizeof(uint32_t))
        ps.keys = <uint32_t *>PyMem_RawCalloc(old_cap * 2, sizeof(uint32_t))
        if ps.keys == NULL or new_pids == NULL:
            PyMem_RawFree(ps.keys)
            PyMem_RawFree(new_pids)
            ps.keys = old
            return -ENOMEM
        ps.pids = new_pids
        ps.cap = old_cap * 2
        ps.count = 0
        for i in range(old_cap):
            if old[i] != 0:
                ff_peer_insert(ps, old[i], old_pids[i])
        PyMem_RawFree(old)
        PyMem_RawFree(old_pids)
    return ff_peer_insert(ps, k, pid)


cdef void ff_peer_del(ff_peers *ps, uint32_t k) noexcept nogil:
    cdef uint32_t mask = ps.cap - 1
    cdef uint32_t i = ff_hash(k, ps.cap), j, home
    while ps.keys[i] != k:
        if ps.keys[i] == 0:
            return
        i = (i + 1) & mask
    ps.keys[i] = 0
    ps.pids[i] = 0
    ps.count -= 1
    j = i
    while True:  # backward-shift deletion: no tombstones, probes stay short
        j = (j + 1) & mask
        if ps.keys[j] == 0:
            return
        home = ff_hash(ps.keys[j], ps.cap)
        if ((j - home) & mask) >= ((j - i) & mask):
            ps.keys[i] = ps.keys[j]
            ps.pids[i] = ps.pids[j]
            ps.keys[j] = 0
            ps.pids[j] = 0
            i = j


cdef int ff_apply(ff_state *st, uint32_t cmd, uint32_t arg, uint32_t value, uint32_t pid) noexcept nogil:
    """Apply one route/peer command; 0 or -errno."""
    if cmd == CMD_SET_ROUTE:
        if arg < st.table_size:
            st.table[arg] = value
            st.table_pid[arg] = ff_pid_ok(st, pid)
    elif cmd == CMD_DEL_ROUTE:
        if arg < st.table_size:
            st.table[arg] = 0
            st.table_pid[arg] = 0
    elif cmd == CMD_PEER_ADD:
        return ff_peer_add(&st.peers, value, ff_pid_ok(st, pid))
    elif cmd == CMD_PEER_DEL:
        ff_peer_del(&st.peers, value)
    return 0


# ---------------------------------------------------------------------------------------------------------
# offloads: TSO split (TUN read side) and TCP coalescing (TUN write side), fastpath research notes 1.3/1.4.
# virtio_net_hdr fields are host byte order (no TUNSETVNETLE/BE); packet fields big endian. Checksums are summed
# in native order (ff_sum_native) and stored with a native 16-bit store, which is right on either endianness.

cdef inline uint16_t ld16n(const uint8_t *p) noexcept nogil:
    cdef uint16_t v
    memcpy(&v, p, 2)
    return v


cdef inline void st16n(uint8_t *p, uint16_t v) noexcept nogil:
    memcpy(p, &v, 2)


cdef inline uint16_t ld16(const uint8_t *p) noexcept nogil:
    return <uint16_t>((<uint16_t>p[0] << 8) | p[1])


cdef inline void st16(uint8_t *p, uint32_t v) noexcept nogil:
    p[0] = <uint8_t>(v >> 8)
    p[1] = <uint8_t>v


cdef inline uint64_t ff_pseudo(const uint8_t *ip, uint32_t l4len, uint8_t proto) noexcept nogil:
    """Native-order sum of the IPv4 pseudo-header of ``ip`` for an L4 segment of ``l4len`` bytes."""
    return ff_sum_native(ip + 12, 8, 0) + htons(proto) + htons(<uint16_t>l4len)


cdef inline void ff_ip_csum(uint8_t *ip, size_t ihl) noexcept nogil:
    ip[10] = 0
    ip[11] = 0
    st16n(ip + 10, <uint16_t>~ff_fold(ff_sum_native(ip, ihl, 0)))


cdef inline bint ff_tcp_csum_ok(const uint8_t *ip, size_t n, size_t ihl) noexcept nogil:
    return ff_fold(ff_pseudo(ip, <uint32_t>(n - ihl), IPPROTO_TCP) + ff_sum_native(ip + ihl, n - ihl, 0)) == 0xFFFF


cdef int ff_gso_split(const uint8_t *buf, size_t n, uint8_t *out, size_t cap, uint32_t *lens,
                      unsigned int max_segs, int *is_tso) noexcept nogil:
    """Turn one TUN read (virtio_net_hdr + packet) into plain IPv4 packets laid back to back in ``out``.

    Returns the number of packets (lens[i] each), -1 if the header or packet is unusable (count as malformed),
    -2 if more than ``max_segs`` segments or ``cap`` bytes would be needed. is_tso: 1 for a TCPV4 super-packet.
    NONE + NEEDS_CSUM: the checksum is completed. TCPV4: hdr_len is recomputed (never trusted), each segment gets
    IP id + i, total length, seq + offset, FIN/PSH only on the last, IP and TCP checksums computed in full.
    """
    cdef uint8_t flags, gso_type
    cdef size_t gso_size, cs, co, ihl, doff, hdr, payload, off, seg, pos = 0, plen
    cdef const uint8_t *pkt
    cdef uint8_t *o
    cdef unsigned int nseg, i
    cdef uint32_t seq0
    cdef uint16_t id0
    cdef uint8_t tflags
    is_tso[0] = 0
    if n < FF_VNET:
        return -1
    flags = buf[0]
    gso_type = buf[1]
    gso_size = ld16n(buf + 4)
    cs = ld16n(buf + 6)
    co = ld16n(buf + 8)
    pkt = buf + FF_VNET
    plen = n - FF_VNET
    if gso_type == VIRTIO_GSO_NONE:
        if plen > cap:
            return -2
        memcpy(out, pkt, plen)
        if flags & VIRTIO_F_NEEDS_CSUM:
            if cs + co + 2 > plen:
                return -1
            st16n(out + cs + co, <uint16_t>~ff_fold(ff_sum_native(out + cs, plen - cs, 0)))
        lens[0] = <uint32_t>plen
        return 1
    if gso_type != VIRTIO_GSO_TCPV4:  # TCPV6 (flannel carries IPv4 only), UDP, ECN: not ours
        return -1
    is_tso[0] = 1
    if plen < IPV4_HDR_MIN or (pkt[0] >> 4) != 4 or pkt[9] != IPPROTO_TCP:
        return -1
    ihl = (pkt[0] & 0x0F) * 4
    if ihl < IPV4_HDR_MIN or cs != ihl or plen < ihl + 20 or gso_size == 0:
        return -1
    doff = (pkt[ihl + 12] >> 4) * 4
    hdr = ihl + doff
    if doff < 20 or hdr > plen:
        return -1
    payload = plen - hdr
    nseg = <unsigned int>((payload + gso_size - 1) // gso_size) if payload else 1
    if nseg > max_segs or nseg * hdr + payload > cap:
        return -2
    seq0 = ld32(pkt + ihl + 4)
    id0 = ld16(pkt + 4)
    tflags = pkt[ihl + 13]
    off = 0
    for i in range(nseg):
        seg = payload - off if payload - off < gso_size else gso_size
        o = out + pos
        memcpy(o, pkt, hdr)
        memcpy(o + hdr, pkt + hdr + off, seg)
        st16(o + 2, <uint32_t>(hdr + seg))
        st16(o + 4, <uint16_t>(id0 + i))
        ff_ip_csum(o, ihl)
        st32(o + ihl + 4, seq0 + <uint32_t>off)
        if i + 1 != nseg:
            o[ihl + 13] = tflags & ~(TCP_FIN | TCP_PSH)
        o[ihl + 16] = 0
        o[ihl + 17] = 0
        st16n(o + ihl + 16, <uint16_t>~ff_fold(ff_pseudo(o, <uint32_t>(doff + seg), IPPROTO_TCP)
                                               + ff_sum_native(o + ihl, doff + seg, 0)))
        lens[i] = <uint32_t>(hdr + seg)
        pos += hdr + seg
        off += seg
    return <int>nseg


cdef inline bint ff_gro_candidate(const uint8_t *p, size_t n) noexcept nogil:
    """A well-formed IPv4 packet (ff_malformed passed) that may be merged: IHL 5, TCP, no fragment, TCP header
    20..60 inside the packet, flags exactly ACK or ACK|PSH, payload > 0."""
    cdef size_t doff
    if p[0] != 0x45 or p[9] != IPPROTO_TCP or (p[6] & 0x3F) != 0 or p[7] != 0 or n < 40:
        return False
    doff = (p[32] >> 4) * 4
    if doff < 20 or 20 + doff >= n:
        return False
    return (p[33] & ~TCP_PSH) == TCP_ACK


cdef void ff_gro_reset(ff_io *io) noexcept nogil:
    io.nout = 0


cdef int ff_gro_add(ff_io *io, const uint8_t *p, size_t n, uint32_t pid) noexcept nogil:
    """Queue inner packet p[0:n] from peer id ``pid`` (rules already applied) for the TUN: append it to an open run
    of its flow (same peer) or start a new write slot. Returns 0, or 1 if the slots are full (flush, call again)."""
    cdef ff_item *it
    cdef ff_item *head
    cdef uint8_t *slot
    cdef uint8_t *hp
    cdef size_t hlen, pay
    cdef uint32_t src, dst, ports, ack, seq
    cdef int j
    if ff_gro_candidate(p, n) and ff_tcp_csum_ok(p, n, 20):
        hlen = 20 + (p[32] >> 4) * 4
        pay = n - hlen
        src = ld32(p + 12)
        dst = ld32(p + 16)
        ports = ld32(p + 20)
        ack = ld32(p + 28)
        seq = ld32(p + 24)
        j = <int>io.nout - 1
        while j >= 0:  # newest first; the first item of the same flow decides
            it = &io.items[j]
            if it.open and it.src == src and it.dst == dst and it.ports == ports and it.ack == ack and it.pid == pid:
                hp = io.wslots + <size_t>j * FF_WSLOT + FF_VNET
                if (it.hlen == hlen and it.next_seq == seq and pay <= it.gso and it.len + pay <= IPV4_MAX
                        and hp[1] == p[1] and hp[8] == p[8] and hp[6] == p[6]
                        and memcmp(hp + 40, p + 40, hlen - 40) == 0):
                    memcpy(hp + it.len, p + hlen, pay)
                    it.len += <uint32_t>pay
                    it.in_bytes += <uint32_t>n
                    it.next_seq += <uint32_t>pay
                    it.count += 1
                    if pay < it.gso:
                        it.open = 0
                    if p[33] & TCP_PSH:
                        hp[33] |= TCP_PSH
                        it.open = 0
                    return 0
                break
            j -= 1
        if io.nout == FF_WSLOTS:
            return 1
        it = &io.items[io.nout]
        it.src = src
        it.dst = dst
        it.ports = ports
        it.ack = ack
        it.next_seq = seq + <uint32_t>pay
        it.gso = <uint16_t>pay
        it.hlen = <uint16_t>hlen
        it.open = 0 if p[33] & TCP_PSH else 1
    else:
        if io.nout == FF_WSLOTS:
            return 1
        it = &io.items[io.nout]
        it.open = 0
        it.hlen = 0
        it.gso = 0
    slot = io.wslots + <size_t>io.nout * FF_WSLOT
    memcpy(slot + FF_VNET, p, n)
    it.pid = pid
    it.len = <uint32_t>n
    it.in_bytes = <uint32_t>n
    it.count = 1
    io.nout += 1
    return 0


cdef size_t ff_gro_finish(ff_io *io, unsigned int k) noexcept nogil:
    """Write the virtio_net_hdr of slot k (and fix a merged run's IP header and partial TCP checksum); return the
    bytes to write (header included)."""
    cdef ff_item *it = &io.items[k]
    cdef uint8_t *slot = io.wslots + <size_t>k * FF_WSLOT
    cdef uint8_t *ip = slot + FF_VNET
    memset(slot, 0, FF_VNET)
    if it.count > 1:
        slot[0] = VIRTIO_F_NEEDS_CSUM
        slot[1] = VIRTIO_GSO_TCPV4
        st16n(slot + 2, it.hlen)
        st16n(slot + 4, it.gso)
        st16n(slot + 6, 20)
        st16n(slot + 8, 16)
        st16(ip + 2, it.len)
        ff_ip_csum(ip, 20)
        st16n(ip + 36, ff_fold(ff_pseudo(ip, it.len - 20, IPPROTO_TCP)))  # folded, not complemented
    return FF_VNET + it.len


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


cdef int ff_tx_burst(ff_state *st, int *stage, unsigned int *got) noexcept nogil:
    """Drain up to one batch from the TUN, process it, send it; 0, 1 (stop seen) or -errno. got: packets read."""
    cdef ff_io *io = &st.tx
    cdef unsigned int count = 0, nsend, nicmp = 0, sent = 0, i
    cdef ssize_t n
    cdef int r, e, a, rc
    cdef ff_peer_tx *pt
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
    ff_count_batch(st, C_TX_BATCH_PACKETS, count)
    nsend = ff_tx_process(st, count, &nicmp)
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
            ff_add(&st.c[C_TX_DROP_SEND], 1)  # this datagram only (EPERM, ENETUNREACH, EMSGSIZE...)
            ff_add(&ff_ptx(st, io.pids[sent]).drop_send, 1)
            sent += 1
            continue
        for i in range(sent, sent + <unsigned int>r):
            packets += 1
            nbytes += io.iov[i].iov_len
            pt = ff_ptx(st, io.pids[i])
            ff_add(&pt.packets, 1)
            ff_add(&pt.bytes, io.iov[i].iov_len)
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
        if ff_in_one(st, io.srcs[i], io.bufs + <size_t>i * FF_SLOT, io.lens[i], &io.pids[i]) == V_WRITE:
            nwrite += 1
        else:
            io.lens[i] = 0
    return nwrite


cdef int ff_rx_burst(ff_state *st, int *stage, unsigned int *got) noexcept nogil:
    """Receive up to one batch with recvmmsg, process it, write it to the TUN; 0, 1 (stop seen) or -errno.
    got: datagrams received."""
    cdef ff_io *io = &st.rx
    cdef unsigned int i, count
    cdef int r, e, a, rc
    cdef ssize_t w
    cdef ff_peer_rx *pr
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
    ff_count_batch(st, C_RX_BATCH_PACKETS, count)
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
                pr = ff_prx(st, io.pids[i])
                ff_add(&pr.packets, 1)
                ff_add(&pr.bytes, io.lens[i])
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
    ff_add(&st.c[C_RX_SYSCALLS], syscalls)
    ff_add(&st.c[C_RX_PACKETS], packets)
    ff_add(&st.c[C_RX_BYTES], nbytes)
    return 0


# ---------------------------------------------------------------------------------------------------------
# offload mode loops (st.vnet / st.gro); the plain per-packet bursts above stay as they were

cdef int ff_send_slow(ff_state *st, unsigned int m, uint64_t *syscalls, uint64_t *packets,
                      uint64_t *nbytes) noexcept nogil:
    """Send GSO message m one datagram at a time (GSO refused); 0, 1 (stop) or -errno."""
    cdef ff_io *io = &st.tx
    cdef uint8_t *base = <uint8_t *>io.giov[m].iov_base
    cdef size_t left = io.giov[m].iov_len, seg = io.gseglen[m], l
    cdef ssize_t w
    cdef int a, rc
    cdef ff_peer_tx *pt = ff_ptx(st, io.gpids[m])
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
            ff_add(&st.c[C_TX_DROP_SEND], 1)
            ff_add(&pt.drop_send, 1)
        else:
            packets[0] += 1
            nbytes[0] += l
            ff_add(&pt.packets, 1)
            ff_add(&pt.bytes, l)
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
    cdef ff_peer_tx *pt
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
            ff_add(&st.c[C_TX_DROP_SEND], io.gsegs[sent])
            ff_add(&ff_ptx(st, io.gpids[sent]).drop_send, io.gsegs[sent])
            sent += 1
            continue
        for k in range(sent, sent + <unsigned int>r):
            packets += io.gsegs[k]
            nbytes += io.giov[k].iov_len
            pt = ff_ptx(st, io.gpids[k])
            ff_add(&pt.packets, io.gsegs[k])
            ff_add(&pt.bytes, io.giov[k].iov_len)
            if io.gsegs[k] > 1 and st.gso:
                gsends += 1
        sent += <unsigned int>r
        r = 0
    ff_add(&st.c[C_TX_PACKETS], packets)
    ff_add(&st.c[C_TX_BYTES], nbytes)
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
    got[0] = reads
    if reads:
        ff_add(&st.c[C_TX_BATCHES], 1)
        ff_count_batch(st, C_TX_BATCH_PACKETS, pkts)
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
    cdef ff_peer_rx *pr
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
        packets += it.count
        nbytes += it.in_bytes
        pr = ff_prx(st, it.pid)
        ff_add(&pr.packets, it.count)
        ff_add(&pr.bytes, it.in_bytes)
        if it.count > 1:
            cw += 1
            cp += it.count
    io.nout = 0
    ff_add(&st.c[C_RX_PACKETS], packets)
    ff_add(&st.c[C_RX_BYTES], nbytes)
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
    cdef ff_peer_rx *pr
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
                        packets += 1
                        nbytes += il
                        pr = ff_prx(st, pid)
                        ff_add(&pr.packets, 1)
                        ff_add(&pr.bytes, il)
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
    ff_add(&st.c[C_RX_SYSCALLS], syscalls)
    ff_add(&st.c[C_RX_PACKETS], packets)
    ff_add(&st.c[C_RX_BYTES], nbytes)
    return r


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


cdef int ff_run(ff_state *st, int role, int ctl_fd, int *stage, int *bad_fd) noexcept nogil:
    """Serve ``role`` until the stop eventfd is readable (0) or a fd fails (-errno, stage/bad_fd set).

    While a data fd keeps returning packets the loop reads it again without poll() (flannel's trick: an
    occasional EAGAIN is cheaper than a poll() per burst), but at most FF_SPIN bursts in a row: then poll()
    runs (it returns at once when data is waiting) and stop and ctl are serviced.
    """
    cdef pollfd fds[4]
    cdef int nfds = 2, i_tun = -1, i_udp = -1, r, i
    cdef unsigned int spin = 0
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


# ---------------------------------------------------------------------------------------------------------
# memory

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
                  bint check_inner_dest, unsigned int batch, *, unsigned int spin=8, bint tun_offload=False,
                  bint udp_gso=True, bint udp_gro=False):
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
        st.vnet = tun_offload
        st.gso = udp_gso and tun_offload  # segments to send in runs exist only in offload mode
        st.gro = udp_gro
        st.table = <uint32_t *>PyMem_RawCalloc(st.table_size, sizeof(uint32_t))
        st.table_pid = <uint32_t *>PyMem_RawCalloc(st.table_size, sizeof(uint32_t))
        st.peers.cap = FF_PEERS_MIN
        st.peers.keys = <uint32_t *>PyMem_RawCalloc(FF_PEERS_MIN, sizeof(uint32_t))
        st.peers.pids = <uint32_t *>PyMem_RawCalloc(FF_PEERS_MIN, sizeof(uint32_t))
        st.peer_cap = st.table_size + 1  # ids 1..table_size (never more peers than routes) + 0, the "other" block
        st.peer_chunks = (st.peer_cap + FF_PEER_CHUNK - 1) >> FF_PEER_SHIFT
        st.ptx = <ff_peer_tx **>PyMem_RawCalloc(st.peer_chunks, sizeof(ff_peer_tx *))
        st.prx = <ff_peer_rx **>PyMem_RawCalloc(st.peer_chunks, sizeof(ff_peer_rx *))
        if (st.table == NULL or st.table_pid == NULL or st.peers.keys == NULL or st.peers.pids == NULL
                or st.ptx == NULL or st.prx == NULL or self._alloc_chunk(0) < 0
                or ff_io_alloc(&st.tx, batch, st.port_be) < 0 or ff_io_alloc(&st.rx, batch, st.port_be) < 0):
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

    cdef int _alloc_chunk(self, uint32_t chunk) except? -1:
        """Allocate the (zeroed) tx and rx counter blocks of chunk ``chunk`` if missing; 0 or -1 (no memory).

        Called with the GIL, before any command naming an id of the chunk is sent: the ctl socket orders the pointer
        stores before the loop's loads. Chunks are never moved or freed before close()."""
        cdef ff_state *st = self.st
        if st.ptx[chunk] == NULL:
            st.ptx[chunk] = <ff_peer_tx *>PyMem_RawCalloc(FF_PEER_CHUNK, sizeof(ff_peer_tx))
        if st.prx[chunk] == NULL:
            st.prx[chunk] = <ff_peer_rx *>PyMem_RawCalloc(FF_PEER_CHUNK, sizeof(ff_peer_rx))
        return 0 if st.ptx[chunk] != NULL and st.prx[chunk] != NULL else -1

    def reset_peer(self, uint32_t pid):
        """Make peer id ``pid``'s counter blocks exist and zero them. Only for an id that no route and no peer
        entry uses (the facade calls it before the PEER_ADD that hands the id out): no loop writes it meanwhile."""
        if self.st == NULL:
            raise ValueError("FastPath is closed")
        if not 0 < pid < self.st.peer_cap:
            raise ValueError(f"peer id {pid} out of range 1..{self.st.peer_cap - 1}")
        if self._alloc_chunk(pid >> FF_PEER_SHIFT) < 0:
            raise MemoryError("cannot allocate per-peer counters")
        memset(ff_ptx(self.st, pid), 0, sizeof(ff_peer_tx))
        memset(ff_prx(self.st, pid), 0, sizeof(ff_peer_rx))

    def peer_counters(self, uint32_t pid):
        """Return peer id ``pid``'s counters in _fastpath_py.PEER_COUNTER_NAMES order (relaxed loads; safe while
        the loops run); zeros for an id whose chunk does not exist."""
        cdef ff_peer_tx *t
        cdef ff_peer_rx *r
        if self.st == NULL:
            raise ValueError("FastPath is closed")
        if pid >= self.st.peer_cap or self.st.ptx[pid >> FF_PEER_SHIFT] == NULL:
            return (0,) * 8
        t = ff_ptx(self.st, pid)
        r = ff_prx(self.st, pid)
        return (ff_load(&t.packets), ff_load(&t.bytes), ff_load(&t.drop_send), ff_load(&r.packets),
                ff_load(&r.bytes), ff_load(&r.drop_foreign_dest), ff_load(&r.drop_malformed), ff_load(&r.drop_ttl))

    cdef int _apply_direct(self, uint32_t cmd, uint32_t arg, uint32_t value, uint32_t pid) except -1:
        cdef int r = ff_apply(self.st, cmd, arg, value, pid)
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
        for t in cmds:
            cmd, arg, value = t[0], t[1], t[2]
            pid = t[3] if len(t) > 3 else 0
            if cmd not in (CMD_SET_ROUTE, CMD_DEL_ROUTE, CMD_PEER_ADD, CMD_PEER_DEL):
                raise ValueError(f"unknown command {cmd}")
            if ROLE_BOTH in self._running:
                role = ROLE_BOTH
            elif cmd in (CMD_SET_ROUTE, CMD_DEL_ROUTE):
                role = ROLE_TX
            else:
                role = ROLE_RX
            if role not in self._running:
                self._apply_direct(cmd, arg, value, pid)
                continue
            memset(&c, 0, sizeof(c))
            c.cmd = cmd
            c.arg = arg
            c.value = value
            c.pid = pid
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
        cdef uint32_t nh = 0, pid = 0
        cdef size_t ilen = 0
        cdef ff_verdict v
        self._check_idle()
        p = self.st.tx.bufs
        if n <= IPV4_MAX:
            memcpy(p, PyBytes_AS_STRING(packet), n)
        v = ff_out_one(self.st, p, n, &nh, &pid, self.st.tx.icmp, &ilen)
        if v == V_SEND:
            ff_add(&self.st.c[C_TX_PACKETS], 1)
            ff_add(&self.st.c[C_TX_BYTES], n)
            ff_add(&ff_ptx(self.st, pid).packets, 1)
            ff_add(&ff_ptx(self.st, pid).bytes, n)
            return _py.SEND, PyBytes_FromStringAndSize(<char *>p, n), nh
        if v == V_ICMP:
            return _py.ICMP, PyBytes_FromStringAndSize(<char *>self.st.tx.icmp, ilen), None
        return _VERDICTS[v], None, None

    def process_inbound(self, uint32_t src, bytes datagram not None):
        """Apply the UDP -> TUN rules to one datagram from ``src``; (verdict, bytes to write to the TUN)."""
        cdef Py_ssize_t n = PyBytes_GET_SIZE(datagram)
        cdef uint8_t *p
        cdef uint32_t pid = 0
        cdef ff_verdict v
        self._check_idle()
        p = self.st.rx.bufs
        if n <= IPV4_MAX:
            memcpy(p, PyBytes_AS_STRING(datagram), n)
        v = ff_in_one(self.st, src, p, n, &pid)
        if v == V_WRITE:
            ff_add(&self.st.c[C_RX_PACKETS], 1)
            ff_add(&self.st.c[C_RX_BYTES], n)
            ff_add(&ff_prx(self.st, pid).packets, 1)
            ff_add(&ff_prx(self.st, pid).bytes, n)
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
        cdef ff_peer_tx *pt
        nsend = ff_tx_process(self.st, count, &nicmp)
        for i in range(nsend):
            nbytes += self.st.tx.iov[i].iov_len
            pt = ff_ptx(self.st, self.st.tx.pids[i])
            ff_add(&pt.packets, 1)
            ff_add(&pt.bytes, self.st.tx.iov[i].iov_len)
        ff_add(&self.st.c[C_TX_BATCHES], 1)
        ff_count_batch(self.st, C_TX_BATCH_PACKETS, count)
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
        cdef ff_peer_rx *pr
        nwrite = ff_rx_process(self.st, count)
        for i in range(count):
            nbytes += self.st.rx.lens[i]
            if self.st.rx.lens[i]:
                pr = ff_prx(self.st, self.st.rx.pids[i])
                ff_add(&pr.packets, 1)
                ff_add(&pr.bytes, self.st.rx.lens[i])
        ff_add(&self.st.c[C_RX_BATCHES], 1)
        ff_count_batch(self.st, C_RX_BATCH_PACKETS, count)
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


# ---------------------------------------------------------------------------------------------------------
# offload core for tests (tests/test_offload.py compares these with the twin's pure-Python reference)

def gso_split(bytes buf not None):
    """Split one TUN read (virtio_net_hdr + packet) as the tx loop does; return the list of IPv4 packets.

    Raises ValueError for an unusable header or packet (the loop counts it tx_drop_malformed).
    """
    cdef Py_ssize_t n = PyBytes_GET_SIZE(buf)
    cdef uint8_t *out
    cdef uint32_t lens[FF_SEGS_MAX]
    cdef int k, tso = 0
    cdef size_t pos = 0
    if n > FF_RBUF:
        raise ValueError("longer than one TUN read")
    out = <uint8_t *>PyMem_RawMalloc(FF_SEG_ROOM)
    if out == NULL:
        raise MemoryError()
    try:
        k = ff_gso_split(<const uint8_t *>PyBytes_AS_STRING(buf), <size_t>n, out, FF_SEG_ROOM, lens,
                         FF_SEGS_MAX, &tso)
        if k < 0:
            raise ValueError("unusable virtio_net_hdr or packet" if k == -1 else "too many segments")
        res = []
        for i in range(k):
            res.append(PyBytes_FromStringAndSize(<char *>out + pos, lens[i]))
            pos += lens[i]
        return res
    finally:
        PyMem_RawFree(out)


def gro_coalesce(packets):
    """Coalesce IPv4 packets as the rx loop does before its TUN writes; return the writes (virtio_net_hdr +
    packet each), in order. Packets longer than 65535 bytes raise ValueError."""
    cdef ff_io io
    cdef bytes b
    cdef unsigned int k
    cdef size_t n
    memset(&io, 0, sizeof(io))
    io.wslots = <uint8_t *>PyMem_RawMalloc(<size_t>FF_WSLOTS * FF_WSLOT)
    io.items = <ff_item *>PyMem_RawCalloc(FF_WSLOTS, sizeof(ff_item))
    res = []
    try:
        if io.wslots == NULL or io.items == NULL:
            raise MemoryError()
        for b in packets:
            if PyBytes_GET_SIZE(b) > IPV4_MAX:
                raise ValueError("packet longer than 65535 bytes")
            if ff_gro_add(&io, <const uint8_t *>PyBytes_AS_STRING(b), PyBytes_GET_SIZE(b), 0):
                for k in range(io.nout):
                    n = ff_gro_finish(&io, k)
                    res.append(PyBytes_FromStringAndSize(<char *>io.wslots + <size_t>k * FF_WSLOT, n))
                io.nout = 0
                ff_gro_add(&io, <const uint8_t *>PyBytes_AS_STRING(b), PyBytes_GET_SIZE(b), 0)
        for k in range(io.nout):
            n = ff_gro_finish(&io, k)
            res.append(PyBytes_FromStringAndSize(<char *>io.wslots + <size_t>k * FF_WSLOT, n))
        return res
    finally:
        PyMem_RawFree(io.wslots)
        PyMem_RawFree(io.items)
