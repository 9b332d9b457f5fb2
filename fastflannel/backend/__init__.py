# SPDX-License-Identifier: Apache-2.0
"""Backends: the seam between lease events and the kernel (flannel ``pkg/backend``).

A backend is looked up by the lower-cased ``Backend.Type`` and imported lazily, so a missing Cython
extension can only break ``udp``. ``register_network`` creates the device, acquires the lease (through
the subnet manager it was given) and returns a ``Network``; ``run_network`` is the one shared event loop
that feeds every backend its lease events and calls its periodic ``reconcile`` (no per-backend copy).
"""
from __future__ import annotations

import importlib
import logging
import threading
import time
from ipaddress import IPv4Network
from typing import Dict, List, Protocol

from fastflannel.config import NetworkConfig
from fastflannel.errors import BackendError, FatalBackendError
from fastflannel.kernel.iface import ExternalInterface
from fastflannel.lease import Event, EventType, Lease
from fastflannel.retry import Backoff, FailureLog
from fastflannel.subnet import SubnetManager

log = logging.getLogger("fastflannel.backend")
RECONCILE_BACKOFF_MAX_S = 60.0  # a failing reconcile pass: its interval doubling to 60 s

_REGISTRY: Dict[str, str] = {
    "udp": "fastflannel.backend.udp:UdpBackend",
    "vxlan": "fastflannel.backend.vxlan:VxlanBackend",
    "host-gw": "fastflannel.backend.hostgw:HostGwBackend",
    "wireguard": "fastflannel.backend.wireguard:WireguardBackend",
}


class Network(Protocol):
    """A registered network: the lease we hold and the kernel state for every remote lease."""

    lease: Lease
    mtu: int
    reconcile_interval: float  # seconds between reconcile() calls; 0 disables

    def handle_events(self, events: List[Event]) -> None:
        """Program (Added) or remove (Removed) kernel state per event. Logs and continues on a failed
        event; never raises for a single bad lease."""

    def reconcile(self, leases: Dict[IPv4Network, Lease]) -> None:
        """Re-apply the desired state for every known remote lease and repair what drifted."""

    def close(self) -> None:
        """Release fds and threads this network owns. Kernel state is left in place (seamless restart)."""


class Backend(Protocol):
    def register_network(self, config: NetworkConfig) -> Network:
        """Create/reuse the device, acquire the lease, configure the device. Raises ``BackendError``."""


def register(name: str, target: str) -> None:
    """Register a backend constructor as ``"module:Class"`` under its Flannel type name."""
    _REGISTRY[name.lower()] = target


def get_backend(name: str):
    """Return the backend class for a type name (lower-cased), importing its module on first use."""
    target = _REGISTRY.get(name.lower())
    if target is None:
        raise BackendError(f"unknown backend type {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    mod, _, cls = target.partition(":")
    return getattr(importlib.import_module(mod), cls)


def run_network(network: Network, manager: SubnetManager, stop: threading.Event) -> None:
    """Feed ``network`` its lease events until ``stop`` is set; reconcile every ``reconcile_interval``.

    ``manager.watch_leases`` already yields diffed events (it owns the ``LeaseWatcher``); the known
    remote leases are mirrored here for ``reconcile``."""
    known: Dict[IPv4Network, Lease] = {}
    interval = network.reconcile_interval
    next_reconcile = time.monotonic() + interval if interval else float("inf")
    backoff = Backoff(interval or 1.0, max(interval or 1.0, RECONCILE_BACKOFF_MAX_S))
    failure = FailureLog(log, "reconcile_failed", "reconcile_recovered", level=logging.ERROR)
    for events in manager.watch_leases(network.lease, stop):
        if stop.is_set():
            break
        if events:
            for ev in events:
                if ev.type is EventType.ADDED:
                    known[ev.lease.subnet] = ev.lease
                else:
                    known.pop(ev.lease.subnet, None)
            network.handle_events(events)
        now = time.monotonic()
        if now >= next_reconcile:
            try:
                network.reconcile(dict(known))
                failure.ok()
                next_reconcile = now + interval
            except FatalBackendError:
                raise  # the network thread fails and the daemon exits 1 (run by a service manager: restarted)
            except Exception as e:  # a failed pass is retried with back-off; logged (with traceback) once
                failure.failed(e, exc_info=True)
                next_reconcile = now + backoff.next()
            else:
                backoff.reset()
