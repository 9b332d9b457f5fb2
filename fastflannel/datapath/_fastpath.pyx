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
# EWOULDBLOCK == EAGAIN on Linux (asm-generic/errno.h): testing EAGAIN covers both. EBADF, ENOMEM, EPIPE and the
# other fatal errnos come with the contract (includes/contract.pxd, cimported by _fastpath.pxd).
from libc.errno cimport EAGAIN, EINTR, EIO, ETIMEDOUT, errno
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy, memset
from posix.mman cimport MAP_ANONYMOUS, MAP_FAILED, MAP_PRIVATE, PROT_READ, PROT_WRITE, mmap, munmap
from posix.uio cimport iovec, writev
from posix.unistd cimport close, read, write

from fastflannel.datapath.includes.fastpath cimport (
    FASTFLANNEL_DEBUG, ff_add, ff_add_shared, ff_fold, ff_load, ff_set_errno, ff_sum_native,
)
from fastflannel.datapath.includes.system cimport (
    AF_INET,
    CMSG_DATA,
    CMSG_FIRSTHDR,
    CMSG_LEN,
    CMSG_NXTHDR,
    CMSG_SPACE,
    EFD_CLOEXEC,
    EFD_NONBLOCK,
    MSG_DONTWAIT,
    MSG_TRUNC,
    POLLERR,
    POLLHUP,
    POLLIN,
    POLLNVAL,
    POLLOUT,
    cmsghdr,
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
    SCHED_FIFO,
    SCHED_OTHER,
    SCHED_RR,
    sched_getparam,
    sched_getscheduler,
    sched_param,
    sched_setscheduler,
    sched_yield,
    sendto,
    sockaddr_in,
)
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

import socket as _socket
import time as _time

from fastflannel.datapath import contract as _contract
from fastflannel.datapath.contract import COUNTER_NAMES, FastPathError, fastpath_error

IMPLEMENTATION = "cython"
SYNC_TIMEOUT_S = 5.0

if FF_CONTRACT_HASH != _contract.contract_hash():
    raise ImportError("fastflannel.datapath._fastpath was built from another contract.py than the one installed "
                      "(counters, commands or constants differ); rebuild it: make compile")

_VERDICTS = _contract.VERDICTS  # indexed by ff_verdict


# The parts, by concern (uvloop's layout). Every function in them is noexcept nogil and touches no Python object,
# except testing.pxi (Python entry points over the same functions).
include "parts/debug.pxi"
include "parts/bytes.pxi"
include "parts/rules.pxi"
include "parts/count.pxi"
include "parts/peers.pxi"
include "parts/offload.pxi"
include "parts/loop.pxi"
include "parts/loop_offload.pxi"
include "parts/run.pxi"
include "parts/memory.pxi"


_STAGES = {
    S_POLL: "poll on fd {fd}", S_TUN_READ: "read from tun fd {tun}", S_UDP_SEND: "send on udp fd {udp}",
    S_UDP_RECV: "recv on udp fd {udp}", S_TUN_WRITE: "write to tun fd {tun}", S_CTL: "ctl channel",
    S_PEERS: "peer set",
}


