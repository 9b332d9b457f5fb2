# SPDX-License-Identifier: Apache-2.0
"""Prometheus metrics for ``/metrics`` on the healthz listener. The only module that imports prometheus_client.

Sources, so no other module needs to know about Prometheus:
- control-plane events are counted from the package's own ``event=...`` log records by a ``logging.Handler`` on the
  ``fastflannel`` logger (lease acquired/renewed/lost/reacquired, peers added/removed, kernel programming errors,
  etcd reconnects). The handler sees records of INFO and above whatever ``-v`` says, because every counted event
  is logged at INFO or above;
- the udp fast path's counters are read at scrape time (``network.stats()``, lock-free) by a custom collector, so
  the data path does no extra work for metrics.

Per-peer udp figures (``network.fastpath.peer_stats()``, lock-free loads too): packets, bytes and drops by reason per
peer PublicIP and direction (tx: by the route's next hop; rx: by the outer source), plus the number of routes each
peer carries. Datagrams accepted from a source that is not a current peer (only with the source check off) are
labelled ``peer="other"``. A peer's series start at 0 when it is accepted and disappear when its last route goes.
Batch sizes: ``fastflannel_udp_batch_size`` is a Prometheus histogram of packets per non-empty burst (buckets 1, 4,
16, 64, +Inf; cumulative ``le`` buckets, ``_count`` = bursts, ``_sum`` = packets in them), per direction.
"""
from __future__ import annotations

import logging
import re
from typing import Callable, Dict, Iterator, Optional, Tuple

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from fastflannel.datapath.contract import BATCH_BUCKET_NAMES, BATCH_BUCKETS, PEER_COUNTER_NAMES

try:  # generate_latest writes text format 0.0.4; prometheus-client >= 0.22 calls 1.0.0 "latest"
    from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4 as CONTENT_TYPE
except ImportError:  # older releases: "latest" is 0.0.4
    CONTENT_TYPE = CONTENT_TYPE_LATEST

_EVENT_RE = re.compile(r"(?:^|\s)event=(\S+)")

LEASE_EVENTS = {  # log event -> label
    "lease_acquired": "acquired",
    "lease_renewed": "renewed",
    "lease_lost": "lost",
    "lease_reacquired": "reacquired",
}
PEER_EVENTS = {"peer_added": "added", "peer_removed": "removed"}
PEERS_SUMMARY_EVENT = "peers_programmed"  # large batches: one INFO line with added=N removed=M instead
# logged by backends/traffic when a netlink or iptables change failed (each also logged at ERROR or WARNING)
KERNEL_ERROR_EVENTS = frozenset({
    "peer_failed", "route_failed", "route_recover_failed", "route_stale_remove_failed", "vxlan_repair_failed",
    "rollback_failed", "vxlan_link_watch_failed", "iptables_resync_failed", "reconcile_failed",
    "tun_txqueuelen_failed",
})
# the store came back after an outage (per operation that noticed), or the client moved to another endpoint
RECONNECT_EVENTS = {"store_available": "recovered", "etcd_failover": "failover", "watch_compacted": "relist"}

_DROP_PREFIXES = (("tx_drop_", "tx"), ("rx_drop_", "rx"))
# the fast path's batch-size buckets (stats() keys {d}_batch_<bucket>, one bucket per burst) and their le bounds,
# and the per-peer counters -> (metric, direction, drop reason): all from the data path's contract
_BATCH_BUCKETS = tuple(zip(BATCH_BUCKET_NAMES, [f"{float(b)}" for b in BATCH_BUCKETS] + ["+Inf"]))
_BATCH_KEYS = frozenset(f"{d}_batch_{b}" for d in ("tx", "rx") for b, _ in _BATCH_BUCKETS) | {
    "tx_batch_packets", "rx_batch_packets"}


def _peer_field(name: str) -> Tuple[str, str, Optional[str]]:
    """``tx_drop_send`` -> ("drops", "tx", "send"); ``rx_bytes`` -> ("bytes", "rx", None)."""
    direction, what = name.split("_", 1)
    if what.startswith("drop_"):
        return "drops", direction, what[len("drop_"):]
    return what, direction, None


_PEER_FIELDS = {name: _peer_field(name) for name in PEER_COUNTER_NAMES}


class _EventHandler(logging.Handler):
    def __init__(self, metrics: "Metrics") -> None:
        super().__init__(logging.INFO)
        self.metrics = metrics

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.msg if isinstance(record.msg, str) else str(record.msg)
            m = _EVENT_RE.search(msg)
            if m is not None:
                self.metrics.observe_event(m.group(1), msg, record)
        except Exception:  # noqa: BLE001 - metrics must never break logging
            self.handleError(record)


