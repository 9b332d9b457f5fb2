# SPDX-License-Identifier: Apache-2.0
"""kernel/nexthop.py without a kernel: the ids (distinct per destination, clear of low ids), the requests an op
expands to, and which ops stay plain."""
from __future__ import annotations

import struct
from ipaddress import IPv4Network, IPv6Network

from fastflannel.kernel import nexthop as N
from fastflannel.kernel import nlbatch as B


def test_ids_are_distinct_per_destination_and_have_the_top_bit():
    nets = list(IPv4Network("100.64.0.0/10").subnets(new_prefix=24))[:20000]
    nets += [IPv4Network("100.64.0.0/10"), IPv4Network("100.64.0.0/16"), IPv4Network("100.64.0.0/30"),
             IPv4Network("0.0.0.0/0"), IPv4Network("100.64.0.0/23"), IPv4Network("100.64.0.0/25")]
    ids = [N.nexthop_id(n) for n in nets]
    assert len(set(ids)) == len(nets)
    assert all(N.ID_BIT <= i < 2 ** 32 for i in ids)
    assert N.nexthop_id(IPv4Network("100.96.7.0/24")) == N.nexthop_id(IPv4Network("100.96.7.0/24"))  # after restart
    assert N.nexthop_id(IPv4Network("10.0.0.0/31")) is None and N.nexthop_id(IPv6Network("fc00::/64")) is None


def _attrs(body: bytes, head: int) -> dict:
    return B.attrs(body, head)


def test_gateway_route_expands_to_object_then_route():
    (nh, ign1), (route, ign2) = N.expand(B.route_replace("100.96.7.0/24", "10.168.0.7", 2, False))
    nh_id = N.nexthop_id(IPv4Network("100.96.7.0/24"))
    assert nh[0] == N.RTM_NEWNEXTHOP and nh[1] & B.NLM_F_REPLACE and ign1 == ()
    a = _attrs(nh[2], 8)
    assert struct.unpack("=I", a[N.NHA_ID])[0] == nh_id and struct.unpack("=I", a[N.NHA_OIF])[0] == 2
    assert a[N.NHA_GATEWAY] == bytes([10, 168, 0, 7])
    assert route[0] == B.RTM_NEWROUTE and ign2 == ()
    r = _attrs(route[2], 12)
    assert struct.unpack("=I", r[N.RTA_NH_ID])[0] == nh_id and B.RTA_GATEWAY not in r and B.RTA_OIF not in r
    assert r[B.RTA_DST] == bytes([100, 96, 7, 0])
    onlink = N.expand(B.route_replace("100.96.7.0/24", "100.96.7.0", 4, True))[0][0]
    assert struct.unpack_from("=BBBBI", onlink[2])[4] == B.RTNH_F_ONLINK


def test_delete_removes_object_and_plain_route_and_other_ops_stay_plain():
    (nh, ign1), (plain, ign2) = N.expand(B.route_del("100.96.7.0/24", "10.168.0.7", 2))
    assert nh[0] == N.RTM_DELNEXTHOP and set(ign1) >= {2} and plain == B.encode(B.route_del("100.96.7.0/24",
                                                                                              "10.168.0.7", 2))
    assert ign2 == B.IGNORED_ERRNOS["route_del"]
    for op in (B.route_replace("100.96.0.0/16", None, 3), B.route_replace("fc00:0:0:2::/64", "fd00::3", 2),
               B.route_replace("100.96.7.0/24", "10.168.0.7", None),
               B.route_replace("100.96.7.0/24", "10.168.0.7", 2, scope=B.RT_SCOPE_UNIVERSE),  # its own scope
               B.neigh_replace(3, "100.96.7.0", "0a:58:00:00:00:01"),
               B.fdb_del(3, "0a:58:00:00:00:01")):
        assert N.expand(op) == B.plain(op), op
    assert N.expand_deletes(B.route_replace("100.96.7.0/24", "10.168.0.7", 2)) == B.plain(
        B.route_replace("100.96.7.0/24", "10.168.0.7", 2))
    assert N.expand_deletes(B.route_del("100.96.7.0/24"))[0][0][0] == N.RTM_DELNEXTHOP
