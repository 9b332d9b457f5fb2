# SPDX-License-Identifier: Apache-2.0
"""LocalManager on FakeRegistry: flannel's TestAcquireLease / TestWatchLease* scenarios and our improvements."""
from __future__ import annotations

import json
import logging
import random
import threading
import time
from ipaddress import IPv4Address, IPv4Network

import pytest
from waiting import wait_for

from fakes_registry import FakeRegistry
from fastflannel.config import ConfigError
from fastflannel.lease import EventType, LeaseAttrs
from fastflannel.subnet import ConfigNotFoundError, LeaseError, OutOfSubnetsError, StoreUnavailableError
from fastflannel.subnet.manager import RACE_RETRIES, LocalManager
from fastflannel.subnet.registry import SubnetExistsError

CONFIG = '{"Network": "10.3.0.0/16", "Backend": {"Type": "vxlan"}}'


def attrs(ip: str, mac: str = "0a:58:0a:00:00:01") -> LeaseAttrs:
    return LeaseAttrs(public_ip=IPv4Address(ip), backend_type="vxlan",
                      backend_data={"VNI": 1, "VtepMAC": mac})


def mgr(reg, **kw) -> LocalManager:
    kw.setdefault("rng", random.Random(1))
    kw.setdefault("tick_s", 0.1)
    kw.setdefault("keep_backoff", (0.05, 0.2))
    kw.setdefault("watch_backoff", (0.01, 0.05))
    return LocalManager(reg, **kw)


# -- config -------------------------------------------------------------------------------------------------------

def test_config_not_found_and_invalid():
    reg = FakeRegistry()
    with pytest.raises(ConfigNotFoundError) as ei:
        mgr(reg).get_network_config()
    assert "/coreos.com/network/config" in str(ei.value) and "etcdv3" in str(ei.value)
    reg.set_config('{"Network": "10.3.0.0/30"}')
    with pytest.raises(ConfigError):
        mgr(reg).get_network_config()
    reg.set_config(CONFIG)
    assert str(mgr(reg).get_network_config().network) == "10.3.0.0/16"


# -- acquire (flannel TestAcquireLease, TestConfigChanged) ----------------------------------------------------------

def test_acquire_lease_then_reuse_by_public_ip():
    reg = FakeRegistry(config=CONFIG)
    m = mgr(reg)
    a = attrs("1.1.1.1")
    l1 = m.acquire_lease(a)
    assert l1.subnet.subnet_of(IPv4Network("10.3.0.0/16")) and l1.subnet.prefixlen == 24
    assert l1.subnet != IPv4Network("10.3.0.0/24")  # SubnetMin skips the first subnet
    assert reg.value_of(str(l1.subnet)).value == a.to_json()
    assert l1.lease_id in reg.leases and reg.leases[l1.lease_id] == 86400
    # a second acquire (a restart) finds the lease by PublicIP: same subnet, same (still alive) etcd lease
    a2 = attrs("1.1.1.1", mac="0a:58:0a:00:00:02")
    l2 = mgr(reg, rng=random.Random(99)).acquire_lease(a2)
    assert l2.subnet == l1.subnet and l2.lease_id == l1.lease_id
    assert reg.value_of(str(l1.subnet)).value == a2.to_json()
    # another host gets another subnet
    l3 = mgr(reg).acquire_lease(attrs("2.2.2.2"))
    assert l3.subnet != l1.subnet


def test_reuse_by_public_ip_after_etcd_lease_expired_grants_new():
    reg = FakeRegistry(config=CONFIG)
    reg.put_lease("10.3.7.0/24", attrs("1.1.1.1"), lease=4242)  # lease 4242 is unknown to the store: expired
    lease = mgr(reg).acquire_lease(attrs("1.1.1.1"))
    assert lease.subnet == IPv4Network("10.3.7.0/24")
    assert lease.lease_id != 4242 and lease.lease_id in reg.leases


def test_reservation_stays_reservation():
    reg = FakeRegistry(config=CONFIG)
    reg.put_lease("10.3.9.0/24", attrs("1.1.1.1"), lease=0)
    lease = mgr(reg).acquire_lease(attrs("1.1.1.1"))
    assert lease.subnet == IPv4Network("10.3.9.0/24") and lease.lease_id == 0
    assert reg.value_of("10.3.9.0/24").lease == 0


