# SPDX-License-Identifier: Apache-2.0
"""Docker on fastflannel hosts (issue 16): Debian's docker.io, one dockerd per simulated host, started with the
options the contrib drop-in computes (``fastflannel docker-opts``: --bip, --mtu, --ip-masq=false), an image made
from busybox-static with ``docker import``; containers on two hosts ping each other and move data with their own
source address, and reach an outside host masqueraded by fastflanneld (not by docker), on vxlan and udp.

Each dockerd runs under ``nsenter --net=/run/netns/<host>`` (``ip netns exec`` remounts /sys and hides the
cgroups) inside a private mount namespace (``unshare --mount``), so its mounts vanish with it, with its own
data-root, exec-root, pidfile, socket, config file and cgroup parent under a directory of this test. Teardown, on
every exit path: remove the containers, stop dockerd (SIGTERM, then SIGKILL), kill by pid whatever still runs from
that directory (containerd, shims) or in the cgroup parent (container processes), remove the cgroups and the
directory. The CLI is Debian's /usr/bin/docker, always with ``-H unix://<our socket>`` and its own DOCKER_CONFIG.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path

import pytest
from peer_transfer import tcp_transfer
from waiting import wait_for

pytestmark = [pytest.mark.netns, pytest.mark.etcd, pytest.mark.slow]

DOCKERD, DOCKER, BUSYBOX = "/usr/sbin/dockerd", "/usr/bin/docker", "/bin/busybox"
DROPIN = Path(__file__).resolve().parents[2] / "contrib" / "docker.service.d" / "fastflannel.conf"
NETWORK = "100.96.0.0/16"
IMAGE = "ffbusybox:1"
READY_S = 60.0  # liveness bound for dockerd on a contended machine

_missing = [p for p in (DOCKERD, DOCKER, BUSYBOX, "/usr/bin/containerd", "/usr/bin/nsenter", "/usr/bin/unshare")
            if not os.path.exists(p)]
pytestmark.append(pytest.mark.skipif(bool(_missing), reason=f"needs docker.io and busybox-static: {_missing}"))


def dropin_commands() -> "tuple[list[str], list[str]]":
    """Return the drop-in's ExecStartPre and (last) ExecStart command lines, split as systemd would."""
    pre, start = [], []
    for line in DROPIN.read_text().splitlines():
        key, _, value = line.partition("=")
        if key == "ExecStartPre":
            pre = shlex.split(value)
        elif key == "ExecStart" and value:
            start = shlex.split(value)
    assert pre and start, f"{DROPIN}: no ExecStartPre/ExecStart"
    return pre, start


def fastflannel_command() -> list[str]:
    script = Path(sys.executable).parent / "fastflannel"
    return [str(script)] if script.exists() else [sys.executable, "-m", "fastflannel.lab.cli"]


