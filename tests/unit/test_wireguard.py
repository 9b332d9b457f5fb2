# SPDX-License-Identifier: Apache-2.0
"""wireguard backend without root: options, keys and the key file, UAPI text, peers from lease events/reconcile."""
from __future__ import annotations

import os
import stat
import subprocess
import shutil
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, ip_interface, ip_network

import pytest

from fastflannel.backend import get_backend
from fastflannel.backend.wgkey import WgKeyError, generate_private_key, load_or_create_private_key, public_key
from fastflannel.backend.wireguard import (WgOptions, WireguardBackend, lease_peer, parse_options, wireguard_mtu)
from fastflannel.config import parse_config
from fastflannel.errors import BackendError
from fastflannel.kernel.iface import ExternalInterface
from fastflannel.kernel.netlink import AddrInfo, LinkInfo
from fastflannel.kernel.wireguard import WgPeer, WgState, parse_uapi_get, uapi_set_lines
from fastflannel.lease import Event, EventType, Lease, LeaseAttrs, LeaseParseError


def cfg(backend: str = '{"Type":"wireguard"}'):
    return parse_config('{"Network":"100.96.0.0/16","Backend":%s}' % backend)


def wg_lease(subnet: str, ip: str, key: str, port: int = 51820, btype: str = "wireguard") -> Lease:
    return Lease(IPv4Network(subnet), LeaseAttrs(IPv4Address(ip), btype, {"PublicKey": key, "Port": port}))


# -- options ----------------------------------------------------------------------------------------------------
def test_options_defaults_and_case_insensitive_names():
    assert parse_options(cfg()) == WgOptions(51820, 51821, 0, None, 0, "separate")
    psk = generate_private_key()
    o = parse_options(cfg('{"Type":"wireguard","listenport":5000,"PSK":"%s","persistentKeepaliveInterval":25,'
                          '"MTU":1400,"mode":"Auto"}' % psk))
    assert (o.listen_port, o.psk, o.keepalive, o.mtu, o.mode) == (5000, psk, 25, 1400, "auto")


@pytest.mark.parametrize("backend,msg", [
    ('{"Type":"wireguard","PSK":"nope"}', "could not parse psk"),
    ('{"Type":"wireguard","Mode":"both"}', "no valid Mode configured"),
    ('{"Type":"wireguard","ListenPort":70000}', "Backend.ListenPort"),
    ('{"Type":"wireguard","PersistentKeepaliveInterval":"25s"}', "PersistentKeepaliveInterval"),
])
def test_bad_options_name_the_key(backend, msg):
    with pytest.raises(BackendError, match=msg):
        parse_options(cfg(backend))


def test_mtu_is_80_below_the_underlay():
    assert wireguard_mtu(0, 1500) == 1420
    assert wireguard_mtu(9000, 1500) == 8920


def test_registered_by_name():
    assert get_backend("WireGuard") is WireguardBackend


# -- keys ---------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(shutil.which("wg") is None, reason="needs wireguard-tools' wg to cross-check")
def test_public_key_matches_wg_pubkey():
    k = generate_private_key()
    assert public_key(k) == subprocess.run(["wg", "pubkey"], input=k, capture_output=True, text=True,
                                           check=True).stdout.strip()


def test_key_file_created_0400_once_and_reused(tmp_path):
    path = str(tmp_path / "run" / "flannel" / "wgkey")
    k1, created1 = load_or_create_private_key(path)
    assert created1
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o400
    assert open(path).read() == k1  # base64, no newline
    k2, created2 = load_or_create_private_key(path)
    assert (k2, created2) == (k1, False)


def test_key_file_with_newline_accepted_garbage_refused(tmp_path):
    p = tmp_path / "wgkey"
    k = generate_private_key()
    p.write_text(k + "\n")
    assert load_or_create_private_key(str(p)) == (k, False)
    p.write_text("not a key")
    with pytest.raises(WgKeyError, match=f"could not parse private key from file {p}"):
        load_or_create_private_key(str(p))


