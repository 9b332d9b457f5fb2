# SPDX-License-Identifier: Apache-2.0
"""The daemon: wires the parts in flanneld's start-up order and owns everything it opens.

Order (flannel main.go): subnet manager (reads the old subnet.env) -> signal handlers -> healthz -> config
fetch loop -> interface -> backend + register_network (device, lease, address) -> traffic rules ->
subnet.env (ready) -> backend event loop + lease keeper -> sd_notify READY=1 -> wait for a signal.

Concurrency: plain threads and one ``threading.Event`` (``stop``). SIGTERM/SIGINT set it; every loop
returns soon after; exit status 0; kernel state is left in place so a restart is seamless (flanneld does
the same; only the udp backend's TUN, and the wireguard backend's wireguard-go with its device, go away with the
process).

Differences from flanneld, on purpose: a store outage during start-up is waited out instead of exiting;
losing our own lease re-acquires the same subnet instead of shutting down (see subnet/manager.py).
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
from contextlib import ExitStack
from typing import Callable, List, Optional

from fastflannel.options import DaemonOptions
from fastflannel.config import ConfigError, NetworkConfig
from fastflannel.retry import Backoff, FailureLog
from fastflannel.subnet import ConfigNotFoundError, StoreUnavailableError, SubnetError

log = logging.getLogger("fastflannel.daemon")

CONFIG_RETRY_S = 1.0  # flanneld polls for a missing config every second
STORE_RETRY_MAX_S = 10.0  # cap of the back-off while the store is unreachable at start-up
THREAD_JOIN_S = 10.0
HEAP_TRIM_S = 60.0  # how often the main thread gives glibc's free heap pages back (trim_heap)


def lease_timing(opts: DaemonOptions) -> "tuple[int, float]":
    """Return (lease TTL s, renew margin s). The TTL is flanneld's 24 h; ``FASTFLANNEL_SUBNET_TTL`` shortens it
    for tests of lease expiry (a vanished host's lease then expires in seconds). The margin is capped at half
    the TTL so a short TTL stays valid."""
    from fastflannel.subnet.manager import DEFAULT_TTL_S

    ttl = _env_seconds("FASTFLANNEL_SUBNET_TTL", DEFAULT_TTL_S, int, 2, "must be at least 2 seconds")
    return ttl, min(opts.subnet_lease_renew_margin * 60.0, ttl / 2.0)


def lease_resync_period() -> float:
    """Seconds between the lease watcher's full re-lists (then jittered and longer in large clusters:
    ``manager.resync_delay``; the own-key check follows it): ``DEFAULT_RESYNC_S``, or ``FASTFLANNEL_LEASE_RESYNC_S``."""
    from fastflannel.subnet.manager import DEFAULT_RESYNC_S

    return _env_seconds("FASTFLANNEL_LEASE_RESYNC_S", DEFAULT_RESYNC_S, float, 1, "must be at least 1 second")


def _env_seconds(name: str, default, kind, minimum, rule: str, hint: str = ""):
    """The number of seconds in environment variable ``name`` (``default`` when unset or empty), parsed with ``kind``;
    StartupError naming the variable if it is not a number or is below ``minimum`` (``rule`` says what is allowed)."""
    raw = os.environ.get(name, "")
    try:
        value = kind(raw) if raw else default
    except ValueError:
        raise StartupError(f"{name}={raw!r}: not a number of seconds{hint}") from None
    if value < minimum:
        raise StartupError(f"{name}={value}: {rule}")
    return value


def make_traffic_manager(config: NetworkConfig, lease, opts: DaemonOptions, prev_network, prev_subnet):
    """Return the traffic manager of the mode ``EnableNFTables`` selects, after removing the other mode's objects
    as flanneld does at start (nftables mode: the iptables FLANNEL chains; iptables mode: the nftables tables)."""
    from fastflannel.kernel import iptables, nftables
    from fastflannel.subnet.subnetfile import read_previous_network_and_subnet

    dual = config.enable_ipv6 and config.ipv6_network is not None and lease.subnet6 is not None
    nets = [(config.network, lease.subnet)] + ([(config.ipv6_network, lease.subnet6)] if dual else [])
    if config.enable_nftables:
        for family in (4, 6) if dual else (4,):
            iptables.remove_iptables_objects(family=family)
        return nftables.NftTrafficManager(nets=nets, masq=opts.ip_masq,
                                          forward=opts.iptables_forward_rules, resync_s=float(opts.iptables_resync))
    nftables.delete_tables()
    prevs = [(prev_network, prev_subnet)]
    if dual:  # ip6tables rules from FLANNEL_IPV6_NETWORK / FLANNEL_IPV6_SUBNET of the previous subnet.env
        prevs.append(read_previous_network_and_subnet(opts.subnet_file, family=6))
    managers = [iptables.TrafficManager(network=net, subnet=sub, masq=opts.ip_masq, forward=opts.iptables_forward_rules,
                                        prev_network=pn, prev_subnet=ps, resync_s=float(opts.iptables_resync))
                for (net, sub), (pn, ps) in zip(nets, prevs)]
    return managers[0] if len(managers) == 1 else iptables.TrafficGroup(managers)


class StartupError(Exception):
    """Start-up cannot continue; the message says what failed and what to do. Exit status 1."""


_libc_trim: Optional[Callable[[int], int]] = None


def heap_trim_period() -> float:
    """Seconds between ``trim_heap`` calls: ``HEAP_TRIM_S``, or ``FASTFLANNEL_HEAP_TRIM_S`` (0 = never; the soak's
    control runs use it to measure the difference side by side)."""
    return _env_seconds("FASTFLANNEL_HEAP_TRIM_S", HEAP_TRIM_S, float, 0,
                        "must be 0 (off) or a positive number of seconds", hint=" (0 turns trimming off)")


def trim_heap() -> bool:
    """``malloc_trim(0)``: return the free pages of every glibc arena to the kernel; False where libc has none.

    Why (issue 14, docs/soak.md): under lease churn the daemon's live Python objects stay flat, but its threads
    (watch reader, network, lease keeper, pyroute2's per-call event loops) allocate and free in several glibc
    arenas, and glibc keeps the freed pages, so RSS crept up 1.5-6 MiB/h in the soak with nothing leaked. One call
    a minute (15 us here with nothing to return) gives them back."""
    global _libc_trim
    if _libc_trim is None:
        import ctypes

        try:
            _libc_trim = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):  # musl, or no symbol: nothing to do
            _libc_trim = lambda pad: 0  # noqa: E731
            return False
    return bool(_libc_trim(0))


class Daemon:
    def __init__(self, opts: DaemonOptions) -> None:
        self.opts = opts
        self.stop = threading.Event()
        self.health = None
        self.metrics = None
        self.network = None
        self.threads: List[threading.Thread] = []

    # -- signals ---------------------------------------------------------------------------------
    def _install_signals(self) -> None:
        def handler(signum, _frame):
            log.info("event=signal signal=%s action=shutdown", signal.Signals(signum).name)
            self.stop.set()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        def guarded() -> None:
            try:
                target()
            except Exception:
                log.exception("event=thread_failed thread=%s action=shutdown", name)
                self.failed = True
                self.stop.set()

        t = threading.Thread(target=guarded, name=name, daemon=True)
        t.start()
        self.threads.append(t)

    # -- start-up steps --------------------------------------------------------------------------
    def _wait_for_config(self, manager) -> Optional[NetworkConfig]:
        """Poll for the network config (every second while it is missing, as flanneld; with back-off while the
        store is unreachable); log once per state, not per attempt."""
        store = Backoff(CONFIG_RETRY_S, STORE_RETRY_MAX_S)
        last_state = None
        while not self.stop.is_set():
            try:
                config = manager.get_network_config()
                if last_state == "unavailable":
                    log.info("event=store_available op=get_config")
                elif last_state == "missing":
                    log.info("event=config_found")
                return config
            except ConfigNotFoundError as e:
                if last_state != "missing":
                    log.warning("event=config_missing error=%r action=poll_every_1s hint=%s", str(e),
                                f"write the network config to {self.opts.etcd_prefix}/config with the etcd v3 API")
                last_state = "missing"
                store.reset()
                delay = CONFIG_RETRY_S
            except StoreUnavailableError as e:
                if last_state != "unavailable":
                    log.warning("event=store_unavailable op=get_config error=%r action=retry_with_backoff", str(e))
                last_state = "unavailable"
                delay = store.next()
            self.stop.wait(delay)
        return None

    def _acquire(self, backend, config: NetworkConfig):
        store = Backoff(CONFIG_RETRY_S, STORE_RETRY_MAX_S)
        outage = FailureLog(log, "store_unavailable", "store_available", op="acquire_lease")
        while not self.stop.is_set():
            try:
                network = backend.register_network(config)
                outage.ok()
                return network
            except StoreUnavailableError as e:
                outage.failed(e)
                self.stop.wait(store.next())
        return None

    def _notify_systemd(self) -> None:
        addr = os.environ.get("NOTIFY_SOCKET")
        if not addr:
            return
        if addr.startswith("@"):
            addr = "\0" + addr[1:]
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                s.sendto(b"READY=1", addr)
        except OSError as e:
            log.warning("event=sd_notify_failed error=%r", str(e))

    # -- main ------------------------------------------------------------------------------------
    def run(self) -> int:
        self.failed = False
        self._install_signals()
        from fastflannel.errors import BackendError
        from fastflannel.kernel.iface import InterfaceError

        try:
            with ExitStack() as stack:
                rc = self._run(stack)
        except (StartupError, ConfigError, SubnetError, BackendError, InterfaceError) as e:
            log.error("event=startup_failed error=%s", e)
            return 1
        log.info("event=exit status=%d", rc)
        return rc

    def _run(self, stack: ExitStack) -> int:
        from fastflannel.backend import get_backend, run_network
        from fastflannel.service.healthz import HealthServer
        from fastflannel.kernel.iface import select_interface
        from fastflannel.kernel.netlink import Netlink
        from fastflannel.subnet.etcd import EtcdRegistry
        from fastflannel.subnet.manager import LocalManager
        from fastflannel.subnet.subnetfile import (
            read_previous_network_and_subnet, read_previous_subnets, write_subnet_file,
        )

        opts = self.opts
        prev_network, prev_subnet = read_previous_network_and_subnet(opts.subnet_file)
        prev_subnet6 = read_previous_subnets(opts.subnet_file)[1]
        registry = EtcdRegistry(
            endpoints=opts.etcd_endpoints,
            prefix=opts.etcd_prefix,
            keyfile=opts.etcd_keyfile,
            certfile=opts.etcd_certfile,
            cafile=opts.etcd_cafile,
            username=opts.etcd_username,
            password=opts.etcd_password,
        )
        stack.callback(registry.close)
        ttl, margin = lease_timing(opts)
        trim_s = heap_trim_period()
        manager = LocalManager(
            registry,
            prefix=opts.etcd_prefix,
            previous_subnet=prev_subnet,
            previous_subnet6=prev_subnet6,
            ttl=ttl,
            renew_margin_s=margin,
            resync_s=lease_resync_period(),
        )
        if opts.healthz_port:
            from fastflannel.service.metrics import Metrics

            self.metrics = Metrics()
            stack.callback(self.metrics.install("fastflannel"))
            self.health = HealthServer(opts.healthz_ip, opts.healthz_port)
            stack.callback(self.health.close)
            self.health.routes["/metrics"] = self.metrics.render

        config = self._wait_for_config(manager)
        if config is None:
            return 0
        log.info("event=config_loaded network=%s subnet_len=%d ipv6_network=%s ipv6_subnet_len=%d backend=%s",
                 config.network, config.subnet_len, config.ipv6_network, config.ipv6_subnet_len, config.backend_type)

        netlink = stack.enter_context(Netlink())
        ext = select_interface(opts.iface, opts.iface_regex, opts.public_ip or None, netlink,
                               can_reach=opts.iface_can_reach or None,
                               public_ipv6=opts.public_ipv6 or None, ipv6=config.enable_ipv6)
        log.info("event=interface_selected iface=%s iface_addr=%s public_ip=%s iface_addr6=%s public_ipv6=%s mtu=%d",
                 ext.name, ext.iface_addr, ext.ext_addr, ext.iface_addr6, ext.ext_addr6, ext.mtu)

        prev_lease = None
        try:
            prev_lease = manager.lookup_lease_by_public_ip(ext.ext_addr)
        except StoreUnavailableError:
            pass
        backend = get_backend(config.backend_type)(manager, ext, netlink, previous_lease=prev_lease)
        network = self._acquire(backend, config)
        if network is None:
            return 0
        self.network = network
        stack.callback(network.close)
        lease = network.lease
        log.info("event=network_registered subnet=%s subnet6=%s public_ip=%s public_ipv6=%s backend=%s mtu=%d",
                 lease.subnet, lease.subnet6, lease.attrs.public_ip, lease.attrs.public_ipv6, config.backend_type,
                 network.mtu)

        traffic = make_traffic_manager(config, lease, opts, prev_network, prev_subnet)
        program_traffic = opts.ip_masq or opts.iptables_forward_rules or config.enable_nftables
        if program_traffic:
            traffic.apply()

        write_subnet_file(opts.subnet_file, config, lease, network.mtu, opts.ip_masq)
        log.info("event=subnet_file_written path=%s", opts.subnet_file)
        if self.health is not None:
            stats = getattr(network, "stats", None)
            if stats is not None:
                self.health.routes["/debug/fastpath"] = lambda: (
                    200, "application/json", json.dumps(stats(), sort_keys=True).encode())
            self.health.ready.set()
        if self.metrics is not None:
            self.metrics.set_network(network)
            self.metrics.ready.set(1)

        self._spawn("network", lambda: run_network(network, manager, self.stop))
        self._spawn("lease", lambda: manager.keep_lease(lease, self.stop))
        if program_traffic:
            self._spawn("traffic", lambda: traffic.run(self.stop))
        self._notify_systemd()

        next_trim = time.monotonic() + trim_s
        while not self.stop.wait(1.0):
            if trim_s and time.monotonic() >= next_trim:
                trim_heap()
                next_trim = time.monotonic() + trim_s
        deadline = time.monotonic() + THREAD_JOIN_S
        for t in self.threads:
            t.join(max(0.1, deadline - time.monotonic()))
            if t.is_alive():
                log.warning("event=thread_stuck thread=%s", t.name)
        log.info("event=shutdown msg=\"Exiting cleanly...\"")
        return 1 if self.failed else 0
