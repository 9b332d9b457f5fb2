# SPDX-License-Identifier: Apache-2.0
"""iptables masquerade (``--ip-masq``) and forward rules (flannel ``pkg/trafficmngr/iptables``; flannel-compat.md 8).

Design notes
------------
Rules, in order, every one tagged with a comment so they are recognisable as ours:

    nat    POSTROUTING      -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG            (appended)
    nat    FLANNEL-POSTRTG  -m mark --mark 0x4000/0x4000 ... -j RETURN                         (kube-proxy mark)
                            -s <pod> -d <cluster> ... -j RETURN
                            -s <cluster> -d <pod> ... -j RETURN
                            ! -s <cluster> -d <pod> ... -j RETURN
                            -s <cluster> ! -d 224.0.0.0/4 ... -j MASQUERADE [--random-fully]
                            ! -s <cluster> -d <cluster> ... -j MASQUERADE [--random-fully]
    filter FORWARD          -m comment --comment "flanneld forward" -j FLANNEL-FWD            (appended)
    filter FLANNEL-FWD      -s <cluster> ... -j ACCEPT ; -d <cluster> ... -j ACCEPT

``<cluster>`` is the config Network, ``<pod>`` our lease subnet. Everything is applied atomically with one
``iptables-restore --noflush`` payload: declaring ``:FLANNEL-POSTRTG`` flushes our chain, existing copies of the
jump rules are deleted (``-D``, as many as exist) and appended again, so the order is exact and a restart never
duplicates a rule. Rules built from a previous FLANNEL_NETWORK/FLANNEL_SUBNET (subnet.env) that differ from the
current ones are deleted in the same payload. ``check()`` parses ``iptables-save`` (one exec per table rather
than one ``iptables -C`` per rule); ``run()`` re-applies the whole set when anything is missing, every
``resync_s`` seconds. Rules are never removed at shutdown (Flannel's behaviour).

Dual stack (EnableIPv6): a second TrafficManager built from IPv6Network and our IPv6 subnet uses ``ip6tables``,
``ip6tables-save`` and ``ip6tables-restore`` with the same chains, comments and order, and ``ff00::/8`` in place of
224.0.0.0/4 (Flannel's ip6tables rules); the family comes from the Network. ``TrafficGroup`` runs both.

iptables has no netlink API, so this module shells out to ``iptables-save``/``iptables-restore``; ``netns`` (tests
only) runs them under ``ip netns exec``.
"""
from __future__ import annotations

import logging
import re
import subprocess
import threading
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network, ip_network
from typing import Dict, List, Optional, Sequence, Tuple

from fastflannel.errors import TrafficError
from fastflannel.retry import FailureLog, run_periodic

log = logging.getLogger("fastflannel.kernel.iptables")

MASQ_CHAIN = "FLANNEL-POSTRTG"
FWD_CHAIN = "FLANNEL-FWD"
MASQ_COMMENT = "flanneld masq"
FWD_COMMENT = "flanneld forward"
KUBE_PROXY_MARK = "0x4000/0x4000"  # kube-proxy's masquerade mark: never NAT twice (flannel)
MULTICAST_V4 = "224.0.0.0/4"
MULTICAST = {4: MULTICAST_V4, 6: "ff00::/8"}  # what the cluster-source MASQUERADE rule never masquerades
TOOLS = {4: ("iptables", "iptables-save", "iptables-restore"), 6: ("ip6tables", "ip6tables-save", "ip6tables-restore")}
RESYNC_S = 5.0  # seconds between checks (flanneld --iptables-resync default)
RESYNC_BACKOFF_MAX_S = 60.0  # while iptables fails: 5 s doubling to 60 s between attempts
FEATURE_VERSION = (1, 6, 2)  # first iptables with both --random-fully and iptables-restore --wait
CMD_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Rule:
    table: str
    chain: str
    spec: Tuple[str, ...]

    def text(self) -> str:
        """Return the rule as ``iptables-save`` prints it (without the ``-A``/``-D`` verb)."""
        return self.chain + " " + " ".join(f'"{a}"' if " " in a else a for a in self.spec)