# -- UAPI text ----------------------------------------------------------------------------------------------------
def test_uapi_set_and_get_round_trip():
    priv, pub, psk = generate_private_key(), public_key(generate_private_key()), generate_private_key()
    peer = WgPeer(pub, "10.168.0.3:51820", ("100.96.3.0/24",), psk, 25)
    lines = uapi_set_lines(private_key=priv, listen_port=51820, peers=[peer])
    assert lines[0] == "set=1" and "listen_port=51820" in lines and "replace_allowed_ips=true" in lines
    assert f"private_key={bytes.fromhex(lines[1][12:]).hex()}" == lines[1] and len(lines[1]) == 12 + 64
    get = ("private_key=%s\nlisten_port=51820\npublic_key=%s\npreshared_key=%s\nendpoint=10.168.0.3:51820\n"
           "persistent_keepalive_interval=25\nallowed_ip=100.96.3.0/24\nrx_bytes=0\nerrno=0\n\n"
           % (lines[1][12:], lines[3][11:], lines[4][14:]))
    st = parse_uapi_get(get)
    assert st.listen_port == 51820 and st.peers == {pub: peer}
    assert uapi_set_lines(remove=[pub]) == ["set=1", f"public_key={lines[3][11:]}", "remove=true"]


def test_uapi_get_error_raises():
    with pytest.raises(BackendError, match="errno"):
        parse_uapi_get("errno=-22\n\n")


# -- the backend with a fake device -----------------------------------------------------------------------------
class FakeDevice:
    kind = "fake"

    def __init__(self):
        self.peers = {}
        self.config = None
        self.is_alive = True
        self.closed = False

    def configure(self, private_key, listen_port):
        self.config = (private_key, listen_port)

    def set_peer(self, peer):
        for k, p in list(self.peers.items()):  # WireGuard moves an allowed IP to the peer that claims it last
            left = tuple(a for a in p.allowed_ips if a not in peer.allowed_ips)
            self.peers[k] = WgPeer(p.public_key, p.endpoint, left, p.preshared_key, p.keepalive)
        self.peers[peer.public_key] = peer

    def remove_peer(self, key):
        if key not in self.peers:
            raise BackendError(f"no peer {key}")
        del self.peers[key]

    def state(self):
        return WgState(51820, "", dict(self.peers))

    def alive(self):
        return self.is_alive

    def close(self):
        self.closed = True


class FakeNl:
    def __init__(self):
        self.links, self.addrs, self.routes = {}, {}, {}

    def link_info(self, name):
        return LinkInfo(name, 7, "", 1420, "", True) if name in self.links else None

    def link_index(self, name):
        return 7 if name in self.links else None

    def addr_list(self, ifname):
        return [AddrInfo(7, a, 0, 0x80) for a in self.addrs.get(ifname, ())]

    def addr_replace(self, ifname, cidr):
        self.addrs.setdefault(ifname, set()).add(ip_interface(cidr))

    def addr_del(self, ifname, cidr):
        self.addrs[ifname].discard(ip_interface(cidr))

    def set_link_up(self, name):
        self.links[name] = "up"

    def route_replace(self, dst, gateway=None, oif=None, onlink=False, table=254, scope=None):
        self.routes[ip_network(dst)] = (oif, scope)


class Manager:
    def acquire_lease(self, attrs):
        self.attrs = attrs
        return Lease(IPv4Network("100.96.1.0/24"), attrs)


@pytest.fixture
def rig(tmp_path):
    nl, devs, mgr = FakeNl(), [], Manager()

    def factory(netlink, name, mtu):
        netlink.links[name] = "down"
        devs.append(FakeDevice())
        devs[-1].mtu = mtu
        return devs[-1]

    ext = ExternalInterface("eth0", 2, IPv4Address("10.168.0.2"), IPv4Address("10.168.0.2"), 1500)
    be = WireguardBackend(mgr, ext, nl, device_factory=factory, key_file=str(tmp_path / "wgkey"))
    net = be.register_network(cfg('{"Type":"wireguard","PersistentKeepaliveInterval":25}'))
    return nl, devs, mgr, net, tmp_path


