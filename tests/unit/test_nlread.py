# SPDX-License-Identifier: Apache-2.0
"""kernel/nlread.py without root: link and address answers built byte by byte (as the kernel lays them out)."""
from __future__ import annotations

import struct
from ipaddress import IPv4Address, IPv6Address, IPv4Interface

from fastflannel.kernel import nlbatch, nlread
from fastflannel.kernel.netlink import AddrInfo, LinkInfo, VxlanAttrs


def attr(kind: int, payload: bytes) -> bytes:
    return nlbatch._attr(kind, payload)


def vxlan_link(port: int = 4789, learning: int = 0, gbp: bool = True, local6: bool = False) -> bytes:
    data = attr(nlread.VX_ID, struct.pack("=I", 7)) + attr(nlread.VX_LINK, struct.pack("=I", 2))
    data += attr(nlread.VX_LOCAL6, IPv6Address("fd00::2").packed) if local6 else attr(
        nlread.VX_LOCAL, IPv4Address("10.168.0.2").packed)
    data += attr(nlread.VX_GROUP, bytes(4)) + attr(nlread.VX_PORT, struct.pack("!H", port))
    data += attr(nlread.VX_LEARNING, bytes([learning])) + attr(nlread.VX_L2MISS, b"\1")
    if gbp:
        data += attr(nlread.VX_GBP, b"")
    info = attr(nlread.IFLA_INFO_KIND, b"vxlan\0") + attr(nlread.IFLA_INFO_DATA | 0x8000, data)  # NLA_F_NESTED
    return (struct.pack("=BxHiII", 0, 1, 5, 0x1043, 0) + attr(nlread.IFLA_IFNAME, b"flannel.1\0")
            + attr(nlread.IFLA_MTU, struct.pack("=I", 1450)) + attr(nlread.IFLA_ADDRESS, bytes.fromhex("0a5800000007"))
            + attr(nlread.IFLA_LINKINFO | 0x8000, info))


def test_vxlan_link_decodes_every_field():
    got = nlread.link_info(nlread.parse_link(vxlan_link()), LinkInfo, VxlanAttrs)
    assert got == LinkInfo(name="flannel.1", index=5, kind="vxlan", mtu=1450, mac="0a:58:00:00:00:07", up=True,
                           vxlan=VxlanAttrs(vni=7, link=2, local=IPv4Address("10.168.0.2"), group=None, port=4789,
                                            learning=False, gbp=True, l2miss=True))
    six = nlread.link_info(nlread.parse_link(vxlan_link(port=8472, learning=1, gbp=False, local6=True)), LinkInfo,
                           VxlanAttrs)
    assert (six.vxlan.local, six.vxlan.port, six.vxlan.learning, six.vxlan.gbp) == (
        IPv6Address("fd00::2"), 8472, True, False)


def test_link_without_linkinfo_or_address_and_truncated_answers():
    tun = struct.pack("=BxHiII", 0, 65534, 9, 0x1090, 0) + attr(nlread.IFLA_IFNAME, b"flannel0\0")
    got = nlread.link_info(nlread.parse_link(tun), LinkInfo, VxlanAttrs)
    assert (got.name, got.index, got.kind, got.mac, got.mtu, got.up, got.vxlan) == ("flannel0", 9, "", "", 0, False,
                                                                                  None)
    assert nlread.parse_link(tun[:10]) is None and nlread.link_info(None, LinkInfo, VxlanAttrs) is None
    assert nlread.parse_addr(b"\2\x18") is None


def test_address_flags_prefer_ifa_flags_and_request_layout():
    body = struct.pack("=BBBBI", 2, 24, 0x80, 0, 4) + attr(nlread.IFA_ADDRESS, IPv4Address("100.96.7.1").packed)
    assert nlread.parse_addr(body) == (2, 24, 0x80, 0, 4, IPv4Address("100.96.7.1").packed)
    body += attr(nlread.IFA_FLAGS, struct.pack("=I", 0x300))
    fam, plen, flags, scope, index, addr = nlread.parse_addr(body)
    assert flags == 0x300
    assert AddrInfo(index=index, address=IPv4Interface(f"{IPv4Address(addr)}/{plen}"), scope=scope, flags=flags) \
        .address == IPv4Interface("100.96.7.1/24")
    mtype, flags, req = nlread.link_get_request("flannel.1")
    assert (mtype, flags) == (nlread.RTM_GETLINK, nlbatch.NLM_F_REQUEST)
    assert nlbatch.attrs(req, 16) == {nlread.IFLA_IFNAME: b"flannel.1\0"}
    assert nlread.addr_dump_request(10)[1] & nlbatch.NLM_F_DUMP == nlbatch.NLM_F_DUMP
