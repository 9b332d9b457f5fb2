# SPDX-License-Identifier: Apache-2.0
"""The debug build (``make debug``: FASTFLANNEL_DEBUG=1): allocation counters and checked invariants.

Every C buffer of the extension is allocated with ff_malloc/ff_calloc and released with ff_free (the large packet
buffers: ff_pages/ff_pages_free, whole pages from mmap). In the debug build they count allocations and releases
(atomically: the rx loop grows the peer set), and ff_check() counts violated invariants instead of aborting (the
loop never exits the process). ``debug_counters()`` reads them;
tests/datapath/conftest.py checks, around every test, that nothing leaked and no check failed. In the release build
FASTFLANNEL_DEBUG is the constant 0: the compiler removes all of it.
"""

cdef uint64_t ff_dbg_allocs = 0
cdef uint64_t ff_dbg_frees = 0
cdef uint64_t ff_dbg_check_failures = 0

DEBUG = bool(FASTFLANNEL_DEBUG)  # this module was built by `make debug`


cdef inline void *ff_malloc(size_t n) noexcept nogil:
    cdef void *p = PyMem_RawMalloc(n)
    if FASTFLANNEL_DEBUG and p != NULL:
        ff_add_shared(&ff_dbg_allocs, 1)
    return p


cdef inline void *ff_calloc(size_t n, size_t size) noexcept nogil:
    cdef void *p = PyMem_RawCalloc(n, size)
    if FASTFLANNEL_DEBUG and p != NULL:
        ff_add_shared(&ff_dbg_allocs, 1)
    return p


cdef inline void ff_free(void *p) noexcept nogil:
    if FASTFLANNEL_DEBUG and p != NULL:
        ff_add_shared(&ff_dbg_frees, 1)
    PyMem_RawFree(p)


cdef inline uint8_t *ff_pages(size_t n) noexcept nogil:
    """Fresh anonymous pages for a packet buffer (NULL if none): unlike malloc'd memory they are never pages an
    earlier allocation left resident, and ff_pages_free gives them back to the kernel at once (glibc would keep a
    freed block's pages while a later block lives above it)."""
    cdef void *p = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
    if p == MAP_FAILED:
        return NULL
    if FASTFLANNEL_DEBUG:
        ff_add_shared(&ff_dbg_allocs, 1)
    return <uint8_t *>p


cdef inline void ff_pages_free(uint8_t *p, size_t n) noexcept nogil:
    if p == NULL:
        return
    if FASTFLANNEL_DEBUG:
        ff_add_shared(&ff_dbg_frees, 1)
    munmap(p, n)


cdef inline void ff_check(bint ok) noexcept nogil:
    """Count a violated invariant (debug build only; free in the release build)."""
    if FASTFLANNEL_DEBUG and not ok:
        ff_add_shared(&ff_dbg_check_failures, 1)


def debug_counters():
    """Return {"debug": built by make debug, "allocs", "frees", "live" (allocs - frees), "check_failures"};
    the counts are 0 in the release build."""
    cdef uint64_t a = ff_load(&ff_dbg_allocs), f = ff_load(&ff_dbg_frees)
    return {"debug": DEBUG, "allocs": a, "frees": f, "live": a - f, "check_failures": ff_load(&ff_dbg_check_failures)}
