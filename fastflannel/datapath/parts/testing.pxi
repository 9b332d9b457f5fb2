# SPDX-License-Identifier: Apache-2.0
"""Offload core for tests: tests/datapath/test_offload.py compares these with the twin's pure-Python reference.
They call the same nogil functions the loop runs."""


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
    out = <uint8_t *>ff_malloc(FF_SEG_ROOM)
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
        ff_free(out)


def gro_coalesce(packets, bint uso=True):
    """Coalesce IPv4 packets as the rx loop does before its TUN writes (UDP runs too unless ``uso`` is false);
    return the writes (virtio_net_hdr + packet each), in order. Packets longer than 65535 bytes raise ValueError."""
    cdef ff_io io
    cdef bytes b
    cdef unsigned int k
    cdef size_t n
    memset(&io, 0, sizeof(io))
    io.uso = uso
    io.wslots = <uint8_t *>ff_malloc(<size_t>FF_WSLOTS * FF_WSLOT)
    io.items = <ff_item *>ff_calloc(FF_WSLOTS, sizeof(ff_item))
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
        ff_free(io.wslots)
        ff_free(io.items)


def busy_window_next(long long window, long long max_ns, int event, long long slept_ns=0):
    """The loop's busy-poll window policy (ff_busy_next) for tests: twin.busy_window_next must agree."""
    return ff_busy_next(window, max_ns, event, slept_ns)


def thin_next(unsigned int thin, int src, int last_src, long long gap_ns):
    """The loop's thin wake-up count (ff_thin_next) for tests: twin.thin_next must agree."""
    return ff_thin_next(thin, src, last_src, gap_ns)
