# SPDX-License-Identifier: Apache-2.0
"""Offloads (wireguard-go keeps them apart too): TSO split on the TUN read side, TCP and UDP coalescing on the TUN
write side (fastpath research notes 1.3/1.4). Pure buffer work, no I/O; the offload loop (loop_offload.pxi) calls it."""


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


cdef inline bint ff_uso_candidate(const uint8_t *p, size_t n) noexcept nogil:
    """A well-formed IPv4 packet (ff_malformed passed) that may join a UDP run: IHL 5, UDP, no fragment, the UDP
    length field covering exactly the rest of the packet, payload > 0, and a checksum that is absent (0) or right."""
    if p[0] != 0x45 or p[9] != IPPROTO_UDP or (p[6] & 0x3F) != 0 or p[7] != 0 or n < 29 or ld16(p + 24) != n - 20:
        return False
    if p[26] == 0 and p[27] == 0:
        return True
    return ff_fold(ff_pseudo(p, <uint32_t>(n - 20), IPPROTO_UDP) + ff_sum_native(p + 20, n - 20, 0)) == 0xFFFF


cdef void ff_gro_reset(ff_io *io) noexcept nogil:
    io.nout = 0


cdef int ff_gro_add(ff_io *io, const uint8_t *p, size_t n, uint32_t pid) noexcept nogil:
    """Queue inner packet p[0:n] from peer id ``pid`` (rules already applied) for the TUN: append it to an open run
    of its flow (same peer) or start a new write slot. Returns 0, or 1 if the slots are full (flush, call again).

    TCP runs (fastpath.md 1.4): consecutive sequence numbers, equal headers and options, no segment larger than
    the first; a shorter or PSH segment closes the run. UDP runs (io.uso): datagrams of one flow with the first
    one's payload size, up to FF_USO_SEGS; a shorter one closes the run (the kernel's UDP GSO cuts at gso_size).
    Both need equal TOS, TTL and IP flags and a checksum that verifies."""
    cdef ff_item *it
    cdef ff_item *head
    cdef uint8_t *slot
    cdef uint8_t *hp
    cdef size_t hlen = 0, pay
    cdef uint32_t src, dst, ports, ack = 0, seq = 0
    cdef uint8_t proto = 0
    cdef int j
    if ff_gro_candidate(p, n) and ff_tcp_csum_ok(p, n, 20):
        proto = IPPROTO_TCP
        hlen = 20 + (p[32] >> 4) * 4
        ack = ld32(p + 28)
        seq = ld32(p + 24)
    elif io.uso and ff_uso_candidate(p, n):
        proto = IPPROTO_UDP
        hlen = 28
    if proto:
        pay = n - hlen
        src = ld32(p + 12)
        dst = ld32(p + 16)
        ports = ld32(p + 20)
        j = <int>io.nout - 1
        while j >= 0:  # newest first; the first item of the same flow decides
            it = &io.items[j]
            if (it.open and it.proto == proto and it.src == src and it.dst == dst and it.ports == ports
                    and it.ack == ack and it.pid == pid):
                hp = io.wslots + <size_t>j * FF_WSLOT + FF_VNET
                if proto == IPPROTO_UDP:
                    if (pay <= it.gso and it.count < FF_USO_SEGS and it.len + pay <= IPV4_MAX
                            and hp[1] == p[1] and hp[8] == p[8] and hp[6] == p[6]):
                        memcpy(hp + it.len, p + hlen, pay)
                        it.len += <uint32_t>pay
                        it.in_bytes += <uint32_t>n
                        it.count += 1
                        if pay < it.gso or it.count == FF_USO_SEGS:
                            it.open = 0
                        return 0
                    it.open = 0  # one open run per UDP flow: an older one must never take a later datagram
                elif (it.hlen == hlen and it.next_seq == seq and pay <= it.gso and it.len + pay <= IPV4_MAX
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
        it.open = 0 if proto == IPPROTO_TCP and p[33] & TCP_PSH else 1
    else:
        if io.uso and p[9] == IPPROTO_UDP and n >= 24:  # a datagram of an open run's flow that cannot join it
            src = ld32(p + 12)  # closes the run, or the next one would overtake it
            dst = ld32(p + 16)
            ports = ld32(p + 20)
            for j in range(<int>io.nout):
                it = &io.items[j]
                if it.open and it.proto == IPPROTO_UDP and it.src == src and it.dst == dst and it.ports == ports:
                    it.open = 0
        if io.nout == FF_WSLOTS:
            return 1
        it = &io.items[io.nout]
        it.open = 0
        it.hlen = 0
        it.gso = 0
    it.proto = proto
    slot = io.wslots + <size_t>io.nout * FF_WSLOT
    memcpy(slot + FF_VNET, p, n)
    it.pid = pid
    it.len = <uint32_t>n
    it.in_bytes = <uint32_t>n
    it.count = 1
    io.nout += 1
    ff_check(io.nout <= FF_WSLOTS)
    return 0


cdef size_t ff_gro_finish(ff_io *io, unsigned int k) noexcept nogil:
    """Write the virtio_net_hdr of slot k (and fix a merged run's IP header and partial TCP checksum); return the
    bytes to write (header included)."""
    cdef ff_item *it = &io.items[k]
    cdef uint8_t *slot = io.wslots + <size_t>k * FF_WSLOT
    cdef uint8_t *ip = slot + FF_VNET
    ff_check(k < io.nout and FF_VNET + it.len <= FF_WSLOT)
    memset(slot, 0, FF_VNET)
    if it.count > 1:
        slot[0] = VIRTIO_F_NEEDS_CSUM
        st16n(slot + 2, it.hlen)
        st16n(slot + 4, it.gso)
        st16n(slot + 6, 20)
        st16(ip + 2, it.len)
        ff_ip_csum(ip, 20)
        if it.proto == IPPROTO_UDP:  # the kernel gives every datagram its own length and checksum
            slot[1] = VIRTIO_GSO_UDP_L4
            st16n(slot + 8, 6)
            st16(ip + 24, it.len - 20)
            st16n(ip + 26, ff_fold(ff_pseudo(ip, it.len - 20, IPPROTO_UDP)))  # folded, not complemented
        else:
            slot[1] = VIRTIO_GSO_TCPV4
            st16n(slot + 8, 16)
            st16n(ip + 36, ff_fold(ff_pseudo(ip, it.len - 20, IPPROTO_TCP)))
    return FF_VNET + it.len
