# SPDX-License-Identifier: Apache-2.0
"""The registry seam: the store's KV verbs for Flannel's layout, with no lease policy (flannel ``Registry``).

Keys are ``<prefix>/config`` and ``<prefix>/subnets/<ip>-<len>`` (dual stack: ``<ip>-<len>&<ip6>-<len6>``, so
every verb that names a key takes the lease's IPv6 subnet too, ``subnet6``, None for a v4-only lease); values are
exactly ``LeaseAttrs.to_json()``.
Policy (reuse by PublicIP, previous subnet, allocation, retries, keep-alive, reconnects) is the manager's.

Expiration: a listing is one range call. Flannel follows every key with a ``LeaseTimeToLive`` call (N+1 round
trips); a registry here returns ``Lease.expiration == 0`` ("unknown") from ``get_subnets``/``get_subnet``/watch
and carries the etcd lease ID in ``Lease.lease_id`` instead. Nothing in the policy needs the expiration of a
*remote* lease; our own lease's remaining TTL comes back from ``refresh``.

Parse failures: a key under ``subnets/`` that is not a subnet key, or a value that is not lease JSON, is logged
once as a WARNING naming the key and the error and left out of the result (``skipped`` in a watch batch). It never
turns a listing or a watch batch into an empty snapshot (the Flannel bug of flannel-compat.md section 3).

Every method blocks its caller's thread and may raise ``StoreUnavailableError``.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Network
from typing import Dict, Iterator, List, Optional, Protocol, Tuple, Union

from fastflannel.ip import make_subnet_key, parse_subnet_key
from fastflannel.lease import EventType, Lease, LeaseAttrs
from fastflannel.subnet import SubnetError

WatchItem = Tuple[EventType, Union[Lease, IPv4Network]]
"""(ADDED, Lease) for a put; (REMOVED, ``removed_lease(subnet, subnet6)``) for a delete or lease expiry (a delete
carries no value, only the key: the Lease has ``REMOVED_ATTRS``). A bare IPv4Network is still accepted as a
v4-only removal."""

REMOVED_ATTRS = LeaseAttrs(public_ip=IPv4Address(0))  # placeholder: a store DELETE carries no value


def removed_lease(subnet: IPv4Network, subnet6: Optional[IPv6Network] = None) -> Lease:
    """Return the Lease a DELETE of the key for (``subnet``, ``subnet6``) stands for."""
    return Lease(subnet, REMOVED_ATTRS, subnet6=subnet6)


class SubnetExistsError(SubnetError):
    """An atomic create lost: the subnet key already exists (another host won the race)."""

    def __init__(self, subnet: IPv4Network, key: str = "") -> None:
        super().__init__(f"subnet {subnet} is already leased (key {key or subnet} exists)")
        self.subnet = subnet


class CompactedError(SubnetError):
    """A watch start revision is older than the store's compaction point; re-list and watch from the new one."""

    def __init__(self, start_revision: int, compact_revision: int) -> None:
        super().__init__(
            f"watch from revision {start_revision} is impossible: the store was compacted at revision "
            f"{compact_revision}; re-list and watch again"
        )
        self.start_revision = start_revision
        self.compact_revision = compact_revision


class LeaseNotFoundError(SubnetError):
    """The etcd lease behind a subnet has expired or been revoked (its keys are gone)."""

    def __init__(self, lease_id: int) -> None:
        super().__init__(f"etcd lease {lease_id:x} has expired or was revoked")
        self.lease_id = lease_id


@dataclass(frozen=True)
class WatchBatch:
    """One watch response: parsed items in store order, the revision to resume after, skipped keys."""

    items: List[WatchItem] = field(default_factory=list)
    revision: int = 0
    skipped: List[str] = field(default_factory=list)


@dataclass(frozen=True)
class StoredSubnet:
    """What a subnet key holds, parsed or not: ``lease`` is None when the value is not a lease (``error`` says
    why); ``mod_revision`` guards a rewrite (``replace_subnet``)."""

    key: str
    value: str
    mod_revision: int
    lease_id: int = 0
    lease: Optional[Lease] = None
    error: str = ""


