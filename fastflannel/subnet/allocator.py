# SPDX-License-Identifier: Apache-2.0
"""Pick a free subnet for a new lease (flannel ``allocateSubnet``; pure, no I/O).

Flannel's rule: walk the candidates from SubnetMin upward in SubnetLen steps while <= SubnetMax, skip every
candidate that overlaps an existing lease, stop after ``MAX_CANDIDATES`` free ones and pick one uniformly at
random. Flannel tests each candidate against every lease (O(slots x leases)); here the leases become merged
intervals of blocked slot indices, so a nearly full /8 of /24s (65,536 slots) costs one sort of the leases and
one walk over the gaps, not 65,536 x 65,536 overlap tests. The same walk serves IPv6 (``family=6``): a /48 of
/64s or even fc00::/8 (2**56 slots) costs no more, since nothing loops over slots beyond the 100 picked.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network
from typing import Iterable, List, Optional, Tuple, Union

from fastflannel.config import NetworkConfig
from fastflannel.subnet import OutOfSubnetsError

MAX_CANDIDATES = 100  # flannel collects at most 100 free subnets and picks one of them at random
DEFAULT_PREFIX = "/coreos.com/network"

Net = Union[IPv4Network, IPv6Network]


def _blocked_slots(taken: Iterable[Net], lo: int, size: int, nslots: int) -> List[Tuple[int, int]]:
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


@dataclass(frozen=True)
class _Range:
    """One family's allocation range out of the config: what ``free_candidates`` walks."""

    network: "IPv4Network | IPv6Network"
    subnet_len: int
    lo: int  # SubnetMin as an int
    hi: int  # SubnetMax as an int
    bits: int
    net_cls: type
    field_names: Tuple[str, str, str]  # for messages: network, min, max


def _range(config: NetworkConfig, family: int) -> _Range:
    if family == 6:
        if config.ipv6_network is None or config.ipv6_subnet_min is None or config.ipv6_subnet_max is None:
            raise ValueError("config has no IPv6Network to allocate from (EnableIPv6 is false)")
        return _Range(config.ipv6_network, config.ipv6_subnet_len, int(config.ipv6_subnet_min),
                      int(config.ipv6_subnet_max), 128, IPv6Network, ("IPv6Network", "IPv6SubnetMin", "IPv6SubnetMax"))
    if config.network is None or config.subnet_min is None or config.subnet_max is None:
        raise ValueError("config has no IPv4 network to allocate from")
    return _Range(config.network, config.subnet_len, int(config.subnet_min), int(config.subnet_max), 32,
                  IPv4Network, ("Network", "SubnetMin", "SubnetMax"))


def free_candidates(config: NetworkConfig, taken: Iterable[Net], limit: int = MAX_CANDIDATES,
                    family: int = 4) -> List[Net]:
    """Return up to ``limit`` free subnets of ``family`` (4 or 6) in Flannel's walk order (lowest first).
    ``taken`` may mix families; only networks of ``family`` count."""
    r = _range(config, family)
    size = 1 << (r.bits - r.subnet_len)
    lo = r.lo
    nslots = (r.hi - lo) // size + 1
    same = [t for t in taken if t is not None and t.version == family]
    out: List[Net] = []
    slot = 0
    for first, last in _blocked_slots(same, lo, size, nslots):
        while slot < first and len(out) < limit:
            out.append(r.net_cls((lo + slot * size, r.subnet_len)))
            slot += 1
        if len(out) >= limit:
            return out
        slot = max(slot, last + 1)
    while slot < nslots and len(out) < limit:
        out.append(r.net_cls((lo + slot * size, r.subnet_len)))
        slot += 1
    return out


def total_subnets(config: NetworkConfig, family: int = 4) -> int:
    """Return how many subnets of ``family`` lie between its SubnetMin and SubnetMax."""
    r = _range(config, family)
    return (r.hi - r.lo) // (1 << (r.bits - r.subnet_len)) + 1


def pick_subnet(
    config: NetworkConfig,
    taken: Iterable[Net],
    rng: Optional[random.Random] = None,
    prefix: str = DEFAULT_PREFIX,
    family: int = 4,
) -> Net:
    """Return a free subnet of ``family`` chosen uniformly among the first 100 free ones (Flannel picks the
    IPv6 subnet independently the same way); raise ``OutOfSubnetsError``."""
    candidates = free_candidates(config, taken, family=family)
    if not candidates:
        r = _range(config, family)
        net, lo_name, hi_name = r.field_names
        raise OutOfSubnetsError(
            f"out of subnets: all {total_subnets(config, family)} subnets of {r.network} between "
            f"{lo_name} {r.net_cls((r.lo, r.bits)).network_address} and {hi_name} "
            f"{r.net_cls((r.hi, r.bits)).network_address} are leased; enlarge {net} or remove "
            f"stale leases under {prefix.rstrip('/')}/subnets"
        )
    return (rng or random).choice(candidates)
