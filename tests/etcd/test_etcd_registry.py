# SPDX-License-Identifier: Apache-2.0
"""EtcdRegistry + LocalManager against a real etcd 3.4 on 127.0.0.1 (marker ``etcd``).

Each test gets its own key prefix on a shared module etcd; tests that kill the server get their own etcd.
"""
from __future__ import annotations

import itertools
import json
import logging
import random
import threading
import time
from ipaddress import IPv4Address, IPv4Network

import pytest
from waiting import wait_for

import shutil

from etcd_local import LocalEtcd, etcd_available, free_port, tls_etcd
from fastflannel.lease import EventType, LeaseAttrs
from fastflannel.subnet import OutOfSubnetsError, StoreUnavailableError
from fastflannel.subnet.etcd import INSECURE_WARNING, EtcdConfigError, EtcdRegistry, EtcdRequestError, parse_endpoints
from fastflannel.subnet.manager import LocalManager
from fastflannel.subnet.registry import CompactedError, LeaseNotFoundError, SubnetExistsError

SKIP = etcd_available()
etcd_only = [pytest.mark.etcd, pytest.mark.skipif(SKIP is not None, reason=SKIP or "")]

CONFIG = '{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}'
_prefixes = itertools.count()


def vx(ip: str, mac: str = "0a:58:c0:00:02:0a") -> LeaseAttrs:
    return LeaseAttrs(public_ip=IPv4Address(ip), backend_type="vxlan", backend_data={"VNI": 1, "VtepMAC": mac})


@pytest.fixture(scope="module")
def etcd():
    if SKIP:
        pytest.skip(SKIP)
    e = LocalEtcd()
    try:
        e.start()
        yield e
    finally:
        e.close()


@pytest.fixture
def prefix(etcd):
    return f"/test{next(_prefixes)}/coreos.com/network"


def registry(e: LocalEtcd, prefix: str, **kw) -> EtcdRegistry:
    return EtcdRegistry(e.endpoint, prefix=prefix, timeout=5, **kw)


def manager(reg, **kw) -> LocalManager:
    kw.setdefault("tick_s", 0.2)
    kw.setdefault("keep_backoff", (0.1, 0.5))
    kw.setdefault("watch_backoff", (0.05, 0.5))
    return LocalManager(reg, **kw)


class Thread:
    def __init__(self, target, *args):
        self.stop = threading.Event()
        self.result = []
        self.t = threading.Thread(target=self._run, args=(target, args), daemon=True)
        self.t.start()

    def _run(self, target, args):
        out = target(*args, self.stop)
        if out is not None:
            for batch in out:
                self.result.extend(batch)

    def close(self):
        self.stop.set()
        self.t.join(10)
        assert not self.t.is_alive()


def replay(events):
    state = {}
    for ev in list(events):
        if ev.type is EventType.ADDED:
            state[str(ev.lease.subnet)] = ev.lease.attrs
        else:
            state.pop(str(ev.lease.subnet), None)
    return state


# -- flag parsing (no etcd needed) ----------------------------------------------------------------------------------

def test_parse_endpoints_and_tls_rules(caplog):
    eps = parse_endpoints("http://127.0.0.1:4001, http://127.0.0.1:2379,127.0.0.1", tls=False)
    assert [str(e) for e in eps] == ["http://127.0.0.1:4001", "http://127.0.0.1:2379", "http://127.0.0.1:2379"]
    assert str(parse_endpoints("https://[::1]:2379", tls=True)[0]) == "https://[::1]:2379"
    with pytest.raises(EtcdConfigError, match="plain http"):
        parse_endpoints("http://127.0.0.1:2379", tls=True)
    with pytest.raises(EtcdConfigError, match="given together"):
        EtcdRegistry("https://127.0.0.1:2379", keyfile="/k.pem")
    with pytest.raises(EtcdConfigError, match="not an http"):
        parse_endpoints("ftp://x:1", tls=False)
    caplog.clear()
    EtcdRegistry("http://127.0.0.1:2379")
    assert INSECURE_WARNING in caplog.text
    caplog.clear()
    EtcdRegistry("https://127.0.0.1:2379", keyfile="/k.pem", certfile="/c.pem")
    assert INSECURE_WARNING not in caplog.text


