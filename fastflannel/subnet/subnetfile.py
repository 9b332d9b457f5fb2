# SPDX-License-Identifier: Apache-2.0
"""subnet.env: write it the way Flannel does and read back the previous subnet (flannel-compat.md section 4).

Format (order fixed, each ``KEY=value\\n``, no quotes): FLANNEL_NETWORK, FLANNEL_SUBNET (lease address + 1 with
SubnetLen), [FLANNEL_IPV6_NETWORK, FLANNEL_IPV6_SUBNET], FLANNEL_MTU, FLANNEL_IPMASQ=true|false. The write is
atomic (temp file in the same directory, fsync, rename, fsync of the directory) so a CNI plugin never reads a half
written file; the mode is 0644 whatever the umask; a missing directory is created 0755.
"""
from __future__ import annotations

import logging
import os
import tempfile
from ipaddress import IPv4Network, IPv6Network
from typing import Dict, List, Optional

from fastflannel.config import NetworkConfig
from fastflannel.lease import Lease

log = logging.getLogger(__name__)

FILE_MODE = 0o644
DIR_MODE = 0o755


def format_subnet_file(config: NetworkConfig, lease: Lease, mtu: int, ipmasq: bool) -> str:
    """Return the exact subnet.env text for ``lease``."""
    lines: List[str] = []
    if config.enable_ipv4 and config.network is not None:
        lines.append(f"FLANNEL_NETWORK={config.network}")
        lines.append(f"FLANNEL_SUBNET={lease.subnet.network_address + 1}/{config.subnet_len}")
    if config.enable_ipv6 and config.ipv6_network is not None and lease.subnet6 is not None:
        lines.append(f"FLANNEL_IPV6_NETWORK={config.ipv6_network}")
        lines.append(f"FLANNEL_IPV6_SUBNET={lease.subnet6.network_address + 1}/{config.ipv6_subnet_len}")
    lines.append(f"FLANNEL_MTU={int(mtu)}")
    lines.append(f"FLANNEL_IPMASQ={'true' if ipmasq else 'false'}")
    return "".join(line + "\n" for line in lines)


def write_subnet_file(path: str, config: NetworkConfig, lease: Lease, mtu: int, ipmasq: bool) -> None:
    """Write subnet.env atomically (temp + fsync + rename), mode 0644; raise ``OSError`` naming the path."""
    data = format_subnet_file(config, lease, mtu, ipmasq).encode("ascii")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        os.makedirs(directory, mode=DIR_MODE, exist_ok=True)
        os.chmod(directory, DIR_MODE)  # makedirs honours the umask; Flannel's directory is 0755
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), FILE_MODE)
            os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def _parse_env(text: str) -> Dict[str, List[str]]:
    """Parse dotenv-ish ``KEY=value`` lines (comments, ``export``, quotes); keep every value of a repeated key."""
    out: Dict[str, List[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export "):].lstrip()
        key, sep, value = line.partition("=")
        if not sep:
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        out.setdefault(key.strip(), []).append(value)
    return out


def _read(path: str) -> Dict[str, List[str]]:
    try:
        with open(path, "r", encoding="utf-8", errors="replace") as f:
            return _parse_env(f.read())
    except OSError:
        return {}


def _one(env: Dict[str, List[str]], path: str, key: str, cls):  # type: ignore[no-untyped-def]
    vals = env.get(key)
    if not vals or len(vals) != 1:
        if vals:
            log.warning("event=subnet_file_ignored path=%s key=%s reason=multiple_values", path, key)
        return None
    try:
        return cls(vals[0], strict=False)
    except ValueError:
        log.warning("event=subnet_file_ignored path=%s key=%s value=%r reason=not_a_cidr", path, key, vals[0])
        return None


def read_previous_network_and_subnet(path: str, family: int = 4):  # type: ignore[no-untyped-def]
    """Return (FLANNEL_NETWORK, FLANNEL_SUBNET) of an existing subnet file (for masq-rule recycling); None if bad.
    ``family`` 6: (FLANNEL_IPV6_NETWORK, FLANNEL_IPV6_SUBNET)."""
    env = _read(path)
    if family == 6:
        return _one(env, path, "FLANNEL_IPV6_NETWORK", IPv6Network), _one(env, path, "FLANNEL_IPV6_SUBNET", IPv6Network)
    return _one(env, path, "FLANNEL_NETWORK", IPv4Network), _one(env, path, "FLANNEL_SUBNET", IPv4Network)


def read_previous_subnets(path: str) -> "tuple[Optional[IPv4Network], Optional[IPv6Network]]":
    """Return (FLANNEL_SUBNET, FLANNEL_IPV6_SUBNET) as networks (host bits cleared); None when absent/bad."""
    env = _read(path)
    return _one(env, path, "FLANNEL_SUBNET", IPv4Network), _one(env, path, "FLANNEL_IPV6_SUBNET", IPv6Network)


def read_previous_subnet(path: str) -> Optional[IPv4Network]:
    """Return the FLANNEL_SUBNET of an existing subnet file as a network (``10.5.72.1/24`` -> ``10.5.72.0/24``)."""
    return read_previous_subnets(path)[0]
