# SPDX-License-Identifier: Apache-2.0
"""The e2e tests' cluster: a testbed world running fastflanneld on every host, and how tests read it back.

``Cluster`` is the one cluster of the e2e tier: N hosts (3 by default) with a daemon and one container each, the
network config in etcd, converged and pinging before a test sees it. ``tests/e2e/conftest.py`` turns it into the
module-scoped ``bed`` fixture (parametrized indirectly by backend) and prints every live cluster's daemon logs when
a test fails. The readers below look at the kernel with iproute2 (``ip -j``, ``bridge -j``) and at etcd with
``etcdctl``, tools independent of the product's pyroute2 and etcd3gw, and compute what Flannel programs for the
leases in etcd (flannel-compat.md sections 5, 6, 8, 10).
"""
from __future__ import annotations

import base64
import json
import re
import secrets
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from waiting import wait_for

NETWORK = IPv4Network("100.96.0.0/16")
VXLAN_DEV = "flannel.1"
HEALTHZ_PORT = 8471
CONVERGE_S = 15.0  # "within a few seconds", generous for a loaded machine
READY_S = 30.0


def network_config(backend: str, **backend_opts: Any) -> dict:
    """Return the network config (``<prefix>/config``) of the e2e tests for ``backend``."""
    return {"Network": str(NETWORK), "Backend": {"Type": backend, **backend_opts}}


# ------------------------------------------------------------------------------------------------------------------
# etcd, read with etcdctl


def key_of(tb, subnet: IPv4Network) -> str:
    return f"{tb.prefix_key}/subnets/{str(subnet).replace('/', '-')}"


def stored(tb) -> dict[IPv4Network, tuple[dict, int]]:
    """Return {subnet: (lease JSON, etcd lease id)} as stored in etcd."""
    out = tb.etcdctl("get", "--prefix", f"{tb.prefix_key}/subnets/", "-w", "json")
    res = {}
    for kv in json.loads(out).get("kvs", []):
        key = base64.b64decode(kv["key"]).decode()
        res[IPv4Network(key.rsplit("/", 1)[1].replace("-", "/"))] = (json.loads(base64.b64decode(kv["value"])),
                                                                    int(kv.get("lease", 0)))
    return res


def leases(tb) -> dict[IPv4Network, dict]:
    """Return {subnet: parsed lease JSON} as stored in etcd."""
    return {s: v for s, (v, _) in stored(tb).items()}


def free_subnets(tb, count: int = 1, start: int = 128, network: IPv4Network = NETWORK,
                 prefixlen: int = 24) -> list[IPv4Network]:
    """Return the first ``count`` subnets of ``network``, from its ``start``-th on, that no lease in etcd holds
    (daemons allocate at random, so a hard-coded "unused" subnet collides with a real host's now and then: pick them
    from what is stored; distinct ``start`` values keep the picks of one test apart)."""
    held = set(stored(tb))
    free = [s for i, s in enumerate(network.subnets(new_prefix=prefixlen)) if i >= max(start, 1) and s not in held]
    assert len(free) >= count, f"only {len(free)} free /{prefixlen} subnets from #{start} on in {network}"
    return free[:count]


def raw_lease(tb, subnet: IPv4Network) -> str:
    return tb.etcdctl("get", "--print-value-only", key_of(tb, subnet)).strip()


def subnet_of(host) -> IPv4Network:
    return IPv4Network(host.wait_subnet_env()["FLANNEL_SUBNET"], strict=False)


# ------------------------------------------------------------------------------------------------------------------
# the kernel, read with iproute2


def ipj(node, *args: str, tool: str = "ip"):
    out = node.run([tool, "-j", *args]).stdout
    return json.loads(out or "[]")


def overlay_routes(host) -> dict[str, tuple]:
    """Return {dst: (gateway, dev, sorted flags)} of the gateway routes inside the Network (main table)."""
    res = {}
    for r in ipj(host, "-4", "route", "show", "table", "main"):
        dst = r.get("dst", "")
        if "/" not in dst or not IPv4Network(dst).subnet_of(NETWORK):
            continue
        if r.get("gateway"):
            res[dst] = (r["gateway"], r.get("dev"), tuple(sorted(r.get("flags", []))))
    return res


def network_wide_routes(host) -> list:
    """Return routes for the whole Network (Flannel's vxlan installs none)."""
    return [r for r in ipj(host, "-4", "route", "show", "table", "main") if r.get("dst") == str(NETWORK)]