def test_unreachable_maps_to_store_unavailable():
    ports = [free_port(), free_port()]
    reg = EtcdRegistry(",".join(f"http://127.0.0.1:{p}" for p in ports), timeout=2)
    with pytest.raises(StoreUnavailableError) as ei:
        reg.get_config()
    msg = str(ei.value)
    assert all(str(p) in msg for p in ports) and "--etcd-endpoints" in msg


# -- against etcd ---------------------------------------------------------------------------------------------------

@pytest.mark.etcd
def test_gateway_path_and_failover(etcd, prefix):
    dead = f"http://127.0.0.1:{free_port()}"
    reg = EtcdRegistry(f"{dead},{etcd.endpoint}", prefix=prefix, timeout=5)
    assert reg.get_config() is None
    assert reg.api_path() == "/v3/"  # etcd3gw discovers /v3/ on 3.4 via GET /version


@pytest.mark.etcd
def test_store_format_byte_exact(etcd, prefix):
    etcd.ctl("put", f"{prefix}/config", CONFIG)
    reg = registry(etcd, prefix)
    assert reg.get_config() == CONFIG
    a = vx("192.0.2.10")
    lease = reg.create_subnet(IPv4Network("10.5.52.0/24"), a, 600)
    out = etcd.ctl("get", "--prefix", f"{prefix}/subnets")
    assert out == (
        f"{prefix}/subnets/10.5.52.0-24\n".encode()
        + b'{"PublicIP":"192.0.2.10","PublicIPv6":null,"BackendType":"vxlan",'
        b'"BackendData":{"VNI":1,"VtepMAC":"0a:58:c0:00:02:0a"}}\n'
    )
    meta = json.loads(etcd.ctl("get", f"{prefix}/subnets/10.5.52.0-24", "-w", "json"))
    assert int(meta["kvs"][0]["lease"]) == lease.lease_id
    ttl = json.loads(etcd.ctl("lease", "timetolive", format(lease.lease_id, "x"), "-w", "json"))
    assert 590 <= ttl["ttl"] <= 600 and ttl["granted-ttl"] == 600
    # udp/alloc-style value: no BackendType at all
    reg.create_subnet(IPv4Network("10.5.53.0/24"), LeaseAttrs(IPv4Address("192.0.2.11")), 600)
    assert etcd.ctl("get", "--print-value-only", f"{prefix}/subnets/10.5.53.0-24") == \
        b'{"PublicIP":"192.0.2.11","PublicIPv6":null}\n'


@pytest.mark.etcd
def test_create_is_atomic_and_revokes_loser_lease(etcd, prefix):
    reg = registry(etcd, prefix)
    def lease_ids():
        return {int(x["id"]) for x in json.loads(etcd.ctl("lease", "list", "-w", "json")).get("leases") or []}

    before = lease_ids()
    first = reg.create_subnet(IPv4Network("10.5.1.0/24"), vx("192.0.2.1"), 600)
    with pytest.raises(SubnetExistsError):
        reg.create_subnet(IPv4Network("10.5.1.0/24"), vx("192.0.2.2"), 600)
    assert json.loads(etcd.ctl("get", "--print-value-only", f"{prefix}/subnets/10.5.1.0-24"))["PublicIP"] == "192.0.2.1"
    assert lease_ids() - before == {first.lease_id}  # the loser's freshly granted lease was revoked


@pytest.mark.etcd
def test_two_hosts_race_for_two_free_subnets(etcd, prefix):
    etcd.ctl("put", f"{prefix}/config", '{"Network":"10.5.0.0/22","SubnetLen":24,"Backend":{"Type":"vxlan"}}')
    reg0 = registry(etcd, prefix)
    reg0.create_subnet(IPv4Network("10.5.1.0/24"), vx("192.0.2.1"), 600)  # slots .1 .2 .3: two left
    barrier = threading.Barrier(2)
    results, errors = {}, []

    def host(ip):
        try:
            m = manager(registry(etcd, prefix), rng=random.Random(5))  # same seed: same first pick -> a real race
            barrier.wait()
            results[ip] = m.acquire_lease(vx(ip))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    ts = [threading.Thread(target=host, args=(ip,)) for ip in ("192.0.2.2", "192.0.2.3")]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    assert not errors
    subnets = {str(x.subnet) for x in results.values()}
    assert subnets == {"10.5.2.0/24", "10.5.3.0/24"}
    with pytest.raises(OutOfSubnetsError, match=f"remove stale leases under {prefix}/subnets"):
        manager(registry(etcd, prefix)).acquire_lease(vx("192.0.2.4"))


