# SPDX-License-Identifier: Apache-2.0
"""Load/store helpers and checksums (included by _fastpath.pyx; nogil, no Python objects).

Packet fields are big endian and read byte by byte (no pointer casts onto packet memory); virtio_net_hdr fields
are host order (no TUNSETVNETLE/BE): ld16n/st16n. Checksums are summed in native order (ff_sum_native, fastpath.h)
and stored with a native 16-bit store, which is right on either endianness (RFC 1071 s.2): the one checksum
routine of the extension.
"""


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
    """Compute the IPv4 header checksum of ip[0:ihl] into ip[10:12]."""
    ip[10] = 0
    ip[11] = 0
    st16n(ip + 10, <uint16_t>~ff_fold(ff_sum_native(ip, ihl, 0)))


cdef inline bint ff_tcp_csum_ok(const uint8_t *ip, size_t n, size_t ihl) noexcept nogil:
    return ff_fold(ff_pseudo(ip, <uint32_t>(n - ihl), IPPROTO_TCP) + ff_sum_native(ip + ihl, n - ihl, 0)) == 0xFFFF