def masq_rules(cluster: "IPv4Network | IPv6Network", pod: "IPv4Network | IPv6Network", random_fully: bool) -> List[Rule]:
    """Return Flannel's masquerade rules, jump first, in order (IPv6: the same with ff00::/8)."""
    c, p = str(cluster), str(pod)
    cm = ("-m", "comment", "--comment", MASQ_COMMENT)
    masq = ("-j", "MASQUERADE") + (("--random-fully",) if random_fully else ())
    return [
        Rule("nat", "POSTROUTING", cm + ("-j", MASQ_CHAIN)),
        Rule("nat", MASQ_CHAIN, ("-m", "mark", "--mark", KUBE_PROXY_MARK) + cm + ("-j", "RETURN")),
        Rule("nat", MASQ_CHAIN, ("-s", p, "-d", c) + cm + ("-j", "RETURN")),
        Rule("nat", MASQ_CHAIN, ("-s", c, "-d", p) + cm + ("-j", "RETURN")),
        Rule("nat", MASQ_CHAIN, ("!", "-s", c, "-d", p) + cm + ("-j", "RETURN")),
        Rule("nat", MASQ_CHAIN, ("-s", c, "!", "-d", MULTICAST[ip_network(c).version]) + cm + masq),
        Rule("nat", MASQ_CHAIN, ("!", "-s", c, "-d", c) + cm + masq),
    ]


def forward_rules(cluster: "IPv4Network | IPv6Network") -> List[Rule]:
    """Return Flannel's forward rules, jump first, in order."""
    cm = ("-m", "comment", "--comment", FWD_COMMENT)
    return [
        Rule("filter", "FORWARD", cm + ("-j", FWD_CHAIN)),
        Rule("filter", FWD_CHAIN, ("-s", str(cluster)) + cm + ("-j", "ACCEPT")),
        Rule("filter", FWD_CHAIN, ("-d", str(cluster)) + cm + ("-j", "ACCEPT")),
    ]


def parse_save(text: str) -> Dict[str, Dict[str, List[str]]]:
    """Parse ``iptables-save`` output into ``{table: {chain: [rule text without -A, ...]}}``."""
    tables: Dict[str, Dict[str, List[str]]] = {}
    cur: Optional[Dict[str, List[str]]] = None
    for line in text.splitlines():
        if line.startswith("*"):
            cur = tables.setdefault(line[1:].strip(), {})
        elif cur is None:
            continue
        elif line.startswith(":"):
            cur.setdefault(line[1:].split()[0], [])
        elif line.startswith("-A "):
            rest = line[3:].rstrip()
            cur.setdefault(rest.split()[0], []).append(rest)
    return tables