def test_register_lease_address_route_mtu(rig):
    nl, devs, mgr, net, tmp = rig
    key = open(tmp / "wgkey").read()
    assert mgr.attrs.to_json() == ('{"PublicIP":"10.168.0.2","PublicIPv6":null,"BackendType":"wireguard",'
                                   '"BackendData":{"PublicKey":"%s","Port":51820}}' % public_key(key))
    assert devs[0].config == (key, 51820) and devs[0].mtu == 1420 and net.mtu == 1420
    assert nl.addrs["flannel-wg"] == {IPv4Interface("100.96.1.0/32")}
    assert nl.routes == {IPv4Network("100.96.0.0/16"): (7, 253)}


def test_peers_follow_events_key_change_and_removal(rig):
    nl, devs, _, net, _ = rig
    dev = devs[0]
    k2, k3, k3b = (public_key(generate_private_key()) for _ in range(3))
    a, b = wg_lease("100.96.2.0/24", "10.168.0.3", k2), wg_lease("100.96.3.0/24", "10.168.0.4", k3, port=0)
    other = Lease(IPv4Network("100.96.9.0/24"), LeaseAttrs(IPv4Address("10.168.0.9"), "vxlan", {}))
    net.handle_events([Event(EventType.ADDED, x) for x in (a, b, other)])
    assert dev.peers == {
        k2: WgPeer(k2, "10.168.0.3:51820", ("100.96.2.0/24",), None, 25),
        k3: WgPeer(k3, "10.168.0.4:51820", ("100.96.3.0/24",), None, 25),  # Port 0: our own port
    }
    b2 = wg_lease("100.96.3.0/24", "10.168.0.4", k3b)
    net.handle_events([Event(EventType.ADDED, b2)])
    assert set(dev.peers) == {k2, k3b}
    net.handle_events([Event(EventType.REMOVED, a)])
    assert set(dev.peers) == {k3b}


def test_bad_lease_is_logged_and_skipped(rig):
    _, devs, _, net, _ = rig
    good = public_key(generate_private_key())
    net.handle_events([Event(EventType.ADDED, wg_lease("100.96.2.0/24", "10.168.0.3", "bad")),
                       Event(EventType.ADDED, wg_lease("100.96.3.0/24", "10.168.0.4", good))])
    assert set(devs[0].peers) == {good}
    with pytest.raises(LeaseParseError):
        lease_peer(wg_lease("100.96.2.0/24", "10.168.0.3", good, port=-1), WgOptions())


def test_reconcile_repairs_drift_removes_stale_and_recreates_dead_device(rig):
    nl, devs, _, net, _ = rig
    k2, stale = public_key(generate_private_key()), public_key(generate_private_key())
    a = wg_lease("100.96.2.0/24", "10.168.0.3", k2)
    net.handle_events([Event(EventType.ADDED, a)])
    dev = devs[0]
    dev.peers[k2] = WgPeer(k2, "10.168.0.3:51820", ("100.96.99.0/24",), None, 0)  # drifted
    dev.peers[stale] = WgPeer(stale, None, ("100.96.7.0/24",))
    net.reconcile({a.subnet: a})
    assert dev.peers == {k2: WgPeer(k2, "10.168.0.3:51820", ("100.96.2.0/24",), None, 25)}
    dev.is_alive = False  # wireguard-go died: a new device with the same key, address, route, peers
    del nl.links["flannel-wg"]
    nl.addrs.clear()
    nl.routes.clear()
    net.reconcile({a.subnet: a})
    assert len(devs) == 2 and dev.closed and devs[1].config == dev.config
    assert set(devs[1].peers) == {k2}
    assert nl.addrs["flannel-wg"] == {IPv4Interface("100.96.1.0/32")} and IPv4Network("100.96.0.0/16") in nl.routes


