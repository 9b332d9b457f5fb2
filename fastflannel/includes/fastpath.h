/* SPDX-License-Identifier: Apache-2.0 */
/* Small C helpers for fastflannel/_fastpath.pyx: relaxed atomics for counters read while the loop runs. */
#ifndef FASTFLANNEL_FASTPATH_H
#define FASTFLANNEL_FASTPATH_H

#include <stdint.h>

#ifndef FASTFLANNEL_DEBUG
#define FASTFLANNEL_DEBUG 0
#endif

/* A counter has one writer (the thread serving its direction): a relaxed load + store is one plain aligned
 * 64-bit move on x86-64/arm64, cannot tear, and costs no locked instruction. Python reads with ff_load(). */
static inline void ff_add(uint64_t *p, uint64_t v) {
    __atomic_store_n(p, __atomic_load_n(p, __ATOMIC_RELAXED) + v, __ATOMIC_RELAXED);
}

/* Counters written by every loop thread (polls, ctl_commands): a locked add, once per poll, not per packet. */
static inline void ff_add_shared(uint64_t *p, uint64_t v) {
    __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
}

static inline uint64_t ff_load(uint64_t *p) {
    return __atomic_load_n(p, __ATOMIC_RELAXED);
}

#endif
