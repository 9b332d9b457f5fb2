# SPDX-License-Identifier: Apache-2.0
"""LocalManager: Flannel's lease policy over a ``Registry`` (flannel ``pkg/subnet/etcd/local_manager.go``).

Acquire (``acquire_lease``), up to ``RACE_RETRIES`` attempts, each on a fresh listing:
  1. our PublicIP already holds a lease -> config-compatible: re-put it (same etcd lease if still alive, else a new
     one; a key without an etcd lease, Flannel's "reservation", stays one); incompatible: delete it;
  2. else the previous subnet(s) from subnet.env (FLANNEL_SUBNET, and FLANNEL_IPV6_SUBNET with EnableIPv6), if
     compatible and free; its key holding a value that is not a lease (written while we were down) is still
     ours: rewritten, guarded by that value's mod revision (``event=lease_repaired source=previous_subnet``);
  3. else ``pick_subnet`` (random among the first 100 free), for IPv6 too (chosen independently, as Flannel).
  Dual stack: the key is ``<v4>-<len>&<v6>-<len6>`` and a lease is compatible only if both parts are (a v4-only
  lease of our PublicIP is deleted and re-allocated when EnableIPv6 is turned on, as in Flannel).
  The create is atomic; a lost race is retried with a fresh listing (Flannel exits 1 instead).

Keep (``keep_lease``), deliberately unlike Flannel:
  - one etcd lease kept alive with keep-alives every ``min(ttl/3, ttl - renew_margin)`` seconds; Flannel grants a
    new lease on each renewal and leaves the old one to expire;
  - our key is checked every ``check_s`` seconds and at once when the watch sees it change; if it is gone (deleted,
    or its etcd lease expired, e.g. during a long outage) the SAME subnet is re-created while it is free, with a
    WARNING ``event=lease_lost``. Flannel shuts the daemon down instead (flannel-compat.md section 2);
  - our key holding a value that is not a lease (an operator's mistaken ``etcdctl put``) is seen from the watch
    event (the batch's ``skipped`` keys) and rewritten with our lease in a txn guarded by that value's mod
    revision (a concurrent legitimate writer wins), one WARNING ``event=lease_repaired``; subnet and data plane
    stay. Another host's valid lease in our key is a conflict: ERROR ``event=lease_conflict`` once, re-checked
    with back-off (0.5 s doubling to 30 s) and on every watch event of the key, never in a hot loop;
  - store outages log one line when they start and one when they end, and retry with backoff.

Watch (``watch_leases``): snapshot at revision R -> ``LeaseWatcher.reset``; watch from R+1 -> ``update``; the
first snapshot is the listing ``acquire_lease`` just made (a restarting host reads its 5,000 leases once, not twice);
reconnect with backoff 100 ms -> 5 s; compaction -> re-list + reset; a full re-list every ``resync_s``
(longer in large clusters, jittered: ``resync_delay``) so state converges even after a missed event (Flannel
has none); an empty batch at least every ``tick_s`` (1 s).

Concurrency: plain threads. ``keep_lease`` and ``watch_leases`` run on different threads; they share only
``_wake`` (a ``threading.Event``: the watch saw our key change) and ``_current`` (read/written under ``_lock``).
"""
from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network, IPv6Network
from typing import Iterator, List, Optional, Tuple

from fastflannel.config import NetworkConfig, parse_config
from fastflannel.lease import Event, EventType, Lease, LeaseAttrs, LeaseWatcher
from fastflannel.retry import Backoff, FailureLog
from fastflannel.subnet import ConfigNotFoundError, LeaseError, StoreUnavailableError
from fastflannel.ip import parse_subnet_key
from fastflannel.subnet.allocator import pick_subnet
from fastflannel.subnet.registry import (
    CompactedError,
    LeaseNotFoundError,
    REMOVED_ATTRS,
    Registry,
    SubnetExistsError,
    WatchBatch,
    config_key,
    subnets_prefix,
)

log = logging.getLogger(__name__)