class Registry(Protocol):
    """KV verbs over ``<prefix>``. All block; all may raise ``StoreUnavailableError``."""

    prefix: str

    def get_config(self) -> Optional[str]:
        """Return the raw text of ``<prefix>/config``, or None if the key does not exist."""

    def get_subnets(self) -> Tuple[List[Lease], int]:
        """List every parsable lease under ``<prefix>/subnets`` in one range call; return (leases, revision).
        Unparsable keys/values are logged and skipped."""

    def get_subnet(self, subnet: IPv4Network, subnet6: Optional[IPv6Network] = None) -> Optional[Lease]:
        """Return the lease stored for ``subnet`` (with its etcd lease ID), or None if absent or unparsable."""

    def read_subnet(self, subnet: IPv4Network, subnet6: Optional[IPv6Network] = None) -> Optional[StoredSubnet]:
        """Return what the key of ``subnet`` holds, parsed or not (never logs a parse error), or None if absent."""

    def replace_subnet(self, subnet: IPv4Network, attrs: LeaseAttrs, ttl: int, mod_revision: int,
                       lease_id: Optional[int] = None, subnet6: Optional[IPv6Network] = None) -> Lease:
        """Put the key only if it is still at ``mod_revision`` (a txn), reusing etcd lease ``lease_id`` if alive,
        else granting a new ``ttl`` lease (``ttl`` 0: none). Raise ``SubnetExistsError`` if the key changed."""

    def create_subnet(self, subnet: IPv4Network, attrs: LeaseAttrs, ttl: int,
                      subnet6: Optional[IPv6Network] = None) -> Lease:
        """Atomically create the key if absent, bound to a freshly granted ``ttl`` lease (``ttl`` 0: no lease).
        Raise ``SubnetExistsError`` if the key exists; the granted lease is revoked on any failure."""

    def update_subnet(self, subnet: IPv4Network, attrs: LeaseAttrs, ttl: int, lease_id: Optional[int] = None,
                      subnet6: Optional[IPv6Network] = None) -> Lease:
        """Put the key unconditionally, reusing etcd lease ``lease_id`` if it is still alive, else granting a new
        ``ttl`` lease (``ttl`` 0: no lease, a Flannel "reservation")."""

    def refresh(self, lease_id: int) -> int:
        """Keep etcd lease ``lease_id`` alive (one keep-alive); return its TTL in seconds.
        Raise ``LeaseNotFoundError`` if it has expired or was revoked."""

    def delete_subnet(self, subnet: IPv4Network, subnet6: Optional[IPv6Network] = None) -> None:
        """Delete the key (no error if absent)."""

    def watch_subnets(self, start_revision: int, stop: threading.Event) -> Iterator[WatchBatch]:
        """Yield batches of events under ``<prefix>/subnets`` from ``start_revision`` on, and an empty batch at
        least every second; end when ``stop`` is set or the iterator is closed (the watch is cancelled).
        Raise ``CompactedError`` if ``start_revision`` was compacted, ``StoreUnavailableError`` if the stream
        breaks."""


def config_key(prefix: str) -> str:
    """Return ``<prefix>/config`` (path-join: one slash, trailing slash of the prefix dropped)."""
    return prefix.rstrip("/") + "/config"


def subnets_prefix(prefix: str) -> str:
    """Return ``<prefix>/subnets`` (listed and watched without a trailing slash, as Flannel does)."""
    return prefix.rstrip("/") + "/subnets"


def subnet_key(prefix: str, subnet: IPv4Network, subnet6: Optional[IPv6Network] = None) -> str:
    """Return ``<prefix>/subnets/<ip>-<len>`` (``&<ip6>-<len6>`` appended for a dual-stack lease)."""
    return subnets_prefix(prefix) + "/" + make_subnet_key(subnet, subnet6)


LEASE_PARSE_CACHE = 32768  # keys whose last parsed lease is kept: more than a /10 of /24s
_LAST_PARSED: Dict[str, Tuple["str | bytes", int, Lease]] = {}  # key -> (value, etcd lease id, Lease)


def lease_from_kv(key: str, value: "str | bytes", lease_id: int = 0) -> Lease:
    """Parse one stored lease; raise ``ValueError`` (or ``LeaseParseError``) naming what is wrong.

    Memoised on the exact (key, value, lease id): parsing is ~47 us a lease (mostly ``ipaddress``), and every
    daemon parses the same 5,000 values again and again - twice after a restart (to pick its subnet, to start
    the watch) and at every re-list. A ``Lease`` is frozen, so sharing it is safe; errors are not cached.
    Only the LAST value of each key is kept (about 1 KiB each): lease churn, where every write is a new value
    and etcd lease, must not fill a cache of old values (an LRU on (key, value, lease) grew ~1 KiB per churned
    lease, up to ~34 MiB: a slow RSS rise in the soak, issue 14). Cleared if it ever holds more keys than
    ``LEASE_PARSE_CACHE``."""
    hit = _LAST_PARSED.get(key)
    if hit is not None and hit[1] == lease_id and hit[0] == value:
        return hit[2]
    lease = _lease_from_kv(key, value, lease_id)
    if len(_LAST_PARSED) >= LEASE_PARSE_CACHE and key not in _LAST_PARSED:
        _LAST_PARSED.clear()
    _LAST_PARSED[key] = (value, lease_id, lease)
    return lease


def _lease_from_kv(key: str, value: "str | bytes", lease_id: int) -> Lease:
    name = key.rsplit("/", 1)[-1]
    net, net6 = parse_subnet_key(name)
    if make_subnet_key(net) != name.split("&", 1)[0]:  # e.g. "x10.5.1.0-24", "10.5.1.7-24", "010.5.1.0-24"
        raise ValueError(f"not a subnet key: {name!r} (IPv4 part is not <network address>-<prefix length>)")
    attrs = LeaseAttrs.from_json(value)
    return Lease(subnet=net, attrs=attrs, expiration=0.0, lease_id=lease_id, subnet6=net6)


def stored_subnet(key: str, value: "str | bytes", mod_revision: int, lease_id: int = 0) -> StoredSubnet:
    """Return a ``StoredSubnet`` for one key, with the lease parsed if the value is one (no logging)."""
    text = value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value
    try:
        lease: Optional[Lease] = lease_from_kv(key, value, lease_id)
        error = ""
    except ValueError as e:
        lease, error = None, str(e)
    return StoredSubnet(key, text, mod_revision, lease_id, lease, error)


def log_skipped(log: "logging.Logger", key: str, err: Exception) -> None:
    """Log one unparsable store entry (WARNING, key=value style)."""
    log.warning("event=lease_skipped key=%s error=%r", key, str(err))