def test_select_endpoint_follows_flannel():
    from ipaddress import IPv6Address

    from fastflannel.backend.wireguard import select_endpoint

    v4p, v4g, v6p, v6g = (IPv4Address("10.0.0.3"), IPv4Address("11.0.0.3"), IPv6Address("fd00::3"),
                          IPv6Address("2a00::3"))
    me4, me6g = IPv4Address("10.0.0.2"), IPv6Address("2a00::2")
    assert select_endpoint("ipv4", v4p, v6g, me4, me6g) == v4p
    assert select_endpoint("ipv6", v4g, v6p, me4, me6g) == v6p
    assert select_endpoint("auto", v4g, v6g, me4, me6g) == v4g  # public IPv4 first
    assert select_endpoint("auto", v4p, v6g, me4, me6g) == v6g  # else public IPv6 on both ends
    assert select_endpoint("auto", v4p, v6g, me4, IPv6Address("fd00::2")) == v4p  # else IPv4
    assert select_endpoint("auto", v4p, None, me4, None) == v4p


def test_single_device_mode_one_device_both_families_one_peer(tmp_path):
    from ipaddress import IPv6Address, IPv6Interface, IPv6Network

    nl, devs, mgr, be = dual_rig(tmp_path)
    dual = ('{"Network":"100.96.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:100::/48",'
            '"Backend":{"Type":"wireguard","Mode":"%s"}}')
    net = be.register_network(parse_config(dual % "ipv6"))
    pub = public_key(open(tmp_path / "wgkey").read())
    assert list(devs) == ["flannel-wg"] and devs["flannel-wg"].config[1] == 51820
    assert mgr.attrs.backend_data == mgr.attrs.backend_v6_data == {"PublicKey": pub, "Port": 51820}
    assert nl.addrs["flannel-wg"] == {IPv4Interface("100.96.1.0/32"), IPv6Interface("fd00:100:0:1::/128")}
    assert set(nl.routes) == {IPv4Network("100.96.0.0/16"), IPv6Network("fd00:100::/48")}
    k2 = public_key(generate_private_key())
    lease = Lease(IPv4Network("100.96.2.0/24"),
                  LeaseAttrs(IPv4Address("10.168.0.3"), "wireguard", {"PublicKey": k2, "Port": 51820},
                             IPv6Address("fd00::3"), {"PublicKey": k2, "Port": 51820}),
                  subnet6=IPv6Network("fd00:100:0:2::/64"))
    net.handle_events([Event(EventType.ADDED, lease)])
    assert devs["flannel-wg"].peers == {
        k2: WgPeer(k2, "[fd00::3]:51820", ("100.96.2.0/24", "fd00:100:0:2::/64"), None, 0)}
    net.handle_events([Event(EventType.REMOVED, lease)])
    assert devs["flannel-wg"].peers == {}
    with pytest.raises(BackendError, match="Mode ipv6 needs EnableIPv6"):
        be.register_network(cfg('{"Type":"wireguard","Mode":"ipv6"}'))


# -- kernel path (no module on this kernel): probe/fallback and the generic netlink wrapper ----------------------
class ProbeNl:
    def __init__(self, existing=None, add_error=None):
        self.existing, self.add_error, self.calls = existing, add_error, []

    def link_info(self, name):
        return self.existing

    def add_wireguard(self, name, mtu):
        self.calls.append(("add", name, mtu))
        if self.add_error:
            raise self.add_error
        return LinkInfo(name, 9, "wireguard", mtu, "", False)

    def delete_link(self, name):
        self.calls.append(("del", name))
        self.existing = None

    def set_mtu(self, name, mtu):
        self.calls.append(("mtu", name, mtu))


