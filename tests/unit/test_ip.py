# SPDX-License-Identifier: Apache-2.0
from ipaddress import IPv4Address, IPv4Network, IPv6Network

import pytest
from hypothesis import given, strategies as st

from fastflannel.ip import first_host, make_subnet_key, parse_ipv4, parse_subnet_key, subnet_index


def test_key_format_matches_flannel():
    assert make_subnet_key(IPv4Network("10.5.34.0/24")) == "10.5.34.0-24"
    assert (make_subnet_key(IPv4Network("10.5.1.0/24"), IPv6Network("fc00:0:0:1::/64"))
            == "10.5.1.0-24&fc00:0:0:1::-64")


def test_parse_full_key_path():
    net, net6 = parse_subnet_key("/coreos.com/network/subnets/100.96.3.0-24")
    assert net == IPv4Network("100.96.3.0/24") and net6 is None
    net, net6 = parse_subnet_key("10.5.1.0-24&fc00:0:0:1::-64")
    assert net6 == IPv6Network("fc00:0:0:1::/64")


@pytest.mark.parametrize("bad", ["", "garbage", "10.5.1.0/24", "10.5.1.0-", "10.5.1.0-24x", "999.5.1.0-24",
                                 "10.5.1.0-40", "10.5.1.0-24&FC00::-64"])
def test_parse_rejects(bad):
    with pytest.raises(ValueError, match="not a subnet key"):
        parse_subnet_key(bad)


@given(st.integers(0, 2**32 - 1), st.integers(8, 30))
def test_key_roundtrip(addr, plen):
    net = IPv4Network((addr, plen), strict=False)
    assert parse_subnet_key(make_subnet_key(net))[0] == net


def test_subnet_index_and_first_host():
    network = IPv4Network("100.96.0.0/16")
    assert subnet_index(IPv4Address("100.96.0.1"), network, 24) == 0
    assert subnet_index(IPv4Address("100.96.7.200"), network, 24) == 7
    assert subnet_index(IPv4Address("100.96.255.255"), network, 24) == 255
    assert first_host(IPv4Network("10.5.72.0/24")) == IPv4Address("10.5.72.1")


def _ipaddress_or_error(text):
    try:
        return IPv4Address(text)
    except ValueError:
        return "error"


def _ours_or_error(text):
    try:
        return parse_ipv4(text)
    except ValueError:
        return "error"


@given(st.one_of(st.ip_addresses(v=4).map(str), st.text(alphabet="0123456789.x -", max_size=18),
                 st.lists(st.integers(0, 300).map(str), min_size=1, max_size=5).map(".".join),
                 st.lists(st.sampled_from(["0", "00", "01", "255", "256", "1", "9"]), min_size=4, max_size=4)
                 .map(".".join)))
def test_parse_ipv4_accepts_exactly_what_ipaddress_accepts(text):
    assert _ours_or_error(text) == _ipaddress_or_error(text)