def test_config_changed_incompatible_lease_deleted():
    reg = FakeRegistry(config=CONFIG)
    old = mgr(reg).acquire_lease(attrs("1.1.1.1"))
    reg.set_config('{"Network": "10.4.0.0/16", "Backend": {"Type": "vxlan"}}')
    new = mgr(reg).acquire_lease(attrs("1.1.1.1"))
    assert new.subnet.subnet_of(IPv4Network("10.4.0.0/16"))
    assert reg.value_of(str(old.subnet)) is None  # the incompatible lease was deleted


def test_previous_subnet_used_when_free_and_compatible():
    reg = FakeRegistry(config=CONFIG)
    lease = mgr(reg, previous_subnet=IPv4Network("10.3.42.0/24")).acquire_lease(attrs("1.1.1.1"))
    assert lease.subnet == IPv4Network("10.3.42.0/24")


@pytest.mark.parametrize("prev", ["10.3.42.0/24", "10.9.42.0/24", "10.3.42.0/25", "10.3.0.0/24"])
def test_previous_subnet_ignored_when_taken_or_incompatible(prev):
    reg = FakeRegistry(config=CONFIG)
    reg.put_lease("10.3.42.0/24", attrs("9.9.9.9"))
    lease = mgr(reg, previous_subnet=IPv4Network(prev)).acquire_lease(attrs("1.1.1.1"))
    assert lease.subnet != IPv4Network(prev) and lease.subnet != IPv4Network("10.3.42.0/24")
    assert lease.subnet.prefixlen == 24


def test_lost_race_is_retried():
    reg = FakeRegistry(config=CONFIG)
    raced = []

    def racer(subnet, a, ttl):
        if not raced:  # another host creates the very subnet we picked, between our list and our create
            raced.append(subnet)
            reg.put_lease(str(subnet), attrs("7.7.7.7"))

    reg.hooks["create_subnet"].append(racer)
    lease = mgr(reg, previous_subnet=IPv4Network("10.3.5.0/24")).acquire_lease(attrs("1.1.1.1"))
    assert raced == [IPv4Network("10.3.5.0/24")]
    assert lease.subnet != raced[0]
    assert reg.calls.count("get_subnets") == 2 and reg.calls.count("create_subnet") == 2
    assert json.loads(reg.value_of("10.3.5.0/24").value)["PublicIP"] == "7.7.7.7"


def test_max_retries():
    reg = FakeRegistry(config=CONFIG)
    reg.fail_next["create_subnet"] = [SubnetExistsError(IPv4Network("10.3.1.0/24"))] * RACE_RETRIES
    with pytest.raises(LeaseError, match="max retries reached trying to acquire a subnet"):
        mgr(reg).acquire_lease(attrs("1.1.1.1"))
    assert reg.calls.count("create_subnet") == RACE_RETRIES


def test_out_of_subnets():
    reg = FakeRegistry(config='{"Network": "10.3.0.0/22", "SubnetLen": 24}')
    for i in (1, 2, 3):
        reg.put_lease(f"10.3.{i}.0/24", attrs(f"9.9.9.{i}"))
    with pytest.raises(OutOfSubnetsError, match="out of subnets: all 3 subnets"):
        mgr(reg).acquire_lease(attrs("1.1.1.1"))


def test_store_unavailable_propagates_from_acquire():
    reg = FakeRegistry(config=CONFIG)
    reg.fail_next["get_subnets"] = [StoreUnavailableError("down")]
    with pytest.raises(StoreUnavailableError):
        mgr(reg).acquire_lease(attrs("1.1.1.1"))


def test_lookup_by_public_ip():
    reg = FakeRegistry(config=CONFIG)
    reg.put_lease("10.3.3.0/24", attrs("3.3.3.3", mac="0a:58:00:00:00:33"))
    m = mgr(reg)
    assert m.lookup_lease_by_public_ip(IPv4Address("3.3.3.3")).attrs.vxlan_data() == (1, "0a:58:00:00:00:33")
    assert m.lookup_lease_by_public_ip(IPv4Address("4.4.4.4")) is None


# -- keep ---------------------------------------------------------------------------------------------------------

class KeepRunner:
    def __init__(self, m, lease):
        self.m = m
        self.stop = threading.Event()
        self.t = threading.Thread(target=m.keep_lease, args=(lease, self.stop), daemon=True)
        self.t.start()

    def close(self):
        self.stop.set()
        self.t.join(5)
        assert not self.t.is_alive()


