# SPDX-License-Identifier: Apache-2.0
"""Simulate N flannel hosts, an etcd cluster and docker-style containers with network namespaces.

Design notes
------------
Tool choice. The testbed builds the simulated world with iproute2 (``ip``, ``ip -n``, ``ip netns exec``) run through
``subprocess``, while the product programs the kernel only through pyroute2 (``fastflannel/kernel/netlink.py``). Using an
independent tool means a bug in our netlink layer cannot also hide itself in the rig that tests it.

Topology (defaults are the classic flannel example)::

    <prefix>-ul   underlay namespace holding the bridge <prefix>br (no addresses; MTU 1500 by default)
      |-- veth <prefix>h1 <-> eth0 in <prefix>-h1      10.168.0.2/24   fastflanneld, docker0, containers
      |-- veth <prefix>h2 <-> eth0 in <prefix>-h2      10.168.0.3/24
      |-- ...
      |-- veth <prefix>o1 <-> eth0 in <prefix>-o1      outside host (no daemon), optional
      `-- veth <prefix>e0 <-> eth0 in <prefix>-etcd0   10.168.0.250/24, etcd client :2379, peer :2380
    <prefix>-h1-c1 etc.  container namespaces; eth0 <-> veth<N> on the host's ``docker0`` bridge

Safety. The root namespace gets no links and no addresses at all: the underlay bridge lives in its own namespace and
every veth pair is created from inside a testbed namespace (``ip -n <ns> link add ... peer ... netns <other>``), so
both ends are born outside the root namespace. Every process that talks to a testbed address (etcd, etcdctl,
daemons, ping) runs under ``ip netns exec``. Only ``ip netns add/del/pids`` runs in the root namespace.

Naming. A run's prefix is ``ff`` + 5 random base36 characters (7 chars), so ``<prefix>h12`` fits the 15-character
interface limit. Every namespace is ``<prefix>-...``. Before anything is created the owner writes
``/run/fastflannel-testbed/<prefix>.pid`` (pid, process start time, workdir); ``cleanup_stale()`` uses it to remove
what a dead owner left behind.

Teardown order (``Testbed.close()``, idempotent, also registered with ``atexit``): tracked processes get SIGTERM then
SIGKILL after a grace period; then etcd members; then every process still inside one of our namespaces is killed
(``ip netns pids``); then namespaces (containers, hosts, etcd, underlay) are deleted, which destroys the veths; then
the temp dirs and the marker go. SIGINT/SIGTERM are blocked on the main thread while this runs, so a second Ctrl-C
cannot cut teardown short; it is delivered (as KeyboardInterrupt) once teardown is done. Every command has a timeout
so teardown cannot hang. ``install_signal_handlers()`` turns SIGTERM into an exception so ``with Testbed()`` unwinds.

etcd. Each member is an ``EtcdServer`` in its own namespace with its data dir in the testbed's temp dir. ``stop()``
(SIGTERM) and ``kill()`` (SIGKILL) keep the data dir so ``start()`` restarts the same member; ``close()`` removes it.
A multi-member cluster spawns every member first and waits for health afterwards, because one member of a fresh
three-member cluster cannot become healthy before it has quorum. ``Testbed(etcd_tls=True)`` makes a CA, a server
certificate (SANs: every member address and 127.0.0.1) and a client certificate with openssl in the workdir
(``tb.tls``: paths) and serves the client URLs over https with ``--client-cert-auth`` (peer traffic stays http,
inside the testbed). ``EtcdServer.user`` ("name:password"), when set, is passed to every etcdctl call (for tests
that enable etcd authentication).
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import re
import secrets
import shutil
import signal
import string
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path
from typing import IO, Any, Union

__all__ = [
    "CommandError",
    "Container",
    "EtcdError",
    "EtcdServer",
    "Host",
    "MARKER_DIR",
    "Testbed",
    "TestbedError",
    "cleanup_stale",
    "install_signal_handlers",
    "list_netns",
    "make_tls_files",
    "owned_prefixes",
    "pid_alive",
    "remove_namespaces",
    "restore_signal_handlers",
]

_logger = logging.getLogger(__name__)

MARKER_DIR = Path("/run/fastflannel-testbed")
DEFAULT_PREFIX_KEY = "/coreos.com/network"
ETCD_CLIENT_PORT = 2379
ETCD_PEER_PORT = 2380
IFNAMSIZ_MAX = 15  # linux IFNAMSIZ (16) minus the NUL
CMD_TIMEOUT_S = 30.0  # upper bound for any one iproute2/etcdctl command
TEARDOWN_GRACE_S = 5.0  # SIGTERM -> SIGKILL for tracked processes
_PREFIX_RE = re.compile(r"^ff[0-9a-z]{5}$")
_NODE_NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,7}$")  # <prefix>(7) + name(<=8) <= 15 chars
_BASE36 = string.digits + string.ascii_lowercase

LogFn = Union[Callable[[str], Any], logging.Logger, None]

PING_INTERVAL_S = 0.2  # between echo requests (ping -i 0.2)

# A self-contained ICMP echo client (RFC 792), written to the workdir and run with ``python -I`` inside a namespace,
# so the testbed does not depend on iputils. argv: dst count timeout interval payload_size df(0/1). Exit 0 when
# ``count`` replies arrived before the deadline, 1 otherwise (``ping -c N -w T`` semantics).
_PING_SCRIPT = r"""
import os, select, socket, struct, sys, time
dst, count, timeout, interval, size, df = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), \
    int(sys.argv[5]), sys.argv[6] == "1"