@pytest.mark.etcd
def test_keep_alive_keeps_same_lease_and_recreates_deleted_key(etcd, prefix, caplog):
    caplog.set_level(logging.INFO)
    etcd.ctl("put", f"{prefix}/config", CONFIG)
    reg = registry(etcd, prefix)
    m = manager(reg, ttl=6, renew_margin_s=4, check_s=0.5)  # keep-alive every 2 s
    lease = m.acquire_lease(vx("192.0.2.1"))
    k = Thread(m.keep_lease, lease)
    try:
        time.sleep(7)  # longer than the TTL: alive only thanks to keep-alives of the same lease
        meta = json.loads(etcd.ctl("get", f"{prefix}/subnets/{lease.subnet.network_address}-24", "-w", "json"))
        assert int(meta["kvs"][0]["lease"]) == lease.lease_id
        assert reg.refresh(lease.lease_id) == 6
        etcd.ctl("del", f"{prefix}/subnets/{lease.subnet.network_address}-24")
        assert wait_for(lambda: reg.get_subnet(lease.subnet) is not None)
        again = reg.get_subnet(lease.subnet)
        assert again.attrs == lease.attrs and again.lease_id == m.current_lease.lease_id
    finally:
        k.close()
    assert sum("event=lease_lost" in r.getMessage() for r in caplog.records) == 1
    with pytest.raises(LeaseNotFoundError):
        reg.refresh(0x7777)


@pytest.mark.etcd
def test_garbage_value_skipped_by_list_and_watch(etcd, prefix, caplog):
    reg = registry(etcd, prefix)
    reg.create_subnet(IPv4Network("10.5.2.0/24"), vx("192.0.2.2"), 600)
    etcd.ctl("put", f"{prefix}/subnets/10.5.3.0-24", "garbage")
    leases, rev = reg.get_subnets()
    assert [str(x.subnet) for x in leases] == ["10.5.2.0/24"]
    assert "10.5.3.0-24" in caplog.text and "event=lease_skipped" in caplog.text
    stop = threading.Event()
    batches = reg.watch_subnets(rev + 1, stop)
    try:
        etcd.ctl("put", f"{prefix}/subnets/10.5.4.0-24", "{not json")
        reg.create_subnet(IPv4Network("10.5.5.0/24"), vx("192.0.2.5"), 600)
        got, skipped = [], []
        end = time.monotonic() + 10
        while len(got) < 1 and time.monotonic() < end:
            b = next(batches)
            got += b.items
            skipped += b.skipped
        assert [(t, str(x.subnet)) for t, x in got] == [(EventType.ADDED, "10.5.5.0/24")]
        assert skipped == [f"{prefix}/subnets/10.5.4.0-24"]
    finally:
        batches.close()