def test_keep_lease_refreshes_same_etcd_lease():
    reg = FakeRegistry(config=CONFIG)
    m = mgr(reg, ttl=3, renew_margin_s=1)  # keep-alive every 1 s
    lease = m.acquire_lease(attrs("1.1.1.1"))
    k = KeepRunner(m, lease)
    try:
        assert wait_for(lambda: reg.refreshes[lease.lease_id] >= 2)
        assert reg.calls.count("create_subnet") == 1 and "update_subnet" not in reg.calls
        assert reg.value_of(str(lease.subnet)).lease == lease.lease_id
    finally:
        k.close()


def test_keep_lease_recreates_deleted_key(caplog):
    caplog.set_level(logging.INFO)
    reg = FakeRegistry(config=CONFIG)
    m = mgr(reg, check_s=0.1)
    a = attrs("1.1.1.1")
    lease = m.acquire_lease(a)
    k = KeepRunner(m, lease)
    try:
        reg.delete_subnet(lease.subnet)
        assert wait_for(lambda: reg.value_of(str(lease.subnet)) is not None)
        kv = reg.value_of(str(lease.subnet))
        assert kv.value == a.to_json()
        assert m.current_lease.subnet == lease.subnet and m.current_lease.lease_id == kv.lease
    finally:
        k.close()
    lost = [r for r in caplog.records if "event=lease_lost" in r.getMessage()]
    assert len(lost) == 1 and lost[0].levelno == logging.WARNING
    assert f"subnet={lease.subnet}" in lost[0].getMessage() and "action=reacquire" in lost[0].getMessage()


def test_keep_lease_recreates_after_etcd_lease_expired():
    reg = FakeRegistry(config=CONFIG)
    m = mgr(reg, ttl=3, renew_margin_s=1, check_s=60)
    lease = m.acquire_lease(attrs("1.1.1.1"))
    k = KeepRunner(m, lease)
    try:
        assert wait_for(lambda: reg.refreshes[lease.lease_id] >= 1)
        reg.expire_lease(lease.lease_id)  # keys gone; the next keep-alive says "not found"
        assert wait_for(lambda: reg.value_of(str(lease.subnet)) is not None)
        assert reg.value_of(str(lease.subnet)).lease != lease.lease_id
    finally:
        k.close()


def test_keep_lease_outage_logs_once_and_recovers(caplog):
    caplog.set_level(logging.INFO)
    reg = FakeRegistry(config=CONFIG)
    m = mgr(reg, ttl=3, renew_margin_s=1, check_s=0.1)
    lease = m.acquire_lease(attrs("1.1.1.1"))
    k = KeepRunner(m, lease)
    try:
        assert wait_for(lambda: reg.refreshes[lease.lease_id] >= 1)
        reg.set_down(True)
        n = len(reg.calls)
        assert wait_for(lambda: len(reg.calls) >= n + 5)  # it keeps retrying
        reg.expire_lease(lease.lease_id)  # the lease ran out during the outage
        reg.set_down(False)
        assert wait_for(lambda: reg.value_of(str(lease.subnet)) is not None)
    finally:
        k.close()
    msgs = [r.getMessage() for r in caplog.records]
    assert sum("event=store_unavailable" in x for x in msgs) == 1
    assert sum("event=store_available" in x for x in msgs) == 1
    assert not any(r.exc_info for r in caplog.records)


def test_keep_lease_conflict_waits_until_free(caplog):
    reg = FakeRegistry(config=CONFIG)
    m = mgr(reg, check_s=0.05)
    lease = m.acquire_lease(attrs("1.1.1.1"))
    k = KeepRunner(m, lease)
    try:
        reg.delete_subnet(lease.subnet)
        reg.put_lease(str(lease.subnet), attrs("6.6.6.6"))  # someone else took it meanwhile
        time.sleep(0.3)
        assert json.loads(reg.value_of(str(lease.subnet)).value)["PublicIP"] == "6.6.6.6"
        reg.delete_subnet(lease.subnet)  # now free again: we take it back
        assert wait_for(lambda: reg.value_of(str(lease.subnet)) is not None
                        and json.loads(reg.value_of(str(lease.subnet)).value)["PublicIP"] == "1.1.1.1")
    finally:
        k.close()
    assert sum("event=lease_conflict" in r.getMessage() for r in caplog.records) == 1


# -- watch (flannel TestWatchLeaseAdded / TestWatchLeaseRemoved + ours) ---------------------------------------------

