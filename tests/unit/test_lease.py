# SPDX-License-Identifier: Apache-2.0
"""Lease JSON byte-compatibility and the pure LeaseWatcher (flannel pkg/lease)."""
from ipaddress import IPv4Address, IPv4Network, IPv6Address

import pytest
from hypothesis import given, strategies as st

from fastflannel.lease import Event, EventType, Lease, LeaseAttrs, LeaseParseError, LeaseWatcher

FLANNEL_VXLAN = '{"PublicIP":"192.0.2.10","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"0a:58:c0:00:02:0a"}}'
FLANNEL_HOSTGW = '{"PublicIP":"192.0.2.10","PublicIPv6":null,"BackendType":"host-gw"}'
FLANNEL_UDP = '{"PublicIP":"192.0.2.10","PublicIPv6":null}'


@pytest.mark.parametrize("text", [FLANNEL_VXLAN, FLANNEL_HOSTGW, FLANNEL_UDP])
def test_roundtrip_is_byte_exact(text):
    assert LeaseAttrs.from_json(text).to_json() == text


def test_encode_matches_flannel():
    a = LeaseAttrs(IPv4Address("192.0.2.10"), "vxlan", {"VNI": 1, "VtepMAC": "0a:58:c0:00:02:0a"})
    assert a.to_json() == FLANNEL_VXLAN
    assert LeaseAttrs(IPv4Address("192.0.2.10")).to_json() == FLANNEL_UDP
    v6 = LeaseAttrs(IPv4Address("192.0.2.10"), "host-gw", public_ipv6=IPv6Address("2001:db8::10"))
    assert v6.to_json() == '{"PublicIP":"192.0.2.10","PublicIPv6":"2001:db8::10","BackendType":"host-gw"}'


def test_decode_like_go():
    a = LeaseAttrs.from_json('{"publicip":"10.0.0.1","backendtype":"vxlan","BackendData":{"vni":1,"vtepmac":"AA:bb:cc:dd:ee:ff"},"Extra":5}')
    assert a.public_ip == IPv4Address("10.0.0.1")
    assert a.vxlan_data() == (1, "aa:bb:cc:dd:ee:ff")


@pytest.mark.parametrize("bad", ["", "nope", "[]", "{}", '{"PublicIP":5}', '{"PublicIP":"1.2.3"}',
                                 '{"PublicIP":"1.2.3.4","PublicIPv6":"x"}', '{"PublicIP":"1.2.3.4","BackendType":3}'])
def test_decode_errors(bad):
    with pytest.raises(LeaseParseError):
        LeaseAttrs.from_json(bad)


@given(st.binary(max_size=200))
def test_decode_garbage_never_crashes_otherwise(data):
    try:
        LeaseAttrs.from_json(data)
    except LeaseParseError:
        pass


def L(net, ip="10.168.0.2", mac=None):
    data = {"VNI": 1, "VtepMAC": mac} if mac else None
    return Lease(IPv4Network(net), LeaseAttrs(IPv4Address(ip), "vxlan" if mac else "", data))


def test_watcher_reset_filters_own_and_diffs():
    w = LeaseWatcher(IPv4Network("10.5.1.0/24"))
    ev = w.reset([L("10.5.1.0/24"), L("10.5.2.0/24"), L("10.5.3.0/24")])
    assert [(e.type, str(e.lease.subnet)) for e in ev] == [(EventType.ADDED, "10.5.2.0/24"), (EventType.ADDED, "10.5.3.0/24")]
    ev = w.reset([L("10.5.3.0/24"), L("10.5.4.0/24")])
    assert {(e.type, str(e.lease.subnet)) for e in ev} == {(EventType.REMOVED, "10.5.2.0/24"), (EventType.ADDED, "10.5.4.0/24")}
    assert w.reset([L("10.5.3.0/24"), L("10.5.4.0/24")]) == []


def test_watcher_reset_reports_changed_attrs():
    """Better than Flannel (PR #1247): a new VtepMAC in a snapshot reprograms the peer."""
    w = LeaseWatcher(None)
    w.reset([L("10.5.2.0/24", mac="0a:00:00:00:00:01")])
    ev = w.reset([L("10.5.2.0/24", mac="0a:00:00:00:00:02")])
    assert len(ev) == 1 and ev[0].type is EventType.ADDED
    assert ev[0].lease.attrs.vxlan_data()[1] == "0a:00:00:00:00:02"


def test_watcher_removal_carries_known_attrs():
    w = LeaseWatcher(IPv4Network("10.5.1.0/24"))
    w.update([Event(EventType.ADDED, L("10.5.2.0/24", "10.168.0.3", "0a:00:00:00:00:03"))])
    bare = Lease(IPv4Network("10.5.2.0/24"), LeaseAttrs(IPv4Address("0.0.0.0")))
    (ev,) = w.update([Event(EventType.REMOVED, bare)])
    assert ev.lease.attrs.public_ip == IPv4Address("10.168.0.3")
    assert ev.lease.attrs.vxlan_data()[1] == "0a:00:00:00:00:03"
    assert w.update([Event(EventType.REMOVED, bare)]) == []  # unknown removal: nothing to clean
    assert w.update([Event(EventType.ADDED, L("10.5.1.0/24"))]) == []  # own lease filtered


def test_lease_from_kv_is_memoised_on_the_exact_stored_value():
    from fastflannel.subnet.registry import lease_from_kv

    value = b'{"PublicIP":"10.168.0.3","PublicIPv6":null,"BackendType":"host-gw"}'
    a = lease_from_kv("/coreos.com/network/subnets/100.96.2.0-24", value, 7)
    assert lease_from_kv("/coreos.com/network/subnets/100.96.2.0-24", value, 7) is a  # parsed once
    other = lease_from_kv("/coreos.com/network/subnets/100.96.2.0-24", value, 8)
    assert other is not a and other.lease_id == 8 and other == a  # another etcd lease: parsed again
    changed = lease_from_kv("/coreos.com/network/subnets/100.96.2.0-24", value.replace(b".3", b".4"), 7)
    assert str(changed.attrs.public_ip) == "10.168.0.4"
    for _ in range(2):  # errors are raised every time, never cached as a value
        with pytest.raises(ValueError):
            lease_from_kv("/coreos.com/network/subnets/100.96.2.7-24", value, 7)


def test_lease_parse_memo_keeps_one_value_per_key_under_churn():
    """Lease churn (a new value and etcd lease at every write of the same keys) must not grow the memo: it holds
    the last value of each key only (issue 14: an LRU of old values was a slow RSS rise in the soak)."""
    from fastflannel.subnet import registry

    keys = [f"/coreos.com/network/subnets/100.96.{i}.0-24" for i in range(200, 250)]
    before = len(registry._LAST_PARSED)
    for n in range(2000):
        value = f'{{"PublicIP":"10.168.0.{n % 200}","PublicIPv6":null,"BackendType":"host-gw"}}'.encode()
        registry.lease_from_kv(keys[n % 50], value, 0x1000 + n)
    assert len(registry._LAST_PARSED) - before <= 50
