# SPDX-License-Identifier: Apache-2.0
"""Network config (``<prefix>/config``): parse, validate and default exactly as Flannel does.

Reference: flannel ``pkg/subnet/config.go`` (``ParseConfig``, ``CheckNetworkConfig``) and
flannel-compat.md section 1.2. Field names are matched case-insensitively (Go ``encoding/json``).
Every error is a ``ConfigError`` whose message names the field and the rule, so the daemon can print
one line and exit 1.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any, Dict, Optional

DEFAULT_BACKEND = "udp"  # Backend absent -> udp on the etcd path (flannel's docs say vxlan; the code says udp)
MAX_SUBNET_LEN = 30  # an explicit SubnetLen must be <= 30
MIN_NETWORK_PREFIX_DEFAULT_LEN = 28  # without SubnetLen, Network prefix > 28 is an error
MAX_SUBNET_LEN6 = 126
MIN_NETWORK_PREFIX6 = 124
KNOWN_BACKENDS = ("udp", "vxlan", "host-gw", "wireguard")


class ConfigError(ValueError):
    """The network config is invalid; the message names the field and the rule."""


@dataclass(frozen=True)
class NetworkConfig:
    """Validated, defaulted network config. ``backend`` is the raw Backend object (options read by backends)."""

    network: Optional[IPv4Network]
    subnet_len: int
    subnet_min: Optional[IPv4Address]
    subnet_max: Optional[IPv4Address]
    backend_type: str
    backend: Dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    enable_ipv4: bool = True
    enable_ipv6: bool = False
    ipv6_network: Optional[IPv6Network] = None
    ipv6_subnet_len: int = 0
    ipv6_subnet_min: Optional[IPv6Address] = None
    ipv6_subnet_max: Optional[IPv6Address] = None
    enable_nftables: bool = False

    def backend_option(self, name: str, default: Any = None) -> Any:
        """Return a Backend option matched case-insensitively (Go json), or ``default``."""
        return _ci_get(self.backend, name, default)

    def subnet_in_range(self, net: IPv4Network) -> bool:
        """Return True if ``net`` is a lease this config could have allocated (Flannel's compatibility test)."""
        if self.network is None or self.subnet_min is None or self.subnet_max is None:
            return False
        return (
            net.prefixlen == self.subnet_len
            and net.subnet_of(self.network)
            and self.subnet_min <= net.network_address <= self.subnet_max
        )

    def subnet6_in_range(self, net6: Optional[IPv6Network]) -> bool:
        """Flannel's ``isIPv6SubnetConfigCompat``: with EnableIPv6 the lease must carry an IPv6 subnet of
        IPv6SubnetLen between IPv6SubnetMin and IPv6SubnetMax; without it, it must carry none."""
        if not self.enable_ipv6:
            return net6 is None
        if net6 is None or self.ipv6_network is None or self.ipv6_subnet_min is None or self.ipv6_subnet_max is None:
            return False
        return (
            net6.prefixlen == self.ipv6_subnet_len
            and net6.subnet_of(self.ipv6_network)
            and self.ipv6_subnet_min <= net6.network_address <= self.ipv6_subnet_max
        )

    def lease_in_range(self, net: IPv4Network, net6: Optional[IPv6Network]) -> bool:
        """Return True if a lease for (``net``, ``net6``) is compatible with this config (both families)."""
        return self.subnet_in_range(net) and self.subnet6_in_range(net6)


def _ci_get(obj: Dict[str, Any], name: str, default: Any = None) -> Any:
    if name in obj:
        return obj[name]
    low = name.lower()
    for k, v in obj.items():
        if k.lower() == low:
            return v
    return default


def _int_field(raw: Dict[str, Any], name: str) -> int:
    v = _ci_get(raw, name, 0)
    if v is None:
        return 0
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(f"{name}: must be an integer, got {v!r}")
    return v


def _bool_field(raw: Dict[str, Any], name: str, default: bool) -> bool:
    v = _ci_get(raw, name, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise ConfigError(f"{name}: must be true or false, got {v!r}")
    return v


def _str_field(raw: Dict[str, Any], name: str) -> str:
    v = _ci_get(raw, name, "")
    if v is None:
        return ""
    if not isinstance(v, str):
        raise ConfigError(f"{name}: must be a string, got {v!r}")
    return v


def parse_config(text: str) -> NetworkConfig:
    """Parse and check the config JSON; raise ``ConfigError`` naming the field and the rule."""
    try:
        raw = json.loads(text)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"config is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config must be a JSON object, got {type(raw).__name__}")

    enable_ipv4 = _bool_field(raw, "EnableIPv4", True)
    enable_ipv6 = _bool_field(raw, "EnableIPv6", False)
    enable_nft = _bool_field(raw, "EnableNFTables", False)

    backend_raw = _ci_get(raw, "Backend", None)
    if backend_raw is None:
        backend: Dict[str, Any] = {}
        btype = DEFAULT_BACKEND
    else:
        if not isinstance(backend_raw, dict):
            raise ConfigError(f"Backend: must be a JSON object, got {backend_raw!r}")
        backend = backend_raw
        t = _ci_get(backend, "Type", "")
        if not isinstance(t, str):
            raise ConfigError(f"Backend.Type: must be a string, got {t!r}")
        btype = t.lower()
        if btype not in KNOWN_BACKENDS:
            raise ConfigError(
                f"Backend.Type: unknown backend type {t!r}; fastflannel supports {', '.join(KNOWN_BACKENDS)}"
            )

    network = None
    subnet_len = 0
    smin = smax = None
    if enable_ipv4:
        network, subnet_len, smin, smax = _check_family(raw, V4)
    if not enable_ipv4 and not enable_ipv6:
        raise ConfigError("EnableIPv4/EnableIPv6: at least one address family must be enabled")

    net6 = None
    len6 = 0
    min6 = max6 = None
    if enable_ipv6:
        net6, len6, min6, max6 = _check_family(raw, V6)

    return NetworkConfig(
        network=network,
        subnet_len=subnet_len,
        subnet_min=smin,
        subnet_max=smax,
        backend_type=btype,
        backend=backend,
        enable_ipv4=enable_ipv4,
        enable_ipv6=enable_ipv6,
        ipv6_network=net6,
        ipv6_subnet_len=len6,
        ipv6_subnet_min=min6,
        ipv6_subnet_max=max6,
        enable_nftables=enable_nft,
    )


@dataclass(frozen=True)
class _Family:
    """Field names and limits of one address family (flannel CheckNetworkConfig), so one check serves both."""

    network: str
    subnet_len: str
    subnet_min: str
    subnet_max: str
    net_cls: Any
    addr_cls: Any
    bits: int
    max_subnet_len: int  # an explicit SubnetLen must be <= this
    max_network_prefix: int  # without SubnetLen, a longer Network prefix is an error
    default_len: int  # SubnetLen when the prefix leaves room for it
    example: str
    flannel_name: str  # how Flannel's CheckNetworkConfig errors name the network ("Network" / "IPv6Network")


V4 = _Family("Network", "SubnetLen", "SubnetMin", "SubnetMax", IPv4Network, IPv4Address, 32,
             MAX_SUBNET_LEN, MIN_NETWORK_PREFIX_DEFAULT_LEN, 24, "100.96.0.0/16", "network")
V6 = _Family("IPv6Network", "IPv6SubnetLen", "IPv6SubnetMin", "IPv6SubnetMax", IPv6Network, IPv6Address, 128,
             MAX_SUBNET_LEN6, MIN_NETWORK_PREFIX6, 64, "fc00::/48", "IPv6Network")


def _check_family(raw: Dict[str, Any], fam: _Family):
    """Return (network, subnet_len, subnet_min, subnet_max) for one family, defaulted as Flannel does.

    Each message starts with Flannel's own error text (``CheckNetworkConfig``), then says what to change."""
    text = _str_field(raw, fam.network)
    missing = f"please define a correct {fam.network} parameter in the flannel config"
    if not text:
        raise ConfigError(f"{missing}: {fam.network} is required (a CIDR such as \"{fam.example}\")")
    try:
        network = fam.net_cls(text, strict=False)
    except ValueError as e:
        raise ConfigError(f"{missing}: {fam.network} {text!r} is not a CIDR of this address family: {e}") from None
    subnet_len = _int_field(raw, fam.subnet_len)
    if subnet_len:
        if subnet_len > fam.max_subnet_len:
            raise ConfigError(f"SubnetLen must be less than /{fam.max_subnet_len + 1}: {fam.subnet_len} is "
                              f"{subnet_len}; use at most {fam.max_subnet_len}")
        if subnet_len < network.prefixlen + 2:
            raise ConfigError(
                f"network must be able to accommodate at least four subnets: {fam.subnet_len} {subnet_len} must "
                f"be at least {fam.network} prefix + 2 = {network.prefixlen + 2}"
            )
    else:
        if network.prefixlen > fam.max_network_prefix:
            raise ConfigError(f"{fam.flannel_name} is too small. Minimum useful network prefix is "
                              f"/{fam.max_network_prefix}: {fam.network} {network} is /{network.prefixlen}")
        room = fam.default_len - 2
        subnet_len = fam.default_len if network.prefixlen <= room else network.prefixlen + 2
    size = 1 << (fam.bits - subnet_len)
    lo = int(network.network_address)
    nxt = lo + network.num_addresses

    def bound(name: str, default: int):
        t = _str_field(raw, name)
        if not t:
            return fam.addr_cls(default)
        try:
            a = fam.addr_cls(t)
        except ValueError as e:
            raise ConfigError(f"{name}: {t!r} is not an address of this family: {e}") from None
        if int(a) == 0:  # only the zero address counts as unset
            return fam.addr_cls(default)
        if a not in network:
            raise ConfigError(f"{name} is not in the range of the {fam.network}: {a} is not within {network}")
        if int(a) % size:
            raise ConfigError(f"{name} is not on a SubnetLen boundary: {a} (a multiple of {size} addresses "
                              f"for {fam.subnet_len} {subnet_len})")
        return a

    smin, smax = bound(fam.subnet_min, lo + size), bound(fam.subnet_max, nxt - size)
    if smin > smax:
        raise ConfigError(f"{fam.subnet_min}: {smin} is above {fam.subnet_max} {smax}")
    return network, subnet_len, smin, smax