class WatchRunner:
    """Drive watch_leases on a thread; collect events."""

    def __init__(self, m, own):
        self.stop = threading.Event()
        self.events = []
        self.batches = 0
        self.lock = threading.Lock()
        self.gen = m.watch_leases(own, self.stop)
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self):
        for batch in self.gen:
            with self.lock:
                self.batches += 1
                self.events.extend(batch)

    def state(self):
        """Replay events into {subnet: attrs}."""
        out = {}
        with self.lock:
            for ev in self.events:
                if ev.type is EventType.ADDED:
                    out[str(ev.lease.subnet)] = ev.lease.attrs
                else:
                    out.pop(str(ev.lease.subnet), None)
        return out

    def close(self):
        self.stop.set()
        self.t.join(5)
        assert not self.t.is_alive()


def setup_watch(**kw):
    reg = FakeRegistry(config=CONFIG)
    reg.put_lease("10.3.2.0/24", attrs("2.2.2.2"))
    m = mgr(reg, **kw)
    own = m.acquire_lease(attrs("1.1.1.1"))
    return reg, m, own


@pytest.mark.parametrize("age_s, lists", [(0.0, 0), (3600.0, 1)])
def test_first_watch_reuses_acquires_listing_while_fresh(age_s, lists):
    """A restarting host reads every lease once: the first watch starts from acquire's listing and revision (a
    change made in between still arrives, from the watch); a listing older than FIRST_LISTING_REUSE_S is not used."""
    reg, m, own = setup_watch()
    reg.put_lease("10.3.3.0/24", attrs("3.3.3.3"))  # after acquire's listing, before the watch
    leases, rev, t = m._first_listing
    m._first_listing = (leases, rev, t - age_s)
    before = reg.calls.count("get_subnets")
    w = WatchRunner(m, own)
    try:
        assert wait_for(lambda: w.state() == {"10.3.2.0/24": attrs("2.2.2.2"), "10.3.3.0/24": attrs("3.3.3.3")})
        assert reg.calls.count("get_subnets") - before == lists
    finally:
        w.close()


def test_watch_snapshot_added_removed_own_filtered():
    reg, m, own = setup_watch()
    w = WatchRunner(m, own)
    try:
        assert wait_for(lambda: w.state() == {"10.3.2.0/24": attrs("2.2.2.2")})
        reg.put_lease("10.3.3.0/24", attrs("3.3.3.3"))
        assert wait_for(lambda: "10.3.3.0/24" in w.state())
        reg.delete_raw("10.3.2.0-24")
        assert wait_for(lambda: "10.3.2.0/24" not in w.state())
        removed = [e for e in w.events if e.type is EventType.REMOVED]
        assert removed[0].lease.attrs == attrs("2.2.2.2")  # removal carries the last known attrs
        reg.put_lease(str(own.subnet), attrs("1.1.1.1", mac="0a:58:0a:00:00:09"))
        time.sleep(0.2)
        assert all(e.lease.subnet != own.subnet for e in w.events)
    finally:
        w.close()


def test_watch_yields_empty_batches_and_stops():
    reg, m, own = setup_watch()
    w = WatchRunner(m, own)
    wait_for(lambda: w.batches >= 3, what="empty batches keep coming with no events")
    w.close()  # the watch returns once stop is set: close() asserts the thread ended within its 5 s join


def test_watch_unparsable_value_skipped_nothing_removed(caplog):
    reg, m, own = setup_watch()
    reg.put_lease("10.3.3.0/24", attrs("3.3.3.3"))
    w = WatchRunner(m, own)
    try:
        assert wait_for(lambda: len(w.state()) == 2)
        reg.put_raw("10.3.4.0-24", "this is not json")
        reg.put_raw("not-a-subnet", '{"PublicIP":"4.4.4.4"}')
        reg.put_lease("10.3.5.0/24", attrs("5.5.5.5"))
        assert wait_for(lambda: "10.3.5.0/24" in w.state())
        assert set(w.state()) == {"10.3.2.0/24", "10.3.3.0/24", "10.3.5.0/24"}
        assert not any(e.type is EventType.REMOVED for e in w.events)
    finally:
        w.close()
    skipped = [r.getMessage() for r in caplog.records if "event=lease_skipped" in r.getMessage()]
    assert any("10.3.4.0-24" in s for s in skipped) and any("not-a-subnet" in s for s in skipped)
    # and a listing with the garbage still in it is not empty either
    leases, _ = reg.get_subnets()
    assert {str(x.subnet) for x in leases} >= {"10.3.2.0/24", "10.3.3.0/24", "10.3.5.0/24"}


