# SPDX-License-Identifier: Apache-2.0
"""Fuzz what the daemon reads from etcd (issue 6, bad input): the network config and the lease keys and values.

The parsers may refuse anything, but only with their own error type (the daemon catches exactly those): a
``TypeError``/``KeyError``/``AttributeError`` escaping from a parser would kill a watch loop or the start-up with
a traceback instead of the one clear line. test_lease.py fuzzes raw bytes into ``LeaseAttrs.from_json``; here the
inputs are *structured*: real JSON whose fields carry every JSON type, case-mangled names, nesting, and the
near-valid values (addresses, prefixes, booleans) that reach deeper into the checks. Config errors must also name
a field or say the text is not JSON/an object, so the operator's one ERROR line says what to fix.
"""
from __future__ import annotations

import json
import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastflannel.config import ConfigError, parse_config
from fastflannel.lease import LeaseAttrs, LeaseParseError
from fastflannel.subnet.registry import lease_from_kv

EXAMPLES = int(os.environ.get("FASTFLANNEL_FUZZ_EXAMPLES") or 300)
fuzz = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False),
                    st.text(max_size=20),
                    st.sampled_from(["10.5.0.0/16", "10.5.0.0/33", "10.5.0.1", "fc00::/48", "fc00::", "0.0.0.0",
                                     "255.255.255.255", "1.2.3", "", " ", "vxlan", "VXLAN", "host-gw", "udp", "true",
                                     "24", "-1", "10.5.1.0/24", "::/0", "0/0", "aa:bb:cc:dd:ee:ff", "zz"]))
JSON = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                      st.dictionaries(st.text(max_size=10), inner, max_size=4)),
                    max_leaves=12)

CONFIG_FIELDS = ["Network", "SubnetLen", "SubnetMin", "SubnetMax", "Backend", "EnableIPv4", "EnableIPv6",
                 "IPv6Network", "IPv6SubnetLen", "IPv6SubnetMin", "IPv6SubnetMax", "EnableNFTables"]
BACKEND_FIELDS = ["Type", "VNI", "Port", "DirectRouting", "MTU", "GBP", "Learning", "MacPrefix"]


def _case(name: str, draw_bool: bool) -> str:
    return name.lower() if draw_bool else name


@st.composite
def configs(draw):  # type: ignore[no-untyped-def]
    base = {"Network": "10.5.0.0/16", "Backend": {"Type": "vxlan"}}
    for f in draw(st.lists(st.sampled_from(CONFIG_FIELDS), max_size=5, unique=True)):
        base.pop(f, None)
        base[_case(f, draw(st.booleans()))] = draw(JSON)
    if isinstance(base.get("Backend"), dict) and draw(st.booleans()):
        for f in draw(st.lists(st.sampled_from(BACKEND_FIELDS), max_size=3, unique=True)):
            base["Backend"][_case(f, draw(st.booleans()))] = draw(JSON)
    return json.dumps(base)


@fuzz
@given(st.one_of(configs(), JSON.map(json.dumps), st.text(max_size=60)))
def test_parse_config_raises_only_config_error(text: str) -> None:
    try:
        cfg = parse_config(text)
    except ConfigError as e:
        msg = str(e)
        assert msg and "\n" not in msg.strip()
        assert any(w in msg for w in CONFIG_FIELDS + ["JSON", "config", "Backend", "EnableIPv4"]), msg
        return
    # accepted: the result is usable by the daemon as is
    if cfg.enable_ipv4:
        assert cfg.network is not None and cfg.network.prefixlen < cfg.subnet_len <= 30
        assert cfg.subnet_min <= cfg.subnet_max and cfg.subnet_min in cfg.network
    assert cfg.backend_type in ("udp", "vxlan", "host-gw")


LEASE_FIELDS = ["PublicIP", "PublicIPv6", "BackendType", "BackendData", "BackendV6Data"]


@st.composite
def lease_values(draw):  # type: ignore[no-untyped-def]
    base = {"PublicIP": "10.168.0.9", "PublicIPv6": None, "BackendType": "vxlan",
            "BackendData": {"VNI": 1, "VtepMAC": "aa:bb:cc:dd:ee:ff"}}
    for f in draw(st.lists(st.sampled_from(LEASE_FIELDS), max_size=3, unique=True)):
        base.pop(f, None)
        base[_case(f, draw(st.booleans()))] = draw(JSON)
    if isinstance(base.get("BackendData"), dict) and draw(st.booleans()):
        base["BackendData"][draw(st.sampled_from(["VNI", "VtepMAC", "vtepmac", "vni"]))] = draw(JSON)
    return json.dumps(base)


@fuzz
@given(st.one_of(lease_values(), JSON.map(json.dumps)))
def test_lease_value_raises_only_lease_parse_error(text: str) -> None:
    try:
        attrs = LeaseAttrs.from_json(text)
    except LeaseParseError:
        return
    # accepted: it re-encodes, and reading the vxlan part fails only with LeaseParseError
    assert LeaseAttrs.from_json(attrs.to_json()) == attrs
    try:
        vni, mac = attrs.vxlan_data()
        assert isinstance(vni, int) and isinstance(mac, str)
    except LeaseParseError:
        pass


KEYS = st.one_of(
    st.text(max_size=40),
    st.builds(lambda a, b, c, d, n: f"/coreos.com/network/subnets/{a}.{b}.{c}.{d}-{n}",
              st.integers(-1, 300), st.integers(0, 256), st.integers(0, 256), st.integers(0, 256), st.integers(-1, 40)),
    st.sampled_from(["/coreos.com/network/subnets/10.5.1.0-24&fc00::-64", "/coreos.com/network/subnets/10.5.1.7-24",
                     "/coreos.com/network/subnets/010.5.1.0-24", "/coreos.com/network/subnets/", "-",
                     "/coreos.com/network/subnets/10.5.1.0-24&zz-64"]),
)


@fuzz
@given(KEYS, st.one_of(lease_values(), st.binary(max_size=40)), st.integers(0, 2**63))
def test_stored_lease_raises_only_value_error(key: str, value, lease_id: int) -> None:  # type: ignore[no-untyped-def]
    try:
        lease = lease_from_kv(key, value, lease_id)
    except ValueError:  # LeaseParseError is one
        return
    assert lease.subnet.network_address == lease.subnet.network_address  # a real network
    assert key.rsplit("/", 1)[-1].split("&")[0] == f"{lease.subnet.network_address}-{lease.subnet.prefixlen}"
