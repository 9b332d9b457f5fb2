# SPDX-License-Identifier: Apache-2.0
"""FakeRegistry: an in-memory Registry with etcd's revision, lease and compaction semantics.

- every mutation bumps the store revision and is appended to a history that watches replay;
- ``compact(rev)`` drops history below ``rev``; a watch starting below it raises ``CompactedError``;
- etcd leases: ``grant``/``expire_lease`` (expiry deletes the keys and emits DELETE events, as etcd does);
- failures: ``down = True`` makes every call raise ``StoreUnavailableError`` and breaks open watches;
  ``fail_next[op]`` is a list of exceptions raised by the next calls of ``op``; ``hooks[op]`` run before ``op``
  (to inject a racing writer); ``calls`` records every verb for assertions.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network
from typing import Callable, Dict, Iterator, List, Optional, Tuple

from fastflannel.lease import EventType, Lease, LeaseAttrs
from fastflannel.subnet import StoreUnavailableError
from fastflannel.subnet.registry import (
    CompactedError,
    LeaseNotFoundError,
    SubnetExistsError,
    WatchBatch,
    config_key,
    lease_from_kv,
    StoredSubnet,
    log_skipped,
    removed_lease,
    stored_subnet,
    subnet_key,
    subnets_prefix,
)

log = logging.getLogger("fakes_registry")


@dataclass
class _KV:
    value: str
    lease: int
    mod_revision: int


class FakeRegistry:
    def __init__(self, prefix: str = "/coreos.com/network", config: Optional[str] = None,
                 watch_tick_s: float = 0.05) -> None:
        self.prefix = prefix
        self.cond = threading.Condition()
        self.revision = 1
        self.kv: Dict[str, _KV] = {}
        self.history: List[Tuple[int, str, str, str, int]] = []  # (rev, "PUT"|"DELETE", key, value, lease)
        self.compacted = 0
        self.leases: Dict[int, int] = {}  # id -> ttl
        self.refreshes: Dict[int, int] = defaultdict(int)
        self._ids = itertools.count(0x1000)
        self.down = False
        self._watch_generation = 0
        self.fail_next: Dict[str, List[Exception]] = defaultdict(list)
        self.hooks: Dict[str, List[Callable[..., None]]] = defaultdict(list)
        self.calls: List[str] = []
        self.watch_tick_s = watch_tick_s
        self.watches_started = 0
        if config is not None:
            self.set_config(config)

    # -- helpers for tests -------------------------------------------------------------------------------------
    def _mutate(self, typ: str, key: str, value: str = "", lease: int = 0) -> int:
        with self.cond:
            self.revision += 1
            if typ == "PUT":
                self.kv[key] = _KV(value, lease, self.revision)
            else:
                self.kv.pop(key, None)
            self.history.append((self.revision, typ, key, value, lease))
            self.cond.notify_all()
            return self.revision

    def set_config(self, text: str) -> None:
        self._mutate("PUT", config_key(self.prefix), text)

    def put_raw(self, name: str, value: str, lease: int = 0) -> int:
        """Put ``<prefix>/subnets/<name>`` = value behind the registry's back (another host, an operator)."""
        return self._mutate("PUT", subnets_prefix(self.prefix) + "/" + name, value, lease)

    def put_lease(self, subnet: str, attrs: LeaseAttrs, lease: int = 0, subnet6: Optional[str] = None) -> int:
        key = subnet_key(self.prefix, IPv4Network(subnet), IPv6Network(subnet6) if subnet6 else None)
        return self._mutate("PUT", key, attrs.to_json(), lease)

    def delete_raw(self, name: str) -> int:
        return self._mutate("DELETE", subnets_prefix(self.prefix) + "/" + name)

    def grant(self, ttl: int) -> int:
        with self.cond:
            lid = next(self._ids)
            self.leases[lid] = ttl
            return lid

    def expire_lease(self, lease_id: int) -> None:
        """Expire an etcd lease: drop it and delete its keys (DELETE events), like etcd."""
        with self.cond:
            self.leases.pop(lease_id, None)
            for key in [k for k, v in self.kv.items() if v.lease == lease_id]:
                self._mutate("DELETE", key)

    def compact(self, revision: Optional[int] = None) -> None:
        with self.cond:
            rev = self.revision if revision is None else revision
            self.compacted = max(self.compacted, rev)
            self.history = [h for h in self.history if h[0] >= rev]

    def set_down(self, down: bool) -> None:
        with self.cond:
            self.down = down
            self._watch_generation += 1
            self.cond.notify_all()

    def break_watches(self) -> None:
        """Break every open watch stream once (as a connection reset would)."""
        with self.cond:
            self._watch_generation += 1
            self.cond.notify_all()

    def value_of(self, subnet: str) -> Optional[_KV]:
        return self.kv.get(subnet_key(self.prefix, IPv4Network(subnet)))

    def _enter(self, op: str, *args: object) -> None:
        self.calls.append(op)
        for hook in list(self.hooks.get(op, [])):
            hook(*args)
        if self.fail_next.get(op):
            raise self.fail_next[op].pop(0)
        if self.down:
            raise StoreUnavailableError(f"fake store is down ({op})")

    def _lease(self, key: str, kv: _KV) -> Lease:
        return lease_from_kv(key, kv.value, kv.lease)

    # -- Registry ----------------------------------------------------------------------------------------------
    def get_config(self) -> Optional[str]:
        self._enter("get_config")
        kv = self.kv.get(config_key(self.prefix))
        return kv.value if kv else None

    def get_subnets(self) -> Tuple[List[Lease], int]:
        self._enter("get_subnets")
        with self.cond:
            out: List[Lease] = []
            pfx = subnets_prefix(self.prefix)
            for key in sorted(self.kv):
                if not key.startswith(pfx):
                    continue
                try:
                    out.append(self._lease(key, self.kv[key]))
                except ValueError as e:
                    log_skipped(log, key, e)
            return out, self.revision

    def get_subnet(self, subnet: IPv4Network, subnet6: Optional[IPv6Network] = None) -> Optional[Lease]:
        self._enter("get_subnet", subnet)
        key = subnet_key(self.prefix, subnet, subnet6)
        with self.cond:
            kv = self.kv.get(key)
            if kv is None:
                return None
            try:
                return self._lease(key, kv)
            except ValueError as e:
                log_skipped(log, key, e)
                return None

    def read_subnet(self, subnet: IPv4Network, subnet6: Optional[IPv6Network] = None) -> Optional[StoredSubnet]:
        self._enter("read_subnet", subnet)
        key = subnet_key(self.prefix, subnet, subnet6)
        with self.cond:
            kv = self.kv.get(key)
            return None if kv is None else stored_subnet(key, kv.value, kv.mod_revision, kv.lease)

    def replace_subnet(self, subnet: IPv4Network, attrs: LeaseAttrs, ttl: int, mod_revision: int,
                       lease_id: Optional[int] = None, subnet6: Optional[IPv6Network] = None) -> Lease:
        self._enter("replace_subnet", subnet, attrs, ttl, mod_revision, lease_id)
        key = subnet_key(self.prefix, subnet, subnet6)
        with self.cond:
            kv = self.kv.get(key)
            if (kv.mod_revision if kv else 0) != mod_revision:
                raise SubnetExistsError(subnet, key)
            lid = lease_id if lease_id and lease_id in self.leases else (self.grant(ttl) if ttl else 0)
            self._mutate("PUT", key, attrs.to_json(), lid)
            return Lease(subnet, attrs, time.time() + ttl if ttl else 0.0, lid)

    def create_subnet(self, subnet: IPv4Network, attrs: LeaseAttrs, ttl: int,
                      subnet6: Optional[IPv6Network] = None) -> Lease:
        self._enter("create_subnet", subnet, attrs, ttl)
        key = subnet_key(self.prefix, subnet, subnet6)
        with self.cond:
            if key in self.kv:
                raise SubnetExistsError(subnet, key)
            lid = self.grant(ttl) if ttl else 0
            self._mutate("PUT", key, attrs.to_json(), lid)
            return Lease(subnet, attrs, time.time() + ttl if ttl else 0.0, lid, subnet6=subnet6)

    def update_subnet(self, subnet: IPv4Network, attrs: LeaseAttrs, ttl: int,
                      lease_id: Optional[int] = None, subnet6: Optional[IPv6Network] = None) -> Lease:
        self._enter("update_subnet", subnet, attrs, ttl, lease_id)
        key = subnet_key(self.prefix, subnet, subnet6)
        with self.cond:
            if lease_id and lease_id in self.leases:
                lid = lease_id
            else:
                lid = self.grant(ttl) if ttl else 0
            self._mutate("PUT", key, attrs.to_json(), lid)
            return Lease(subnet, attrs, time.time() + ttl if ttl else 0.0, lid, subnet6=subnet6)

    def refresh(self, lease_id: int) -> int:
        self._enter("refresh", lease_id)
        with self.cond:
            if lease_id not in self.leases:
                raise LeaseNotFoundError(lease_id)
            self.refreshes[lease_id] += 1
            return self.leases[lease_id]

    def delete_subnet(self, subnet: IPv4Network, subnet6: Optional[IPv6Network] = None) -> None:
        self._enter("delete_subnet", subnet)
        key = subnet_key(self.prefix, subnet, subnet6)
        with self.cond:
            if key in self.kv:
                self._mutate("DELETE", key)

    def watch_subnets(self, start_revision: int, stop: threading.Event) -> Iterator[WatchBatch]:
        self._enter("watch_subnets", start_revision)
        with self.cond:
            if start_revision < self.compacted:
                raise CompactedError(start_revision, self.compacted)
            gen = self._watch_generation
            self.watches_started += 1
        nxt = start_revision
        pfx = subnets_prefix(self.prefix) + "/"
        last_yield = time.monotonic()
        while not stop.is_set():
            with self.cond:
                if self._watch_generation != gen or self.down:
                    raise StoreUnavailableError("fake watch stream broken")
                pending = [h for h in self.history if h[0] >= nxt]
                if not pending:
                    self.cond.wait(self.watch_tick_s)
                    pending = [h for h in self.history if h[0] >= nxt]
                if self._watch_generation != gen or self.down:
                    raise StoreUnavailableError("fake watch stream broken")
            if pending:
                nxt = pending[-1][0] + 1
            items = []
            skipped = []
            for rev, typ, key, value, lease in pending:
                if not key.startswith(pfx):
                    continue
                try:
                    if typ == "PUT":
                        items.append((EventType.ADDED, lease_from_kv(key, value, lease)))
                    else:
                        gone = lease_from_kv(key, '{"PublicIP":"0.0.0.0"}')
                        items.append((EventType.REMOVED, removed_lease(gone.subnet, gone.subnet6)))
                except ValueError as e:
                    log_skipped(log, key, e)
                    skipped.append(key)
            if items or skipped or time.monotonic() - last_yield >= 0.2:
                last_yield = time.monotonic()
                yield WatchBatch(items, nxt - 1, skipped)
