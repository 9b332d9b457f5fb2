# SPDX-License-Identifier: Apache-2.0
"""Dual-stack leases in a real etcd (issue 15): Flannel's key and JSON, read back by etcdctl, and a watch DELETE
of a dual key that carries both subnets."""
from __future__ import annotations

import threading
import time
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest

from etcd_local import LocalEtcd, etcd_available
from fastflannel.lease import EventType, LeaseAttrs
from fastflannel.subnet.etcd import EtcdRegistry
from fastflannel.subnet.manager import LocalManager

SKIP = etcd_available()
DUAL = '{"Network":"10.5.0.0/16","EnableIPv6":true,"IPv6Network":"fc00::/48","Backend":{"Type":"vxlan"}}'
PREFIX = "/dual/coreos.com/network"


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


@pytest.mark.etcd
def test_dual_lease_key_json_and_watch_delete(etcd):
    etcd.ctl("put", f"{PREFIX}/config", DUAL)
    attrs = LeaseAttrs(IPv4Address("192.0.2.10"), "vxlan", {"VNI": 1, "VtepMAC": "0a:58:0a:05:01:00"},
                       IPv6Address("2001:db8::10"), {"VNI": 1, "VtepMAC": "0e:58:0a:05:01:06"})
    reg = EtcdRegistry(etcd.endpoint, prefix=PREFIX, timeout=5)
    try:
        lease = LocalManager(reg).acquire_lease(attrs)
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