class Dockerd:
    """One dockerd for one simulated host; ``close()`` removes every trace of it and is idempotent."""

    def __init__(self, host, root: Path, cgroup: str) -> None:
        self.host, self.root, self.cgroup = host, root, cgroup
        self.sock = root / "docker.sock"
        self.proc: "subprocess.Popen | None" = None
        self.log = root / "dockerd.log"

    # -- the drop-in ---------------------------------------------------------------------------------------
    def options_from_dropin(self) -> list[str]:
        """Run the drop-in's ExecStartPre (``fastflannel docker-opts``) on this host's files and return the
        dockerd options its ExecStart line expands to (without systemd's -H fd:// and --containerd)."""
        pre, start = dropin_commands()
        env_file = self.root / "docker_opts.env"
        assert pre[0].endswith("/fastflannel") and pre[1] == "docker-opts", pre
        args = [{"/run/flannel/subnet.env": str(self.host.subnet_file), "/run/docker_opts.env": str(env_file)}.get(a, a)
                for a in pre[2:]]
        subprocess.run(fastflannel_command() + ["docker-opts", *args], check=True, timeout=30,
                       env={k: v for k, v in os.environ.items() if k != "DOCKER_OPTS"})
        # systemd: EnvironmentFile= removes the quotes; an unbraced $VAR splits at whitespace
        env = {k: shlex.split(v)[0] for k, v in (line.split("=", 1) for line in env_file.read_text().splitlines())}
        opts = env["DOCKER_OPTS"].split()
        assert start[0] == DOCKERD.replace("/sbin/", "/bin/") or start[0].endswith("dockerd"), start
        out = []
        for a in start[1:]:
            if a == "$DOCKER_OPTS":
                out += opts
            elif a not in ("-H", "fd://") and not a.startswith("--containerd="):
                out.append(a)
        return out

    # -- life cycle ----------------------------------------------------------------------------------------
    def start(self, options: list[str]) -> None:
        (self.root / "cli").mkdir(parents=True, exist_ok=True)
        cfg = self.root / "daemon.json"
        cfg.write_text(json.dumps({"storage-driver": "vfs", "exec-opts": ["native.cgroupdriver=cgroupfs"]}))
        argv = ["unshare", "--mount", "--propagation", "private",
                "nsenter", f"--net=/run/netns/{self.host.netns}",
                DOCKERD, f"--data-root={self.root / 'data'}", f"--exec-root={self.root / 'exec'}",
                f"--pidfile={self.root / 'docker.pid'}", f"--host=unix://{self.sock}", f"--config-file={cfg}",
                f"--cgroup-parent=/{self.cgroup}", *options]
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        wait_for(lambda: self.proc.poll() is not None or self.docker("info", check=False).returncode == 0,
                 READY_S, 0.3, what=f"dockerd on {self.host.name}")
        assert self.proc.poll() is None, self.log.read_text()[-3000:]

    def docker(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "DOCKER_CONFIG": str(self.root / "cli")}
        p = subprocess.run([DOCKER, "-H", f"unix://{self.sock}", *args], capture_output=True, text=True,
                           timeout=timeout, env=env)
        if check and p.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)} on {self.host.name} failed: {p.stderr[-2000:]}")
        return p

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None and self.sock.exists():
            try:
                ids = self.docker("ps", "-aq", check=False, timeout=20).stdout.split()
                if ids:
                    self.docker("rm", "-f", *ids, check=False, timeout=60)
            except subprocess.TimeoutExpired:
                pass
        if self.proc is not None:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGTERM)
                try:
                    self.proc.wait(20)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(10)
            self.proc = None
        for pid in self._stray_pids():  # containerd and shims (their command lines name our directory)
            _kill(pid)
        self._remove_cgroups()
        shutil.rmtree(self.root, ignore_errors=True)

    def _stray_pids(self) -> list[int]:
        needle = str(self.root).encode()
        pids = []
        for d in Path("/proc").iterdir():
            if d.name.isdigit() and int(d.name) != os.getpid():
                try:
                    if needle in (d / "cmdline").read_bytes():
                        pids.append(int(d.name))
                except OSError:
                    pass
        return pids

    def _remove_cgroups(self) -> None:
        for top in Path("/sys/fs/cgroup").glob(f"*/{self.cgroup}"):
            dirs = sorted((p for p in [top, *top.rglob("*")] if p.is_dir()), key=lambda p: -len(p.parts))
            for d in dirs:
                try:
                    for pid in (d / "cgroup.procs").read_text().split():
                        _kill(int(pid))
                except OSError:
                    pass
            for d in dirs:
                for _ in range(50):
                    try:
                        d.rmdir()
                        break
                    except FileNotFoundError:
                        break
                    except OSError:
                        time.sleep(0.1)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class DockerContainer:
    """A running container as a node for tcp_transfer: commands run in its network namespace."""

    def __init__(self, dockerd: Dockerd, name: str) -> None:
        self.dockerd, self.name = dockerd, name
        info = json.loads(dockerd.docker("inspect", name).stdout)[0]
        self.pid = info["State"]["Pid"]
        self.ip = IPv4Address(info["NetworkSettings"]["IPAddress"])

    def _wrap(self, args) -> list[str]:
        return ["nsenter", f"--net=/proc/{self.pid}/ns/net", *map(str, args)]

    def run(self, args, check: bool = True, timeout: float = 60):
        return subprocess.run(self._wrap(args), capture_output=True, text=True, timeout=timeout, check=check)

    def popen(self, args, **kw):
        return subprocess.Popen(self._wrap(args), stdin=subprocess.DEVNULL, **kw)

    def ping(self, ip, count: int = 1) -> bool:
        return self.dockerd.docker("exec", self.name, BUSYBOX, "ping", "-c", str(count), "-W", "2", str(ip),
                                   check=False).returncode == 0