@pytest.mark.etcd
@pytest.mark.parametrize("reuse_listing", [True, False])
def test_watch_from_compacted_revision_raises_and_manager_relists(etcd, prefix, reuse_listing):
    etcd.ctl("put", f"{prefix}/config", CONFIG)
    reg = registry(etcd, prefix)
    reg.create_subnet(IPv4Network("10.5.2.0/24"), vx("192.0.2.2"), 600)
    _, rev = reg.get_subnets()
    etcd.ctl("put", f"{prefix}/other", "x")
    etcd.ctl("put", f"{prefix}/other", "y")
    _, rev2 = reg.get_subnets()
    etcd.ctl("compact", str(rev2))
    stop = threading.Event()
    with pytest.raises(CompactedError) as ei:
        next(reg.watch_subnets(rev + 1, stop))
    assert ei.value.compact_revision == rev2

    # manager: the store is compacted between its listing and its watch -> re-list converges
    m = manager(reg)
    own = m.acquire_lease(vx("192.0.2.1"))
    real_list = reg.get_subnets
    calls = []

    def change_and_compact():
        etcd.ctl("del", f"{prefix}/subnets/10.5.2.0-24")
        reg.create_subnet(IPv4Network("10.5.6.0/24"), vx("192.0.2.6"), 600)
        _, now = real_list()
        etcd.ctl("compact", str(now))

    if reuse_listing:  # the first watch starts from acquire's listing: the change comes after that one
        change_and_compact()

    def list_then_change():
        out = real_list()
        calls.append(out[1])
        if len(calls) == 1 and not reuse_listing:
            change_and_compact()
        return out

    if not reuse_listing:
        m._first_listing = None  # the watch lists for itself (as after a re-list or a reconnect)
    reg.get_subnets = list_then_change  # type: ignore[method-assign]
    w = Thread(m.watch_leases, own)
    try:
        assert wait_for(lambda: replay(w.result) == {"10.5.6.0/24": vx("192.0.2.6")})
        assert len(calls) == 1 if reuse_listing else len(calls) >= 2  # reused: only the re-list after compaction
    finally:
        w.close()


@pytest.mark.etcd
def test_auth_username_password(etcd, prefix):
    # a second etcd so enabling auth does not disturb the other tests
    e = LocalEtcd()
    try:
        e.start()
        e.ctl("user", "add", "root:rootpw")
        e.ctl("user", "add", "flannel:s3cret")
        e.ctl("role", "add", "flannel")
        e.ctl("role", "grant-permission", "flannel", "--prefix=true", "readwrite", "/coreos.com/network/")
        e.ctl("user", "grant-role", "flannel", "flannel")
        e.ctl("auth", "enable")
        e.ctl("--user=root:rootpw", "put", "/coreos.com/network/config", CONFIG)
        reg = EtcdRegistry(e.endpoint, username="flannel", password="s3cret", timeout=5)
        assert reg.get_config() == CONFIG
        m = manager(reg)
        lease = m.acquire_lease(vx("192.0.2.1"))
        assert reg.refresh(lease.lease_id) > 0
        stop = threading.Event()
        w = reg.watch_subnets(1, stop)
        try:
            b = next(w)
            while not b.items:
                b = next(w)
            assert b.items[0][1].subnet == lease.subnet
        finally:
            w.close()
        with pytest.raises(EtcdRequestError, match="--etcd-username"):
            EtcdRegistry(e.endpoint, username="flannel", password="wrong", timeout=5).get_config()
        with pytest.raises(EtcdRequestError):
            EtcdRegistry(e.endpoint, timeout=5).get_config()  # no token: refused, not "unavailable"
    finally:
        e.close()


@pytest.mark.etcd
def test_etcd_killed_and_restarted_keep_and_watch_recover(etcd, caplog):
    caplog.set_level(logging.INFO)
    e = LocalEtcd()
    try:
        e.start()
        e.ctl("put", "/coreos.com/network/config", CONFIG)
        reg = EtcdRegistry(e.endpoint, timeout=3, connect_timeout=1)
        other = EtcdRegistry(e.endpoint, timeout=3)
        other.create_subnet(IPv4Network("10.5.2.0/24"), vx("192.0.2.2"), 600)
        m = manager(reg, ttl=30, renew_margin_s=20, check_s=1)  # keep-alive every 10 s
        own = m.acquire_lease(vx("192.0.2.1"))
        k = Thread(m.keep_lease, own)
        w = Thread(m.watch_leases, own)
        try:
            assert wait_for(lambda: "10.5.2.0/24" in replay(w.result))
            e.kill()
            time.sleep(3)  # keep_lease and the watch both see the outage
            e.start()
            other.create_subnet(IPv4Network("10.5.3.0/24"), vx("192.0.2.3"), 600)
            assert wait_for(lambda: "10.5.3.0/24" in replay(w.result), timeout=20)
            held = reg.get_subnet(own.subnet)
            assert held is not None and held.attrs == own.attrs
            assert held.lease_id == own.lease_id  # the same etcd lease survived the restart
            assert wait_for(lambda: sum("event=store_available" in r.getMessage() and "keep_lease" in r.getMessage()
                                        for r in caplog.records) == 1, timeout=15)
        finally:
            w.close()
            k.close()
        msgs = [r.getMessage() for r in caplog.records if r.name.startswith("fastflannel")]
        assert sum("event=store_unavailable" in x and "op=keep_lease" in x for x in msgs) == 1
        assert sum("event=store_unavailable" in x and ("op=watch" in x or "op=list" in x) for x in msgs) == 1
        assert not any(r.exc_info for r in caplog.records)
    finally:
        e.close()