def test_watch_compaction_relists():
    reg, m, own = setup_watch()
    reg.fail_next["watch_subnets"] = []
    w = WatchRunner(m, own)
    try:
        assert wait_for(lambda: "10.3.2.0/24" in w.state())
        reg.set_down(True)  # the stream breaks; meanwhile changes happen and the store is compacted
        reg.down = False
        reg.fail_next["watch_subnets"] = [StoreUnavailableError("x")] * 3
        reg.delete_raw("10.3.2.0-24")
        reg.put_lease("10.3.6.0/24", attrs("6.6.6.6"))
        reg.compact()
        n_lists = reg.calls.count("get_subnets")
        assert wait_for(lambda: w.state() == {"10.3.6.0/24": attrs("6.6.6.6")})
        assert reg.calls.count("get_subnets") > n_lists  # converged by a re-list
    finally:
        w.close()


def test_watch_resync_converges_after_missed_event():
    reg, m, own = setup_watch(resync_s=0.3)
    w = WatchRunner(m, own)
    try:
        assert wait_for(lambda: "10.3.2.0/24" in w.state())
        # an event the watch never delivers (lost in a gateway hiccup): change state behind the history
        with reg.cond:
            del reg.kv["/coreos.com/network/subnets/10.3.2.0-24"]
        assert wait_for(lambda: "10.3.2.0/24" not in w.state())
    finally:
        w.close()


def test_watch_reconnects_after_outage_without_losing_events(caplog):
    caplog.set_level(logging.INFO)
    reg, m, own = setup_watch()
    w = WatchRunner(m, own)
    try:
        assert wait_for(lambda: "10.3.2.0/24" in w.state())
        reg.set_down(True)
        time.sleep(0.3)
        reg.down = False  # back, but the watch must resume from its revision
        reg.put_lease("10.3.8.0/24", attrs("8.8.8.8"))
        assert wait_for(lambda: "10.3.8.0/24" in w.state())
    finally:
        w.close()
    msgs = [r.getMessage() for r in caplog.records]
    assert sum("event=store_unavailable" in x for x in msgs) == 1


def test_watch_own_key_deleted_wakes_keep_lease():
    reg, m, own = setup_watch(check_s=3600)
    k = KeepRunner(m, own)
    w = WatchRunner(m, own)
    try:
        time.sleep(0.2)
        reg.delete_subnet(own.subnet)
        assert wait_for(lambda: reg.value_of(str(own.subnet)) is not None)
    finally:
        w.close()
        k.close()


# -- own key overwritten (issue 14) ---------------------------------------------------------------------------------

def test_own_key_garbage_repaired_from_the_watch_event(caplog):
    """An operator's non-JSON put over our key: seen from the watch (not the 60 s check), rewritten once, same
    subnet and etcd lease, no hot loop afterwards."""
    caplog.set_level(logging.INFO)
    reg, m, own = setup_watch(check_s=3600)
    k = KeepRunner(m, own)
    w = WatchRunner(m, own)
    try:
        time.sleep(0.2)
        reg.put_raw(str(own.subnet).replace("/", "-"), "oops, not json")
        assert wait_for(lambda: reg.value_of(str(own.subnet)).value == own.attrs.to_json(), timeout=3)
        kv = reg.value_of(str(own.subnet))
        assert kv.lease == own.lease_id and m.current_lease.subnet == own.subnet
        n = len(reg.calls)
        time.sleep(1.0)
        assert len(reg.calls) - n < 10, reg.calls[n:]  # quiet again: a refresh/watch tick at most
        assert "10.3.2.0/24" in w.state()
    finally:
        w.close()
        k.close()
    msgs = [r.getMessage() for r in caplog.records]
    repaired = [x for x in msgs if "event=lease_repaired" in x]
    assert len(repaired) == 1 and "oops, not json" in repaired[0], repaired
    assert not any("event=lease_lost" in x or "event=lease_conflict" in x for x in msgs)


