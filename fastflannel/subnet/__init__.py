# SPDX-License-Identifier: Apache-2.0
"""The subnet manager seam: what backends and the daemon may ask of the store (flannel ``subnet.Manager``).

Concurrency model of the whole control plane: plain threads with a shared ``threading.Event`` for stop.
etcd3gw is synchronous, so every store call blocks its caller's thread; nothing here is async.
"""
from __future__ import annotations

import threading
from typing import Iterator, List, Protocol

from fastflannel.config import NetworkConfig
from fastflannel.lease import Event, Lease, LeaseAttrs


class SubnetError(Exception):
    """Base class of store-side errors; messages say what failed and what to do."""


class ConfigNotFoundError(SubnetError):
    """``<prefix>/config`` does not exist (yet)."""


class LeaseError(SubnetError):
    """A lease could not be acquired or renewed."""


class OutOfSubnetsError(LeaseError):
    """Every subnet between SubnetMin and SubnetMax is taken."""


class StoreUnavailableError(SubnetError):
    """The store (etcd) cannot be reached; the caller retries."""


class SubnetManager(Protocol):
    """Lease policy over a registry. All methods block; all may raise ``StoreUnavailableError``."""

    def get_network_config(self) -> NetworkConfig:
        """Read and check ``<prefix>/config``. Raises ``ConfigNotFoundError`` or ``config.ConfigError``."""

    def acquire_lease(self, attrs: LeaseAttrs) -> Lease:
        """Reuse our lease by PublicIP, else the previous subnet, else allocate; create atomically.
        Raises ``OutOfSubnetsError`` or ``LeaseError``."""

    def keep_lease(self, lease: Lease, stop: threading.Event) -> None:
        """Keep ``lease`` alive until ``stop`` is set: refresh the etcd lease and re-create our key with the
        same subnet if it disappears. Never raises for store outages; logs each state change once."""

    def watch_leases(self, own: Lease, stop: threading.Event) -> Iterator[List[Event]]:
        """Yield batches of diffed remote-lease events (own lease filtered out, removals carry the last known
        attributes; the manager owns the ``LeaseWatcher``): first the snapshot as Added events, then changes; reconnects, re-lists on compaction and resyncs periodically. Yields an empty batch at
        least every second so the caller can check ``stop`` and run timers. Ends when ``stop`` is set."""