def link_exists(host, dev: str) -> bool:
    return host.run(["ip", "link", "show", "dev", dev], check=False).returncode == 0


def vxlan_link(host):
    links = ipj(host, "-d", "link", "show", "dev", VXLAN_DEV) if link_exists(host, VXLAN_DEV) else []
    return links[0] if links else None


def neighs(host) -> dict[str, tuple]:
    """Return {ip: (lladdr, states)} of every neighbour on flannel.1."""
    return {n["dst"]: (n.get("lladdr"), tuple(n.get("state", [])))
            for n in ipj(host, "neigh", "show", "dev", VXLAN_DEV)}


def fdbs(host) -> set[tuple]:
    """Return {(mac, dst, flags, state)} of every FDB entry on flannel.1."""
    return {(f["mac"], f.get("dst"), tuple(sorted(f.get("flags", []))), f.get("state"))
            for f in ipj(host, "fdb", "show", "dev", VXLAN_DEV, tool="bridge")}


def tables(host, backend: str) -> dict:
    """Return the per-peer kernel state the backend owns (and the VTEP MAC for vxlan)."""
    if backend == "host-gw":
        return {"routes": overlay_routes(host)}
    link = vxlan_link(host)
    if link is None:
        return {"routes": overlay_routes(host), "device": None}
    return {"routes": overlay_routes(host), "neigh": neighs(host), "fdb": fdbs(host), "mac": link["address"]}


def expected_tables(tb, host, backend: str) -> dict:
    """Return Flannel's per-peer entries on ``host`` for the leases in etcd (every lease but its own)."""
    own = subnet_of(host)
    all_leases = leases(tb)
    peers = {s: v for s, v in all_leases.items() if s != own}
    for s, v in peers.items():
        assert v["BackendType"] == backend, f"lease {s} of another backend: {v}"
    if backend == "host-gw":
        return {"routes": {str(s): (v["PublicIP"], "eth0", ()) for s, v in peers.items()}}
    return {
        "routes": {str(s): (str(s.network_address), VXLAN_DEV, ("onlink",)) for s in peers},
        "neigh": {str(s.network_address): (v["BackendData"]["VtepMAC"], ("PERMANENT",)) for s, v in peers.items()},
        "fdb": {(v["BackendData"]["VtepMAC"], v["PublicIP"], ("self",), "permanent") for v in peers.values()},
        "mac": all_leases[own]["BackendData"]["VtepMAC"],
    }


def random_mac() -> str:
    b = bytearray(secrets.token_bytes(6))
    b[0] = (b[0] & 0xFE) | 0x02
    return ":".join(f"{x:02x}" for x in b)


# ------------------------------------------------------------------------------------------------------------------
# the daemon, read through its log and its healthz port


def log_count(host, needle: str) -> int:
    return host.daemon_log_text().count(needle)


def healthz_get(host, path: str, port: int = HEALTHZ_PORT) -> str:
    """GET ``path`` from the daemon's healthz listener, inside the host's namespace."""
    code = ("import sys,urllib.request;sys.stdout.write(urllib.request.urlopen("
            f"'http://127.0.0.1:{port}{path}',timeout=5).read().decode())")
    return host.run([sys.executable, "-c", code]).stdout


def fastpath_stats(host, port: int = HEALTHZ_PORT) -> dict:
    """Return the udp fast path's counters (``GET /debug/fastpath``)."""
    return json.loads(healthz_get(host, "/debug/fastpath", port))


def programmed_peers(host) -> set[str]:
    """Return the subnets ``host``'s daemon has programmed since its last (re)start, by its peer events."""
    text = host.daemon_log_text()
    text = text[text.rfind("event=subnet_file_written"):]
    last: dict[str, str] = {}  # the last event of each subnet decides
    for kind, s in re.findall(r"event=peer_(added|removed)\b.*?\bsubnet=(\S+)", text):
        last[s] = kind
    return {s for s, k in last.items() if k == "added"}


# ------------------------------------------------------------------------------------------------------------------
# traffic


def wait_ping(a, ip, timeout: float = 20.0):
    """Wait until ``a`` gets an answer from ``ip`` (one ping per try)."""
    return wait_for(lambda: a.ping(ip, count=1, timeout=2), timeout=timeout, what=f"{a.name} -> {ip}")


class At:
    """A node seen at another of its addresses (a hand-made peer's "container" address, for instance)."""

    def __init__(self, node, ip) -> None:
        self.node, self.ip, self.name = node, IPv4Address(str(ip)), f"{node.name}@{ip}"

    def run(self, *a, **kw):
        return self.node.run(*a, **kw)

    def popen(self, *a, **kw):
        return self.node.popen(*a, **kw)


