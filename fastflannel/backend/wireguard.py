# SPDX-License-Identifier: Apache-2.0
"""WireGuard backend: every packet between hosts encrypted and authenticated (flannel ``pkg/backend/wireguard``).

Design notes
------------
One device, ``flannel-wg`` (MTU = ``Backend.MTU`` or the external interface MTU, minus 80), created before the lease
because the lease advertises its public key: ``BackendData {"PublicKey":"<base64>","Port":<ListenPort>}``. The
private key comes from the key file (``backend/wgkey.py``: created 0400 once, reused, so the public key survives a
restart). After the lease: the lease's network address as a /32 (other addresses inside the Network removed), link
up, and ONE route for the whole Network, ``<Network> dev flannel-wg scope link``: WireGuard's cryptokey routing
picks the peer from the allowed IPs, so there are no per-peer routes, neighbours or FDB entries.

Per remote host one kernel object: a peer {PublicKey, Endpoint ``PublicIP:Port`` (our own ListenPort when the lease
says 0, as older flannel), AllowedIPs = [subnet] (replaced), PresharedKey = ``Backend.PSK``, PersistentKeepalive}.
A removed lease removes the peer by the public key of the cached lease; a lease whose key changed replaces the old
peer. Leases with another BackendType are skipped with Flannel's warning. The device is the kernel module's when the
kernel has it, else a ``wireguard-go`` child of the daemon (``kernel/wireguard.py``, which says in the log which).

Reconcile (every ``reconcile_interval`` s): a dead device (wireguard-go gone, link deleted) is created again with the
same key and port, address and route, and every known peer replayed; then the device's peers are diffed against the
leases: missing or drifted peers set, peers of no known lease removed (after the first event batch). The endpoint is
only set when absent, so WireGuard's roaming is not undone every 10 s.

Modes: ``separate`` (default) is the one implemented: with ``EnableIPv6`` a second device ``flannel-wg-v6`` (the
same key, ``ListenPortV6``, /128, ``<IPv6Network> dev flannel-wg-v6``) advertised in ``BackendV6Data``, its peers
fed with the IPv6 projection of the leases (``lease.project``, ``DualStackNetwork``), endpoints ``[PublicIPv6]:Port``.
The single-device modes ``auto``/``ipv4``/``ipv6`` (``SingleDeviceNetwork``) put both families on ``flannel-wg``:
one peer per lease with both subnets as allowed IPs, the endpoint chosen as Flannel does (``select_endpoint``).

Scale: one peer per remote host, one UAPI/genl request per event; a reconcile is one dump plus one request per
drifted peer.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
import socket
from ipaddress import IPv4Network, ip_interface
from typing import Dict, List, Optional

from fastflannel.backend.dualstack import DualStackNetwork
from fastflannel.backend.route_network import ROUTE_CHECK_INTERVAL_S
from fastflannel.backend.wgkey import WgKeyError, key_file_path, load_or_create_private_key, parse_key, public_key
from fastflannel.config import NetworkConfig
from fastflannel.errors import BackendError
from fastflannel.kernel.iface import ExternalInterface
from fastflannel.kernel.wireguard import WgDevice, WgPeer, open_device
from fastflannel.lease import Event, EventType, Lease, LeaseAttrs, LeaseParseError, project

log = logging.getLogger("fastflannel.backend.wireguard")

BACKEND_TYPE = "wireguard"
DEVICE_NAME = "flannel-wg"
DEVICE_NAME_V6 = "flannel-wg-v6"
DEFAULT_PORT = 51820
DEFAULT_PORT_V6 = 51821
# 20 (IPv4; Flannel reserves 40 for IPv6 too) + 8 UDP + 4 type + 4 receiver index + 8 counter + 16 Poly1305 tag
WIREGUARD_OVERHEAD = 80
MODES = ("separate", "auto", "ipv4", "ipv6")
RT_SCOPE_LINK = 253


@dataclass(frozen=True)
class WgOptions:
    listen_port: int = DEFAULT_PORT
    listen_port_v6: int = DEFAULT_PORT_V6
    mtu: int = 0  # 0: the external interface's
    psk: Optional[str] = None
    keepalive: int = 0  # seconds; 0 = off
    mode: str = "separate"


def _int_opt(config: NetworkConfig, name: str, default: int, lo: int, hi: int) -> int:
    v = config.backend_option(name, default)
    if v is None:
        return default
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise BackendError(f"Backend.{name}: must be an integer in [{lo}, {hi}], got {v!r}")
    return v


def parse_options(config: NetworkConfig) -> WgOptions:
    """Read the Backend object (Go JSON: names case-insensitive); raise BackendError naming the bad key."""
    psk = config.backend_option("PSK", None)
    if psk in (None, ""):
        psk = None
    else:
        try:
            parse_key(psk, "Backend.PSK")
        except WgKeyError as e:
            raise BackendError(f"could not parse psk: {e} (make one with wg genpsk)") from None
        psk = psk.strip()
    mode = config.backend_option("Mode", "separate")
    if mode in (None, ""):
        mode = "separate"
    if not isinstance(mode, str) or mode.lower() not in MODES:
        raise BackendError(f"no valid Mode configured: Backend.Mode={mode!r}, one of {', '.join(MODES)}")
    return WgOptions(
        listen_port=_int_opt(config, "ListenPort", DEFAULT_PORT, 1, 65535),
        listen_port_v6=_int_opt(config, "ListenPortV6", DEFAULT_PORT_V6, 1, 65535),
        mtu=_int_opt(config, "MTU", 0, 0, 65535),
        psk=psk,
        keepalive=_int_opt(config, "PersistentKeepaliveInterval", 0, 0, 65535),
        mode=mode.lower(),
    )


def wireguard_mtu(backend_mtu: int, ext_mtu: int) -> int:
    """Return the device MTU (and subnet.env's FLANNEL_MTU): (``Backend.MTU`` or the interface MTU) - 80."""
    return (backend_mtu or ext_mtu) - WIREGUARD_OVERHEAD


def _host_address(subnet):
    """The lease's network address as a host address on the device: /32 (IPv4) or /128 (IPv6), as Flannel."""
    return ip_interface(f"{subnet.network_address}/{subnet.max_prefixlen}")


def select_endpoint(mode: str, ip4, ip6, ext4, ext6):
    """Return the remote address a single-device mode sends to (Flannel's ``selectPublicEndpoint`` for ``auto``):
    ``ipv4``/``ipv6`` the named family; ``auto`` the only one there is, else IPv4 if the remote IPv4 is public,
    else IPv6 if both the remote and our own IPv6 are public, else IPv4."""
    if mode == "ipv4" or ip6 is None:
        return ip4
    if mode == "ipv6" or ip4 is None:
        return ip6
    if not ip4.is_private and ext4 is not None:
        return ip4
    if not ip6.is_private and ext6 is not None and not ext6.is_private:
        return ip6
    return ip4


def lease_peer(lease: Lease, opts: WgOptions, own_port: Optional[int] = None) -> WgPeer:
    """Return the peer for a remote wireguard lease (or its IPv6 projection); raise LeaseParseError if its
    BackendData is not usable. ``own_port``: our listen port of that family, used when the lease says 0."""
    d = lease.attrs.backend_data
    if not isinstance(d, dict):
        raise LeaseParseError(f"BackendData: wireguard lease needs an object with PublicKey and Port, got {d!r}")
    low = {k.lower(): v for k, v in d.items()}
    key = low.get("publickey")
    try:
        parse_key(key, "BackendData.PublicKey")
    except WgKeyError as e:
        raise LeaseParseError(str(e)) from None
    port = low.get("port", 0) or 0
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise LeaseParseError(f"BackendData.Port: {port!r} is not a UDP port")
    ip = lease.attrs.public_ip
    host = f"[{ip}]" if ip.version == 6 else str(ip)
    return WgPeer(public_key=key.strip(), endpoint=f"{host}:{port or own_port or opts.listen_port}",
                  allowed_ips=(str(lease.subnet),), preshared_key=opts.psk, keepalive=opts.keepalive)


class WireguardBackend:
    """Constructed by the daemon as ``WireguardBackend(manager, ext_iface, netlink, previous_lease=...)``."""

    def __init__(self, manager, ext_iface: ExternalInterface, netlink, previous_lease: Optional[Lease] = None,
                 device_factory=open_device, key_file: Optional[str] = None):
        self.manager = manager
        self.ext = ext_iface
        self.netlink = netlink
        self.previous_lease = previous_lease
        self.device_factory = device_factory
        self.key_file = key_file or key_file_path()

    def register_network(self, config: NetworkConfig):
        """Devices (flannel-wg, and flannel-wg-v6 with EnableIPv6) with our key, then the lease advertising it, then
        addresses and routes. Returns one WireguardNetwork, or a DualStackNetwork of both families."""
        opts = parse_options(config)
        if not config.enable_ipv4 or config.network is None:
            raise BackendError("wireguard: needs EnableIPv4 and Network")
        if config.enable_ipv6 and (self.ext.ext_addr6 is None or config.ipv6_network is None):
            raise BackendError("EnableIPv6 is true but the external interface has no IPv6 address")
        private_key, created = load_or_create_private_key(self.key_file)
        pub = public_key(private_key)
        log.info("event=wireguard_key path=%s created=%s public_key=%s", self.key_file, created, pub)
        mtu = wireguard_mtu(opts.mtu, self.ext.mtu)
        if opts.mode != "separate":
            return self._register_single(config, opts, private_key, pub, mtu)
        nets = {4: WireguardNetwork(self.netlink, opts, private_key, pub, mtu, config.network, self.device_factory)}
        if config.enable_ipv6:
            nets[6] = WireguardNetwork(self.netlink, opts, private_key, pub, mtu, config.ipv6_network,
                                       self.device_factory, dev=DEVICE_NAME_V6, port=opts.listen_port_v6)
        try:
            for n in nets.values():
                n.ensure_device()
            attrs = LeaseAttrs(public_ip=self.ext.ext_addr, backend_type=BACKEND_TYPE,
                               backend_data={"PublicKey": pub, "Port": opts.listen_port},
                               public_ipv6=self.ext.ext_addr6 if 6 in nets else None,
                               backend_v6_data={"PublicKey": pub, "Port": opts.listen_port_v6} if 6 in nets else None)
            lease = self.manager.acquire_lease(attrs)
        except BaseException:
            for n in nets.values():
                n.close()
            raise
        for family, n in nets.items():
            n.lease = project(lease, family)
            n.configure_link()
            log.info("event=device_ready dev=%s type=wireguard impl=%s public_key=%s port=%d addr=%s/%d mtu=%d "
                     "psk=%s keepalive_s=%d", n.dev, n.device.kind, pub, n.port, n.lease.subnet.network_address,
                     n.lease.subnet.max_prefixlen, mtu, "set" if opts.psk else "none", opts.keepalive)
        return nets[4] if len(nets) == 1 else DualStackNetwork(lease, nets)

    def _register_single(self, config: NetworkConfig, opts: WgOptions, private_key: str, pub: str, mtu: int):
        """Modes auto/ipv4/ipv6: one flannel-wg on ListenPort for both families (both BackendData carry it)."""
        if opts.mode == "ipv6" and not config.enable_ipv6:
            raise BackendError("wireguard: Mode ipv6 needs EnableIPv6 (and an IPv6 address on the interface)")
        net = SingleDeviceNetwork(self.netlink, opts, private_key, pub, mtu, config.network, self.device_factory,
                                  network6=config.ipv6_network if config.enable_ipv6 else None, ext=self.ext)
        data = {"PublicKey": pub, "Port": opts.listen_port}
        try:
            net.ensure_device()
            lease = self.manager.acquire_lease(LeaseAttrs(
                public_ip=self.ext.ext_addr, backend_type=BACKEND_TYPE, backend_data=data,
                public_ipv6=self.ext.ext_addr6 if config.enable_ipv6 else None,
                backend_v6_data=data if config.enable_ipv6 else None))
        except BaseException:
            net.close()
            raise
        net.lease = lease
        net.configure_link()
        log.info("event=device_ready dev=%s type=wireguard mode=%s impl=%s public_key=%s port=%d addr=%s mtu=%d "
                 "psk=%s keepalive_s=%d", net.dev, opts.mode, net.device.kind, pub, net.port,
                 ",".join(str(_host_address(own)) for own, _ in net._targets()), mtu, "set" if opts.psk else "none",
                 opts.keepalive)
        return net


class WireguardNetwork:
    reconcile_interval = ROUTE_CHECK_INTERVAL_S

    def __init__(self, netlink, opts: WgOptions, private_key: str, pub: str, mtu: int, network,
                 device_factory=open_device, dev: str = DEVICE_NAME, port: Optional[int] = None) -> None:
        self.netlink = netlink
        self.dev = dev  # flannel-wg (IPv4) or flannel-wg-v6
        self.port = opts.listen_port if port is None else port
        self.opts = opts
        self._private_key = private_key
        self.public_key = pub
        self.mtu = mtu
        self.network = network
        self.device_factory = device_factory
        self.device: WgDevice = None  # type: ignore[assignment]
        self.lease: Lease = None  # type: ignore[assignment]
        self._peers: Dict[IPv4Network, WgPeer] = {}  # subnet -> peer programmed for it
        self._synced = False
        self._lock = threading.RLock()

    # -- device ------------------------------------------------------------------------------------
    def ensure_device(self) -> bool:
        """Create the device (or a new one if it died) with our key and port; return True if it was created."""
        if self.device is not None and self.device.alive() and self.netlink.link_info(self.dev) is not None:
            return False
        if self.device is not None:
            log.warning("event=wireguard_device_recreate dev=%s impl=%s reason=gone", self.dev, self.device.kind)
            self.device.close()
        self.device = self.device_factory(self.netlink, self.dev, self.mtu)
        log.info("event=wireguard_device dev=%s impl=%s", self.dev, self.device.kind)
        self.device.configure(self._private_key, self.port)
        return True

    def configure_link(self) -> None:
        """/32 (/128) of the lease (others inside the Network removed), link up, ``<Network> dev <dev> scope link``."""
        nl = self.netlink
        for own, network in self._targets():
            want = _host_address(own)
            for a in self._addrs(own.version):
                if a.address != want and a.address.ip in network:
                    log.info("event=wireguard_addr_removed dev=%s addr=%s", self.dev, a.address)
                    nl.addr_del(self.dev, a.address)
            nl.addr_replace(self.dev, want)
        nl.set_link_up(self.dev)
        self._ensure_route()

    def _targets(self) -> list:
        """[(our subnet, the Network)] this device carries: one family here, both in the single-device modes."""
        return [(self.lease.subnet, self.network)]

    def _addrs(self, version: int):
        if version == 6:
            return self.netlink.addr_list(self.dev, family=socket.AF_INET6)
        return self.netlink.addr_list(self.dev)

    def _ensure_route(self) -> None:
        index = self.netlink.link_index(self.dev)
        for _, network in self._targets():
            self.netlink.route_replace(network, oif=index, scope=RT_SCOPE_LINK)

    # -- events ------------------------------------------------------------------------------------
    def handle_events(self, events: List[Event]) -> None:
        with self._lock:
            self._synced = True
            for ev in events:
                try:
                    if ev.type is EventType.ADDED:
                        self._add(ev.lease)
                    else:
                        self._remove(ev.lease)
                except (BackendError, LeaseParseError, ValueError, OSError) as e:
                    log.error("event=peer_failed type=%s subnet=%s public_ip=%s error=%s",
                              ev.type.value, ev.lease.subnet, ev.lease.attrs.public_ip, e)

    def _peer_for(self, lease: Lease, quiet: bool = False) -> Optional[WgPeer]:
        if lease.attrs.backend_type != BACKEND_TYPE:
            if not quiet:
                log.warning("event=lease_skipped subnet=%s backend_type=%r msg=\"Ignoring non-wireguard subnet\"",
                            lease.subnet, lease.attrs.backend_type)
            return None
        if self.lease is not None and lease.subnet == self.lease.subnet:
            return None
        peer = self._build_peer(lease)
        if peer.public_key == self.public_key:
            raise LeaseParseError(f"BackendData.PublicKey is our own public key: host {lease.attrs.public_ip} uses "
                                  f"a copy of our key file")
        return peer

    def _build_peer(self, lease: Lease) -> WgPeer:
        return lease_peer(lease, self.opts, self.port)

    def _add(self, lease: Lease) -> None:
        peer = self._peer_for(lease)
        if peer is None:
            return
        old = self._peers.get(lease.subnet)
        if old is not None and old.public_key != peer.public_key and not self._key_used(old.public_key, lease.subnet):
            self.device.remove_peer(old.public_key)
            log.info("event=peer_key_changed subnet=%s old_public_key=%s", lease.subnet, old.public_key)
        for subnet, other in self._peers.items():
            if subnet != lease.subnet and other.public_key == peer.public_key:
                log.warning("event=peer_key_shared subnet=%s other_subnet=%s public_key=%s msg=\"two leases "
                            "advertise one key: only the last one's subnet is reachable\"", lease.subnet, subnet,
                            peer.public_key)
        self.device.set_peer(peer)
        self._peers[lease.subnet] = peer
        self._ensure_route()
        log.info("event=peer_added subnet=%s public_ip=%s endpoint=%s public_key=%s", lease.subnet,
                 lease.attrs.public_ip, peer.endpoint, peer.public_key)

    def _key_used(self, key: str, besides: IPv4Network) -> bool:
        return any(p.public_key == key for s, p in self._peers.items() if s != besides)

    def _remove(self, lease: Lease) -> None:
        """Remove the peer by the public key of the removed lease (its cached attrs)."""
        programmed = self._peers.pop(lease.subnet, None)
        if lease.attrs.backend_type != BACKEND_TYPE:
            return
        try:
            key = lease_peer(lease, self.opts, self.port).public_key
        except LeaseParseError:
            key = programmed.public_key if programmed else None
        for k in {key, programmed.public_key if programmed else None} - {None}:
            if not self._key_used(k, lease.subnet):
                self.device.remove_peer(k)
        log.info("event=peer_removed subnet=%s public_ip=%s public_key=%s", lease.subnet, lease.attrs.public_ip, key)

    # -- reconcile ---------------------------------------------------------------------------------
    def reconcile(self, leases: Dict[IPv4Network, Lease]) -> None:
        with self._lock:
            recreated = self.ensure_device()
            if recreated:
                self.configure_link()
            self._ensure_address()
            self._ensure_route()
            want: Dict[str, WgPeer] = {}
            peers: Dict[IPv4Network, WgPeer] = {}
            for subnet, lease in leases.items():
                try:
                    peer = self._peer_for(lease, quiet=True)
                except LeaseParseError:
                    continue
                if peer is not None:
                    want[peer.public_key] = peer
                    peers[subnet] = peer
            have = self.device.state().peers
            for key, peer in want.items():
                h = have.get(key)
                if (h is None or set(h.allowed_ips) != set(peer.allowed_ips) or h.preshared_key != peer.preshared_key
                        or h.keepalive != peer.keepalive or not h.endpoint):
                    self._repair("peer", self.device.set_peer, peer)
            if self._synced:
                for key in have:
                    if key not in want:
                        self._repair("stale peer", self.device.remove_peer, key)
            self._peers = peers

    def _ensure_address(self) -> None:
        for own, _ in self._targets():
            want = _host_address(own)
            if not any(a.address == want for a in self._addrs(own.version)):
                self.netlink.addr_replace(self.dev, want)
                self.netlink.set_link_up(self.dev)

    @staticmethod
    def _repair(what: str, fn, arg) -> None:
        try:
            fn(arg)
            log.info("event=wireguard_repaired what=%s key=%s", what, getattr(arg, "public_key", arg))
        except BackendError as e:
            log.error("event=wireguard_repair_failed what=%s error=%s", what, e)

    def close(self) -> None:
        """Stop wireguard-go (its device goes with it) or close the genl socket (the kernel device stays)."""
        with self._lock:
            if self.device is not None:
                self.device.close()
                log.info("event=wireguard_closed dev=%s impl=%s", self.dev, self.device.kind)


class SingleDeviceNetwork(WireguardNetwork):
    """Flannel's single-device modes: ``flannel-wg`` carries both families; one peer per lease whose allowed IPs are
    the lease's IPv4 and IPv6 subnets, its endpoint chosen by ``Mode`` (``select_endpoint``). Fed the real leases
    (not per-family projections)."""

    def __init__(self, *args, network6=None, ext: Optional[ExternalInterface] = None, **kw) -> None:
        super().__init__(*args, **kw)
        self.network6 = network6
        self.ext = ext

    def _targets(self) -> list:
        out = [(self.lease.subnet, self.network)]
        if self.network6 is not None and self.lease.subnet6 is not None:
            out.append((self.lease.subnet6, self.network6))
        return out

    def _build_peer(self, lease: Lease) -> WgPeer:
        p4 = lease_peer(lease, self.opts, self.port) if lease.attrs.backend_data is not None else None
        l6 = project(lease, 6) if self.network6 is not None else None
        p6 = lease_peer(l6, self.opts, self.port) if l6 is not None and l6.attrs.backend_data is not None else None
        parts = [p for p in (p4, p6) if p is not None]
        if not parts:
            raise LeaseParseError("BackendData: no wireguard data for any enabled family")
        ip6 = l6.attrs.public_ip if p6 is not None else None
        chosen = select_endpoint(self.opts.mode, lease.attrs.public_ip if p4 is not None else None, ip6,
                                 self.ext.ext_addr if self.ext else None, self.ext.ext_addr6 if self.ext else None)
        peer = next(p for p, ip in ((p4, lease.attrs.public_ip), (p6, ip6)) if p is not None and ip == chosen)
        key = (p6 or p4).public_key  # Flannel: the IPv6 data's key wins (both are the host's one key)
        return WgPeer(key, peer.endpoint, tuple(a for p in parts for a in p.allowed_ips), self.opts.psk,
                      self.opts.keepalive)