@pytest.mark.etcd
@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not found (needed to make test certificates)")
def test_tls_client_certificates(etcd, caplog):
    e = tls_etcd()
    try:
        f = e.tls_files
        e.ctl("put", "/coreos.com/network/config", CONFIG)
        caplog.clear()
        reg = EtcdRegistry(e.endpoint, keyfile=f["client_key"], certfile=f["client_cert"], cafile=f["ca"], timeout=5)
        assert INSECURE_WARNING not in caplog.text
        assert reg.get_config() == CONFIG
        lease = manager(reg).acquire_lease(vx("192.0.2.1"))
        assert reg.refresh(lease.lease_id) > 0
        stop = threading.Event()
        w = reg.watch_subnets(1, stop)
        try:
            b = next(w)
            while not b.items:
                b = next(w)
            assert b.items[0][1].subnet == lease.subnet
        finally:
            w.close()
        # no client certificate: the server refuses the handshake -> unavailable, never a plain-http retry
        with pytest.raises(StoreUnavailableError):
            EtcdRegistry(e.endpoint, cafile=f["ca"], timeout=3).get_config()
        # wrong CA: verification fails
        with pytest.raises(StoreUnavailableError):
            EtcdRegistry(e.endpoint, keyfile=f["client_key"], certfile=f["client_cert"], timeout=3).get_config()
        with pytest.raises(EtcdConfigError):
            EtcdRegistry(e.endpoint.replace("https", "http"), keyfile=f["client_key"], certfile=f["client_cert"])
    finally:
        e.close()


@pytest.mark.etcd
def test_replace_subnet_is_guarded_by_mod_revision(etcd, prefix):
    """read_subnet shows an unparsable value with its mod revision; replace_subnet rewrites it only at that
    revision (a concurrent writer wins), keeping our etcd lease."""
    reg = registry(etcd, prefix)
    net = IPv4Network("10.5.7.0/24")
    mine = reg.create_subnet(net, vx("192.0.2.7"), 600)
    etcd.ctl("put", f"{prefix}/subnets/10.5.7.0-24", "oops")  # an operator's mistake: no lease, not JSON
    cur = reg.read_subnet(net)
    assert cur.lease is None and cur.value == "oops" and cur.error and cur.lease_id == 0 and cur.mod_revision > 0
    etcd.ctl("put", f"{prefix}/subnets/10.5.7.0-24", "oops again")  # changed after we read it
    with pytest.raises(SubnetExistsError):
        reg.replace_subnet(net, vx("192.0.2.7"), 600, cur.mod_revision, lease_id=mine.lease_id)
    assert reg.read_subnet(net).value == "oops again"
    cur = reg.read_subnet(net)
    got = reg.replace_subnet(net, vx("192.0.2.7"), 600, cur.mod_revision, lease_id=mine.lease_id)
    assert got.lease_id == mine.lease_id
    now = reg.read_subnet(net)
    assert now.lease is not None and now.lease.attrs == vx("192.0.2.7") and now.lease_id == mine.lease_id
    assert reg.get_subnet(net).attrs == vx("192.0.2.7")