RACE_RETRIES = 10  # flannel raceRetries
FIRST_LISTING_REUSE_S = 30.0  # the first watch reuses acquire's listing when it is younger than this
DEFAULT_TTL_S = 86400  # flannel subnetTTL: 24 h
DEFAULT_RENEW_MARGIN_S = 3600  # flannel --subnet-lease-renew-margin default: 60 min
DEFAULT_RESYNC_S = 60.0  # full re-list of the leases (not in Flannel)
RESYNC_JITTER = 0.25  # each re-list is due after period * U(0.75, 1.25): hosts started together drift apart
RESYNC_CLUSTER_PER_S = 1.0  # the re-list period grows with the lease count: <= 1 re-list/s over the cluster
WATCH_BACKOFF_MIN_S = 0.1  # flannel's watch reconnect backoff: 100 ms ...
WATCH_BACKOFF_MAX_S = 5.0  # ... doubling up to 5 s
KEEP_BACKOFF_MIN_S = 1.0  # keep_lease retry after a store error: 1 s doubling ...
KEEP_BACKOFF_MAX_S = 30.0  # ... to 30 s (Flannel retries renewal once a minute)
RECHECK_BACKOFF_MIN_S = 0.5  # our key not ours (lost create race, another host's lease): look again after 0.5 s ...
RECHECK_BACKOFF_MAX_S = 30.0  # ... doubling to 30 s (the watch also wakes the keeper when the key changes)
TICK_S = 1.0  # longest time watch_leases goes without yielding (so the caller can check stop)
_POLL_S = 0.2  # granularity of stop/wake checks inside keep_lease

_REMOVED_ATTRS = REMOVED_ATTRS  # placeholder: a store DELETE carries no value


def resync_delay(base_s: float, n_leases: int, rng: random.Random) -> float:
    """Seconds until the next full re-list of the ``n_leases`` leases just listed.

    Every host re-lists every lease, so a cluster of n hosts costs etcd n re-lists of n keys per period: at 5,000
    hosts and 60 s that is 83 re-lists of 1.5 MB (100 ms of etcd CPU each, measured: docs/scale.md) per second,
    26x what a 3-member etcd on a 2-core machine sustains. The period therefore grows with the cluster so the
    whole cluster re-lists at most ``RESYNC_CLUSTER_PER_S`` times a second (5,000 hosts: every ~83 min; 60 s up
    to 60 hosts); the watch delivers every change and a compaction re-lists at once, the periodic re-list only
    repairs a missed event. Spread by +-``RESYNC_JITTER`` so hosts started together (a cluster-wide restart) do
    not re-list in the same second."""
    period = max(base_s, n_leases / RESYNC_CLUSTER_PER_S)
    return period * rng.uniform(1.0 - RESYNC_JITTER, 1.0 + RESYNC_JITTER)


