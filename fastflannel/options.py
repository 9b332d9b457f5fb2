# SPDX-License-Identifier: Apache-2.0
"""``DaemonOptions``: what ``fastflanneld``'s flags and ``FLANNELD_*`` variables say, as one value.

``cli`` fills it in; ``daemon`` reads it. It lives apart from both so neither imports the other's module.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

DEFAULT_ENDPOINTS = "http://127.0.0.1:4001,http://127.0.0.1:2379"
DEFAULT_PREFIX = "/coreos.com/network"
DEFAULT_SUBNET_FILE = "/run/flannel/subnet.env"
RENEW_MARGIN_MIN, RENEW_MARGIN_MAX = 1, 1439  # minutes; flanneld rejects values outside 1..1439


@dataclass
class DaemonOptions:
    etcd_endpoints: List[str] = field(default_factory=lambda: DEFAULT_ENDPOINTS.split(","))
    etcd_prefix: str = DEFAULT_PREFIX
    etcd_keyfile: str = ""
    etcd_certfile: str = ""
    etcd_cafile: str = ""
    etcd_username: str = ""
    etcd_password: str = ""
    iface: List[str] = field(default_factory=list)
    iface_regex: List[str] = field(default_factory=list)
    iface_can_reach: str = ""
    public_ip: str = ""
    public_ipv6: str = ""
    subnet_file: str = DEFAULT_SUBNET_FILE
    subnet_lease_renew_margin: int = 60  # minutes
    ip_masq: bool = False
    iptables_resync: int = 5  # seconds
    iptables_forward_rules: bool = True
    healthz_ip: str = "0.0.0.0"
    healthz_port: int = 0
    verbosity: int = 0