ICMP_ECHO, ICMP_ECHOREPLY = 8, 0
IP_MTU_DISCOVER, IP_PMTUDISC_DO = 10, 2  # linux/in.h

def csum(b):
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF

ident = os.getpid() & 0xFFFF
sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
if df:
    sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)
payload = (b"fastflannel-testbed-" * (size // 20 + 1))[:size]
deadline = time.monotonic() + timeout
got, seq, next_send, errors = set(), 0, 0.0, []
while len(got) < count:
    now = time.monotonic()
    if now >= deadline:
        break
    if now >= next_send:
        seq += 1
        hdr = struct.pack("!BBHHH", ICMP_ECHO, 0, 0, ident, seq & 0xFFFF)
        pkt = struct.pack("!BBHHH", ICMP_ECHO, 0, csum(hdr + payload), ident, seq & 0xFFFF) + payload
        try:
            sock.sendto(pkt, (dst, 0))
        except OSError as e:  # unreachable or EMSGSIZE: count as lost, keep trying until the deadline
            errors.append(str(e))
        next_send = now + interval
    r, _, _ = select.select([sock], [], [], max(0.0, min(next_send, deadline) - time.monotonic()))
    if r:
        data, addr = sock.recvfrom(65535)
        ihl = (data[0] & 0x0F) * 4
        if len(data) >= ihl + 8:
            typ, _code, _ck, rid, rseq = struct.unpack("!BBHHH", data[ihl:ihl + 8])
            if typ == ICMP_ECHOREPLY and rid == ident and addr[0] == dst:
                got.add(rseq)
print("%d/%d replies from %s" % (len(got), seq, dst))
if errors:
    print("send errors: %s" % sorted(set(errors)), file=sys.stderr)
sys.exit(0 if len(got) >= count else 1)
"""

# Prefixes of every Testbed created by this process (for leak checks in tests).
_OWNED_PREFIXES: set[str] = set()


class TestbedError(Exception):
    """Raise when the simulated world cannot be built, used or torn down."""

    __test__ = False  # not a pytest test class


class EtcdError(TestbedError):
    """Raise when an etcd member fails to start, become healthy or stop."""


class CommandError(subprocess.CalledProcessError, TestbedError):
    """Raise when a command run by the testbed exits non-zero; the message names the namespace and stderr."""

    def __init__(self, returncode: int, cmd: Sequence[str], output: str | None = None,
                 stderr: str | None = None, netns: str | None = None) -> None:
        super().__init__(returncode, list(cmd), output, stderr)
        self.netns = netns

    def __str__(self) -> str:
        where = f" in netns {self.netns}" if self.netns else ""
        err = (self.stderr or "").strip() or (self.output or "").strip()
        tail = f": {err[-800:]}" if err else ""
        return f"command {' '.join(map(str, self.cmd))!r}{where} exited with {self.returncode}{tail}"


# --------------------------------------------------------------------------------------------------------------------
# small helpers


def _as_logfn(log: LogFn) -> Callable[[str], Any]:
    if log is None:
        return _logger.info
    if isinstance(log, logging.Logger):
        return log.info
    return log


def _random_prefix() -> str:
    return "ff" + "".join(secrets.choice(_BASE36) for _ in range(5))


def _run(cmd: Sequence[str], *, netns: str | None = None, check: bool = True, timeout: float | None = CMD_TIMEOUT_S,
         env: Mapping[str, str] | None = None, input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` (already wrapped for its namespace), capture text output, raise CommandError if check fails."""
    try:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, input=input,
                              env=dict(env) if env is not None else None)
    except subprocess.TimeoutExpired as e:
        raise TestbedError(f"command {' '.join(cmd)!r}{f' in netns {netns}' if netns else ''} "
                           f"timed out after {timeout} s") from e
    if check and proc.returncode != 0:
        raise CommandError(proc.returncode, cmd, proc.stdout, proc.stderr, netns=netns)
    return proc


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return _run(["ip", *args], check=check)


def _ipn(netns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``ip -n <netns> ...``: iproute2 switches namespace before it touches the kernel."""
    return _run(["ip", "-n", netns, *args], netns=netns, check=check)


def _netns_exec(netns: str, args: Sequence[str]) -> list[str]:
    return ["ip", "netns", "exec", netns, *map(str, args)]


def _merge_env(env: Mapping[str, str] | None, *, drop_prefixes: Iterable[str] = ()) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not any(k.startswith(p) for p in drop_prefixes)}
    if env:
        out.update(env)
    return out


def list_netns() -> list[str]:
    """Return the names of all named network namespaces (``ip netns list``), ids stripped."""
    proc = _ip("netns", "list", check=False)
    if proc.returncode != 0:
        return []
    return [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]


def owned_prefixes() -> frozenset[str]:
    """Return the prefixes of every Testbed this process has created (open or closed)."""
    return frozenset(_OWNED_PREFIXES)


def _proc_start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22 (starttime), counting from after the comm field


def pid_alive(pid: int, start_time: str | None = None) -> bool:
    """Return True if ``pid`` exists (and, if given, still has the recorded /proc start time: not recycled)."""
    now = _proc_start_time(pid)
    return now is not None and (start_time is None or now == start_time)


def _netns_pids(netns: str) -> list[int]:
    proc = _ip("netns", "pids", netns, check=False)
    if proc.returncode != 0:
        return []
    return [int(p) for p in proc.stdout.split() if p.isdigit()]


def _kill_netns_processes(netns: str, log: Callable[[str], Any]) -> None:
    """SIGKILL whatever still runs inside ``netns`` (a namespace we own), then wait briefly for it to go."""
    pids = [p for p in _netns_pids(netns) if p != os.getpid()]
    for pid in pids:
        log(f"testbed: killing leftover pid {pid} in {netns}")
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 2.0
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if _running(p)]
        if pids:
            time.sleep(0.05)


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _delete_netns(netns: str) -> None:
    proc = _ip("netns", "del", netns, check=False)
    if proc.returncode != 0 and netns in list_netns():
        raise CommandError(proc.returncode, ["ip", "netns", "del", netns], proc.stdout, proc.stderr)


def _terminate(procs: Sequence[subprocess.Popen[Any]], grace: float) -> None:
    """SIGTERM each live process group, wait up to ``grace`` seconds overall, then SIGKILL the rest and reap."""
    live = [p for p in procs if p.poll() is None]
    for p in live:
        _signal_group(p, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in live:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for p in live:
        if p.poll() is None:
            _signal_group(p, signal.SIGKILL)
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass


def _signal_group(p: subprocess.Popen[Any], sig: int) -> None:
    # Children normally run in their own session (start_new_session), so pgid == pid and signalling the group also
    # reaches anything they forked. Only called while p is unreaped, so the pid cannot have been recycled.
    try:
        if os.getpgid(p.pid) == p.pid:
            os.killpg(p.pid, sig)
        else:
            p.send_signal(sig)
    except ProcessLookupError:
        pass


def _tail(path: Path | None, n: int = 2000) -> str:
    if path is None:
        return ""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - n))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


# --------------------------------------------------------------------------------------------------------------------
# signals


def install_signal_handlers(*, sigterm: type[BaseException] = SystemExit) -> dict[int, Any]:
    """Make SIGTERM and SIGHUP raise ``sigterm`` (SystemExit(143) by default, or KeyboardInterrupt) in the main thread.

    Tools call this once before ``with Testbed():`` so a ``kill`` unwinds the with-block and tears everything down
    (SIGINT already raises KeyboardInterrupt). Return the previous handlers for ``restore_signal_handlers``.
    Raise ValueError if not called from the main thread (a Python restriction).
    """

    def _handler(signum: int, _frame: Any) -> None:
        if sigterm is SystemExit:
            raise SystemExit(128 + signum)
        raise sigterm()

    previous = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        previous[sig] = signal.signal(sig, _handler)
    return previous


def restore_signal_handlers(previous: Mapping[int, Any]) -> None:
    """Reinstall handlers returned by ``install_signal_handlers``."""
    for sig, handler in previous.items():
        signal.signal(sig, handler)


class _BlockedSignals:
    """Block SIGINT/SIGTERM/SIGHUP on the main thread for the duration (no-op elsewhere); pending ones fire after."""

    _SIGS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}

    def __enter__(self) -> None:
        self._old: set[int] | None = None
        if threading.current_thread() is threading.main_thread():
            self._old = set(signal.pthread_sigmask(signal.SIG_BLOCK, self._SIGS))

    def __exit__(self, *exc: object) -> None:
        if self._old is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, self._old)


# --------------------------------------------------------------------------------------------------------------------
# etcd


class EtcdServer:
    """Run one etcd member inside an existing network namespace, with its data dir under ``workdir``.

    ``start()`` blocks until the member reports healthy. ``stop()``/``kill()`` keep the data dir, so a later
    ``start()`` restarts the same member with its data; ``close()`` stops it and removes the data dir.
    """

    def __init__(self, name: str, netns: str, ip: IPv4Address | str, workdir: Path | str, *,
                 initial_cluster: str | None = None, cluster_token: str = "fastflannel-testbed",
                 client_port: int = ETCD_CLIENT_PORT, peer_port: int = ETCD_PEER_PORT,
                 etcd_bin: str = "etcd", etcdctl_bin: str = "etcdctl", log: LogFn = None,
                 tls: Mapping[str, str] | None = None) -> None:
        self.name = name
        self.netns = netns
        self.ip = IPv4Address(str(ip))
        self.client_port = client_port
        self.peer_port = peer_port
        self.tls = dict(tls) if tls else None  # make_tls_files() paths: client URLs over https, client certs required
        self.user: str | None = None  # "name:password" for etcdctl once the test enabled etcd authentication
        self.scheme = "https" if self.tls else "http"
        self.endpoint = f"{self.scheme}://{self.ip}:{client_port}"
        self.peer_url = f"http://{self.ip}:{peer_port}"
        self.initial_cluster = initial_cluster or f"{name}={self.peer_url}"
        self.cluster_token = cluster_token
        self.data_dir = Path(workdir) / f"{name}.etcd"
        self.log_path = Path(workdir) / f"{name}.log"
        self.etcd_bin = etcd_bin
        self.etcdctl_bin = etcdctl_bin
        self._log = _as_logfn(log)
        self._proc: subprocess.Popen[bytes] | None = None
        self._logfile: IO[bytes] | None = None

    def __repr__(self) -> str:
        return f"EtcdServer({self.name!r}, netns={self.netns!r}, endpoint={self.endpoint!r}, pid={self.pid})"

    @property
    def pid(self) -> int | None:
        """Return the etcd pid while the process is running, else None."""
        return self._proc.pid if self.running and self._proc else None

    @property
    def running(self) -> bool:
        """Return True if the etcd process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def command(self) -> list[str]:
        """Return the etcd command line (without the ``ip netns exec`` wrapper)."""
        return [
            self.etcd_bin,
            f"--name={self.name}",
            f"--data-dir={self.data_dir}",
            f"--listen-client-urls={self.endpoint},{self.scheme}://127.0.0.1:{self.client_port}",
            f"--advertise-client-urls={self.endpoint}",
            f"--listen-peer-urls={self.peer_url}",
            f"--initial-advertise-peer-urls={self.peer_url}",
            f"--initial-cluster={self.initial_cluster}",
            f"--initial-cluster-token={self.cluster_token}",
            "--initial-cluster-state=new",  # ignored when the data dir already holds a member (restart)
            "--heartbeat-interval=100",
            "--election-timeout=1000",
            *([f"--cert-file={self.tls['server_cert']}", f"--key-file={self.tls['server_key']}",
               f"--trusted-ca-file={self.tls['ca']}", "--client-cert-auth"] if self.tls else []),
        ]

    def ctl_flags(self) -> list[str]:
        """Return the etcdctl flags this member needs (client certificate, user), without the endpoints."""
        flags = []
        if self.tls:
            flags += [f"--cacert={self.tls['ca']}", f"--cert={self.tls['client_cert']}",
                      f"--key={self.tls['client_key']}"]
        if self.user:
            flags.append(f"--user={self.user}")
        return flags

    def spawn(self) -> None:
        """Start the etcd process without waiting for health; no-op if it is running. Raise EtcdError on failure."""
        if self.running:
            return
        self._close_logfile()
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        self._logfile = open(self.log_path, "ab")
        env = _merge_env(None, drop_prefixes=("ETCD_", "ETCDCTL_"))
        try:
            self._proc = subprocess.Popen(_netns_exec(self.netns, self.command()), stdin=subprocess.DEVNULL,
                                          stdout=self._logfile, stderr=subprocess.STDOUT, env=env,
                                          start_new_session=True)
        except OSError as e:
            self._close_logfile()
            raise EtcdError(f"failed to spawn etcd member {self.name} in {self.netns}: {e}") from e
        self._log(f"testbed: etcd {self.name} pid {self._proc.pid} in {self.netns} at {self.endpoint}")

    def etcdctl(self, *args: str, endpoints: str | None = None, check: bool = True,
                timeout: float = CMD_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
        """Run ``etcdctl`` (API v3) inside this member's namespace against ``endpoints`` (default: this member)."""
        env = _merge_env({"ETCDCTL_API": "3"}, drop_prefixes=("ETCDCTL_",))
        cmd = _netns_exec(self.netns, [self.etcdctl_bin, f"--endpoints={endpoints or self.endpoint}",
                                       *self.ctl_flags(), *args])
        return _run(cmd, netns=self.netns, check=check, timeout=timeout, env=env)

    def healthy(self) -> bool:
        """Return True if ``etcdctl endpoint health`` succeeds against this member."""
        proc = self.etcdctl("--dial-timeout=1s", "--command-timeout=2s", "endpoint", "health",
                            check=False, timeout=5)
        return proc.returncode == 0

    def wait_healthy(self, timeout: float = 20.0) -> None:
        """Block until the member is healthy; raise EtcdError (with the log tail) on timeout or if etcd exits."""
        deadline = time.monotonic() + timeout
        while True:
            if self._proc is None or self._proc.poll() is not None:
                rc = None if self._proc is None else self._proc.returncode
                raise EtcdError(f"etcd member {self.name} in {self.netns} exited (rc={rc}) before becoming "
                                f"healthy; log {self.log_path}:\n{_tail(self.log_path)}")
            if self.healthy():
                return
            if time.monotonic() > deadline:
                raise EtcdError(f"etcd member {self.name} at {self.endpoint} not healthy after {timeout} s; "
                                f"log {self.log_path}:\n{_tail(self.log_path)}")
            time.sleep(0.2)

    def start(self, timeout: float = 20.0) -> None:
        """Spawn etcd (keeping any existing data dir) and block until it is healthy; raise EtcdError on failure."""
        self.spawn()
        self.wait_healthy(timeout)

    def stop(self, timeout: float = 10.0) -> int | None:
        """Send SIGTERM and wait (SIGKILL after ``timeout``); keep the data dir. Return the exit code, None if idle."""
        return self._signal(signal.SIGTERM, timeout)

    def kill(self) -> int | None:
        """Send SIGKILL and reap; keep the data dir. Return the exit code, or None if it was not running."""
        return self._signal(signal.SIGKILL, 5.0)

    def close(self) -> None:
        """Stop the member and remove its data dir and log handle; idempotent."""
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def _signal(self, sig: int, timeout: float) -> int | None:
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            _signal_group(proc, sig)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._log(f"testbed: etcd {self.name} ignored signal {sig} for {timeout} s; killing")
                _signal_group(proc, signal.SIGKILL)
                proc.wait(timeout=5)
        self._close_logfile()
        return proc.returncode

    def _close_logfile(self) -> None:
        if self._logfile is not None:
            self._logfile.close()
            self._logfile = None


# --------------------------------------------------------------------------------------------------------------------
# hosts and containers


class _Node:
    """Hold what hosts and containers share: a namespace, commands run in it, and ping."""

    name: str
    netns: str
    ip: IPv4Address
    _tb: Testbed

    def run(self, args: Sequence[str], *, check: bool = True, timeout: float | None = CMD_TIMEOUT_S,
            env: Mapping[str, str] | None = None, input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``args`` in this namespace; capture text output; ``env`` is merged over os.environ.

        Raise CommandError (a CalledProcessError) if ``check`` and the exit code is non-zero, TestbedError on timeout.
        """
        return _run(_netns_exec(self.netns, args), netns=self.netns, check=check, timeout=timeout,
                    env=_merge_env(env) if env is not None else None, input=input)

    def popen(self, args: Sequence[str], *, env: Mapping[str, str] | None = None, **kw: Any) -> subprocess.Popen[Any]:
        """Start ``args`` in this namespace (own session); the testbed tracks it and kills it at teardown.

        ``env`` is merged over os.environ; other keyword arguments go to subprocess.Popen.
        """
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("start_new_session", True)
        proc = subprocess.Popen(_netns_exec(self.netns, args), env=_merge_env(env), **kw)
        self._tb._track(proc)
        return proc

    def ping(self, ip: IPv4Address | str, count: int = 3, timeout: float = 10, *, size: int = 56,
             dont_fragment: bool = False) -> bool:
        """Return True if ``ip`` sends ``count`` echo replies within ``timeout`` seconds (``ping -c -w`` semantics).

        Run our own ICMP pinger inside this netns (iputils may not be installed). ``size`` is the ICMP payload in
        bytes (as ``ping -s``); ``dont_fragment`` sets DF (as ``ping -M do``), for MTU checks.
        """
        proc = self.ping_verbose(ip, count, timeout, size=size, dont_fragment=dont_fragment)
        return proc.returncode == 0

    def ping_verbose(self, ip: IPv4Address | str, count: int = 3, timeout: float = 10, *, size: int = 56,
                     dont_fragment: bool = False) -> subprocess.CompletedProcess[str]:
        """Run the pinger like ``ping`` and return the completed process (stdout: ``<got>/<sent> replies``)."""
        args = [sys.executable, "-I", str(self._tb._ping_script()), str(IPv4Address(str(ip))), str(count), str(timeout),
                str(PING_INTERVAL_S), str(size), "1" if dont_fragment else "0"]
        return self.run(args, check=False, timeout=timeout + 10)

    def addresses(self, dev: str = "eth0") -> list[IPv4Interface]:
        """Return the IPv4 addresses on ``dev`` in this namespace."""
        out = self.run(["ip", "-j", "-4", "addr", "show", "dev", dev]).stdout
        return [IPv4Interface(f"{a['local']}/{a['prefixlen']}")
                for link in json.loads(out or "[]") for a in link.get("addr_info", [])]


class Host(_Node):
    """A simulated flannel host: a namespace with ``eth0`` on the underlay; runs one fastflanneld when asked."""

    def __init__(self, tb: Testbed, name: str, netns: str, ip: IPv4Address, *, iface: str = "eth0") -> None:
        self._tb = tb
        self.name = name
        self.netns = netns
        self.ip = ip
        self.iface = iface
        self.tmpdir = tb.workdir / name
        self.tmpdir.mkdir(parents=True, exist_ok=True)
        self.subnet_file = self.tmpdir / "subnet.env"
        self.subnet_file.unlink(missing_ok=True)  # a reused workdir must not hand out a previous run's lease
        self.daemon: subprocess.Popen[bytes] | None = None
        self.daemon_log: Path | None = None
        self.containers: list[Container] = []
        self.bridge = "docker0"
        self._next_container = 1
        self._used_ips: set[IPv4Address] = set()

    def __repr__(self) -> str:
        return f"Host({self.name!r}, netns={self.netns!r}, ip={self.ip})"

    # -- daemon --------------------------------------------------------------------------------------------------

    def daemon_command(self, *extra_args: str) -> list[str]:
        """Return the fastflanneld command line (without the ``ip netns exec`` wrapper)."""
        return [sys.executable, "-m", "fastflannel",
                f"--etcd-endpoints={self._tb.endpoints}",
                f"--etcd-prefix={self._tb.prefix_key}",
                f"--iface={self.iface}",
                f"--subnet-file={self.subnet_file}",
                *map(str, extra_args)]

    def start_daemon(self, *extra_args: str, env: Mapping[str, str] | None = None,
                     log_path: Path | str | None = None) -> subprocess.Popen[bytes]:
        """Start fastflanneld in this host's netns, output to ``log_path`` (default ``<workdir>/<host>.log``).

        Raise TestbedError if this host's daemon is already running. The process is tracked and killed at teardown.
        """
        if self.daemon is not None and self.daemon.poll() is None:
            raise TestbedError(f"fastflanneld already running on {self.name} (pid {self.daemon.pid})")
        self.daemon_log = Path(log_path) if log_path is not None else self._tb.workdir / f"{self.name}.log"
        denv = {"PYTHONUNBUFFERED": "1", **(env or {})}
        with open(self.daemon_log, "ab") as logf:  # the child keeps its own copy of the fd
            self.daemon = self.popen(self.daemon_command(*extra_args), env=denv, stdout=logf,
                                     stderr=subprocess.STDOUT)
        self._tb._log(f"testbed: fastflanneld pid {self.daemon.pid} on {self.name}, log {self.daemon_log}")
        return self.daemon

    def stop_daemon(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int | None:
        """Send ``sig`` to the daemon and wait; SIGKILL after ``timeout``. Return its exit code, None if none ran."""
        proc = self.daemon
        if proc is None:
            return None
        if proc.poll() is None:
            try:
                proc.send_signal(sig)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._tb._log(f"testbed: fastflanneld on {self.name} ignored signal {sig} for {timeout} s; killing")
                _signal_group(proc, signal.SIGKILL)
                proc.wait(timeout=5)
        return proc.returncode

    def daemon_log_text(self) -> str:
        """Return the daemon's log so far ('' if none)."""
        return _tail(self.daemon_log, 1 << 20)

    # -- subnet.env ----------------------------------------------------------------------------------------------

    def read_subnet_env(self) -> dict[str, str]:
        """Parse ``subnet_file`` (KEY=VALUE lines); raise FileNotFoundError if it does not exist yet."""
        env: dict[str, str] = {}
        for line in self.subnet_file.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                key, _, value = line.partition("=")
                env[key.strip()] = value.strip().strip('"')
        return env

    def wait_subnet_env(self, timeout: float = 30) -> dict[str, str]:
        """Block until ``subnet_file`` holds FLANNEL_SUBNET; raise TestbedError on timeout or if the daemon died."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                env = self.read_subnet_env()
                if "FLANNEL_SUBNET" in env:
                    return env
            except FileNotFoundError:
                pass
            if self.daemon is not None and self.daemon.poll() is not None:
                raise TestbedError(f"fastflanneld on {self.name} exited with {self.daemon.returncode} before "
                                   f"writing {self.subnet_file}; log:\n{_tail(self.daemon_log)}")
            if time.monotonic() > deadline:
                raise TestbedError(f"no FLANNEL_SUBNET in {self.subnet_file} on {self.name} after {timeout} s"
                                   + (f"; daemon log:\n{_tail(self.daemon_log)}" if self.daemon_log else ""))
            time.sleep(0.1)

    # -- containers ----------------------------------------------------------------------------------------------

    def etcdctl(self, *args: str, check: bool = True, endpoints: str | None = None
                ) -> subprocess.CompletedProcess[str]:
        """Run ``etcdctl`` (API v3) in this host's netns against ``endpoints`` (default: all etcd members)."""
        return self.run(["etcdctl", f"--endpoints={endpoints or self._tb.endpoints}", *args], check=check,
                        env={"ETCDCTL_API": "3"})

    def add_container(self, name: str | None = None, *, timeout: float = 30) -> Container:
        """Attach a container the way ``dockerd --bip=$FLANNEL_SUBNET --mtu=$FLANNEL_MTU`` does; return it.

        Wait for subnet.env, ensure bridge ``docker0`` holding the subnet's first address with MTU FLANNEL_MTU, then
        create namespace ``<prefix>-<host>-<name>`` with ``eth0`` (next free address, default route via the bridge)
        and its veth peer enslaved to the bridge. Raise TestbedError on failure or a name clash.
        """
        env = self.wait_subnet_env(timeout)
        try:
            subnet = IPv4Interface(env["FLANNEL_SUBNET"]).network
            mtu = int(env.get("FLANNEL_MTU", "1500"))
        except ValueError as e:
            raise TestbedError(f"bad subnet.env on {self.name} ({self.subnet_file}): {env}") from e
        idx = self._next_container
        name = name or f"c{idx}"
        if not _NODE_NAME_RE.match(name):
            raise TestbedError(f"container name {name!r} must match {_NODE_NAME_RE.pattern}")
        if any(c.name == name for c in self.containers):
            raise TestbedError(f"container {name!r} already exists on {self.name}")
        gateway = self._ensure_bridge(subnet, mtu)
        ip = self._allocate_ip(subnet, gateway)
        netns = f"{self._tb.prefix}-{self.name}-{name}"
        host_veth = f"veth{name}"  # lives in the host netns only; name is <= 8 chars
        tb = self._tb
        tb._add_netns(netns)
        self._next_container += 1
        _ipn(self.netns, "link", "add", host_veth, "mtu", str(mtu), "type", "veth",
             "peer", "name", "eth0", "mtu", str(mtu), "netns", netns)
        _ipn(self.netns, "link", "set", host_veth, "master", self.bridge, "up")
        _ipn(netns, "addr", "add", f"{ip}/{subnet.prefixlen}", "dev", "eth0")
        _ipn(netns, "link", "set", "eth0", "up")
        _ipn(netns, "route", "add", "default", "via", str(gateway), "dev", "eth0")
        container = Container(self, name, netns, ip, mtu=mtu, gateway=gateway, host_veth=host_veth)
        self.containers.append(container)
        self._used_ips.add(ip)
        tb._log(f"testbed: container {name} on {self.name} at {ip} (gw {gateway}, mtu {mtu})")
        return container

    def _ensure_bridge(self, subnet: IPv4Network, mtu: int) -> IPv4Address:
        gateway = subnet.network_address + 1
        want = f"{gateway}/{subnet.prefixlen}"
        exists = _ipn(self.netns, "link", "show", self.bridge, check=False).returncode == 0
        if not exists:
            _ipn(self.netns, "link", "add", self.bridge, "mtu", str(mtu), "type", "bridge")
        else:
            _ipn(self.netns, "link", "set", self.bridge, "mtu", str(mtu))
        have = {str(a) for a in self.addresses(self.bridge)}
        if want not in have:
            if have:  # the lease changed (docker would refuse to start); follow it, as a restarted dockerd would
                _ipn(self.netns, "addr", "flush", "dev", self.bridge)
                self._used_ips.clear()
            _ipn(self.netns, "addr", "add", want, "dev", self.bridge)
        _ipn(self.netns, "link", "set", self.bridge, "up")
        return gateway

    def _allocate_ip(self, subnet: IPv4Network, gateway: IPv4Address) -> IPv4Address:
        for ip in subnet.hosts():
            if ip != gateway and ip not in self._used_ips:
                return ip
        raise TestbedError(f"no free container address left in {subnet} on {self.name}")


class Container(_Node):
    """A docker-style container: a namespace with ``eth0`` on its host's bridge and a default route via it."""

    def __init__(self, host: Host, name: str, netns: str, ip: IPv4Address, *, mtu: int, gateway: IPv4Address,
                 host_veth: str) -> None:
        self._tb = host._tb
        self.host = host
        self.name = name
        self.netns = netns
        self.ip = ip
        self.mtu = mtu
        self.gateway = gateway
        self.host_veth = host_veth

    def __repr__(self) -> str:
        return f"Container({self.name!r}, host={self.host.name!r}, netns={self.netns!r}, ip={self.ip})"


# --------------------------------------------------------------------------------------------------------------------
# the testbed


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
                 teardown_grace: float = TEARDOWN_GRACE_S, etcd_tls: bool = False) -> None:
        if prefix is not None and not _PREFIX_RE.match(prefix):
            raise ValueError(f"prefix {prefix!r} must be 'ff' + 5 base36 characters")
        if etcd_members < 1:
            raise ValueError("etcd_members must be >= 1")
        self.prefix = prefix or _random_prefix()
        self.underlay = IPv4Network(underlay)
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
        _ipn(netns, "link", "set", "eth0", "up")
        sysctls = ["net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0",
                   "net.ipv4.conf.eth0.rp_filter=0"]
        if forwarding:
            sysctls.append("net.ipv4.ip_forward=1")
        _run(_netns_exec(netns, ["sysctl", "-q", "-w", *sysctls]), netns=netns)

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


def make_tls_files(directory: Path | str, ips: Iterable[IPv4Address | str]) -> dict[str, str]:
    """Make a CA, a server certificate for ``ips`` and a client certificate with openssl; return their paths.

    Keys are written 0600. The names: ca, server_cert, server_key, client_cert, client_key, and other_ca (a second
    CA that signed nothing here, for "wrong CA" tests).
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)

    def openssl(*args: str) -> None:
        proc = subprocess.run(["openssl", *args], capture_output=True, text=True, cwd=d, timeout=60)
        if proc.returncode != 0:
            raise TestbedError(f"openssl {' '.join(args[:2])} failed: {proc.stderr.strip()[-500:]}")

    for ca in ("ca", "other_ca"):
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN=fastflannel-{ca}",
                "-keyout", f"{ca}.key", "-out", f"{ca}.crt")
    sans = ",".join(f"IP:{ip}" for ip in ips)
    # etcd's gRPC gateway dials the gRPC server with the server certificate as its client certificate: with
    # --client-cert-auth that certificate needs clientAuth too, or every gateway (HTTP/JSON) request fails
    (d / "server.ext").write_text(f"subjectAltName={sans}\nextendedKeyUsage=serverAuth,clientAuth\n")
    (d / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name in ("server", "client"):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN=fastflannel-{name}", "-keyout",
                f"{name}.key", "-out", f"{name}.csr")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.crt")
    for key in d.glob("*.key"):
        key.chmod(0o600)
    return {k: str(d / v) for k, v in {"ca": "ca.crt", "other_ca": "other_ca.crt", "server_cert": "server.crt",
                                       "server_key": "server.key", "client_cert": "client.crt",
                                       "client_key": "client.key"}.items()}


# --------------------------------------------------------------------------------------------------------------------
# stale runs


def cleanup_stale(prefix_glob: str = "ff", *, include_unowned: bool = False, log: LogFn = None,
                  dry_run: bool = False) -> list[str]:
    """Remove namespaces, processes and temp dirs left by testbed runs whose owner process is dead.

    A run is stale when ``MARKER_DIR/<prefix>.pid`` names a pid that no longer exists (or was recycled: the process
    start time differs). ``prefix_glob`` selects markers (``<prefix_glob>*.pid``). With ``include_unowned``,
    namespaces that look like testbed namespaces (``ff`` + 5 base36 + ``-``) but have no marker at all are removed
    too. Return the namespaces removed (or that would be, with ``dry_run``).
    """
    logf = _as_logfn(log)
    removed: list[str] = []
    all_ns = list_netns()
    owned_by_marker: set[str] = set()
    markers = sorted(MARKER_DIR.glob(f"{prefix_glob}*.pid")) if MARKER_DIR.is_dir() else []
    for marker in markers:
        prefix = marker.name[: -len(".pid")]
        try:
            info = json.loads(marker.read_text())
            pid = int(info["pid"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            logf(f"testbed: cleanup: unreadable marker {marker}: {e}")
            continue
        mine = [ns for ns in all_ns if ns.startswith(prefix + "-")]
        owned_by_marker.update(mine)
        if pid_alive(pid, info.get("start_time")):
            continue
        logf(f"testbed: cleanup: run {prefix} (owner pid {pid} is gone): namespaces {mine}")
        removed.extend(mine)
        if dry_run:
            continue
        remove_namespaces(mine, log=logf)
        workdir = info.get("workdir")
        if workdir and not info.get("keep_workdir") and Path(workdir).name.startswith(prefix + "-"):
            shutil.rmtree(workdir, ignore_errors=True)
        if not any(ns.startswith(prefix + "-") for ns in list_netns()):
            marker.unlink(missing_ok=True)
    if include_unowned:
        pat = re.compile(r"^(ff[0-9a-z]{5})-")
        orphans = [ns for ns in all_ns if ns not in owned_by_marker and (m := pat.match(ns))
                   and m.group(1).startswith(prefix_glob.rstrip("*"))
                   and not (MARKER_DIR / f"{m.group(1)}.pid").exists()]
        if orphans:
            logf(f"testbed: cleanup: namespaces without an owner marker: {orphans}")
            removed.extend(orphans)
            if not dry_run:
                remove_namespaces(orphans, log=logf)
    return removed


def remove_namespaces(namespaces: Sequence[str], *, log: LogFn = None) -> None:
    """Kill every process inside the given namespaces, then delete them (deepest names first, underlay last).

    Failures are logged, not raised; callers check ``list_netns()`` afterwards if they must know.
    """
    logf = _as_logfn(log)
    for ns in sorted(namespaces, key=lambda s: (s.endswith("-ul"), -s.count("-"))):
        _kill_netns_processes(ns, logf)
    for ns in sorted(namespaces, key=lambda s: (s.endswith("-ul"), -s.count("-"))):
        try:
            _delete_netns(ns)
        except TestbedError as e:
            logf(f"testbed: cleanup: {e}")


def _main(argv: Sequence[str] | None = None) -> int:
    """Run ``python -m fastflannel.lab.testbed [--cleanup | N]`` (a stop-gap until ``fastflannel testbed`` exists)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m fastflannel.lab.testbed")
    parser.add_argument("--cleanup", action="store_true", help="remove namespaces of dead testbed runs")
    parser.add_argument("--include-unowned", action="store_true")
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("hosts", nargs="?", type=int, default=3, help="hosts to bring up, then wait for Ctrl-C")
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if ns.cleanup:
        removed = cleanup_stale(include_unowned=ns.include_unowned, dry_run=ns.dry_run)
        _logger.info("removed %d namespaces", len(removed))
        return 0
    install_signal_handlers(sigterm=KeyboardInterrupt)
    try:
        with Testbed(ns.hosts) as tb:
            for h in tb.hosts:
                _logger.info("%s: netns %s ip %s", h.name, h.netns, h.ip)
            _logger.info("etcd: %s; Ctrl-C to tear down", tb.endpoints)
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(_main())
