# SPDX-License-Identifier: Apache-2.0
"""Pick a free subnet for a new lease (flannel ``allocateSubnet``; pure, no I/O).

Flannel's rule: walk the candidates from SubnetMin upward in SubnetLen steps while <= SubnetMax, skip every
candidate that overlaps an existing lease, stop after ``MAX_CANDIDATES`` free ones and pick one uniformly at
random. Flannel tests each candidate against every lease (O(slots x leases)); here the leases become merged
intervals of blocked slot indices, so a nearly full /8 of /24s (65,536 slots) costs one sort of the leases and
one walk over the gaps, not 65,536 x 65,536 overlap tests.
"""
from __future__ import annotations

import random
from ipaddress import IPv4Network
from typing import Iterable, List, Optional, Tuple

from fastflannel.config import NetworkConfig
from fastflannel.subnet import OutOfSubnetsError

MAX_CANDIDATES = 100  # flannel collects at most 100 free subnets and picks one of them at random
DEFAULT_PREFIX = "/coreos.com/network"


def _blocked_slots(taken: Iterable[IPv4Network], lo: int, size: int, nslots: int) -> List[Tuple[int, int]]:
    """Return sorted, merged [first, last] slot-index ranges that overlap a taken network."""
    ranges: List[Tuple[int, int]] = []
    hi_excl = lo + nslots * size
    for net in taken:
        start = int(net.network_address)
        end = start + net.num_addresses  # exclusive
        if end <= lo or start >= hi_excl:
            continue
        first = max(0, (start - lo) // size)
        last = min(nslots - 1, (end - 1 - lo) // size)
        ranges.append((first, last))
    ranges.sort()
    merged: List[Tuple[int, int]] = []
    for first, last in ranges:
        if merged and first <= merged[-1][1] + 1:
            if last > merged[-1][1]:
                merged[-1] = (merged[-1][0], last)
        else:
            merged.append((first, last))
    return merged


def free_candidates(config: NetworkConfig, taken: Iterable[IPv4Network], limit: int = MAX_CANDIDATES) -> List[IPv4Network]:
    """Return up to ``limit`` free subnets in Flannel's walk order (lowest first)."""
    if config.network is None or config.subnet_min is None or config.subnet_max is None:
        raise ValueError("config has no IPv4 network to allocate from")
    size = 1 << (32 - config.subnet_len)
    lo = int(config.subnet_min)
    nslots = (int(config.subnet_max) - lo) // size + 1
    out: List[IPv4Network] = []
    slot = 0
    for first, last in _blocked_slots(taken, lo, size, nslots):
        while slot < first and len(out) < limit:
            out.append(IPv4Network((lo + slot * size, config.subnet_len)))
            slot += 1
        if len(out) >= limit:
            return out
        slot = max(slot, last + 1)
    while slot < nslots and len(out) < limit:
        out.append(IPv4Network((lo + slot * size, config.subnet_len)))
        slot += 1
    return out


def total_subnets(config: NetworkConfig) -> int:
    """Return how many subnets lie between SubnetMin and SubnetMax."""
    assert config.subnet_min is not None and config.subnet_max is not None
    size = 1 << (32 - config.subnet_len)
    return (int(config.subnet_max) - int(config.subnet_min)) // size + 1


def pick_subnet(
    config: NetworkConfig,
    taken: Iterable[IPv4Network],
    rng: Optional[random.Random] = None,
    prefix: str = DEFAULT_PREFIX,
) -> IPv4Network:
    """Return a free subnet chosen uniformly among the first 100 free ones; raise ``OutOfSubnetsError``."""
    candidates = free_candidates(config, taken)
    if not candidates:
        raise OutOfSubnetsError(
            f"out of subnets: all {total_subnets(config)} subnets of {config.network} between SubnetMin "
            f"{config.subnet_min} and SubnetMax {config.subnet_max} are leased; enlarge Network or remove "
            f"stale leases under {prefix.rstrip('/')}/subnets"
        )
    return (rng or random).choice(candidates)
