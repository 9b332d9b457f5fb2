# SPDX-License-Identifier: Apache-2.0
"""Declare includes/fastpath.h (relaxed-atomic counter helpers, checksum, errno) for _fastpath.pyx."""
from libc.stdint cimport uint8_t, uint16_t, uint64_t


cdef extern from "fastpath.h" nogil:
    int FASTFLANNEL_DEBUG
    void ff_add(uint64_t *p, uint64_t v)
    void ff_add_shared(uint64_t *p, uint64_t v)
    uint64_t ff_load(uint64_t *p)
    uint64_t ff_sum_native(const uint8_t *p, size_t n, uint64_t s)
    uint16_t ff_fold(uint64_t s)
    void ff_set_errno(int e)
