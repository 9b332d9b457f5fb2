# SPDX-License-Identifier: Apache-2.0
"""The per-packet rules (twin: twin.py ``_out``/``_in``; table in docs/fastpath.md): header checks, TTL, ICMP.

ff_out_one (TUN -> UDP) and ff_in_one (UDP -> TUN) decide one packet in place and count its drop, never its send.
"""


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


cdef inline bint ff_echo_unreach_due(ff_state *st, const uint8_t *off, size_t n, size_t ihl) noexcept nogil:
    """An ICMP offender gets an error only if it is an echo request (RFC 1122 3.2.2: never about an ICMP error
    message; flannel sends none about any ICMP), at most one per ICMP_ECHO_UNREACH_GAP_NS (twin: _echo_due)."""
    cdef int64_t now
    if n <= ihl or off[ihl] != ICMP_ECHO_REQUEST:
        return False
    now = ff_now_ns()
    if now < st.icmp_echo_next_ns:
        return False
    st.icmp_echo_next_ns = now + ICMP_ECHO_UNREACH_GAP_NS
    return True


cdef size_t ff_icmp_unreach(ff_state *st, const uint8_t *off, size_t n, uint8_t *out) noexcept nogil:
    """Build flannel's ICMP net-unreachable about ``off`` into ``out``; return its length, 0 if none is due."""
    cdef size_t ihl = (off[0] & 0x0F) * 4
    cdef size_t quote = ihl + 8, have, total
    if (((<uint32_t>off[6] << 8) | off[7]) & FRAG_OFFSET_MASK) != 0:  # only about first fragments
        return 0
    if ihl >= IPV4_HDR_ICMP_LIMIT:
        return 0
    if off[9] == IPPROTO_ICMP and not ff_echo_unreach_due(st, off, n, ihl):
        return 0
    total = IPV4_HDR_MIN + 8 + quote
    memset(out, 0, total)
    have = n if n < quote else quote
    memcpy(out + IPV4_HDR_MIN + 8, off, have)  # offender header + 8 bytes, zero-padded
    out[IPV4_HDR_MIN] = ICMP_DEST_UNREACH
    out[IPV4_HDR_MIN + 1] = ICMP_NET_UNREACH
    st16n(out + IPV4_HDR_MIN + 2, <uint16_t>~ff_fold(ff_sum_native(out + IPV4_HDR_MIN, 8 + quote, 0)))
    out[0] = 0x45
    out[2] = <uint8_t>(total >> 8)
    out[3] = <uint8_t>total
    out[8] = ICMP_TTL
    out[9] = IPPROTO_ICMP
    st32(out + 12, st.tun_ip)
    memcpy(out + 16, off + 12, 4)
    ff_ip_csum(out, IPV4_HDR_MIN)
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
