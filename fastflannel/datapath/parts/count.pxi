# SPDX-License-Identifier: Apache-2.0
"""Counting: the one set of routines that the loops (loop.pxi, loop_offload.pxi) and the process_* test entry
points of Proxy use, so the oracle tests comparing Cython with the twin check the loop's own counting.

A burst sums its packets and bytes in locals and adds them once (ff_tx_done / ff_rx_done); a peer's block is
added to as each send or write succeeds. Drops are counted where they are decided (rules.pxi, the I/O sites).
"""


cdef inline void ff_count_batch(ff_state *st, int base, uint64_t n) noexcept nogil:
    """Count one burst of ``n`` packets: c[base] += n (the sum), and its bucket (<=1, <=4, <=16, <=64, >64)."""
    ff_add(&st.c[base], n)
    ff_add(&st.c[base + 1 + ff_batch_bucket(n)], 1)


cdef inline void ff_tx_batch(ff_state *st, uint64_t n) noexcept nogil:
    """Count one non-empty tx burst of ``n`` packets (TSO segments counted one by one)."""
    ff_add(&st.c[C_TX_BATCHES], 1)
    ff_count_batch(st, C_TX_BATCH_PACKETS, n)


cdef inline void ff_rx_batch(ff_state *st, uint64_t n) noexcept nogil:
    """Count one non-empty rx burst of ``n`` datagrams."""
    ff_add(&st.c[C_RX_BATCHES], 1)
    ff_count_batch(st, C_RX_BATCH_PACKETS, n)


cdef inline void ff_tx_sent(ff_state *st, uint32_t pid, uint64_t pkts, uint64_t nbytes, uint64_t *tot_pkts,
                            uint64_t *tot_bytes) noexcept nogil:
    """Count ``pkts`` inner packets of ``nbytes`` bytes accepted by the UDP socket for peer id ``pid``: in its
    block now, in the burst's totals (added to the counters by ff_tx_done)."""
    cdef ff_peer_tx *pt = ff_ptx(st, pid)
    tot_pkts[0] += pkts
    tot_bytes[0] += nbytes
    ff_add(&pt.packets, pkts)
    ff_add(&pt.bytes, nbytes)


cdef inline void ff_rx_written(ff_state *st, uint32_t pid, uint64_t pkts, uint64_t nbytes, uint64_t *tot_pkts,
                               uint64_t *tot_bytes) noexcept nogil:
    """Count ``pkts`` inner packets of ``nbytes`` bytes from peer id ``pid`` written to the TUN (as ff_tx_sent)."""
    cdef ff_peer_rx *pr = ff_prx(st, pid)
    tot_pkts[0] += pkts
    tot_bytes[0] += nbytes
    ff_add(&pr.packets, pkts)
    ff_add(&pr.bytes, nbytes)


cdef inline void ff_tx_drop_send(ff_state *st, uint32_t pid, uint64_t pkts) noexcept nogil:
    """Count ``pkts`` inner packets for peer id ``pid`` whose UDP send failed (EPERM, ENETUNREACH, EMSGSIZE...)."""
    ff_add(&st.c[C_TX_DROP_SEND], pkts)
    ff_add(&ff_ptx(st, pid).drop_send, pkts)


cdef inline void ff_tx_count_sent(ff_state *st, unsigned int lo, unsigned int hi, uint64_t *tot_pkts,
                                  uint64_t *tot_bytes) noexcept nogil:
    """Count the plain tx messages msgs[lo:hi] (one inner packet each) as accepted by the UDP socket."""
    cdef unsigned int i
    for i in range(lo, hi):
        ff_tx_sent(st, st.tx.pids[i], 1, st.tx.iov[i].iov_len, tot_pkts, tot_bytes)


cdef inline void ff_tx_done(ff_state *st, uint64_t syscalls, uint64_t pkts, uint64_t nbytes) noexcept nogil:
    """Add a tx burst's syscalls and the totals ff_tx_sent summed."""
    ff_add(&st.c[C_TX_SYSCALLS], syscalls)
    ff_add(&st.c[C_TX_PACKETS], pkts)
    ff_add(&st.c[C_TX_BYTES], nbytes)


cdef inline void ff_rx_done(ff_state *st, uint64_t syscalls, uint64_t pkts, uint64_t nbytes) noexcept nogil:
    """Add an rx burst's syscalls and the totals ff_rx_written summed."""
    ff_add(&st.c[C_RX_SYSCALLS], syscalls)
    ff_add(&st.c[C_RX_PACKETS], pkts)
    ff_add(&st.c[C_RX_BYTES], nbytes)
