# SPDX-License-Identifier: Apache-2.0
"""nftables masquerade (``--ip-masq``) and forward rules, selected by ``EnableNFTables`` in the network config
(flannel ``pkg/trafficmngr/nftables``; flannel-compat.md 8). The only module that talks to nftables.

Design notes
------------
Flannel's objects, one table per address family, every name and comment as Flannel's (knftables) writes them:

    table ip flannel-ipv4                 comment "rules for flannel-ipv4"
      chain postrtg   (nat, hook postrouting, priority srcnat)  comment "chain to manage traffic masquerading by flannel"
        meta mark 0x4000 return                                   (kube-proxy's mark: never NAT twice)
        ip saddr <pod> ip daddr <cluster> return
        ip saddr <cluster> ip daddr <pod> return
        ip saddr != <cluster> ip daddr <pod> return                (see "Differences" below)
        ip saddr <cluster> ip daddr != 224.0.0.0/4 masquerade [fully-random]
        ip saddr != <cluster> ip daddr <cluster> masquerade [fully-random]
      chain forward   (filter, hook forward, priority filter)   comment "chain to accept flannel traffic"
        ip saddr <cluster> accept
        ip daddr <cluster> accept
    table ip6 flannel-ipv6                comment "rules for flannel-ipv6"   (same chains with ip6 and ff00::/8)

Both tables always exist (Flannel creates both at start); chains appear only for a family that has a
(Network, subnet) pair. The rule generation takes the family as a parameter, so IPv6 is one more pair.

How: one ``nft -f -`` script per apply, which nft runs as ONE atomic transaction (all or nothing, no packet ever
sees a half-built table). The script first deletes our tables (``add table`` then ``delete table``, the idiom that
works whether or not the table exists) and then builds them from scratch, so applying twice, restarting, or
changing the lease leaves exactly one copy of every rule and nothing stale. Reads use ``nft -j`` (JSON): ``check()``
compares the tables, minus kernel handles, with the snapshot read right after our own apply; ``run()`` re-applies
when they differ (someone flushed or deleted them), every ``resync_s`` seconds. The script is written in nft's text
syntax, as knftables does, because nft 1.0.6's JSON input drops table and chain comments. ``fully-random`` is used
when the kernel accepts it (a dry-run ``nft -c``, as Flannel probes it).

Mode switch (flannel main.go): nftables mode removes iptables mode's objects at start (``remove_iptables_objects``
in kernel/iptables.py); iptables mode deletes these tables at start (``delete_tables``).

Differences from Flannel, on purpose (docs/troubleshooting.md):
- Rule 4: Flannel's nftables code writes ``saddr != <pod> daddr <cluster> return``, which returns all traffic from
  anywhere but our own pods to the cluster and so makes rule 6 dead; its iptables mode (and its comment) mean
  ``! -s <cluster> -d <pod>``. We write the iptables meaning, so both modes masquerade the same traffic.
- Flannel applies once and deletes its tables at shutdown; we resync like the iptables mode and leave the tables in
  place at shutdown (a restart is seamless, and the next start rebuilds them exactly).

``netns`` (tests only) runs nft under ``ip netns exec``.
"""
from __future__ import annotations

import json
import logging
import subprocess
import threading
from ipaddress import IPv4Network, IPv6Network, ip_network
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from fastflannel.errors import TrafficError
from fastflannel.retry import FailureLog, run_periodic

log = logging.getLogger("fastflannel.kernel.nftables")

Net = Union[IPv4Network, IPv6Network]

TABLES = {"ip": "flannel-ipv4", "ip6": "flannel-ipv6"}  # nft family -> Flannel's table name
POSTRTG_CHAIN = "postrtg"
FORWARD_CHAIN = "forward"
POSTRTG_COMMENT = "chain to manage traffic masquerading by flannel"
FORWARD_COMMENT = "chain to accept flannel traffic"
MULTICAST = {"ip": "224.0.0.0/4", "ip6": "ff00::/8"}
KUBE_PROXY_MARK = "0x4000"
RESYNC_S = 5.0
RESYNC_BACKOFF_MAX_S = 60.0  # while nft fails: 5 s doubling to 60 s between attempts
CMD_TIMEOUT_S = 30.0