class _FastPathCollector:
    """Read the fast path's counters at scrape time; yields nothing while no udp network is registered."""

    def __init__(self, source: Callable[[], Optional[object]]) -> None:
        self.source = source

    def collect(self) -> Iterator[object]:
        network = self.source()
        stats_fn = getattr(network, "stats", None)
        stats: Dict[str, int] = stats_fn() if stats_fn is not None else {}
        if not stats:
            return
        packets = CounterMetricFamily("fastflannel_udp_packets", "Inner packets forwarded by the udp fast path "
                                      "(tx: TUN to peers, rx: peers to TUN)", labels=["direction"])
        nbytes = CounterMetricFamily("fastflannel_udp_bytes", "Inner IP bytes forwarded by the udp fast path",
                                     labels=["direction"])
        batches = CounterMetricFamily("fastflannel_udp_batches", "Non-empty bursts processed by the udp fast path; "
                                      "packets/batches is the mean batch size", labels=["direction"])
        drops = CounterMetricFamily("fastflannel_udp_drops", "Packets dropped by the udp fast path, by reason",
                                    labels=["direction", "reason"])
        other = CounterMetricFamily("fastflannel_udp_fastpath_events", "Other udp fast path counters (syscalls, "
                                    "polls, waits, offload operations)", labels=["counter"])
        for d in ("tx", "rx"):
            packets.add_metric([d], stats.get(f"{d}_packets", 0))
            nbytes.add_metric([d], stats.get(f"{d}_bytes", 0))
            batches.add_metric([d], stats.get(f"{d}_batches", 0))
        for name, value in sorted(stats.items()):
            if name in ("tx_packets", "rx_packets", "tx_bytes", "rx_bytes", "tx_batches", "rx_batches") or (
                    name in _BATCH_KEYS):
                continue
            for prefix, d in _DROP_PREFIXES:
                if name.startswith(prefix):
                    drops.add_metric([d, name[len(prefix):]], value)
                    break
            else:
                other.add_metric([name], value)
        yield from (packets, nbytes, batches, drops, other)
        if all(f"{d}_batch_{b}" in stats for d in ("tx", "rx") for b, _ in _BATCH_BUCKETS):
            hist = HistogramMetricFamily("fastflannel_udp_batch_size", "Packets per non-empty burst of the udp fast "
                                         "path (tx: packets read from the TUN, TSO segments counted one by one; rx: "
                                         "datagrams received, GRO segments counted one by one)", labels=["direction"])
            for d in ("tx", "rx"):
                acc, buckets = 0, []
                for b, le in _BATCH_BUCKETS:  # the fast path counts one bucket per burst; Prometheus wants le sums
                    acc += stats[f"{d}_batch_{b}"]
                    buckets.append((le, acc))
                hist.add_metric([d], buckets, stats.get(f"{d}_batch_packets", 0))
            yield hist
        fastpath = getattr(network, "fastpath", None)
        yield from self._per_peer(fastpath)
        peers_fn = getattr(fastpath, "peers", None)
        if peers_fn is not None:
            try:
                peers = peers_fn()
            except Exception:  # noqa: BLE001 - closed between the two reads
                return
            per_peer = GaugeMetricFamily("fastflannel_udp_peer_routes", "Subnets routed to each udp peer",
                                         labels=["peer"])
            for ip, n in sorted(peers.items()):
                per_peer.add_metric([str(ip)], n)
            yield per_peer
            yield GaugeMetricFamily("fastflannel_udp_peers", "Peers the udp fast path accepts", value=len(peers))


    @staticmethod
    def _per_peer(fastpath: object) -> Iterator[object]:
        fn = getattr(fastpath, "peer_stats", None)
        if fn is None:
            return
        try:
            per_peer = fn()
        except Exception:  # noqa: BLE001 - closed between the two reads
            return
        fams = {
            "packets": CounterMetricFamily("fastflannel_udp_peer_packets", "Inner packets forwarded by the udp fast "
                                           "path per peer (tx: routed to its PublicIP, rx: from it)",
                                           labels=["direction", "peer"]),
            "bytes": CounterMetricFamily("fastflannel_udp_peer_bytes", "Inner IP bytes forwarded by the udp fast path "
                                         "per peer", labels=["direction", "peer"]),
            "drops": CounterMetricFamily("fastflannel_udp_peer_drops", "Packets dropped by the udp fast path per peer "
                                         "and reason (unknown_peer drops have no peer: see fastflannel_udp_drops)",
                                         labels=["direction", "peer", "reason"]),
        }
        for ip, counters in sorted(per_peer.items()):
            peer = "other" if int(ip) == 0 else str(ip)
            for name, value in counters.items():
                field = _PEER_FIELDS.get(name)
                if field is None:
                    continue
                metric, d, reason = field
                fams[metric].add_metric([d, peer] if reason is None else [d, peer, reason], value)
        yield from fams.values()