@pytest.mark.etcd
def test_scheme_and_tls_mismatch_named_with_what_to_change(etcd):
    """https against plain etcd, http against TLS etcd, a wrong CA, no client certificate: the error (logged once
    per outage by the retry loops) says what to change, not just "unavailable"."""
    import tempfile
    from pathlib import Path

    from fastflannel.lab.testbed.tls import make_tls_files

    def err(**kw) -> str:
        with pytest.raises(StoreUnavailableError) as ei:
            EtcdRegistry(timeout=3, connect_timeout=2, **kw).get_config()
        return str(ei.value)

    e = tls_etcd()
    try:
        f = e.tls_files
        assert "use http:// in --etcd-endpoints" in err(endpoints=etcd.endpoint.replace("http:", "https:"))
        assert "use http:// in --etcd-endpoints" in err(endpoints=etcd.endpoint.replace("http:", "https:"),
                                                        keyfile=f["client_key"], certfile=f["client_cert"])
        assert "serves TLS, not plain http: use https://" in err(endpoints=e.endpoint.replace("https:", "http:"))
        other = make_tls_files(Path(tempfile.mkdtemp(dir=e.data_dir)), [IPv4Address("127.0.0.1")])
        assert "set --etcd-cafile to the CA" in err(endpoints=e.endpoint, cafile=other["ca"],
                                                    keyfile=f["client_key"], certfile=f["client_cert"])
        assert "set --etcd-certfile/--etcd-keyfile" in err(endpoints=e.endpoint, cafile=f["ca"])
        # an ordinary outage keeps the general advice
        e.stop()
        assert "Check that etcd is running" in err(endpoints=e.endpoint, cafile=f["ca"])
    finally:
        e.close()


def test_dual_lease_key_json_and_watch_delete(etcd, prefix):
    """Dual stack (issue 15): Flannel's key and JSON read back by etcdctl, a flanneld-written dual key read, a watch
    DELETE of a dual key that carries both subnets."""
    from ipaddress import IPv6Address, IPv6Network

    PREFIX = prefix
    DUAL = '{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fc00::/48","Backend":{"Type":"vxlan"}}'
    etcd.ctl("put", f"{PREFIX}/config", DUAL)
    attrs = LeaseAttrs(IPv4Address("192.0.2.10"), "vxlan", {"VNI": 1, "VtepMAC": "0a:58:0a:05:01:00"},
                       IPv6Address("2001:db8::10"), {"VNI": 1, "VtepMAC": "0e:58:0a:05:01:06"})
    reg = registry(etcd, PREFIX)
    try:
        lease = manager(reg).acquire_lease(attrs)
        assert lease.subnet6 is not None and lease.lease_id
        key = f"{PREFIX}/subnets/{lease.subnet.network_address}-24&{lease.subnet6.network_address.compressed}-64"
        out = etcd.ctl("get", f"{PREFIX}/subnets", "--prefix").decode().splitlines()
        assert out == [key, '{"PublicIP":"192.0.2.10","PublicIPv6":"2001:db8::10","BackendType":"vxlan",'
                            '"BackendData":{"VNI":1,"VtepMAC":"0a:58:0a:05:01:00"},'
                            '"BackendV6Data":{"VNI":1,"VtepMAC":"0e:58:0a:05:01:06"}}']
        # a flanneld-written dual key is read back with both subnets
        etcd.ctl("put", f"{PREFIX}/subnets/10.5.200.0-24&fc00:0:0:c8::-64",
                 '{"PublicIP":"192.0.2.20","PublicIPv6":"2001:db8::20","BackendType":"host-gw"}')
        leases, rev = reg.get_subnets()
        other = next(x for x in leases if x.subnet == IPv4Network("10.5.200.0/24"))
        assert other.subnet6 == IPv6Network("fc00:0:0:c8::/64") and str(other.attrs.public_ipv6) == "2001:db8::20"
        stop = threading.Event()
        w = reg.watch_subnets(rev + 1, stop)
        try:
            etcd.ctl("del", f"{PREFIX}/subnets/10.5.200.0-24&fc00:0:0:c8::-64")
            items = []
            end = time.monotonic() + 10
            while not items and time.monotonic() < end:
                items = next(w).items
            ((typ, gone),) = items
            assert typ is EventType.REMOVED
            assert (gone.subnet, gone.subnet6) == (IPv4Network("10.5.200.0/24"), IPv6Network("fc00:0:0:c8::/64"))
        finally:
            w.close()
    finally:
        reg.close()