cdef class Proxy:
    """Own the C state of one fast path and run its nogil loop(s); same surface as twin.Proxy.

    Addresses are host-order ints. The caller keeps tun_fd and udp_fd; the Proxy owns its eventfd, its ctl
    socketpairs and all C memory, released by close() (or __dealloc__) once no loop runs.
    """

    def __cinit__(self, int tun_fd, int udp_fd, uint32_t net, int net_plen, int subnet_len, uint32_t own_net,
                  int own_plen, uint32_t tun_ip, int mtu, int port, bint check_peer_source,
                  bint check_inner_dest, unsigned int batch, *, unsigned int spin=8, bint tun_offload=False,
                  bint udp_gso=True, bint udp_gro=False, unsigned int busy_poll_us=0, bint tun_uso=False,
                  unsigned int demote_after=0):
        cdef ff_state *st
        self._ctl = [None, None, None]
        self._ctl_fd[0] = self._ctl_fd[1] = self._ctl_fd[2] = -1
        self._running = set()
        self._closed = False
        self._seq = 0
        if not 0 <= net_plen < subnet_len <= 32 or batch < 1 or not 0 < port < 65536:
            raise ValueError("invalid fast path configuration")
        st = <ff_state *>ff_calloc(1, sizeof(ff_state))
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
        st.busy_ns = <int64_t>busy_poll_us * 1000
        st.demote_after = demote_after
        st.vnet = tun_offload
        st.gso = udp_gso and tun_offload  # segments to send in runs exist only in offload mode
        st.gro = udp_gro
        st.rx.uso = tun_uso and tun_offload  # UDP runs are written with a virtio header: offload mode only
        st.table = <uint32_t *>ff_calloc(st.table_size, sizeof(uint32_t))
        st.table_pid = <uint32_t *>ff_calloc(st.table_size, sizeof(uint32_t))
        st.peers.cap = FF_PEERS_MIN
        st.peers.keys = <uint32_t *>ff_calloc(FF_PEERS_MIN, sizeof(uint32_t))
        st.peers.pids = <uint32_t *>ff_calloc(FF_PEERS_MIN, sizeof(uint32_t))
        st.peer_cap = st.table_size + 1  # ids 1..table_size (never more peers than routes) + 0, the "other" block
        st.peer_chunks = (st.peer_cap + FF_PEER_CHUNK - 1) >> FF_PEER_SHIFT
        st.ptx = <ff_peer_tx **>ff_calloc(st.peer_chunks, sizeof(ff_peer_tx *))
        st.prx = <ff_peer_rx **>ff_calloc(st.peer_chunks, sizeof(ff_peer_rx *))
        if (st.table == NULL or st.table_pid == NULL or st.peers.keys == NULL or st.peers.pids == NULL
                or st.ptx == NULL or st.prx == NULL or self._alloc_chunk(0) < 0
                or ff_io_alloc(&st.tx, batch, st.port_be) < 0 or ff_io_alloc(&st.rx, batch, st.port_be) < 0):
            raise MemoryError(f"cannot allocate the fast path's buffers (batch {batch}, {st.table_size} routes)")
        ff_prefault(st)
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
            st.ptx[chunk] = <ff_peer_tx *>ff_calloc(FF_PEER_CHUNK, sizeof(ff_peer_tx))
        if st.prx[chunk] == NULL:
            st.prx[chunk] = <ff_peer_rx *>ff_calloc(FF_PEER_CHUNK, sizeof(ff_peer_rx))
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
        """Return peer id ``pid``'s counters in contract.PEER_COUNTER_NAMES order (relaxed loads; safe while
        the loops run); zeros for an id whose chunk does not exist."""
        cdef ff_peer_tx *t
        cdef ff_peer_rx *r
        if self.st == NULL:
            raise ValueError("FastPath is closed")
        cdef int i
        if pid >= self.st.peer_cap or self.st.ptx[pid >> FF_PEER_SHIFT] == NULL:
            return (0,) * (FF_PEER_TX_N + FF_PEER_RX_N)
        t = ff_ptx(self.st, pid)
        r = ff_prx(self.st, pid)
        # the blocks are uint64_t fields in PEER_TX_FIELDS / PEER_RX_FIELDS order (generated from the contract)
        return (tuple([ff_load(&(<uint64_t *>t)[i]) for i in range(FF_PEER_TX_N)])
                + tuple([ff_load(&(<uint64_t *>r)[i]) for i in range(FF_PEER_RX_N)]))

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
                    raise fastpath_error(EPIPE, f"{_contract.ROLE_NAMES[role]} loop stopped before applying routes")
                if _time.monotonic() > deadline:
                    raise fastpath_error(ETIMEDOUT, f"{_contract.ROLE_NAMES[role]} loop did not apply routes in time")
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
            raise RuntimeError(f"{_contract.ROLE_NAMES[role]} loop already started")
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
        cdef uint64_t packets = 0, nbytes = 0
        cdef ff_verdict v
        self._check_idle()
        p = self.st.tx.bufs
        if n <= IPV4_MAX:
            memcpy(p, PyBytes_AS_STRING(packet), n)
        v = ff_out_one(self.st, p, n, &nh, &pid, self.st.tx.icmp, &ilen)
        if v == V_SEND:  # counted as the loop counts a packet the UDP socket accepted
            ff_tx_sent(self.st, pid, 1, n, &packets, &nbytes)
            ff_tx_done(self.st, 0, packets, nbytes)
            return _contract.SEND, PyBytes_FromStringAndSize(<char *>p, n), nh
        if v == V_ICMP:
            return _contract.ICMP, PyBytes_FromStringAndSize(<char *>self.st.tx.icmp, ilen), None
        return _VERDICTS[v], None, None

    def process_inbound(self, uint32_t src, bytes datagram not None):
        """Apply the UDP -> TUN rules to one datagram from ``src``; (verdict, bytes to write to the TUN)."""
        cdef Py_ssize_t n = PyBytes_GET_SIZE(datagram)
        cdef uint8_t *p
        cdef uint32_t pid = 0
        cdef uint64_t packets = 0, nbytes = 0
        cdef ff_verdict v
        self._check_idle()
        p = self.st.rx.bufs
        if n <= IPV4_MAX:
            memcpy(p, PyBytes_AS_STRING(datagram), n)
        v = ff_in_one(self.st, src, p, n, &pid)
        if v == V_WRITE:  # counted as the loop counts a packet written to the TUN
            ff_rx_written(self.st, pid, 1, n, &packets, &nbytes)
            ff_rx_done(self.st, 0, packets, nbytes)
            return _contract.WRITE, PyBytes_FromStringAndSize(<char *>p, n)
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
        """The loop's ff_tx_burst without its I/O: the same decide and count routines, every message accepted."""
        cdef unsigned int nicmp = 0, nsend
        cdef uint64_t packets = 0, nbytes = 0
        nsend = ff_tx_decide(self.st, count, &nicmp)
        ff_tx_count_sent(self.st, 0, nsend, &packets, &nbytes)
        ff_tx_done(self.st, 0, packets, nbytes)
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
        """The loop's ff_rx_burst without its I/O: the same decide and count routines, every TUN write done."""
        cdef unsigned int nwrite, i
        cdef uint64_t packets = 0, nbytes = 0
        cdef ff_io *io = &self.st.rx
        nwrite = ff_rx_decide(self.st, count)
        for i in range(count):
            if io.lens[i]:
                ff_rx_written(self.st, io.pids[i], 1, io.lens[i], &packets, &nbytes)
        ff_rx_done(self.st, 0, packets, nbytes)
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
            raise fastpath_error(-rc, f"{_contract.ROLE_NAMES[role]} loop: {where}")


include "parts/testing.pxi"
