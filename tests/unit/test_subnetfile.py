# SPDX-License-Identifier: Apache-2.0
"""subnet.env: Flannel's byte-exact format, atomic 0644 write, previous-subnet parsing."""
from __future__ import annotations

import json
import os
import stat
from ipaddress import IPv4Address, IPv4Network, IPv6Network

import pytest

from fastflannel.config import parse_config
from fastflannel.lease import Lease, LeaseAttrs
from fastflannel.subnet import subnetfile
from fastflannel.subnet.subnetfile import (
    read_previous_network_and_subnet,
    read_previous_subnet,
    read_previous_subnets,
    write_subnet_file,
)

ATTRS = LeaseAttrs(public_ip=IPv4Address("192.0.2.10"))


def test_format_v4_byte_exact(tmp_path):
    config = parse_config(json.dumps({"Network": "10.5.0.0/16", "Backend": {"Type": "vxlan"}}))
    path = tmp_path / "subnet.env"
    write_subnet_file(str(path), config, Lease(IPv4Network("10.5.72.0/24"), ATTRS), 1450, True)
    assert path.read_bytes() == (
        b"FLANNEL_NETWORK=10.5.0.0/16\n"
        b"FLANNEL_SUBNET=10.5.72.1/24\n"
        b"FLANNEL_MTU=1450\n"
        b"FLANNEL_IPMASQ=true\n"
    )
    write_subnet_file(str(path), config, Lease(IPv4Network("10.5.3.0/24"), ATTRS), 1500, False)
    assert path.read_bytes().endswith(b"FLANNEL_SUBNET=10.5.3.1/24\nFLANNEL_MTU=1500\nFLANNEL_IPMASQ=false\n")


def test_format_dual_stack_order(tmp_path):
    config = parse_config(json.dumps({"Network": "10.5.0.0/16", "EnableIPv6": True, "IPv6Network": "fc00::/48"}))
    lease = Lease(IPv4Network("10.5.1.0/24"), ATTRS, subnet6=IPv6Network("fc00:0:0:1::/64"))
    path = tmp_path / "subnet.env"
    write_subnet_file(str(path), config, lease, 1450, False)
    assert path.read_text() == (
        "FLANNEL_NETWORK=10.5.0.0/16\n"
        "FLANNEL_SUBNET=10.5.1.1/24\n"
        "FLANNEL_IPV6_NETWORK=fc00::/48\n"
        "FLANNEL_IPV6_SUBNET=fc00:0:0:1::1/64\n"
        "FLANNEL_MTU=1450\n"
        "FLANNEL_IPMASQ=false\n"
    )


def test_mode_0644_under_umask_077_and_dir_created(tmp_path):
    config = parse_config('{"Network": "10.5.0.0/16"}')
    path = tmp_path / "run" / "flannel" / "subnet.env"
    old = os.umask(0o077)
    try:
        write_subnet_file(str(path), config, Lease(IPv4Network("10.5.2.0/24"), ATTRS), 1472, False)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o755
    assert sorted(os.listdir(path.parent)) == ["subnet.env"]  # no temp file left behind


def test_atomic_rename_keeps_old_file_on_failure(tmp_path, monkeypatch):
    config = parse_config('{"Network": "10.5.0.0/16"}')
    path = tmp_path / "subnet.env"
    write_subnet_file(str(path), config, Lease(IPv4Network("10.5.2.0/24"), ATTRS), 1472, False)
    before = path.read_bytes()
    ino = path.stat().st_ino
    renames = []
    real_rename = os.rename

    def spy(src, dst):
        renames.append((src, dst))
        # the new content is complete and in the same directory before it replaces the file
        assert os.path.dirname(src) == str(tmp_path) and open(src, "rb").read().startswith(b"FLANNEL_NETWORK=")
        return real_rename(src, dst)

    monkeypatch.setattr(subnetfile.os, "rename", spy)
    write_subnet_file(str(path), config, Lease(IPv4Network("10.5.9.0/24"), ATTRS), 1472, False)
    assert len(renames) == 1 and path.stat().st_ino != ino
    assert b"10.5.9.1/24" in path.read_bytes()

    def boom(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(subnetfile.os, "rename", boom)
    current = path.read_bytes()
    with pytest.raises(OSError):
        write_subnet_file(str(path), config, Lease(IPv4Network("10.5.4.0/24"), ATTRS), 1472, False)
    assert path.read_bytes() == current != before
    assert sorted(os.listdir(tmp_path)) == ["subnet.env"]


@pytest.mark.parametrize(
    "text,expected",
    [
        ("FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.72.1/24\nFLANNEL_MTU=1450\n", "10.5.72.0/24"),
        ("FLANNEL_SUBNET=10.5.72.0/24\n", "10.5.72.0/24"),
        ("export FLANNEL_SUBNET=\"10.5.72.1/24\"\n", "10.5.72.0/24"),
        ("# comment\n\nFLANNEL_SUBNET = 10.9.1.77/26 \n", "10.9.1.64/26"),
        ("FLANNEL_SUBNET=garbage\n", None),
        ("FLANNEL_SUBNET=\n", None),
        ("FLANNEL_SUBNET=10.5.1.1/24\nFLANNEL_SUBNET=10.5.2.1/24\n", None),  # multiple -> none (as Flannel)
        ("FLANNEL_NETWORK=10.5.0.0/16\n", None),
        ("", None),
        ("FLANNEL_SUBNET=fc00::1/64\n", None),
    ],
)
def test_read_previous_subnet(tmp_path, text, expected):
    p = tmp_path / "subnet.env"
    p.write_text(text)
    got = read_previous_subnet(str(p))
    assert got == (IPv4Network(expected) if expected else None)


def test_read_previous_missing_file_and_v6(tmp_path):
    assert read_previous_subnet(str(tmp_path / "nope.env")) is None
    p = tmp_path / "subnet.env"
    p.write_text("FLANNEL_SUBNET=10.5.1.1/24\nFLANNEL_IPV6_SUBNET=fc00:0:0:1::1/64\n")
    assert read_previous_subnets(str(p)) == (IPv4Network("10.5.1.0/24"), IPv6Network("fc00:0:0:1::/64"))


def test_round_trip(tmp_path):
    config = parse_config('{"Network": "100.96.0.0/12", "SubnetLen": 26}')
    p = tmp_path / "subnet.env"
    write_subnet_file(str(p), config, Lease(IPv4Network("100.100.3.64/26"), ATTRS), 1450, True)
    assert read_previous_subnet(str(p)) == IPv4Network("100.100.3.64/26")


def test_read_previous_network_and_subnet(tmp_path):
    p = tmp_path / "subnet.env"
    assert read_previous_network_and_subnet(str(p)) == (None, None)
    p.write_text("FLANNEL_NETWORK=10.5.0.0/16\nFLANNEL_SUBNET=10.5.72.1/24\nFLANNEL_MTU=1450\n")
    assert read_previous_network_and_subnet(str(p)) == (IPv4Network("10.5.0.0/16"), IPv4Network("10.5.72.0/24"))