def test_probe_prefers_the_kernel_and_falls_back_with_a_clear_error(monkeypatch):
    import errno

    from fastflannel.errors import KernelError
    from fastflannel.kernel import wireguard as kwg

    monkeypatch.setattr(kwg, "WireGuardGenl", lambda: "genl")
    monkeypatch.delenv("FASTFLANNEL_WIREGUARD", raising=False)
    nl = ProbeNl()
    dev = kwg.open_device(nl, "flannel-wg", 1420)
    assert dev.kind == "kernel" and nl.calls == [("add", "flannel-wg", 1420)]
    nl = ProbeNl(existing=LinkInfo("flannel-wg", 9, "wireguard", 1500, "", True))  # reused, MTU set
    assert kwg.open_device(nl, "flannel-wg", 1420).kind == "kernel" and nl.calls == [("mtu", "flannel-wg", 1420)]
    nomod = KernelError("wireguard flannel-wg", "Operation not supported", errno.EOPNOTSUPP)
    monkeypatch.setenv("FASTFLANNEL_WIREGUARD_GO", "/nonexistent/wireguard-go")
    monkeypatch.setattr(kwg.shutil, "which", lambda _: None)
    with pytest.raises(BackendError, match="no wireguard module and wireguard-go is not installed"):
        kwg.open_device(ProbeNl(add_error=nomod), "flannel-wg", 1420)
    with pytest.raises(KernelError, match="Operation not supported"):  # forced kernel: no fallback
        kwg.open_device(ProbeNl(add_error=nomod), "flannel-wg", 1420, impl="kernel")
    other = KernelError("wireguard flannel-wg", "Permission denied", errno.EPERM)
    with pytest.raises(KernelError, match="Permission denied"):  # only "no module" falls back
        kwg.open_device(ProbeNl(add_error=other), "flannel-wg", 1420)
    with pytest.raises(BackendError, match="must be kernel, userspace or empty"):
        kwg.open_device(ProbeNl(), "flannel-wg", 1420, impl="both")


def test_genl_wrapper_decodes_pyroute2_messages_and_builds_peer_requests():
    """The genl wrapper against messages encoded and decoded by pyroute2's own wgmsg (the kernel's format)."""
    from pyroute2.netlink.generic.wireguard import wgmsg

    from fastflannel.kernel.wireguard import ZERO_KEY, WireGuardGenl

    pub, peer_pub, psk = (public_key(generate_private_key()) for _ in range(3))

    def peer(key, psk_b64, port):
        return {"attrs": [["WGPEER_A_PUBLIC_KEY", key], ["WGPEER_A_PRESHARED_KEY", psk_b64],
                          ["WGPEER_A_ENDPOINT", {"addr": "10.168.0.3", "port": port}],
                          ["WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL", 25],
                          ["WGPEER_A_ALLOWEDIPS", [{"attrs": [["WGALLOWEDIP_A_FAMILY", 2],
                                                              ["WGALLOWEDIP_A_IPADDR", bytes([100, 96, 2, 0])],
                                                              ["WGALLOWEDIP_A_CIDR_MASK", 24]]}]]]}

    m = wgmsg()
    m["cmd"], m["version"], m["header"]["type"] = 0, 1, 0x20
    m["attrs"] = [["WGDEVICE_A_LISTEN_PORT", 51820], ["WGDEVICE_A_PUBLIC_KEY", pub],
                  ["WGDEVICE_A_PEERS", [peer(peer_pub, psk, 51820), peer(pub, ZERO_KEY, 0)]]]
    m.encode()
    decoded = wgmsg(m.data)
    decoded.decode()

    class Sock:
        sets = []

        def info(self, ifname):
            return [decoded]

        def set(self, ifname, **kw):
            self.sets.append((ifname, kw))

        def close(self):
            pass

    g = WireGuardGenl(Sock())
    st = g.dump("flannel-wg")
    assert (st.listen_port, st.public_key) == (51820, pub)
    assert st.peers[peer_pub] == WgPeer(peer_pub, "10.168.0.3:51820", ("100.96.2.0/24",), psk, 25)
    assert st.peers[pub] == WgPeer(pub, None, ("100.96.2.0/24",), None, 25)  # no endpoint, zero PSK = none
    g.set_peer("flannel-wg", peer_pub, ("10.168.0.3", 51820), ["100.96.2.0/24"], None, 0)
    g.remove_peer("flannel-wg", peer_pub)
    (_, add), (_, rm) = Sock.sets
    assert add["peer"] == {"public_key": peer_pub, "replace_allowed_ips": True, "allowed_ips": ["100.96.2.0/24"],
                           "persistent_keepalive": 0, "preshared_key": ZERO_KEY, "endpoint_addr": "10.168.0.3",
                           "endpoint_port": 51820}
    assert rm["peer"] == {"public_key": peer_pub, "remove": True}