def test_own_key_repair_loses_to_a_concurrent_valid_writer(caplog):
    """The rewrite is guarded by the garbage's mod revision: a host that writes a valid lease in between wins, and
    we become a logged-once conflict re-checked with back-off (not a hot loop)."""
    reg, m, own = setup_watch(check_s=3600)
    raced = []

    def race(subnet, *_):
        if not raced:
            raced.append(1)
            reg.put_lease(str(subnet), attrs("6.6.6.6"))

    reg.hooks["replace_subnet"].append(race)
    k = KeepRunner(m, own)
    w = WatchRunner(m, own)
    try:
        time.sleep(0.2)
        reg.put_raw(str(own.subnet).replace("/", "-"), "garbage")
        assert wait_for(lambda: raced, timeout=3)
        time.sleep(2.0)
        assert json.loads(reg.value_of(str(own.subnet)).value)["PublicIP"] == "6.6.6.6"
        assert reg.calls.count("read_subnet") <= 8, reg.calls.count("read_subnet")  # 0.5, 1, 2 s back-off
    finally:
        w.close()
        k.close()
    assert sum("event=lease_conflict" in r.getMessage() for r in caplog.records) == 1
    assert not any("event=lease_repaired" in r.getMessage() for r in caplog.records)


def test_conflict_is_rechecked_with_backoff(caplog):
    reg = FakeRegistry(config=CONFIG)
    m = mgr(reg, check_s=0.05, recheck_backoff=(0.1, 0.4))
    lease = m.acquire_lease(attrs("1.1.1.1"))
    reg.put_lease(str(lease.subnet), attrs("6.6.6.6"))
    k = KeepRunner(m, lease)
    try:
        time.sleep(2.0)
    finally:
        k.close()
    # without back-off check_s=0.05 would mean ~40 reads; 0.1, 0.2, 0.4, 0.4 ... is ~6
    assert 3 <= reg.calls.count("read_subnet") <= 9, reg.calls.count("read_subnet")
    assert sum("event=lease_conflict" in r.getMessage() for r in caplog.records) == 1


def test_resync_delay_spreads_hosts_started_together():
    from fastflannel.subnet.manager import RESYNC_JITTER, resync_delay

    delays = [resync_delay(60.0, 40, random.Random(seed)) for seed in range(2000)]
    assert all(60.0 * (1 - RESYNC_JITTER) <= d <= 60.0 * (1 + RESYNC_JITTER) for d in delays)
    # 2,000 re-lists due in the same second are spread over a 30 s window instead
    per_second = [sum(1 for d in delays if s <= d < s + 1) for s in range(45, 75)]
    assert max(per_second) < 2000 / 30 * 1.6 and min(per_second[1:-1]) > 0


def test_resync_period_grows_with_the_cluster():
    from fastflannel.subnet.manager import RESYNC_CLUSTER_PER_S, resync_delay

    rng = random.Random(5)
    for n in (10, 60, 500, 5000):
        mean = sum(resync_delay(60.0, n, rng) for _ in range(400)) / 400
        period = max(60.0, n / RESYNC_CLUSTER_PER_S)
        assert 0.95 * period < mean < 1.05 * period
        assert n / mean <= RESYNC_CLUSTER_PER_S * 1.05 or period == 60.0  # cluster-wide re-lists per second
    assert resync_delay(60.0, 5000, rng) > 3000  # 5,000 hosts: not every minute


def test_restart_over_garbage_in_our_previous_key_repairs_it(caplog):
    """Killed, then garbage written over our key, then restarted: the listing skips the garbage, the create of the
    previous subnet (subnet.env) fails; the key is ours, so it is rewritten (not 10 lost races and exit 1)."""
    reg = FakeRegistry(config=CONFIG)
    reg.put_raw("10.3.42.0-24", "garbage while we were down")
    lease = mgr(reg, previous_subnet=IPv4Network("10.3.42.0/24")).acquire_lease(attrs("1.1.1.1"))
    assert lease.subnet == IPv4Network("10.3.42.0/24") and lease.lease_id
    assert reg.value_of("10.3.42.0/24").value == attrs("1.1.1.1").to_json()
    assert sum("event=lease_repaired" in r.getMessage() for r in caplog.records) == 1
    assert not any("event=lease_race" in r.getMessage() for r in caplog.records)


def test_previous_subnet_held_by_a_valid_lease_is_not_overwritten():
    reg = FakeRegistry(config=CONFIG)
    reg.put_lease("10.3.42.0/24", attrs("6.6.6.6"))
    lease = mgr(reg, previous_subnet=IPv4Network("10.3.42.0/24")).acquire_lease(attrs("1.1.1.1"))
    assert lease.subnet != IPv4Network("10.3.42.0/24")
    assert json.loads(reg.value_of("10.3.42.0/24").value)["PublicIP"] == "6.6.6.6"