@pytest.fixture
def docker_root():
    root = Path(tempfile.mkdtemp(prefix="ffdocker-"))
    dockerds: list[Dockerd] = []
    try:
        yield root, dockerds
    finally:
        for d in dockerds:
            d.close()
        shutil.rmtree(root, ignore_errors=True)


def busybox_image(path: Path) -> Path:
    with tarfile.open(path, "w") as t:
        t.add(BUSYBOX, "bin/busybox")
    return path


@pytest.mark.parametrize("backend,nftables", [("vxlan", False), ("udp", False), ("vxlan", True)],
                         ids=["vxlan", "udp", "vxlan-nftables"])
def test_docker_containers_across_hosts(make_testbed, docker_root, backend, nftables):
    """Docker's FORWARD policy is DROP (as docker sets it when it turns forwarding on). In iptables mode
    FLANNEL-FWD accepts the overlay's traffic; in nftables mode Flannel's ``forward`` chain is a base chain of its
    own and cannot overrule iptables' DROP, so the test adds the DOCKER-USER rules docs/troubleshooting.md gives."""
    root, dockerds = docker_root
    tb = make_testbed(2)
    tb.put_config({"Network": NETWORK, "Backend": {"Type": backend}, **({"EnableNFTables": True} if nftables else {})})
    for h in tb.hosts:
        h.start_daemon("--ip-masq")
    image = busybox_image(root / "busybox.tar")
    ctrs = []
    for h in tb.hosts:
        env = h.wait_subnet_env()
        d = Dockerd(h, root / h.name, cgroup=f"{tb.prefix}-{h.name}")
        dockerds.append(d)
        opts = d.options_from_dropin()
        assert opts == [f"--bip={env['FLANNEL_SUBNET']}", "--ip-masq=false", f"--mtu={env['FLANNEL_MTU']}"], opts
        h.run(["iptables", "-P", "FORWARD", "DROP"])
        d.start(opts)
        if nftables:  # docs/troubleshooting.md, "Docker: FORWARD policy DROP"
            for flag in ("-s", "-d"):
                h.run(["iptables", "-I", "DOCKER-USER", flag, NETWORK, "-j", "ACCEPT"])
        d.docker("import", str(image), IMAGE)
        d.docker("run", "-d", "--name", "c1", IMAGE, BUSYBOX, "sleep", "600")
        c = DockerContainer(d, "c1")
        assert c.ip in IPv4Interface(env["FLANNEL_SUBNET"]).network, (c.ip, env)
        mtu = d.docker("exec", "c1", BUSYBOX, "cat", "/sys/class/net/eth0/mtu").stdout.strip()
        assert mtu == env["FLANNEL_MTU"], (h.name, mtu, env)
        # docker did not add its own MASQUERADE for the subnet (--ip-masq=false): only FLANNEL-POSTRTG masquerades
        nat = h.run(["iptables-save", "-t", "nat"]).stdout
        assert "-j MASQUERADE" not in "\n".join(ln for ln in nat.splitlines() if "FLANNEL" not in ln and
                                                "flanneld" not in ln), nat
        ctrs.append(c)
    c1, c2 = ctrs
    wait_for(lambda: c1.ping(c2.ip) and c2.ping(c1.ip), 20, 0.5, what=f"containers ping each other over {backend}")
    assert c1.ping(c2.ip, count=3) and c2.ping(c1.ip, count=3)
    for a, b in ((c1, c2), (c2, c1)):
        r = tcp_transfer(a, b, b.ip, size=1 << 20)
        assert r["sent"] == r["recv"] and r["peer"] == str(a.ip), (a.name, r)
    out = tb.add_outside_host()
    r = tcp_transfer(c1, out, out.ip, size=64 << 10)
    assert r["sent"] == r["recv"] and r["peer"] == str(tb.hosts[0].ip), r
