# SPDX-License-Identifier: Apache-2.0
"""Network config: Flannel's defaults and rules (pkg/subnet/config.go), as a table of cases."""
import json
from ipaddress import IPv4Address, IPv4Network, IPv6Address

import pytest

from fastflannel.config import ConfigError, parse_config


@pytest.mark.parametrize(
    "network, subnet_len, smin, smax",
    [
        ("10.3.0.0/16", 24, "10.3.1.0", "10.3.255.0"),
        ("100.96.0.0/16", 24, "100.96.1.0", "100.96.255.0"),
        ("10.0.0.0/8", 24, "10.0.1.0", "10.255.255.0"),
        ("10.1.0.0/22", 24, "10.1.1.0", "10.1.3.0"),
        ("10.1.0.0/23", 25, "10.1.0.128", "10.1.1.128"),
        ("10.1.0.0/28", 30, "10.1.0.4", "10.1.0.12"),
    ],
)
def test_defaults(network, subnet_len, smin, smax):
    c = parse_config(json.dumps({"Network": network}))
    assert c.network == IPv4Network(network)
    assert c.subnet_len == subnet_len
    assert c.subnet_min == IPv4Address(smin)
    assert c.subnet_max == IPv4Address(smax)


def test_backend_absent_is_udp_and_type_lowercased():
    assert parse_config('{"Network":"10.0.0.0/8"}').backend_type == "udp"
    c = parse_config('{"Network":"10.0.0.0/8","Backend":{"Type":"VXLAN","VNI":4}}')
    assert c.backend_type == "vxlan"
    assert c.backend_option("vni") == 4
    assert c.backend_option("Port", 0) == 0


def test_field_names_case_insensitive():
    c = parse_config('{"network":"10.5.0.0/16","subnetlen":26,"backend":{"type":"host-gw"}}')
    assert c.subnet_len == 26 and c.backend_type == "host-gw"


def test_explicit_min_max_kept():
    c = parse_config('{"Network":"10.5.0.0/16","SubnetMin":"10.5.10.0","SubnetMax":"10.5.20.0"}')
    assert c.subnet_min == IPv4Address("10.5.10.0") and c.subnet_max == IPv4Address("10.5.20.0")


def test_zero_min_means_unset():
    c = parse_config('{"Network":"10.5.0.0/16","SubnetMin":"0.0.0.0"}')
    assert c.subnet_min == IPv4Address("10.5.1.0")


@pytest.mark.parametrize(
    "raw, field",
    [
        ("{", "JSON"),
        ("[]", "JSON object"),
        ("{}", "Network"),
        ('{"Network":"banana"}', "Network"),
        ('{"Network":"10.0.0.0/29"}', "Network"),
        ('{"Network":"10.0.0.0/16","SubnetLen":31}', "SubnetLen"),
        ('{"Network":"10.0.0.0/16","SubnetLen":17}', "SubnetLen"),
        ('{"Network":"10.0.0.0/16","SubnetLen":"24"}', "SubnetLen"),
        ('{"Network":"10.0.0.0/16","SubnetMin":"10.1.0.0"}', "SubnetMin"),
        ('{"Network":"10.0.0.0/16","SubnetMax":"10.0.3.7"}', "SubnetMax"),
        ('{"Network":"10.0.0.0/16","SubnetMin":"10.0.9.0","SubnetMax":"10.0.3.0"}', "SubnetMin"),
        ('{"Network":"10.0.0.0/16","Backend":{"Port":1}}', "Backend.Type"),
        ('{"Network":"10.0.0.0/16","Backend":{"Type":"ipsec"}}', "Backend.Type"),
        ('{"Network":"10.0.0.0/16","Backend":"vxlan"}', "Backend"),
        ('{"Network":"10.0.0.0/16","EnableIPv4":"yes"}', "EnableIPv4"),
        ('{"EnableIPv4":false}', "EnableIPv4"),
        ('{"Network":"10.0.0.0/16","EnableIPv6":true}', "IPv6Network"),
    ],
)
def test_errors_name_the_field(raw, field):
    with pytest.raises(ConfigError) as ei:
        parse_config(raw)
    msg = str(ei.value)
    assert field in msg
    assert "\n" not in msg


def test_ipv6_defaults():
    c = parse_config('{"Network":"10.0.0.0/16","EnableIPv6":true,"IPv6Network":"fc00::/48"}')
    assert c.ipv6_subnet_len == 64
    assert c.ipv6_subnet_min == IPv6Address("fc00:0:0:1::")
    assert c.ipv6_subnet_max == IPv6Address("fc00:0:0:ffff::")


def test_subnet_in_range():
    c = parse_config('{"Network":"10.5.0.0/16","SubnetMin":"10.5.10.0"}')
    assert c.subnet_in_range(IPv4Network("10.5.10.0/24"))
    assert not c.subnet_in_range(IPv4Network("10.5.9.0/24"))
    assert not c.subnet_in_range(IPv4Network("10.5.10.0/25"))
    assert not c.subnet_in_range(IPv4Network("10.6.10.0/24"))
