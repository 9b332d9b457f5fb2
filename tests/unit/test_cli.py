# SPDX-License-Identifier: Apache-2.0
"""flanneld flag names, defaults, env variables and precedence."""
import subprocess
import sys

import pytest

from fastflannel import __version__
from fastflannel.cli import UsageError, parse_options


def test_defaults_are_flanneld_defaults():
    o = parse_options([], environ={})
    assert o.etcd_endpoints == ["http://127.0.0.1:4001", "http://127.0.0.1:2379"]
    assert o.etcd_prefix == "/coreos.com/network"
    assert o.subnet_file == "/run/flannel/subnet.env"
    assert o.subnet_lease_renew_margin == 60
    assert o.ip_masq is False and o.iptables_forward_rules is True
    assert o.healthz_ip == "0.0.0.0" and o.healthz_port == 0
    assert o.iface == [] and o.iface_regex == []


def test_both_spellings_and_go_single_dash():
    o = parse_options(["--etcd-prefix", "/a", "--subnet-file=/tmp/s.env", "-public-ip=10.0.0.9", "--ip-masq",
                       "--iptables-forward-rules=false", "-v=2"], environ={})
    assert o.etcd_prefix == "/a" and o.subnet_file == "/tmp/s.env" and o.public_ip == "10.0.0.9"
    assert o.ip_masq is True and o.iptables_forward_rules is False and o.verbosity == 2


def test_iface_repeatable():
    o = parse_options(["--iface", "eth0", "--iface=10.0.0.1", "--iface-regex", "^en"], environ={})
    assert o.iface == ["eth0", "10.0.0.1"] and o.iface_regex == ["^en"]


def test_env_fills_missing_flags_and_command_line_wins():
    env = {"FLANNELD_ETCD_ENDPOINTS": "http://10.0.0.1:2379,http://10.0.0.2:2379", "FLANNELD_IP_MASQ": "true",
           "FLANNELD_ETCD_PREFIX": "/env", "FLANNELD_IFACE": "eth1", "FLANNELD_HEALTHZ_PORT": "8471"}
    o = parse_options(["--etcd-prefix=/cli"], environ=env)
    assert o.etcd_endpoints == ["http://10.0.0.1:2379", "http://10.0.0.2:2379"]
    assert o.ip_masq is True and o.etcd_prefix == "/cli" and o.iface == ["eth1"] and o.healthz_port == 8471


@pytest.mark.parametrize("argv, env, word", [
    (["--subnet-lease-renew-margin=0"], {}, "subnet-lease-renew-margin"),
    (["--subnet-lease-renew-margin=1440"], {}, "subnet-lease-renew-margin"),
    (["--etcd-keyfile=/k"], {}, "etcd-certfile"),
    ([], {"FLANNELD_HEALTHZ_PORT": "abc"}, "FLANNELD_HEALTHZ_PORT"),
    ([], {"FLANNELD_IP_MASQ": "maybe"}, "FLANNELD_IP_MASQ"),
])
def test_bad_values(argv, env, word):
    with pytest.raises(UsageError, match=word):
        parse_options(argv, environ=env)


def test_version_and_bad_margin_exit_codes():
    r = subprocess.run([sys.executable, "-m", "fastflannel", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == __version__
    r = subprocess.run([sys.executable, "-m", "fastflannel", "--subnet-lease-renew-margin=5000"],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "subnet-lease-renew-margin" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_iface_can_reach_flag():
    from fastflannel.cli import UsageError, parse_options

    assert parse_options(["--iface-can-reach=10.0.0.1"], environ={}).iface_can_reach == "10.0.0.1"
    assert parse_options([], environ={"FLANNELD_IFACE_CAN_REACH": "10.0.0.2"}).iface_can_reach == "10.0.0.2"
    with pytest.raises(UsageError, match="--iface-can-reach=eth0: not an IPv4 address"):
        parse_options(["-iface-can-reach=eth0"], environ={})
