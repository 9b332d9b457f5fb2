# SPDX-License-Identifier: Apache-2.0
"""Lay out the fast path's C state: counters, the ctl wire struct, batch buffers, route table, peer set, Proxy.

The ctl wire struct ``ff_command`` is defined here and nowhere else; it is packed only in _fastpath.pyx. Counter
slots, verdicts, commands, roles, wire constants and the per-peer counter blocks come from the contract
(``includes/contract.pxd``, generated from ``contract.py``).
"""
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from posix.uio cimport iovec

from fastflannel.datapath.includes.contract cimport *  # generated from contract.py by setup.py
from fastflannel.datapath.includes.system cimport mmsghdr, sockaddr_in


cdef enum:
    FF_SLOT = 65536  # bytes per packet buffer: any IPv4 packet (<= 65535) fits, so nothing is truncated
    FF_ICMP_MAX = 96  # 20 IP + 8 ICMP + quoted header (< 60, flannel) + 8 payload bytes, rounded up
    FF_CTL_BURST = 256  # commands applied per wake-up before the data fds get their turn
    FF_PEERS_MIN = 16  # initial peer hash capacity (power of two)
    # offload mode (TUN IFF_VNET_HDR + TSO; UDP GSO/GRO): docs/fastpath.md "Offloads"; FF_VNET (virtio_net_hdr),
    # FF_SEGS_MAX (segments per super-packet) and FF_WSLOTS (rx pending TUN writes) come from the contract
    FF_RBUF = FF_VNET + FF_SLOT  # one TUN read: header + any IPv4 packet
    FF_TX_READS = 8  # TUN reads (super-packets) per tx burst
    FF_SEG_ROOM = 98304  # arena bytes one split may need: 256 x 120 header bytes + 65535 payload, rounded up
    FF_ARENA = FF_TX_READS * FF_SEG_ROOM
    FF_TXMSG_MAX = 1024  # sendmmsg messages per tx burst (>= FF_TX_READS * FF_SEGS_MAX / 2 + slack)
    FF_GSO_SEGS = 64  # UDP_MAX_SEGMENTS
    FF_GSO_BYTES = 65507  # largest UDP payload of one IPv4 GSO send
    FF_CMSG = 64  # control buffer per message (UDP_SEGMENT u16 / UDP_GRO int)
    FF_WSLOT = FF_VNET + FF_SLOT


# Where a loop failed (for the error message built at the GIL boundary)
cdef enum ff_stage:
    S_NONE
    S_POLL
    S_TUN_READ
    S_UDP_SEND
    S_UDP_RECV
    S_TUN_WRITE
    S_CTL
    S_PEERS


# The ctl wire struct: native endian, 20 bytes, one per SOCK_SEQPACKET message. cmd is CMD_* of the contract
# (SET_ROUTE 1: arg = table index, value = next hop, pid = its peer id; DEL_ROUTE 2: arg = index; PEER_ADD 3:
# value = peer address, pid = its peer id; PEER_DEL 4: value = peer address) or CMD_SYNC, which the loop echoes
# back unchanged once every earlier command is applied.
cdef struct ff_command:
    uint32_t cmd
    uint32_t arg
    uint32_t value  # an IPv4 address in host order
    uint32_t pid  # peer id: index of the peer's counter blocks (0: the "other" block)
    uint32_t seq


# Per-peer counters, one block per peer id in each direction (docs/fastpath.md "Counters"): ff_peer_tx and
# ff_peer_rx, generated from contract.PEER_TX_FIELDS / PEER_RX_FIELDS. A tx block is written only by the loop serving
# tx, an rx block only by the loop serving rx (separate arrays: no false sharing between the two threads); Python
# reads them with ff_load. Blocks live in chunks of FF_PEER_CHUNK that are allocated by Python (Proxy.reset_peer)
# before any command names one of their ids, and freed only by close().


# One pending TUN write in offload mode: a single packet or a coalesced TCP or UDP flow run (fastpath.md 1.4,
# append only).
cdef struct ff_item:
    uint32_t src
    uint32_t dst
    uint32_t ports
    uint32_t ack
    uint32_t next_seq
    uint32_t len  # IP bytes in the slot (after the vnet header)
    uint32_t in_bytes  # sum of the inner packets' lengths (rx_bytes)
    uint16_t gso  # payload bytes of the first segment
    uint16_t hlen  # IP + TCP header bytes
    uint16_t count  # packets merged
    uint8_t open  # 1: more segments may be appended
    uint8_t proto  # IPPROTO_TCP or IPPROTO_UDP for a run that may grow, 0 for a single packet written as is
    uint32_t pid  # peer id of the outer source (packets of different peers are never merged)