class Metrics:
    """One daemon's metrics in its own ``CollectorRegistry`` (no process-global state; tests can run several)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.lease_events = Counter("fastflannel_lease_events", "Lease events of this host's subnet lease",
                                    ["event"], registry=r)
        for label in LEASE_EVENTS.values():
            self.lease_events.labels(label)  # exported as 0 from the start
        self.peer_events = Counter("fastflannel_peer_events", "Remote leases programmed (added) or removed",
                                   ["event"], registry=r)
        for label in PEER_EVENTS.values():
            self.peer_events.labels(label)
        self.kernel_errors = Counter("fastflannel_kernel_programming_errors",
                                     "Failed kernel changes (netlink, iptables), by logged event", ["event"],
                                     registry=r)
        self.etcd_reconnects = Counter("fastflannel_etcd_reconnects",
                                       "etcd reconnections: store back after an outage (per operation), endpoint "
                                       "failover, watch re-list after compaction", ["reason"], registry=r)
        for label in RECONNECT_EVENTS.values():
            self.etcd_reconnects.labels(label)
        self.store_unavailable = Gauge("fastflannel_etcd_unavailable",
                                       "1 while an operation reports the store unreachable", registry=r)
        self._unavailable_ops: set = set()
        self.ready = Gauge("fastflannel_ready", "1 once subnet.env is written", registry=r)
        self._network: Optional[object] = None
        self.registry.register(_FastPathCollector(lambda: self._network))
        self.handler = _EventHandler(self)

    # -- wiring ----------------------------------------------------------------------------------------------------
    def install(self, logger_name: str = "fastflannel") -> Callable[[], None]:
        """Attach the event handler to ``logger_name``; return a function that detaches it."""
        logger = logging.getLogger(logger_name)
        logger.addHandler(self.handler)
        return lambda: logger.removeHandler(self.handler)

    def set_network(self, network: Optional[object]) -> None:
        """Export ``network.stats()`` (and ``network.fastpath.peers()``/``peer_stats()`` if present) at every scrape."""
        self._network = network

    # -- events ----------------------------------------------------------------------------------------------------
    def observe_event(self, event: str, msg: str = "", record: Optional[logging.LogRecord] = None) -> None:
        """Count one ``event=...`` log record."""
        if event in LEASE_EVENTS:
            if event == "lease_acquired" and record is not None and not record.name.startswith("fastflannel.subnet"):
                return  # only the subnet manager's line counts (one per acquisition)
            self.lease_events.labels(LEASE_EVENTS[event]).inc()
        elif event in PEER_EVENTS:
            self.peer_events.labels(PEER_EVENTS[event]).inc()
        elif event == PEERS_SUMMARY_EVENT and record is not None:  # a snapshot's one line (backend.log_peers_summary)
            text = record.getMessage()
            for field, label in (("added", "added"), ("removed", "removed")):
                m = re.search(rf"(?:^|\s){field}=(\d+)", text)
                if m and int(m.group(1)):
                    self.peer_events.labels(label).inc(int(m.group(1)))
        elif event in KERNEL_ERROR_EVENTS:
            self.kernel_errors.labels(event).inc()
        elif event in RECONNECT_EVENTS:
            self.etcd_reconnects.labels(RECONNECT_EVENTS[event]).inc()
        if event == "store_unavailable":
            self._unavailable_ops.add(_op(msg))
            self.store_unavailable.set(1)
        elif event == "store_available":
            self._unavailable_ops.discard(_op(msg))
            self.store_unavailable.set(1 if self._unavailable_ops else 0)

    # -- exposition ------------------------------------------------------------------------------------------------
    def render(self) -> Tuple[int, str, bytes]:
        """Return (status, content type, body) for the healthz ``/metrics`` route (text format 0.0.4)."""
        return 200, CONTENT_TYPE, generate_latest(self.registry)


def _op(msg: str) -> str:
    m = re.search(r"(?:^|\s)op=(\S+)", msg)
    return m.group(1) if m else "startup"