# ------------------------------------------------------------------------------------------------------------------
# the cluster


LIVE: list[Cluster] = []  # clusters of the running fixtures, whose logs tests/e2e/conftest.py prints on a failure


@dataclass
class Cluster:
    tb: Any
    backend: str
    hosts: list  # the fastflannel hosts (a test may append one it adds, or remove one it kills)
    ctrs: list = field(default_factory=list)  # one container per host
    env: dict = field(default_factory=dict)  # environment of every daemon
    args: dict = field(default_factory=dict)  # extra daemon arguments per host name, reused by restarts

    @classmethod
    def build(cls, tb, backend: str, *, env: dict | None = None, config: dict | None = None,
              containers: bool = True) -> Cluster:
        """Put the config, start a daemon on every host, one container each (unless not ``containers``: the
        control-plane tests); return once converged and, with containers, every container pinging every other."""
        tb.put_config(config or network_config(backend))
        c = cls(tb, backend, list(tb.hosts), env=dict(env or {}))
        for h in c.hosts:
            c.start(h)
        for h in c.hosts:
            h.wait_subnet_env(timeout=60)
        c.ctrs = [h.add_container() for h in c.hosts] if containers else []
        c.wait_converged(timeout=30)
        c.ping_all()
        return c

    def close(self) -> None:
        if self in LIVE:
            LIVE.remove(self)
        self.tb.close()

    def start(self, host, *args: str, env: dict | None = None) -> None:
        """Start ``host``'s daemon (healthz on HEALTHZ_PORT, the cluster's environment plus ``env``)."""
        self.args[host.name] = args
        host.start_daemon(f"--healthz-port={HEALTHZ_PORT}", *args, env={**self.env, **(env or {})})

    def start_ready(self, host, *args: str) -> None:
        """(Re)start ``host``'s daemon and wait until it wrote subnet.env and programmed every peer."""
        before = log_count(host, "event=subnet_file_written")
        self.start(host, *args)
        wait_for(lambda: log_count(host, "event=subnet_file_written") > before or host.daemon.poll() is not None,
                 timeout=READY_S, what=f"daemon ready on {host.name}")
        assert host.daemon.poll() is None, host.daemon_log_text()[-3000:]
        own = subnet_of(host)
        n_peers = len([s for s in leases(self.tb) if s != own])
        wait_for(lambda: len(programmed_peers(host)) >= n_peers, timeout=READY_S,
                 what=f"{n_peers} peers programmed on {host.name}")

    def restart(self, host, sig: signal.Signals = signal.SIGTERM, *args: str) -> None:
        """Stop ``host``'s daemon with ``sig`` (SIGTERM must exit 0) and start it ready, with ``args`` or the last."""
        rc = host.stop_daemon(sig)
        if sig == signal.SIGTERM:
            assert rc == 0, host.daemon_log_text()[-3000:]
        self.start_ready(host, *(args or self.args.get(host.name, ())))

    def peers_ok(self, host) -> bool:
        """Return True when ``host`` has programmed exactly the other leases in etcd (udp: by its peer events, its
        per-peer state lives in the fast path; the kernel backends: the kernel tables)."""
        if self.backend == "udp":
            own = subnet_of(host)
            return programmed_peers(host) == {str(s) for s in stored(self.tb) if s != own}
        return tables(host, self.backend) == expected_tables(self.tb, host, self.backend)

    def wait_converged(self, hosts: Sequence | None = None, timeout: float = CONVERGE_S) -> None:
        for h in hosts or self.hosts:
            try:
                wait_for(lambda: self.peers_ok(h), timeout=timeout, what=f"{self.backend} peers programmed on {h.name}")
            except AssertionError:
                if self.backend == "udp":
                    raise
                assert tables(h, self.backend) == expected_tables(self.tb, h, self.backend), h.name  # the diff

    def ping_all(self, ctrs: Sequence | None = None) -> None:
        ctrs = ctrs or self.ctrs
        for a in ctrs:
            for b in ctrs:
                if a is not b:
                    wait_ping(a, b.ip)

    def dump_logs(self, limit: int = 12000) -> None:
        for h in self.tb.hosts:
            if h.daemon_log is not None:
                sys.stderr.write(f"----- {self.tb.prefix} {self.backend} {h.name} fastflanneld log -----\n"
                                 f"{h.daemon_log_text()[-limit:]}\n")