def _run_cmd(argv: Sequence[str], netns: Optional[str] = None, input: Optional[str] = None) -> str:
    full = (["ip", "netns", "exec", netns] if netns else []) + list(argv)
    try:
        p = subprocess.run(full, input=input, capture_output=True, text=True, timeout=CMD_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise TrafficError(f"{argv[0]}: {e}") from e
    if p.returncode != 0:
        raise TrafficError(f"{' '.join(argv)} failed (exit {p.returncode}): {p.stderr.strip()}")
    return p.stdout


class TrafficManager:
    """Owns flanneld's masquerade and forward rules for one (Network, subnet) of one family (ip6tables for an
    IPv6 Network)."""

    def __init__(
        self,
        network: "IPv4Network | IPv6Network",
        subnet: "IPv4Network | IPv6Network",
        masq: bool,
        forward: bool,
        prev_network: "Optional[IPv4Network | IPv6Network]" = None,
        prev_subnet: "Optional[IPv4Network | IPv6Network]" = None,
        resync_s: float = RESYNC_S,
        random_fully: Optional[bool] = None,
        netns: Optional[str] = None,
    ) -> None:
        self.network = ip_network(network)
        self.subnet = ip_network(subnet)
        self.iptables, self.iptables_save, self.iptables_restore = TOOLS[self.network.version]
        self.masq = masq
        self.forward = forward
        self.prev_network = ip_network(prev_network) if prev_network else None
        self.prev_subnet = ip_network(prev_subnet) if prev_subnet else None
        self.resync_s = resync_s
        self.netns = netns
        self._version: Optional[Tuple[int, ...]] = None
        self.random_fully = self._supports_features() if random_fully is None else random_fully

    # -- commands ----------------------------------------------------------------------------------
    def _cmd(self, argv: Sequence[str], input: Optional[str] = None) -> str:
        return _run_cmd(argv, self.netns, input)

    def _supports_features(self) -> bool:
        if self._version is None:
            try:
                out = self._cmd([self.iptables, "--version"])
            except TrafficError:
                out = ""
            m = re.search(r"v(\d+)\.(\d+)\.(\d+)", out)
            self._version = tuple(int(x) for x in m.groups()) if m else (0, 0, 0)
        return self._version >= FEATURE_VERSION

    # -- rule sets ---------------------------------------------------------------------------------
    def rules(self) -> List[Rule]:
        """Return the wanted rules (masq then forward), in order."""
        out: List[Rule] = []
        if self.masq:
            out += masq_rules(self.network, self.subnet, self.random_fully)
        if self.forward:
            out += forward_rules(self.network)
        return out

    def previous_rules(self) -> List[Rule]:
        """Return the rules built from the previous Network/subnet, if those differ from the current ones."""
        if self.prev_network is None or self.prev_subnet is None:
            return []
        if (self.prev_network, self.prev_subnet) == (self.network, self.subnet):
            return []
        prev = masq_rules(self.prev_network, self.prev_subnet, self.random_fully)
        prev += masq_rules(self.prev_network, self.prev_subnet, not self.random_fully)
        prev += forward_rules(self.prev_network)
        return prev

    def _save(self, tables: Sequence[str]) -> Dict[str, Dict[str, List[str]]]:
        out: Dict[str, Dict[str, List[str]]] = {}
        for t in tables:
            out.update(parse_save(self._cmd([self.iptables_save, "-t", t])))
        return out

    def payload(self) -> str:
        """Return the ``iptables-restore --noflush`` input that makes the rules exact (reads current state)."""
        wanted = self.rules()
        prev = [r for r in self.previous_rules() if r not in wanted]
        tables = sorted({r.table for r in wanted + prev})
        current = self._save(tables)
        lines: List[str] = []
        for table in tables:
            have = current.get(table, {})
            own_chains = [c for c in (MASQ_CHAIN, FWD_CHAIN) if any(r.table == table and r.chain == c for r in wanted)]
            lines.append(f"*{table}")
            lines += [f":{c} - [0:0]" for c in own_chains]  # declares and, with --noflush, flushes
            deleted: set = set()
            for r in prev + [r for r in wanted if r.chain not in own_chains]:
                if r.table != table or r.chain in own_chains or r.text() in deleted:
                    continue
                deleted.add(r.text())
                lines += [f"-D {r.text()}"] * have.get(r.chain, []).count(r.text())
            lines += [f"-A {r.text()}" for r in wanted if r.table == table]
            lines.append("COMMIT")
        return "\n".join(lines) + "\n" if tables else ""

    # -- operations --------------------------------------------------------------------------------
    def apply(self) -> None:
        """Install the rules atomically (one ``iptables-restore --noflush``). Raises TrafficError."""
        payload = self.payload()
        if not payload:
            return
        argv = [self.iptables_restore, "--noflush"] + (["--wait"] if self._supports_features() else [])
        self._cmd(argv, input=payload)
        log.info("event=iptables_applied tool=%s masq=%s forward=%s network=%s subnet=%s random_fully=%s",
                 self.iptables, self.masq, self.forward, self.network, self.subnet, self.random_fully)

    def check(self) -> bool:
        """Return True if our chains exist with exactly the wanted rules in order and every jump rule exists."""
        wanted = self.rules()
        if not wanted:
            return True
        current = self._save(sorted({r.table for r in wanted}))
        for r in wanted:
            chain = current.get(r.table, {}).get(r.chain)
            if chain is None or r.text() not in chain:
                return False
        for c in (MASQ_CHAIN, FWD_CHAIN):
            want = [r.text() for r in wanted if r.chain == c]
            if want:
                table = next(r.table for r in wanted if r.chain == c)
                if current.get(table, {}).get(c) != want:
                    return False
        return True

    def run(self, stop: threading.Event) -> None:
        """Every ``resync_s`` seconds check the rules and re-apply them all if anything is missing, until
        ``stop`` is set. Never raises: while iptables fails the period backs off (to ``RESYNC_BACKOFF_MAX_S``)
        and the failure is logged once when it starts and once when it ends."""
        def step() -> None:
            if not self.check():
                log.warning("event=iptables_drift action=reapply")
                self.apply()

        failure = FailureLog(log, "iptables_resync_failed", "iptables_resync_recovered", level=logging.ERROR)
        run_periodic(stop, self.resync_s, step, failure, cap=RESYNC_BACKOFF_MAX_S, errors=(TrafficError,))


class TrafficGroup:
    """Several traffic managers (IPv4 and IPv6) applied, checked and resynced as one."""

    def __init__(self, managers: Sequence[TrafficManager]) -> None:
        self.managers = list(managers)
        self.resync_s = min(m.resync_s for m in self.managers)

    def apply(self) -> None:
        for m in self.managers:
            m.apply()

    def check(self) -> bool:
        return all(m.check() for m in self.managers)

    def run(self, stop: threading.Event) -> None:
        """Like ``TrafficManager.run`` for every member, on one thread; each family is re-applied on its own."""
        while not stop.wait(self.resync_s):
            for m in self.managers:
                try:
                    if not m.check():
                        log.warning("event=iptables_drift tool=%s action=reapply", m.iptables)
                        m.apply()
                except TrafficError as e:
                    log.error("event=iptables_resync_failed tool=%s error=%s", m.iptables, e)


def removal_payload(saved: Dict[str, Dict[str, List[str]]]) -> str:
    """Return the ``iptables-restore --noflush`` input that removes every FLANNEL chain and every rule jumping to
    one, from ``iptables-save`` output parsed by ``parse_save`` ('' when there is nothing to remove)."""
    lines: List[str] = []
    for table, chain, parent in (("nat", MASQ_CHAIN, "POSTROUTING"), ("filter", FWD_CHAIN, "FORWARD")):
        have = saved.get(table, {})
        jumps = [r for r in have.get(parent, []) if r.split()[-2:] == ["-j", chain]]
        if not jumps and chain not in have:
            continue
        lines.append(f"*{table}")
        lines += [f"-D {r}" for r in jumps]
        if chain in have:
            lines += [f"-F {chain}", f"-X {chain}"]
        lines.append("COMMIT")
    return "\n".join(lines) + "\n" if lines else ""


def remove_iptables_objects(netns: Optional[str] = None, family: int = 4) -> None:
    """Remove iptables mode's chains and jump rules (nftables mode does it at start, flannel main.go).

    Flannel only tries FLANNEL-POSTRTG and FLANNEL-FWD in table nat and leaves the jump rules, so its FLANNEL-FWD
    (in filter) survives a switch; we remove both chains where they live. Never raises: failures are logged (Flannel
    logs them at -v 2), and an absent iptables is not an error."""
    try:
        saved: Dict[str, Dict[str, List[str]]] = {}
        for t in ("nat", "filter"):
            saved.update(parse_save(_run_cmd([TOOLS[family][1], "-t", t], netns)))
        payload = removal_payload(saved)
        if payload:
            _run_cmd([TOOLS[family][2], "--noflush"], netns, input=payload)
            log.info("event=iptables_objects_removed reason=nftables_mode")
    except TrafficError as e:
        log.warning("event=iptables_cleanup_failed error=%s", e)