# One direction's batch: packet slots, their lengths and the mmsghdr/iovec/sockaddr arrays, set up once.
cdef struct ff_io:
    uint8_t *bufs  # batch * FF_SLOT (ff_pages, like rbuf, arena and wslots)
    size_t bufs_size
    uint32_t *lens
    uint32_t *srcs  # rx: outer source address per datagram (host order)
    uint32_t *pids  # tx: peer id per message in msgs; rx: peer id of the source per slot
    mmsghdr *msgs
    iovec *iov
    sockaddr_in *addrs
    uint8_t *icmp  # tx: batch * FF_ICMP_MAX
    uint32_t *icmp_lens
    # offload mode, tx: read buffer, segment arena, GSO messages (one per run of equal segments)
    uint8_t *rbuf
    uint8_t *arena
    size_t arena_used
    mmsghdr *gmsgs
    iovec *giov
    sockaddr_in *gaddrs
    uint8_t *gcmsg  # FF_TXMSG_MAX * FF_CMSG
    uint32_t *gsegs  # segments per message
    uint32_t *gseglen  # segment size per message
    uint32_t *gpids  # peer id per message
    unsigned int ngmsg
    # offload mode, rx: cmsg per received message, write slots and their coalescing items
    uint8_t *rcmsg  # batch * FF_CMSG
    uint8_t *wslots  # FF_WSLOTS * FF_WSLOT
    ff_item *items
    unsigned int nout
    bint uso  # coalesce UDP datagrams of one flow into VIRTIO_GSO_UDP_L4 writes (probed: Linux >= 6.2)




# Open-addressing (linear probing, backward-shift delete) set of peer addresses; 0 is the empty key.
cdef struct ff_peers:
    uint32_t *keys
    uint32_t *pids  # peer id per key (moves with its key)
    uint32_t cap
    uint32_t count


cdef struct ff_state:
    int tun_fd
    int udp_fd
    int stop_fd  # eventfd: written once by stop(), never read, so it stays readable for every loop
    uint32_t net
    uint32_t net_mask
    uint32_t own_net
    uint32_t own_mask
    uint32_t tun_ip
    int64_t icmp_echo_next_ns  # rate limit of net-unreachables about echo requests (ICMP_ECHO_UNREACH_GAP_NS)
    uint32_t shift  # 32 - subnet_len
    uint32_t table_size
    uint16_t port_be
    int check_peer
    int check_dest
    unsigned int batch
    unsigned int spin  # bursts read without poll() while a fd keeps returning data (0: poll every burst)
    int64_t busy_ns  # busy-poll window bound after a burst, ns (0: off; each loop adapts its own window below it)
    unsigned int demote_after  # thin wake-ups in a row before a real-time loop drops to SCHED_OTHER (0: never)
    int vnet  # TUN fd has IFF_VNET_HDR (+ TSO offloads): every read/write starts with a virtio_net_hdr
    int gso  # send split segments with UDP_SEGMENT (cleared on EIO)
    int gro  # the UDP socket has UDP_GRO: receives carry a segment size cmsg
    uint32_t *table  # next hop (host order) per subnet index; 0 = no route
    uint32_t *table_pid  # peer id of that next hop, per subnet index
    ff_peers peers
    uint32_t peer_cap  # peer ids 0..peer_cap-1 (table_size + 1: never more peers than routes)
    uint32_t peer_chunks
    ff_peer_tx **ptx  # peer_chunks pointers, NULL until Python allocates the chunk
    ff_peer_rx **prx
    ff_io tx
    ff_io rx
    uint64_t c[<int>FF_NCOUNTERS]


cdef class Proxy:
    cdef ff_state *st
    cdef list _ctl  # Python ends of the ctl socketpairs, by role (None until mark_running)
    cdef int _ctl_fd[3]  # loop ends, by role; -1 when absent
    cdef set _running
    cdef bint _closed
    cdef uint32_t _seq

    cdef int _alloc_chunk(self, uint32_t chunk) except? -1
    cdef int _apply_direct(self, uint32_t cmd, uint32_t arg, uint32_t value, uint32_t pid) except -1
    cdef _check_idle(self)
    cdef _close_fds(self)
    cdef unsigned int _tx_phase(self, unsigned int count)
    cdef unsigned int _rx_phase(self, unsigned int count)
