# SPDX-License-Identifier: Apache-2.0
"""Declare includes/fastpath.h (relaxed-atomic counter helpers) for _fastpath.pyx."""
from libc.stdint cimport uint64_t


cdef extern from "fastpath.h" nogil:
    int FASTFLANNEL_DEBUG
    void ff_add(uint64_t *p, uint64_t v)
    void ff_add_shared(uint64_t *p, uint64_t v)
    uint64_t ff_load(uint64_t *p)
