# SPDX-License-Identifier: Apache-2.0
"""The peer set (owned by the rx loop, or by Python while no rx loop runs), per-peer counter blocks, and the
route/peer commands the ctl channel carries (ff_apply)."""


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
    ff_check(ps.count * 2 <= ps.cap)
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
        new_pids = <uint32_t *>ff_calloc(old_cap * 2, sizeof(uint32_t))
        ps.keys = <uint32_t *>ff_calloc(old_cap * 2, sizeof(uint32_t))
        if ps.keys == NULL or new_pids == NULL:
            ff_free(ps.keys)
            ff_free(new_pids)
            ps.keys = old
            return -ENOMEM
        ps.pids = new_pids
        ps.cap = old_cap * 2
        ps.count = 0
        for i in range(old_cap):
            if old[i] != 0:
                ff_peer_insert(ps, old[i], old_pids[i])
        ff_free(old)
        ff_free(old_pids)
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
