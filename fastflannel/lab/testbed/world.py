# SPDX-License-Identifier: Apache-2.0
"""``Testbed``: the simulated world (underlay, etcd members, hosts, outside hosts) and its teardown."""
from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path
from typing import Any

from fastflannel.lab.testbed.base import (_NODE_NAME_RE, _OWNED_PREFIXES, _PREFIX_RE, DEFAULT_PREFIX_KEY,
                                          ETCD_CLIENT_PORT, ETCD_PEER_PORT, IFNAMSIZ_MAX, MARKER_DIR, TEARDOWN_GRACE_S,
                                          EtcdError, LogFn, TestbedError, _as_logfn, _BlockedSignals, _ip, _ipn,
                                          _netns_exec, _random_prefix, _run, _terminate)
from fastflannel.lab.testbed.etcd import EtcdServer
from fastflannel.lab.testbed.hosts import _PING_SCRIPT, Host
from fastflannel.lab.testbed.netns import _delete_netns, _kill_netns_processes, _proc_start_time, list_netns
from fastflannel.lab.testbed.tls import make_tls_files


class Testbed:
    """Build N simulated hosts on an underlay bridge plus an etcd cluster; tear everything down on exit.

    Use as a context manager (``with Testbed(3) as tb:``) or call ``start()``/``close()``. Nothing is created in
    ``__init__``. ``close()`` is idempotent, runs from ``atexit`` as a backstop, and blocks SIGINT/SIGTERM while it
    works. Raise TestbedError (or a subclass) when something cannot be built.
    """

    __test__ = False  # not a pytest test class

    def __init__(self, n_hosts: int = 3, *, underlay: str = "10.168.0.0/24", first_host: int = 2,
                 etcd_ip: str = "10.168.0.250", etcd_members: int = 1, mtu: int = 1500, prefix: str | None = None,
                 workdir: str | Path | None = None, log: LogFn = None, prefix_key: str = DEFAULT_PREFIX_KEY,
                 keep_workdir: bool | None = None, etcd_timeout: float = 20.0,
                 teardown_grace: float = TEARDOWN_GRACE_S, etcd_tls: bool = False,
                 underlay6: str | None = None) -> None:
        if prefix is not None and not _PREFIX_RE.match(prefix):
            raise ValueError(f"prefix {prefix!r} must be 'ff' + 5 base36 characters")
        if etcd_members < 1:
            raise ValueError("etcd_members must be >= 1")
        self.prefix = prefix or _random_prefix()
        self.underlay = IPv4Network(underlay)
        # dual-stack underlay: every node's eth0 also gets underlay6 + (its IPv4 host number), e.g. fd00:168::2/64
        self.underlay6 = IPv6Network(underlay6) if underlay6 else None
        self.n_hosts = n_hosts
        self.first_host = first_host
        self.etcd_ips = [IPv4Address(etcd_ip) + i for i in range(etcd_members)]
        self.etcd_tls = etcd_tls
        self.tls: dict[str, str] | None = None  # certificate paths once started with etcd_tls
        self.mtu = mtu
        self.prefix_key = prefix_key.rstrip("/")
        self.etcd_timeout = etcd_timeout
        self.teardown_grace = teardown_grace
        self._log = _as_logfn(log)
        self._user_workdir = Path(workdir) if workdir is not None else None
        if keep_workdir is None:
            keep_workdir = os.environ.get("FASTFLANNEL_TESTBED_KEEP", "") not in ("", "0")
        self.keep_workdir = keep_workdir or workdir is not None
        self.workdir: Path = Path("/nonexistent")
        self.ul_netns = f"{self.prefix}-ul"
        self.ul_bridge = f"{self.prefix}br"
        self.hosts: list[Host] = []
        self.outside_hosts: list[Host] = []
        self.etcd: list[EtcdServer] = []
        self._netns: list[str] = []  # creation order
        self._procs: list[subprocess.Popen[Any]] = []
        self._used_ips: set[IPv4Address] = set()
        self._marker: Path | None = None
        self._state = "new"  # new -> started -> closing -> closed
        self._owner_pid = os.getpid()
        self._lock = threading.Lock()
        for ip in self.etcd_ips:  # reserve the etcd addresses up front so hosts never take them
            self._check_ip(ip)
            self._used_ips.add(ip)

    def __repr__(self) -> str:
        return f"Testbed(prefix={self.prefix!r}, hosts={len(self.hosts)}, state={self._state})"

    # -- public properties ---------------------------------------------------------------------------------------

    @property
    def endpoints(self) -> str:
        """Return the etcd client URLs as a comma-separated list (the ``--etcd-endpoints`` value)."""
        scheme = "https" if self.etcd_tls else "http"
        return ",".join(f"{scheme}://{ip}:{ETCD_CLIENT_PORT}" for ip in self.etcd_ips)

    @property
    def namespaces(self) -> list[str]:
        """Return every namespace this testbed created and has not deleted yet."""
        return list(self._netns)

    # -- lifecycle -----------------------------------------------------------------------------------------------

    def __enter__(self) -> Testbed:
        self.start()
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.close(raise_on_leak=exc_type is None)

    def start(self) -> Testbed:
        """Create the underlay, the etcd member namespaces and the hosts, and start etcd; return self.

        On any failure (including KeyboardInterrupt) tear down what was built and re-raise.
        """
        if self._state != "new":
            raise TestbedError(f"testbed {self.prefix} already {self._state}")
        self._state = "started"
        self._owner_pid = os.getpid()
        _OWNED_PREFIXES.add(self.prefix)
        atexit.register(self.close)
        try:
            self._setup()
        except BaseException:
            self.close(raise_on_leak=False)
            raise
        return self

    def _setup(self) -> None:
        if self._user_workdir is not None:
            self._user_workdir.mkdir(parents=True, exist_ok=True)
            self.workdir = self._user_workdir
        else:
            self.workdir = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-", suffix=".testbed"))
        self._write_marker()
        self._log(f"testbed: {self.prefix}: building underlay {self.underlay} in {self.ul_netns}, "
                  f"workdir {self.workdir}")
        self._add_netns(self.ul_netns)
        _ipn(self.ul_netns, "link", "add", self.ul_bridge, "mtu", str(self.mtu), "type", "bridge",
             "stp_state", "0", "forward_delay", "0")
        _ipn(self.ul_netns, "link", "set", self.ul_bridge, "up")

        if self.etcd_tls:
            self.tls = make_tls_files(self.workdir / "tls", [*self.etcd_ips, IPv4Address("127.0.0.1")])
        n = len(self.etcd_ips)
        names = [f"etcd{i}" for i in range(n)]
        initial = ",".join(f"{nm}=http://{ip}:{ETCD_PEER_PORT}" for nm, ip in zip(names, self.etcd_ips))
        for i, (nm, ip) in enumerate(zip(names, self.etcd_ips)):
            netns = f"{self.prefix}-{nm}"
            self._add_underlay_node(netns, f"e{i}", ip, forwarding=False, reserved=True)
            self.etcd.append(EtcdServer(nm, netns, ip, self.workdir, initial_cluster=initial,
                                        cluster_token=f"{self.prefix}-etcd", log=self._log, tls=self.tls))
        for i in range(self.n_hosts):
            self._new_host(f"h{i + 1}", self.underlay.network_address + self.first_host + i, outside=False)

        for member in self.etcd:  # spawn all first: a fresh multi-member cluster needs quorum to be healthy
            member.spawn()
        for member in self.etcd:
            member.wait_healthy(self.etcd_timeout)
        self._log(f"testbed: {self.prefix}: {len(self.hosts)} hosts up, etcd at {self.endpoints}")

    def close(self, raise_on_leak: bool = True) -> None:
        """Tear everything down (processes, etcd, namespaces, temp dirs, marker); idempotent and signal-safe.

        Errors in one step are logged and the remaining steps still run. Raise TestbedError afterwards if a
        namespace could not be removed and ``raise_on_leak``.
        """
        if os.getpid() != self._owner_pid:
            return  # a forked child inherited us (and our atexit hook): the world belongs to the parent
        with _BlockedSignals():
            with self._lock:
                if self._state != "started":
                    self._state = "closed" if self._state == "new" else self._state
                    return
                self._state = "closing"
            try:
                leaked = self._teardown()
            finally:
                self._state = "closed"
                try:
                    atexit.unregister(self.close)
                except Exception:  # interpreter shutting down
                    pass
        if leaked and raise_on_leak:
            raise TestbedError(f"testbed {self.prefix}: could not remove namespaces {leaked}")

    def _teardown(self) -> list[str]:
        errors: list[str] = []

        def step(what: str, fn: Callable[[], Any]) -> None:
            try:
                fn()
            except Exception as e:  # keep going: every later step must still run
                errors.append(f"{what}: {e}")
                self._log(f"testbed: {self.prefix}: teardown step {what!r} failed: {e}")

        self._log(f"testbed: {self.prefix}: tearing down")
        step("stop processes", lambda: _terminate(self._procs, self.teardown_grace))
        for member in self.etcd:
            step(f"stop {member.name}", member.stop)
        for netns in reversed(self._netns):
            step(f"kill processes in {netns}", lambda ns=netns: _kill_netns_processes(ns, self._log))
        for netns in reversed(list(self._netns)):
            step(f"delete {netns}", lambda ns=netns: self._del_netns(ns))
        for member in self.etcd:
            step(f"remove {member.name} data", member.close)
        if not self.keep_workdir and self.workdir != Path("/nonexistent"):
            step("remove workdir", lambda: shutil.rmtree(self.workdir, ignore_errors=True))
        elif self.workdir != Path("/nonexistent"):
            self._log(f"testbed: {self.prefix}: kept workdir {self.workdir}")
        leaked = [ns for ns in list_netns() if ns.startswith(self.prefix + "-")]
        if self._marker is not None and not leaked:
            step("remove marker", lambda: self._marker.unlink(missing_ok=True))  # type: ignore[union-attr]
        if errors or leaked:
            self._log(f"testbed: {self.prefix}: teardown finished with errors {errors}, leaked {leaked}")
        return leaked

    # -- building blocks -----------------------------------------------------------------------------------------

    def _write_marker(self) -> None:
        MARKER_DIR.mkdir(parents=True, exist_ok=True)
        self._marker = MARKER_DIR / f"{self.prefix}.pid"
        info = {"pid": os.getpid(), "start_time": _proc_start_time(os.getpid()), "prefix": self.prefix,
                "workdir": str(self.workdir), "keep_workdir": self.keep_workdir, "created": time.time()}
        tmp = self._marker.with_suffix(".tmp")
        tmp.write_text(json.dumps(info) + "\n")
        tmp.replace(self._marker)

    def _add_netns(self, netns: str) -> None:
        if not netns.startswith(self.prefix + "-"):
            raise TestbedError(f"refusing to create namespace {netns!r} without prefix {self.prefix}-")
        if self._state != "started":
            raise TestbedError(f"testbed {self.prefix} is {self._state}; cannot add {netns}")
        _ip("netns", "add", netns)
        self._netns.append(netns)
        _ipn(netns, "link", "set", "lo", "up")

    def _del_netns(self, netns: str) -> None:
        _delete_netns(netns)
        self._netns.remove(netns)

    def _check_ip(self, ip: IPv4Address) -> None:
        if ip not in self.underlay or ip in (self.underlay.network_address, self.underlay.broadcast_address):
            raise TestbedError(f"address {ip} is not a host address in underlay {self.underlay}")
        if ip in self._used_ips:
            raise TestbedError(f"address {ip} is already used on underlay {self.underlay}")

    def _add_underlay_node(self, netns: str, port: str, ip: IPv4Address, *, forwarding: bool,
                           reserved: bool = False) -> None:
        """Create ``netns`` with ``eth0`` = ``ip``/len wired to the underlay bridge through port ``<prefix><port>``."""
        if not reserved:
            self._check_ip(ip)
            self._used_ips.add(ip)
        self._add_netns(netns)
        peer = f"{self.prefix}{port}"
        if len(peer) > IFNAMSIZ_MAX:
            raise TestbedError(f"interface name {peer!r} is longer than {IFNAMSIZ_MAX} characters")
        mtu = str(self.mtu)
        # created from inside the underlay namespace, the eth0 end moved straight into netns: never in the root ns
        _ipn(self.ul_netns, "link", "add", peer, "mtu", mtu, "type", "veth",
             "peer", "name", "eth0", "mtu", mtu, "netns", netns)
        _ipn(self.ul_netns, "link", "set", peer, "master", self.ul_bridge, "up")
        _ipn(netns, "addr", "add", f"{ip}/{self.underlay.prefixlen}", "dev", "eth0")
        ip6 = self.ip6_of(ip)
        if ip6 is not None:  # nodad: usable at once (no tentative phase), as on a configured server
            _ipn(netns, "addr", "add", f"{ip6}/{self.underlay6.prefixlen}", "dev", "eth0", "nodad")
        _ipn(netns, "link", "set", "eth0", "up")
        sysctls = ["net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0",
                   "net.ipv4.conf.eth0.rp_filter=0"]
        if forwarding:
            sysctls.append("net.ipv4.ip_forward=1")
            if ip6 is not None:
                sysctls.append("net.ipv6.conf.all.forwarding=1")
        _run(_netns_exec(netns, ["sysctl", "-q", "-w", *sysctls]), netns=netns)

    def ip6_of(self, ip: IPv4Address) -> IPv6Address | None:
        """Return the underlay IPv6 address of the node whose underlay IPv4 is ``ip`` (None without underlay6)."""
        if self.underlay6 is None:
            return None
        return self.underlay6.network_address + (int(ip) - int(self.underlay.network_address))

    def _new_host(self, name: str, ip: IPv4Address, *, outside: bool) -> Host:
        if not _NODE_NAME_RE.match(name):
            raise TestbedError(f"host name {name!r} must match {_NODE_NAME_RE.pattern}")
        if any(h.name == name for h in self.hosts + self.outside_hosts):
            raise TestbedError(f"host {name!r} already exists in testbed {self.prefix}")
        netns = f"{self.prefix}-{name}"
        self._add_underlay_node(netns, name, ip, forwarding=True)
        host = Host(self, name, netns, ip)
        (self.outside_hosts if outside else self.hosts).append(host)
        return host

    def add_host(self, name: str | None = None, ip: str | IPv4Address | None = None) -> Host:
        """Add one more flannel host to a running testbed (next free address by default) and return it."""
        return self._new_host(name or f"h{len(self.hosts) + 1}", self._pick_ip(ip), outside=False)

    def add_outside_host(self, name: str | None = None, ip: str | IPv4Address | None = None) -> Host:
        """Add a host on the underlay that runs no daemon (masquerade targets, interop peers) and return it."""
        return self._new_host(name or f"o{len(self.outside_hosts) + 1}", self._pick_ip(ip), outside=True)

    def _pick_ip(self, ip: str | IPv4Address | None) -> IPv4Address:
        if ip is not None:
            return IPv4Address(str(ip))
        start = self.underlay.network_address + self.first_host
        for cand in self.underlay.hosts():
            if cand >= start and cand not in self._used_ips:
                return cand
        raise TestbedError(f"no free address left in underlay {self.underlay}")

    def _ping_script(self) -> Path:
        path = self.workdir / "icmp_ping.py"
        if not path.exists():
            path.write_text(_PING_SCRIPT)
        return path

    def _track(self, proc: subprocess.Popen[Any]) -> None:
        self._procs.append(proc)

    # -- etcd helpers --------------------------------------------------------------------------------------------

    @property
    def live_endpoints(self) -> str:
        """Return the client URLs of the members whose process runs (etcdctl 3.4 fails over slowly from dead ones)."""
        return ",".join(m.endpoint for m in self.etcd if m.running) or self.endpoints

    def etcdctl(self, *args: str) -> str:
        """Run ``etcdctl`` (API v3) against the live members from inside a live member's namespace; return stdout.

        Raise CommandError if etcdctl fails.
        """
        member = next((m for m in self.etcd if m.running), self.etcd[0])
        return member.etcdctl(*args, endpoints=self.live_endpoints).stdout

    def etcd_leader(self, timeout: float = 10.0) -> EtcdServer:
        """Return the member that is raft leader, waiting up to ``timeout`` for an election; raise EtcdError."""
        deadline = time.monotonic() + timeout
        while True:
            for m in self.etcd:
                if not m.running:
                    continue
                proc = m.etcdctl("endpoint", "status", "-w", "json", "--command-timeout=2s", check=False, timeout=5)
                try:
                    status = json.loads(proc.stdout)[0]["Status"]
                except (ValueError, LookupError, TypeError):
                    continue
                if status.get("leader") and status["leader"] == status["header"]["member_id"]:
                    return m
            if time.monotonic() > deadline:
                raise EtcdError(f"no etcd leader among {self.live_endpoints} after {timeout} s")
            time.sleep(0.2)

    def put_config(self, config: Mapping[str, Any] | str) -> None:
        """Write the flannel network config to ``<prefix_key>/config`` (a dict is JSON-encoded)."""
        value = config if isinstance(config, str) else json.dumps(config)
        self.etcdctl("put", f"{self.prefix_key}/config", value)


# --------------------------------------------------------------------------------------------------------------------
# TLS material for etcd