class LocalManager:
    """Lease policy over a ``Registry``; implements ``fastflannel.subnet.SubnetManager``."""

    def __init__(
        self,
        registry: Registry,
        prefix: Optional[str] = None,
        previous_subnet: Optional[IPv4Network] = None,
        previous_subnet6: Optional[IPv6Network] = None,
        rng: Optional[random.Random] = None,
        ttl: int = DEFAULT_TTL_S,
        renew_margin_s: float = DEFAULT_RENEW_MARGIN_S,
        resync_s: float = DEFAULT_RESYNC_S,
        check_s: Optional[float] = None,
        tick_s: float = TICK_S,
        watch_backoff: Tuple[float, float] = (WATCH_BACKOFF_MIN_S, WATCH_BACKOFF_MAX_S),
        keep_backoff: Tuple[float, float] = (KEEP_BACKOFF_MIN_S, KEEP_BACKOFF_MAX_S),
        recheck_backoff: Tuple[float, float] = (RECHECK_BACKOFF_MIN_S, RECHECK_BACKOFF_MAX_S),
    ) -> None:
        if ttl > 0 and not 0 < renew_margin_s < ttl:
            raise ValueError(f"renew margin {renew_margin_s}s must be between 0 and the lease TTL {ttl}s")
        self.registry = registry
        self.prefix = (prefix if prefix is not None else getattr(registry, "prefix", "/coreos.com/network")).rstrip("/")
        self.previous_subnet = previous_subnet
        self.previous_subnet6 = previous_subnet6
        self.rng = rng or random.Random()
        self.ttl = ttl
        self.renew_margin_s = renew_margin_s
        self.resync_s = resync_s
        self.check_s = check_s if check_s is not None else resync_s
        self.tick_s = tick_s
        self.watch_backoff = watch_backoff
        self.keep_backoff = keep_backoff
        self.recheck_backoff = recheck_backoff
        self._lock = threading.Lock()
        self._current: Optional[Lease] = None
        self._wake = threading.Event()
        # the listing acquire_lease made (leases, revision, monotonic time): the first watch starts from it
        # instead of listing all leases again (5,000 after a restart), consumed once, only while fresh
        self._first_listing: Optional[Tuple[List[Lease], int, float]] = None

    # -- config ------------------------------------------------------------------------------------------------
    def get_network_config(self) -> NetworkConfig:
        """Read and check ``<prefix>/config``; raise ``ConfigNotFoundError`` or ``ConfigError``."""
        text = self.registry.get_config()
        if text is None:
            raise ConfigNotFoundError(
                f"flannel config not found in etcd store at {config_key(self.prefix)}. Did you create your config "
                f"using etcdv3 API? (e.g. etcdctl put {config_key(self.prefix)} '{{\"Network\": \"10.5.0.0/16\", "
                f"\"Backend\": {{\"Type\": \"vxlan\"}}}}')"
            )
        return parse_config(text)

    @property
    def current_lease(self) -> Optional[Lease]:
        """Return the lease as last acquired or re-created (its etcd lease ID may change after a loss)."""
        with self._lock:
            return self._current

    def _set_current(self, lease: Lease) -> None:
        with self._lock:
            self._current = lease

    # -- acquire -----------------------------------------------------------------------------------------------
    def acquire_lease(self, attrs: LeaseAttrs) -> Lease:
        """Reuse by PublicIP, else the previous subnet, else allocate; atomic create, lost races retried."""
        config = self.get_network_config()
        if not config.enable_ipv4 or config.network is None:
            raise LeaseError("the etcd subnet manager needs an IPv4 Network in the config (IPv6-only is unsupported)")
        for attempt in range(1, RACE_RETRIES + 1):
            leases, rev = self.registry.get_subnets()
            try:
                lease, how = self._try_acquire(config, attrs, leases)
            except SubnetExistsError as e:
                log.warning("event=lease_race subnet=%s attempt=%d/%d action=retry", e.subnet, attempt, RACE_RETRIES)
                time.sleep(self.rng.uniform(0, 0.01 * attempt))  # de-synchronise hosts started together
                continue
            log.info(
                "event=lease_acquired subnet=%s subnet6=%s public_ip=%s public_ipv6=%s ttl=%d lease_id=%x source=%s",
                lease.subnet, lease.subnet6, attrs.public_ip, attrs.public_ipv6, self.ttl if lease.lease_id else 0,
                lease.lease_id, how,
            )
            self._set_current(lease)
            self._first_listing = (leases, rev, time.monotonic())
            return lease
        raise LeaseError("max retries reached trying to acquire a subnet")

    def _try_acquire(self, config: NetworkConfig, attrs: LeaseAttrs, leases: List[Lease]) -> Tuple[Lease, str]:
        mine = next((x for x in leases if x.attrs.public_ip == attrs.public_ip), None)
        if mine is not None:
            # Flannel's isSubnetConfigCompat && isIPv6SubnetConfigCompat: with EnableIPv6 a v4-only lease is
            # incompatible (deleted, then both families allocated), without it a dual-stack one is
            if config.lease_in_range(mine.subnet, mine.subnet6):
                # a key without an etcd lease is an operator reservation: keep it one (Flannel turns it into a 24 h lease)
                ttl = self.ttl if mine.lease_id else 0
                return self.registry.update_subnet(mine.subnet, attrs, ttl, lease_id=mine.lease_id or None,
                                                   subnet6=mine.subnet6), "public_ip"
            log.warning(
                "event=lease_incompatible subnet=%s subnet6=%s public_ip=%s network=%s subnet_len=%d "
                "ipv6_network=%s action=delete",
                mine.subnet, mine.subnet6, attrs.public_ip, config.network, config.subnet_len, config.ipv6_network,
            )
            self.registry.delete_subnet(mine.subnet, mine.subnet6)
            leases = [x for x in leases if x.subnet != mine.subnet]
        taken = [x.subnet for x in leases]
        taken6 = [x.subnet6 for x in leases if x.subnet6 is not None]
        prev, prev6 = self.previous_subnet, self.previous_subnet6 if config.enable_ipv6 else None
        if prev is not None:
            if not config.lease_in_range(prev, prev6):
                log.info("event=previous_subnet_ignored subnet=%s subnet6=%s reason=not_in_config network=%s "
                         "ipv6_network=%s", prev, prev6, config.network, config.ipv6_network)
            elif any(prev.overlaps(t) for t in taken) or (prev6 is not None and any(prev6.overlaps(t) for t in taken6)):
                log.info("event=previous_subnet_ignored subnet=%s subnet6=%s reason=taken", prev, prev6)
            else:
                try:
                    return self.registry.create_subnet(prev, attrs, self.ttl, subnet6=prev6), "previous_subnet"
                except SubnetExistsError:
                    return self._repair_previous(prev, prev6, attrs), "previous_subnet_repaired"
        subnet = pick_subnet(config, taken, self.rng, prefix=self.prefix)
        subnet6 = pick_subnet(config, taken6, self.rng, prefix=self.prefix, family=6) if config.enable_ipv6 else None
        return self.registry.create_subnet(subnet, attrs, self.ttl, subnet6=subnet6), "allocated"

    def _repair_previous(self, prev: IPv4Network, prev6: Optional[IPv6Network], attrs: LeaseAttrs) -> Lease:
        """Our previous subnet's key exists but was not in the listing: if it holds a value that is not a lease
        (a mistaken put while we were down), it is still ours (subnet.env says so): rewrite it, guarded by that
        value's mod revision. Else re-raise ``SubnetExistsError`` (a real race: retried on a fresh listing)."""
        cur = self.registry.read_subnet(prev, prev6)
        if cur is None or cur.lease is not None:
            raise SubnetExistsError(prev)
        lease = self.registry.replace_subnet(prev, attrs, self.ttl, cur.mod_revision, subnet6=prev6)
        log.warning("event=lease_repaired subnet=%s key=%s found=%r error=%r lease_id=%x action=rewrote_own_lease "
                    "source=previous_subnet", prev, cur.key, cur.value[:80], cur.error, lease.lease_id)
        return lease

    def lookup_lease_by_public_ip(self, ip: IPv4Address) -> Optional[Lease]:
        """Return the stored lease advertising ``ip`` as PublicIP (first found), or None."""
        leases, _ = self.registry.get_subnets()
        return next((x for x in leases if x.attrs.public_ip == ip), None)

    # -- keep --------------------------------------------------------------------------------------------------
    def refresh_interval(self) -> float:
        """Return the keep-alive period: a third of the TTL, and at least the renew margin before expiry."""
        return max(1.0, min(self.ttl / 3.0, self.ttl - self.renew_margin_s))

    def keep_lease(self, lease: Lease, stop: threading.Event) -> None:
        """Keep ``lease`` alive until ``stop`` is set (see the module docstring). Never raises for outages."""
        self._set_current(lease)
        reservation = lease.lease_id == 0  # an operator's key without an etcd lease stays one
        interval = self.refresh_interval()
        store = Backoff(*self.keep_backoff)
        recheck = Backoff(*self.recheck_backoff)  # while our key is not ours: lost race, conflict
        outage = FailureLog(log, "store_unavailable", "store_available", op="keep_lease", subnet=lease.subnet)
        own_state = ""
        now = time.monotonic()
        next_refresh = now  # a first keep-alive at once resets a reused lease to the full TTL
        next_check = now + self.check_s
        while not stop.is_set():
            now = time.monotonic()
            due = min(next_refresh if lease.lease_id else float("inf"), next_check)
            if now < due and not self._wake.is_set():
                stop.wait(min(due - now, _POLL_S))
                continue
            woken = self._wake.is_set()
            self._wake.clear()
            try:
                need_check = woken or now >= next_check
                if lease.lease_id and now >= next_refresh:
                    try:
                        ttl = self.registry.refresh(lease.lease_id)
                        log.info("event=lease_renewed subnet=%s lease_id=%x ttl=%d", lease.subnet, lease.lease_id, ttl)
                    except LeaseNotFoundError:
                        need_check = True  # the key went with the etcd lease: re-create below
                        lease = replace(lease, lease_id=0)
                        self._set_current(lease)
                    next_refresh = now + interval
                if need_check:
                    lease, own_state, again = self._check_own(lease, own_state, reservation)
                    if again:
                        next_check = now + recheck.next()
                    else:
                        recheck.reset()
                        next_check = now + self.check_s
                outage.ok()
                store.reset()
            except StoreUnavailableError as e:
                outage.failed(e)
                delay = store.next()
                # when the store is back: refresh and check at once
                next_refresh = next_check = time.monotonic() + delay
                stop.wait(delay)

    def _check_own(self, lease: Lease, state: str, reservation: bool) -> Tuple[Lease, str, bool]:
        """Verify our key and repair it. Return (lease, state, check again soon).

        ``state`` is "" (the key holds our lease), "lost" (absent, being re-created) or "conflict <ip>" (another
        host's valid lease): each is logged once when entered. A value that is not a lease at all (an operator's
        mistaken put) is overwritten with ours, guarded by its mod revision so a concurrent writer wins."""
        cur = self.registry.read_subnet(lease.subnet, lease.subnet6)
        ttl = 0 if reservation else self.ttl
        if cur is not None and cur.lease is not None:
            if cur.lease.attrs == lease.attrs:
                if cur.lease_id != lease.lease_id:
                    lease = replace(lease, lease_id=cur.lease_id)
                    self._set_current(lease)
                if state:
                    log.info("event=lease_ok subnet=%s lease_id=%x after=%r", lease.subnet, lease.lease_id, state)
                return lease, "", False
            new_state = f"conflict {cur.lease.attrs.public_ip}"
            if new_state != state:
                log.error(
                    "event=lease_conflict subnet=%s holder=%s public_ip=%s action=wait_until_free",
                    lease.subnet, cur.lease.attrs.public_ip, lease.attrs.public_ip,
                )
            return lease, new_state, True
        try:
            if cur is not None:
                new = self.registry.replace_subnet(lease.subnet, lease.attrs, ttl, cur.mod_revision,
                                                   lease_id=lease.lease_id or None, subnet6=lease.subnet6)
                log.warning(
                    "event=lease_repaired subnet=%s key=%s found=%r error=%r lease_id=%x "
                    "action=rewrote_own_lease hint=\"the key held a value that is not a lease (a mistaken etcdctl put?)\"",
                    lease.subnet, cur.key, cur.value[:80], cur.error, new.lease_id,
                )
            else:
                if state != "lost":
                    log.warning("event=lease_lost subnet=%s public_ip=%s action=reacquire", lease.subnet,
                                lease.attrs.public_ip)
                state = "lost"
                new = self.registry.create_subnet(lease.subnet, lease.attrs, ttl, subnet6=lease.subnet6)
                log.warning("event=lease_reacquired subnet=%s lease_id=%x ttl=%d", new.subnet, new.lease_id, ttl)
        except SubnetExistsError:
            return lease, state, True  # someone (maybe us, via a retried request) wrote it meanwhile: look again
        self._set_current(new)
        return new, "", False

    # -- watch -------------------------------------------------------------------------------------------------
    def _pause(self, seconds: float, stop: threading.Event) -> Iterator[List[Event]]:
        """Wait ``seconds`` (stop-aware), yielding an empty batch every tick."""
        end = time.monotonic() + seconds
        while not stop.is_set():
            left = end - time.monotonic()
            if left <= 0:
                return
            stop.wait(min(left, self.tick_s))
            yield []

    def _note_own(self, own: Lease, item_type: EventType, lease_or_subnet: object) -> None:
        subnet = lease_or_subnet.subnet if isinstance(lease_or_subnet, Lease) else lease_or_subnet
        if subnet != own.subnet:
            return
        if item_type is EventType.REMOVED or (isinstance(lease_or_subnet, Lease) and lease_or_subnet.attrs != own.attrs):
            self._wake.set()

    def watch_leases(self, own: Lease, stop: threading.Event) -> Iterator[List[Event]]:
        """Yield batches of remote-lease events until ``stop`` is set (see the module docstring)."""
        watcher = LeaseWatcher(own.subnet)
        backoff = self.watch_backoff[0]
        available = True
        need_list = True
        rev = 0
        next_resync = 0.0

        def unavailable(op: str, e: Exception) -> None:
            nonlocal available
            if available:
                log.warning("event=store_unavailable op=%s prefix=%s error=%r action=retry", op, subnets_prefix(self.prefix), str(e))
                available = False

        while not stop.is_set():
            if need_list:
                first, self._first_listing = self._first_listing, None
                reuse = first is not None and time.monotonic() - first[2] < FIRST_LISTING_REUSE_S
                try:
                    # acquire's listing at R plus the watch from R + 1 (which replays our own create and every
                    # change since) is as consistent as a new listing, and saves reading every lease again
                    leases, rev = first[:2] if reuse else self.registry.get_subnets()
                except StoreUnavailableError as e:
                    unavailable("list", e)
                    yield from self._pause(backoff, stop)
                    backoff = min(backoff * 2, self.watch_backoff[1])
                    continue
                for x in leases:
                    self._note_own(own, EventType.ADDED, x)
                if not reuse and not any(x.subnet == own.subnet for x in leases):
                    self._wake.set()
                events = watcher.reset(leases)
                need_list = False
                next_resync = time.monotonic() + resync_delay(self.resync_s, len(leases), self.rng)
                log.debug("event=leases_listed revision=%d count=%d changes=%d", rev, len(leases), len(events))
                yield events
            try:
                stream = self.registry.watch_subnets(rev + 1, stop)
                try:
                    for batch in stream:
                        if not available:
                            log.info("event=store_available op=watch prefix=%s revision=%d", subnets_prefix(self.prefix), rev)
                            available = True
                        backoff = self.watch_backoff[0]
                        yield self._apply(own, watcher, batch)
                        rev = max(rev, batch.revision)
                        if stop.is_set():
                            return
                        if time.monotonic() >= next_resync:
                            need_list = True
                            break
                finally:
                    close = getattr(stream, "close", None)
                    if close is not None:
                        close()
            except CompactedError as e:
                log.warning("event=watch_compacted start_revision=%d compact_revision=%d action=relist",
                            e.start_revision, e.compact_revision)
                need_list = True
                continue
            except StoreUnavailableError as e:
                unavailable("watch", e)
                yield from self._pause(backoff, stop)
                backoff = min(backoff * 2, self.watch_backoff[1])
                continue
            if not need_list and not stop.is_set():
                # the stream ended without an error (server closed it): reconnect from the last revision
                yield from self._pause(backoff, stop)
                backoff = min(backoff * 2, self.watch_backoff[1])

    def _apply(self, own: Lease, watcher: LeaseWatcher, batch: WatchBatch) -> List[Event]:
        for key in batch.skipped:  # a value we cannot parse: if it is in our key, the keeper repairs it now
            try:
                if parse_subnet_key(key.rsplit("/", 1)[-1])[0] == own.subnet:
                    self._wake.set()
            except ValueError:
                pass
        events: List[Event] = []
        for typ, item in batch.items:
            self._note_own(own, typ, item)
            if typ is EventType.ADDED:
                assert isinstance(item, Lease)
                events.append(Event(EventType.ADDED, item))
            else:
                subnet = item.subnet if isinstance(item, Lease) else item
                subnet6 = item.subnet6 if isinstance(item, Lease) else None
                events.append(Event(EventType.REMOVED, Lease(subnet, _REMOVED_ATTRS, subnet6=subnet6)))
        return watcher.update(events) if events else []