def family_of(net: Net) -> str:
    """Return the nft family (``ip`` or ``ip6``) of a network."""
    return "ip" if ip_network(net).version == 4 else "ip6"


def table_lines(family: str) -> List[str]:
    t = TABLES[family]
    return [f'add table {family} {t} {{ comment "rules for {t}" ; }}']


def masq_lines(cluster: Net, pod: Net, random_fully: bool) -> List[str]:
    """Return the ``postrtg`` chain and Flannel's six masquerade rules for one family, in order."""
    fam = family_of(cluster)
    t, c, p, mc = TABLES[fam], str(cluster), str(pod), MULTICAST[fam]
    masq = "masquerade fully-random" if random_fully else "masquerade"
    rule = f"add rule {fam} {t} {POSTRTG_CHAIN}"
    return [
        f'add chain {fam} {t} {POSTRTG_CHAIN} {{ type nat hook postrouting priority srcnat ; '
        f'comment "{POSTRTG_COMMENT}" ; }}',
        f"{rule} meta mark {KUBE_PROXY_MARK} return",
        f"{rule} {fam} saddr {p} {fam} daddr {c} return",
        f"{rule} {fam} saddr {c} {fam} daddr {p} return",
        f"{rule} {fam} saddr != {c} {fam} daddr {p} return",
        f"{rule} {fam} saddr {c} {fam} daddr != {mc} {masq}",
        f"{rule} {fam} saddr != {c} {fam} daddr {c} {masq}",
    ]


def forward_lines(cluster: Net) -> List[str]:
    """Return the ``forward`` chain and its two accept rules for one family."""
    fam = family_of(cluster)
    t = TABLES[fam]
    rule = f"add rule {fam} {t} {FORWARD_CHAIN}"
    return [
        f'add chain {fam} {t} {FORWARD_CHAIN} {{ type filter hook forward priority filter ; '
        f'comment "{FORWARD_COMMENT}" ; }}',
        f"{rule} {fam} saddr {cluster} accept",
        f"{rule} {fam} daddr {cluster} accept",
    ]


def delete_lines() -> List[str]:
    """Return the lines that delete both tables whether or not they exist (one transaction with what follows)."""
    out: List[str] = []
    for fam, t in TABLES.items():
        out += [f"add table {fam} {t}", f"delete table {fam} {t}"]
    return out


def build_script(nets: Sequence[Tuple[Net, Net]], masq: bool, forward: bool, random_fully: bool) -> str:
    """Return the whole ``nft -f`` script: delete our tables, then build them exactly (pure; tested without root).

    ``nets`` holds one (Network, lease subnet) pair per address family in use."""
    seen = set()
    lines = delete_lines()
    for fam in TABLES:
        lines += table_lines(fam)
    for cluster, pod in nets:
        cluster, pod = ip_network(cluster), ip_network(pod)
        fam = family_of(cluster)
        if family_of(pod) != fam:
            raise ValueError(f"network {cluster} and subnet {pod} are of different address families")
        if fam in seen:
            raise ValueError(f"two {fam} networks given; nftables mode takes one (Network, subnet) per family")
        seen.add(fam)
        if masq:
            lines += masq_lines(cluster, pod, random_fully)
        if forward:
            lines += forward_lines(cluster)
    return "\n".join(lines) + "\n"


def normalize(listing: Dict[str, Any]) -> Dict[str, Any]:
    """Return an ``nft -j list table`` answer without metainfo and kernel handles (comparable across reads)."""
    out = []
    for obj in listing.get("nftables", []):
        if "metainfo" in obj:
            continue
        (kind, body), = obj.items()
        out.append({kind: {k: v for k, v in body.items() if k != "handle"}})
    return {"nftables": out}