class Nl6(FakeNl):
    def addr_list(self, ifname, family=2):
        return [AddrInfo(7, a, 0, 0x80) for a in self.addrs.get(ifname, ()) if (a.version == 6) == (family == 10)]


class Mgr6:
    def acquire_lease(self, attrs):
        from ipaddress import IPv6Network

        self.attrs = attrs
        return Lease(IPv4Network("100.96.1.0/24"), attrs, subnet6=IPv6Network("fd00:100:0:1::/64"))


def dual_rig(tmp_path):
    """A dual-stack host (10.168.0.2, fd00::2) with fake netlink, manager and devices (by name)."""
    from ipaddress import IPv6Address

    nl, devs, mgr = Nl6(), {}, Mgr6()

    def factory(netlink, name, mtu):
        netlink.links[name] = "down"
        devs[name] = FakeDevice()
        return devs[name]

    ext = ExternalInterface("eth0", 2, IPv4Address("10.168.0.2"), IPv4Address("10.168.0.2"), 1500,
                            iface_addr6=IPv6Address("fd00::2"), ext_addr6=IPv6Address("fd00::2"))
    return nl, devs, mgr, WireguardBackend(mgr, ext, nl, device_factory=factory, key_file=str(tmp_path / "wgkey"))


def test_dual_stack_separate_mode_second_device_v6_lease_and_peers(tmp_path):
    from ipaddress import IPv6Address, IPv6Interface, IPv6Network

    nl, devs, mgr, be = dual_rig(tmp_path)
    net = be.register_network(parse_config(
        '{"Network":"100.96.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:100::/48",'
        '"Backend":{"Type":"wireguard","ListenPortV6":51999}}'))
    pub = public_key(open(tmp_path / "wgkey").read())
    assert mgr.attrs.to_json() == (
        '{"PublicIP":"10.168.0.2","PublicIPv6":"fd00::2","BackendType":"wireguard",'
        '"BackendData":{"PublicKey":"%s","Port":51820},"BackendV6Data":{"PublicKey":"%s","Port":51999}}' % (pub, pub))
    assert devs["flannel-wg"].config[1] == 51820 and devs["flannel-wg-v6"].config[1] == 51999
    assert nl.addrs["flannel-wg-v6"] == {IPv6Interface("fd00:100:0:1::/128")} and net.mtu == 1420
    assert nl.routes[IPv6Network("fd00:100::/48")] == (7, 253)
    k2 = public_key(generate_private_key())
    dual = Lease(IPv4Network("100.96.2.0/24"),
                 LeaseAttrs(IPv4Address("10.168.0.3"), "wireguard", {"PublicKey": k2, "Port": 51820},
                            IPv6Address("fd00::3"), {"PublicKey": k2, "Port": 0}),
                 subnet6=IPv6Network("fd00:100:0:2::/64"))
    v4only = wg_lease("100.96.3.0/24", "10.168.0.4", public_key(generate_private_key()))
    net.handle_events([Event(EventType.ADDED, dual), Event(EventType.ADDED, v4only)])
    assert devs["flannel-wg-v6"].peers == {k2: WgPeer(k2, "[fd00::3]:51999", ("fd00:100:0:2::/64",), None, 0)}
    assert len(devs["flannel-wg"].peers) == 2
    net.handle_events([Event(EventType.REMOVED, dual)])
    assert devs["flannel-wg-v6"].peers == {} and len(devs["flannel-wg"].peers) == 1
