# SPDX-License-Identifier: Apache-2.0
"""The ``flannel.<VNI>`` VXLAN device: create or reuse it, keep its MAC, give it the lease's /32.

Flannel's ``pkg/backend/vxlan/device.go`` with two changes: the MAC is kept stable across daemon restarts
and device re-creation (the caller passes the MAC it advertises; see ``VxlanDevice.mac``), and an existing
device whose MTU differs from the wanted one gets the wanted MTU (Flannel leaves it).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_interface
from typing import Optional

from fastflannel.errors import BackendError

log = logging.getLogger("fastflannel.backend.vxlan")

VXLAN_OVERHEAD = 50  # bytes: 20 outer IPv4 + 8 UDP + 8 VXLAN header + 14 inner Ethernet
VXLAN6_OVERHEAD = 70  # bytes: 40 outer IPv6 + 8 + 8 + 14 (the kernel's VXLAN6_HEADROOM: its cap for an IPv6 underlay)


def vxlan_mtu(backend_mtu: int, ext_mtu: int, overhead: int = VXLAN_OVERHEAD) -> int:
    """Return the device MTU: (``Backend.MTU`` or the external interface MTU) - ``overhead``.

    ``flannel-v6.<VNI>`` uses ``VXLAN6_OVERHEAD``: flanneld asks ext - 50 and the kernel caps it at ext - 70
    (flannel-compat.md section 5), so asking ext - 70 gives the same device and keeps our MTU check honest."""
    return (backend_mtu or ext_mtu) - overhead


def random_mac() -> str:
    """Return a random locally-administered unicast MAC (first byte ``& 0xfe | 0x02``), like Flannel."""
    b = bytearray(os.urandom(6))
    b[0] = (b[0] & 0xFE) | 0x02
    return ":".join(f"{x:02x}" for x in b)


@dataclass(frozen=True)
class VxlanSpec:
    name: str
    vni: int
    dev_index: int
    local: "IPv4Address | IPv6Address"  # IPv6 for flannel-v6.<VNI>
    port: int  # 0 = kernel default 8472
    gbp: bool
    learning: bool
    mtu: int


class VxlanDevice:
    """Owns the desired state of one vxlan link. ``mac`` is the MAC we advertise; it only changes on ``ensure``
    when a compatible device already exists with another MAC (the device wins, as in Flannel)."""

    def __init__(self, netlink, spec: VxlanSpec, mac: Optional[str] = None) -> None:
        self.netlink = netlink
        self.spec = spec
        self.mac = mac.lower() if mac else random_mac()
        self.index = 0
        self.mtu = spec.mtu

    def ensure(self) -> None:
        """Create the device with ``self.mac`` or reuse a compatible one (adopting its MAC). Raises BackendError."""
        s = self.spec
        info = self.netlink.ensure_vxlan(
            s.name, s.vni, s.dev_index, s.local, port=s.port, gbp=s.gbp, learning=s.learning, mtu=s.mtu, mac=self.mac
        )
        if info.mac != self.mac:
            log.info("event=vxlan_reused dev=%s mac=%s previous_hint=%s", s.name, info.mac, self.mac)
            self.mac = info.mac
        if s.mtu > 0 and info.mtu != s.mtu:
            log.info("event=vxlan_mtu_set dev=%s from=%d to=%d", s.name, info.mtu, s.mtu)
            self.netlink.set_mtu(s.name, s.mtu)
        self.index = info.index
        self.mtu = s.mtu if s.mtu > 0 else info.mtu

    def configure(self, addr: "IPv4Address | IPv6Address", network: "Optional[IPv4Network | IPv6Network]") -> None:
        """accept_ra 0; ``addr``/32 (IPv6: /128) on the device; other addresses inside ``network`` removed; link
        up; MAC verified (set back if something changed it, BackendError if it will not stick)."""
        from fastflannel.kernel.netlink import AF_INET6
        from fastflannel.kernel.sysctl import write_sysctl

        name = self.spec.name
        write_sysctl(f"net/ipv6/conf/{name}/accept_ra", "0", netns=getattr(self.netlink, "netns", None))
        want = ip_interface(f"{addr}/{addr.max_prefixlen}")
        have = self.netlink.addr_list(name, family=AF_INET6) if addr.version == 6 else self.netlink.addr_list(name)
        for a in have:
            if a.address != want and network is not None and a.address.ip in network:
                log.info("event=vxlan_addr_removed dev=%s addr=%s", name, a.address)
                self.netlink.addr_del(name, a.address)
        self.netlink.addr_replace(name, want)
        self.netlink.set_link_up(name)
        self.check_mac()

    def check_mac(self) -> bool:
        """Return True if the MAC had drifted and was set back (systemd MACAddressPolicy, flannel #1155)."""
        info = self.netlink.link_info(self.spec.name)
        if info is None:
            raise BackendError(f"vxlan {self.spec.name}: device disappeared")
        if info.mac == self.mac:
            return False
        log.warning("event=vxlan_mac_drift dev=%s have=%s want=%s action=set", self.spec.name, info.mac, self.mac)
        self.netlink.set_mac(self.spec.name, self.mac)
        info = self.netlink.link_info(self.spec.name)
        if info is None or info.mac != self.mac:
            raise BackendError(
                f"vxlan {self.spec.name}: mac address wanted {self.mac} but got {info.mac if info else 'no device'}"
            )
        return True