class Nft:
    """Run the ``nft`` command (optionally inside a namespace); the one door to nftables."""

    def __init__(self, netns: Optional[str] = None) -> None:
        self.netns = netns

    def run(self, args: Sequence[str], script: Optional[str] = None) -> str:
        full = (["ip", "netns", "exec", self.netns] if self.netns else []) + ["nft", *args]
        try:
            p = subprocess.run(full, input=script, capture_output=True, text=True, timeout=CMD_TIMEOUT_S)
        except FileNotFoundError as e:
            raise TrafficError(f"nft not found ({e}); install nftables or set EnableNFTables to false") from e
        except (OSError, subprocess.TimeoutExpired) as e:
            raise TrafficError(f"nft: {e}") from e
        if p.returncode != 0:
            raise TrafficError(f"nft {' '.join(args)} failed (exit {p.returncode}): {p.stderr.strip()}")
        return p.stdout

    def apply(self, script: str) -> None:
        self.run(["-f", "-"], script)

    def dry_run(self, script: str) -> bool:
        try:
            self.run(["-c", "-f", "-"], script)
            return True
        except TrafficError:
            return False

    def tables(self) -> Dict[str, Any]:
        """Return our tables as one normalized JSON listing (missing tables are simply absent)."""
        out: List[Any] = []
        have = json.loads(self.run(["-j", "list", "tables"]) or "{}").get("nftables", [])
        names = {(o["table"]["family"], o["table"]["name"]) for o in have if "table" in o}
        for fam, t in TABLES.items():
            if (fam, t) in names:
                out += normalize(json.loads(self.run(["-j", "list", "table", fam, t])))["nftables"]
        return {"nftables": out}


def supports_fully_random(nft: Nft) -> bool:
    """Return True if the kernel accepts ``masquerade fully-random`` (Flannel's dry-run probe, nothing committed)."""
    t = TABLES["ip"]
    return nft.dry_run(f"add table ip {t}\n"
                       f"add chain ip {t} masqueradeTest {{ type nat hook postrouting priority srcnat ; }}\n"
                       f"add rule ip {t} masqueradeTest ip saddr != 127.0.0.1 masquerade fully-random\n")


def delete_tables(netns: Optional[str] = None) -> bool:
    """Delete ``flannel-ipv4`` and ``flannel-ipv6`` (iptables mode does it at start, as Flannel does).

    Return True if they were deleted or never existed; without nft (an iptables-only host) log at debug and return
    False. Never raises."""
    try:
        Nft(netns).apply("\n".join(delete_lines()) + "\n")
        return True
    except TrafficError as e:
        log.debug("event=nftables_cleanup_skipped error=%s", e)
        return False


class NftTrafficManager:
    """Owns Flannel's nftables tables for the given (Network, subnet) pairs. Same interface as the iptables one."""

    def __init__(self, nets: Sequence[Tuple[Net, Net]], masq: bool, forward: bool, resync_s: float = RESYNC_S,
                 random_fully: Optional[bool] = None, netns: Optional[str] = None) -> None:
        # a family that is off (EnableIPv4=false: no Network, no subnet) has no chains, only its empty table
        self.nets = [(ip_network(c), ip_network(p)) for c, p in nets if c is not None and p is not None]
        self.masq = masq
        self.forward = forward
        self.resync_s = resync_s
        self.nft = Nft(netns)
        self.random_fully = supports_fully_random(self.nft) if random_fully is None else random_fully
        self._applied: Optional[Dict[str, Any]] = None
        build_script(self.nets, masq, forward, self.random_fully)  # bad input fails here, before any change

    def script(self) -> str:
        return build_script(self.nets, self.masq, self.forward, self.random_fully)

    def apply(self) -> None:
        """Build the tables exactly, atomically (one ``nft -f``). Raises TrafficError."""
        self.nft.apply(self.script())
        self._applied = self.nft.tables()
        log.info("event=nftables_applied masq=%s forward=%s nets=%s random_fully=%s", self.masq, self.forward,
                 ",".join(f"{c}:{p}" for c, p in self.nets), self.random_fully)

    def check(self) -> bool:
        """Return True if our tables are exactly as our last apply left them (False before any apply)."""
        return self._applied is not None and self.nft.tables() == self._applied

    def run(self, stop: threading.Event) -> None:
        """Every ``resync_s`` seconds re-apply when the tables drifted, until ``stop`` is set. Never raises: while
        nft fails the period backs off (to ``RESYNC_BACKOFF_MAX_S``), logged once when it starts and once when
        it ends (``retry.run_periodic``, as the iptables resync)."""
        def step() -> None:
            if not self.check():
                log.warning("event=nftables_drift action=reapply")
                self.apply()

        failure = FailureLog(log, "nftables_resync_failed", "nftables_resync_recovered", level=logging.ERROR)
        run_periodic(stop, self.resync_s, step, failure, cap=RESYNC_BACKOFF_MAX_S, errors=(TrafficError,))
