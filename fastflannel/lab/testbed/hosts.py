# SPDX-License-Identifier: Apache-2.0
"""Simulated hosts (a daemon, docker0, containers) and containers, with their ping/iperf helpers."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Address, IPv6Interface, ip_address
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastflannel.lab.testbed.base import (_NODE_NAME_RE, CMD_TIMEOUT_S, TestbedError, _ipn, _merge_env, _netns_exec,
                                          _run, _signal_group, _tail)

if TYPE_CHECKING:  # the world owns its hosts; a host only keeps a reference back
    from fastflannel.lab.testbed.world import Testbed

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
        bytes (as ``ping -s``); ``dont_fragment`` sets DF (as ``ping -M do``), for MTU checks. An IPv6 ``ip`` is
        pinged with iputils ``ping -6`` (dual-stack testbeds).
        """
        proc = self.ping_verbose(ip, count, timeout, size=size, dont_fragment=dont_fragment)
        return proc.returncode == 0

    def ping_verbose(self, ip: IPv4Address | str, count: int = 3, timeout: float = 10, *, size: int = 56,
                     dont_fragment: bool = False) -> subprocess.CompletedProcess[str]:
        """Run the pinger like ``ping`` and return the completed process (stdout: ``<got>/<sent> replies``)."""
        if ip_address(str(ip)).version == 6:
            args6 = ["ping", "-6", "-n", "-q", "-c", str(count), "-w", str(int(timeout)), "-i", str(PING_INTERVAL_S),
                     "-s", str(size), *(["-M", "do"] if dont_fragment else []), str(ip)]
            return self.run(args6, check=False, timeout=timeout + 10)
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
        self.ip6 = tb.ip6_of(ip)  # underlay IPv6 (dual-stack testbed), else None
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
        denv = {"PYTHONUNBUFFERED": "1", "WIREGUARD_KEY_FILE": str(self.wg_key_file), **(env or {})}
        with open(self.daemon_log, "ab") as logf:  # the child keeps its own copy of the fd
            self.daemon = self.popen(self.private_run(self.daemon_command(*extra_args)), env=denv, stdout=logf,
                                     stderr=subprocess.STDOUT)
        self._tb._log(f"testbed: fastflanneld pid {self.daemon.pid} on {self.name}, log {self.daemon_log}")
        return self.daemon

    # -- wireguard: a private UAPI socket directory ----------------------------------------------------------------

    @property
    def wg_key_file(self) -> Path:
        """The daemon's WireGuard key file (``$WIREGUARD_KEY_FILE``; Flannel's default /run/flannel/wgkey is shared)."""
        return self.tmpdir / "wgkey"

    def private_run(self, args: Sequence[str]) -> list[str]:
        """Wrap ``args`` so they see this host's own ``/var/run/wireguard`` (``<tmpdir>/wireguard`` bind-mounted).

        wireguard-go's UAPI socket ``/var/run/wireguard/<dev>.sock`` lives on the filesystem, which every network
        namespace shares: a second ``flannel-wg`` would fail with "unix socket in use". ``ip netns exec`` already
        runs each command in a new mount namespace whose mounts do not propagate back, so the bind mount is private
        to the command and its children; every later command wrapped the same way (``wg``) finds the same socket.
        """
        d = self.tmpdir / "wireguard"
        d.mkdir(mode=0o700, exist_ok=True)
        return ["sh", "-c", 'mkdir -p /var/run/wireguard && mount --bind "$0" /var/run/wireguard && exec "$@"',
                str(d), *map(str, args)]

    def wg(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run wireguard-tools' ``wg`` on this host (with its private /var/run/wireguard)."""
        return self.run(self.private_run(["wg", *args]), check=check)

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
        ip6 = gw6 = None
        if env.get("FLANNEL_IPV6_SUBNET"):  # dual stack: the same host number in the IPv6 subnet (docker --ipv6)
            subnet6 = IPv6Interface(env["FLANNEL_IPV6_SUBNET"]).network
            gw6 = subnet6.network_address + 1
            ip6 = subnet6.network_address + (int(ip) - int(subnet.network_address))
            _ipn(self.netns, "addr", "replace", f"{gw6}/{subnet6.prefixlen}", "dev", self.bridge, "nodad")
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
        if ip6 is not None:
            _ipn(netns, "addr", "add", f"{ip6}/{subnet6.prefixlen}", "dev", "eth0", "nodad")
            _ipn(netns, "-6", "route", "add", "default", "via", str(gw6), "dev", "eth0")
        container = Container(self, name, netns, ip, mtu=mtu, gateway=gateway, host_veth=host_veth, ip6=ip6)
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
                 host_veth: str, ip6: IPv6Address | None = None) -> None:
        self._tb = host._tb
        self.host = host
        self.name = name
        self.netns = netns
        self.ip = ip
        self.ip6 = ip6  # with FLANNEL_IPV6_SUBNET in subnet.env
        self.mtu = mtu
        self.gateway = gateway
        self.host_veth = host_veth

    def __repr__(self) -> str:
        return f"Container({self.name!r}, host={self.host.name!r}, netns={self.netns!r}, ip={self.ip})"


# --------------------------------------------------------------------------------------------------------------------
# the testbed
