# SPDX-License-Identifier: Apache-2.0
"""udp backend: a TUN device and a UDP socket, bridged by the Cython fast path.

Design notes (flannel ``pkg/backend/udp``, flannel-compat.md section 7):
- One TUN ``flannel0`` (IFF_TUN | IFF_NO_PI) carries raw IP packets. Its address is the lease's network
  address as /32, its MTU the external MTU - 28 (UDP_ENCAP_OVERHEAD), and one route sends the whole
  Network into it. The local bridge's /24 is more specific, so only remote traffic enters the TUN.
- One UDP socket bound to the interface IP and ``Port`` (8285). Wire format: exactly one inner IPv4
  packet per datagram, TTL decremented on each hop: byte-compatible with flanneld.
- Per remote lease the data path holds one table slot (O(1), indexed by subnet number) with the peer's
  PublicIP; nothing per peer is programmed in the kernel. Lease events become ``set_route``/``del_route``
  on the running loop; the loop is never stopped for an update.
- Peers' leases are accepted whatever BackendType they carry (flanneld's udp backend writes none).
- Our lease value is flanneld's udp one: ``{"PublicIP":"...","PublicIPv6":null}``.
- The TUN disappears with the process (as flanneld); a restart re-creates it and replays the snapshot.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import replace
from typing import Dict, List, Optional

from fastflannel.backend.peerlog import log_peers_summary, peer_log_level
from fastflannel.backend.udp_options import UdpOptions
from fastflannel.config import NetworkConfig
from fastflannel.errors import BackendError, FatalBackendError
from fastflannel.datapath.contract import UDP_ENCAP_OVERHEAD
from fastflannel.kernel.drops import link_drops, socket_drops
from fastflannel.kernel.iface import ExternalInterface
from fastflannel.lease import Event, EventType, Lease, LeaseAttrs

log = logging.getLogger("fastflannel.backend.udp")

TUN_NAME = "flannel0"
RECONCILE_INTERVAL_S = 10.0


def fastpath_options(opts: UdpOptions, threads: int):
    """The FastPathOptions for ``opts`` (the loop's part of the backend's switches)."""
    from fastflannel.datapath.fastpath import FastPathOptions

    return FastPathOptions(check_peer_source=opts.check_peer_source, check_inner_dest=opts.check_inner_dest,
                           spin=opts.bench_spin, busy_poll_us=opts.bench_busy_poll_us,
                           loop_priority=opts.bench_loop_priority, demote_after=opts.bench_demote_after,
                           threads=threads, tun_offload=opts.tun_offload,
                           udp_gso=opts.udp_gso, udp_gro=opts.udp_gro,
                           tun_uso=opts.tun_uso and opts.tun_offload)


class UdpBackend:
    """Constructed with the subnet manager, the external interface and the netlink facade."""

    def __init__(self, manager, ext_iface: ExternalInterface, netlink, previous_lease: Optional[Lease] = None):
        self.manager = manager
        self.ext = ext_iface
        self.netlink = netlink

    def register_network(self, config: NetworkConfig) -> "UdpNetwork":
        if config.enable_ipv6:  # Flannel's udp backend is IPv4 only too (its C proxy carries raw IPv4 packets)
            raise BackendError(UDP_IPV6_ERROR)
        options = UdpOptions.load(config.backend_option, os.environ)  # the one place the switches are read
        lease = self.manager.acquire_lease(LeaseAttrs(public_ip=self.ext.ext_addr))
        return UdpNetwork(config, lease, self.ext, self.netlink, options)


UDP_IPV6_ERROR = (
    "the udp backend is IPv4 only (as in Flannel) but the network config has EnableIPv6 true; use the vxlan or "
    "host-gw backend for dual stack, or set EnableIPv6 to false"
)


class UdpNetwork:
    reconcile_interval = RECONCILE_INTERVAL_S

    def __init__(self, config: NetworkConfig, lease: Lease, ext: ExternalInterface, netlink,
                 options: UdpOptions = UdpOptions()):
        from fastflannel.datapath.fastpath import GRO_RCVBUF_BYTES, FastPath, implementation_module, tune_socket
        from fastflannel.kernel.tun import TunError, open_tun, open_tun_offload, uso_supported

        self.config = config
        self.lease = lease
        self.netlink = netlink
        self.options = options
        self.port = port = options.port
        self.mtu = ext.mtu - UDP_ENCAP_OVERHEAD
        self.tun_fd = -1
        self.tun_index = 0
        self.sock: Optional[socket.socket] = None
        self.fastpath = None
        try:
            opts = options
            if implementation_module(None).IMPLEMENTATION != "cython":
                opts = replace(opts, tun_offload=False, udp_gro=False)  # the twin has no offload loop
            if opts.tun_offload:
                try:
                    self.tun_fd, self.tun_name = open_tun_offload(TUN_NAME)
                except TunError as e:
                    log.warning("event=tun_offload_refused error=%s: per-packet TUN", e)
                    opts = replace(opts, tun_offload=False)
            if opts.tun_offload and opts.tun_uso and not uso_supported(self.tun_fd):
                log.warning("event=tun_uso_unsupported dev=%s: the kernel takes no UDP GSO writes (Linux < 6.2); "
                            "UDP datagrams are written one per write", self.tun_name)
                opts = replace(opts, tun_uso=False)
            if not opts.tun_offload:
                self.tun_fd, self.tun_name = open_tun(TUN_NAME)
            fp_opts = fastpath_options(opts, opts.threads())  # after the TUN probe, before the GRO one (FastPath)
            self._configure_tun()
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                self.sock.bind((str(ext.iface_addr), port))
            except OSError as e:
                raise BackendError(
                    f"udp socket {ext.iface_addr}:{port}: {e.strerror}; is another flanneld running on this host?"
                ) from e
            self.sock.setblocking(False)
            # GRO queues 64 KB skbs: 4 MiB overflowed under 4 TCP streams (docs/fastpath.md "Offloads")
            rcvbuf = opts.bench_rcvbuf or (GRO_RCVBUF_BYTES if opts.udp_gro else None)
            tune_socket(self.sock, rcvbuf=rcvbuf)
            self.fastpath = FastPath(
                self.tun_fd,
                self.sock.fileno(),
                network=config.network,
                subnet_len=config.subnet_len,
                own_subnet=lease.subnet,
                tun_ip=lease.subnet.network_address,
                mtu=self.mtu,
                port=port,
                options=fp_opts,
            )
            self.fastpath.start()
        except BaseException:
            self.close()
            raise
        o = self.fastpath.options
        log.info("event=device_ready dev=%s type=tun addr=%s/32 mtu=%d udp=%s:%d fastpath=%s tun_offload=%s udp_gso=%s "
                 "udp_gro=%s tun_uso=%s threads=%d busy_poll_us=%d loop_priority=%s demote_after=%d",
                 self.tun_name,
                 lease.subnet.network_address, self.mtu, ext.iface_addr, port, self.fastpath.implementation,
                 o.tun_offload, o.udp_gso and o.tun_offload, o.udp_gro, o.tun_uso, o.threads, o.busy_poll_us,
                 o.loop_priority or "inherit", o.demote_after)

    def _configure_tun(self) -> None:
        from fastflannel.kernel.sysctl import write_sysctl

        nl = self.netlink
        nl.set_mtu(self.tun_name, self.mtu)
        txqlen = self.options.bench_txqueuelen
        try:
            nl.set_link_queue(self.tun_name, txqlen=txqlen)
        except Exception as e:  # noqa: BLE001 - a slower TUN is no reason not to start
            log.warning("event=tun_txqueuelen_failed device=%s txqueuelen=%d error=%s", self.tun_name, txqlen, e)
        gso_max = self.options.bench_gso_max_size
        if gso_max:
            try:
                nl.set_link_queue(self.tun_name, gso_max_size=gso_max)
            except Exception as e:  # noqa: BLE001
                log.warning("event=tun_gso_max_size_failed device=%s error=%s", self.tun_name, e)
        nl.addr_replace(self.tun_name, f"{self.lease.subnet.network_address}/32")
        # The ICMP net-unreachable the fast path writes back carries flanneld's source, the TUN's own
        # address; without accept_local the kernel drops it as a martian and the sender just times out
        # (flanneld has this bug). Only flannel0 accepts it, and only the fast path writes to flannel0.
        write_sysctl(f"net/ipv4/conf/{self.tun_name}/accept_local", "1")
        nl.set_link_up(self.tun_name)
        # the TUN lives as long as our fd: its index cannot change under a running loop (deleting the link kills
        # the loop, and reconcile's check() then restarts the daemon)
        self.tun_index = nl.link_index(self.tun_name)
        self._ensure_network_route()

    def _ensure_network_route(self) -> None:
        """``ip route replace <Network> dev flannel0`` (scope universe, as flanneld): every reconcile pass, so
        ``Netlink`` sends it raw and the TUN's index is not looked up again (docs/soak.md, "What udp's slope was":
        through pyroute2 this check grew a daemon +1.9-2.1 MiB/h, raw +0.3-0.5)."""
        self.netlink.route_replace(self.config.network, oif=self.tun_index)

    def handle_events(self, events: List[Event]) -> None:
        """Program the batch's routes into the fast path with one loop round trip per chunk of commands (not per
        route: 5,000 peers after a restart, docs/scale.md); a bad lease fails alone."""
        t0 = time.monotonic()
        level = peer_log_level(len(events))
        changes = [(ev.lease.subnet, ev.lease.attrs.public_ip if ev.type is EventType.ADDED else None)
                   for ev in events]
        try:
            errors: List[Optional[Exception]] = list(self.fastpath.update_routes(changes))
        except OSError as e:  # the loop failed: nothing of the batch is known to be in effect
            errors = [e] * len(events)
        n = {EventType.ADDED: 0, EventType.REMOVED: 0}
        for ev, err in zip(events, errors):
            subnet, peer = ev.lease.subnet, ev.lease.attrs.public_ip
            if err is not None:
                log.error("event=route_failed subnet=%s public_ip=%s error=%s", subnet, peer, err)
                continue
            n[ev.type] += 1
            if not log.isEnabledFor(level):
                continue
            if ev.type is EventType.ADDED:  # literal event names: service/metrics.py counts them from the format
                log.log(level, "event=peer_added subnet=%s public_ip=%s", subnet, peer)
            else:
                log.log(level, "event=peer_removed subnet=%s public_ip=%s", subnet, peer)
        log_peers_summary(log, "udp", len(events), n[EventType.ADDED], n[EventType.REMOVED],
                          len(events) - n[EventType.ADDED] - n[EventType.REMOVED], time.monotonic() - t0)

    def reconcile(self, leases: Dict) -> None:
        try:
            self.fastpath.check()  # raises if a loop thread died
        except OSError as e:
            raise FatalBackendError(f"udp fast path loop died: {e}; exiting so that the service manager restarts "
                                    "fastflanneld") from e
        self._ensure_network_route()
        want = {s: l.attrs.public_ip for s, l in leases.items()}
        have = self.fastpath.routes()
        fixes = [(subnet, peer) for subnet, peer in want.items() if have.get(subnet) != peer]
        fixes += [(subnet, None) for subnet in set(have) - set(want)]
        for (subnet, peer), err in zip(fixes, self.fastpath.update_routes(fixes) if fixes else []):
            if err is not None:
                log.error("event=route_repair_failed subnet=%s public_ip=%s error=%s", subnet, peer, err)
            elif peer is None:
                log.warning("event=route_stale_removed subnet=%s", subnet)
            else:
                log.warning("event=route_repaired subnet=%s public_ip=%s", subnet, peer)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("event=fastpath_stats %s", " ".join(f"{k}={v}" for k, v in self.fastpath.stats().items()))

    def stats(self) -> Dict[str, int]:
        """The fast path's counters plus the drops only the kernel sees (read now, never by the loop):
        ``tx_drop_tun_queue``, packets the TUN could not queue for our reads (``flannel0`` tx_dropped), and
        ``rx_drop_udp_rcvbuf``, datagrams dropped at our socket because its receive buffer was full."""
        if self.fastpath is None:
            return {}
        out = self.fastpath.stats()
        link = link_drops(self.tun_name) if self.tun_name else None
        if link is not None:
            out["tx_drop_tun_queue"] = link["tx_dropped"]
        sock_drops = socket_drops(self.sock) if self.sock is not None else None
        if sock_drops is not None:
            out["rx_drop_udp_rcvbuf"] = sock_drops
        return out

    def close(self) -> None:
        """Stop the loop first, then close the fds it used (never the other way round)."""
        fp, self.fastpath = self.fastpath, None
        if fp is not None:
            fp.close()
        sock, self.sock = self.sock, None
        if sock is not None:
            sock.close()
        fd, self.tun_fd = self.tun_fd, -1
        if fd >= 0:
            os.close(fd)
