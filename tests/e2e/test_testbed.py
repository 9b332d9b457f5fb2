# SPDX-License-Identifier: Apache-2.0
"""Check the multi-host testbed: underlay, etcd, containers, and teardown on every exit path."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path

import pytest

from fastflannel.lab import testbed as tbmod
from fastflannel.lab.testbed import base as tbbase
from fastflannel.lab.testbed import netns as tbnetns
from fastflannel.lab.testbed import world as tbworld
from fastflannel.lab.testbed import CommandError, Testbed, TestbedError, cleanup_stale, list_netns

FAKE_SUBNET_ENV = ("FLANNEL_NETWORK=100.96.0.0/16\nFLANNEL_SUBNET=100.96.1.1/24\n"
                   "FLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n")


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state == "Z"


def _assert_torn_down(prefix: str, pids: list[int], workdir: Path) -> None:
    assert [ns for ns in list_netns() if ns.startswith(prefix + "-")] == []
    assert all(_gone(p) for p in pids), [p for p in pids if not _gone(p)]
    assert not workdir.exists()
    assert not (tbmod.MARKER_DIR / f"{prefix}.pid").exists()


# ------------------------------------------------------------------------------------------------------------------
# tier 0: no root needed


def test_init_creates_nothing_and_validates() -> None:
    before = list_netns()
    tb = Testbed(3, etcd_members=3)
    assert tb.endpoints == "http://10.168.0.250:2379,http://10.168.0.251:2379,http://10.168.0.252:2379"
    assert tb.prefix_key == "/coreos.com/network"
    assert tbbase._PREFIX_RE.match(tb.prefix)
    assert list_netns() == before
    tb.close()  # closing a never-started testbed is a no-op
    with pytest.raises(ValueError):
        Testbed(prefix="not-a-prefix")
    with pytest.raises(TestbedError):
        Testbed(etcd_ip="10.169.0.1")  # outside the underlay
    assert Testbed(prefix_key="/x/net/").prefix_key == "/x/net"


def test_command_error_names_namespace_and_stderr() -> None:
    err = CommandError(2, ["ip", "link"], "", "RTNETLINK answers: File exists\n", netns="ffabcde-h1")
    assert isinstance(err, subprocess.CalledProcessError)
    assert "ffabcde-h1" in str(err) and "File exists" in str(err)


# ------------------------------------------------------------------------------------------------------------------
# one shared world for the read-mostly checks


@pytest.fixture(scope="module")
def tb(make_module_testbed) -> Testbed:
    return make_module_testbed(3)


@pytest.mark.netns
@pytest.mark.etcd
def test_layout_and_root_namespace_untouched(tb: Testbed) -> None:
    assert [str(h.ip) for h in tb.hosts] == ["10.168.0.2", "10.168.0.3", "10.168.0.4"]
    assert set(tb.namespaces) >= {f"{tb.prefix}-ul", f"{tb.prefix}-etcd0"} | {h.netns for h in tb.hosts}
    for h in tb.hosts:
        assert h.addresses("eth0") == [IPv4Interface(f"{h.ip}/24")]
        assert h.run(["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.strip() == "1"
        mtu = json.loads(h.run(["ip", "-j", "link", "show", "eth0"]).stdout)[0]["mtu"]
        assert mtu == 1500
    # nothing of ours in the root namespace: no links, no underlay addresses
    root_links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    assert tb.prefix not in root_links
    root_addrs = subprocess.run(["ip", "-o", "-4", "addr"], capture_output=True, text=True, check=True).stdout
    assert " 10.168.0." not in root_addrs


@pytest.mark.netns
@pytest.mark.etcd
def test_hosts_ping_each_other_and_etcd_on_underlay(tb: Testbed) -> None:
    for a in tb.hosts:
        for b in tb.hosts:
            if a is not b:
                assert a.ping(b.ip, count=1, timeout=5), f"{a.name} -> {b.name}"
        assert a.ping(tb.etcd[0].ip, count=1, timeout=5)
    assert not tb.hosts[0].ping("10.168.0.99", count=1, timeout=0.5)


@pytest.mark.netns
@pytest.mark.etcd
def test_outside_host_joins_underlay_without_daemon(tb: Testbed) -> None:
    o1 = tb.add_outside_host()
    assert (o1.name, o1.netns, o1.ip) == ("o1", f"{tb.prefix}-o1", IPv4Address("10.168.0.5"))
    assert o1 in tb.outside_hosts and o1 not in tb.hosts and o1.daemon is None
    assert o1.ping(tb.hosts[0].ip, count=1)
    with pytest.raises(TestbedError):
        tb.add_outside_host("o2", ip="10.168.0.2")  # taken by h1


@pytest.mark.netns
@pytest.mark.etcd
def test_etcdctl_from_host_namespace(tb: Testbed) -> None:
    h1, h2, _ = tb.hosts
    h1.etcdctl("put", "/testbed/k", "v1")
    assert h2.etcdctl("get", "--print-value-only", "/testbed/k").stdout.strip() == "v1"
    tb.put_config({"Network": "100.96.0.0/16", "Backend": {"Type": "vxlan"}})
    got = tb.etcdctl("get", "--print-value-only", "/coreos.com/network/config")
    assert json.loads(got) == {"Network": "100.96.0.0/16", "Backend": {"Type": "vxlan"}}


@pytest.mark.netns
@pytest.mark.etcd
def test_daemon_command_line(tb: Testbed) -> None:
    h = tb.hosts[0]
    cmd = h.daemon_command("--backend-hint")
    assert cmd[:3] == [sys.executable, "-m", "fastflannel"]
    assert f"--etcd-endpoints={tb.endpoints}" in cmd
    assert "--etcd-prefix=/coreos.com/network" in cmd
    assert "--iface=eth0" in cmd and f"--subnet-file={h.subnet_file}" in cmd
    assert cmd[-1] == "--backend-hint"


@pytest.mark.netns
@pytest.mark.etcd
def test_containers_attach_docker_style(tb: Testbed) -> None:
    h1 = tb.hosts[0]
    h1.subnet_file.write_text(FAKE_SUBNET_ENV)
    assert h1.read_subnet_env()["FLANNEL_MTU"] == "1450"
    c1 = h1.add_container()
    c2 = h1.add_container("web")
    assert (c1.ip, c2.ip) == (IPv4Address("100.96.1.2"), IPv4Address("100.96.1.3"))
    assert c1.netns == f"{tb.prefix}-h1-c1" and c2.netns == f"{tb.prefix}-h1-web"
    assert h1.addresses("docker0") == [IPv4Interface("100.96.1.1/24")]
    bridge = json.loads(h1.run(["ip", "-j", "link", "show", "docker0"]).stdout)[0]
    assert bridge["mtu"] == 1450
    eth0 = json.loads(c1.run(["ip", "-j", "link", "show", "eth0"]).stdout)[0]
    assert eth0["mtu"] == 1450
    routes = json.loads(c1.run(["ip", "-j", "route", "show", "default"]).stdout)
    assert routes[0]["gateway"] == "100.96.1.1"
    assert c1.ping(c1.gateway, count=2)
    assert c1.ping(c2.ip, count=1)
    assert c2.ping(h1.ip, count=1)  # the host's own eth0 address, via the bridge
    with pytest.raises(TestbedError):
        h1.add_container("web")


@pytest.mark.netns
@pytest.mark.etcd
def test_add_container_waits_for_subnet_env(tb: Testbed) -> None:
    h3 = tb.hosts[2]
    t0 = time.monotonic()
    with pytest.raises(TestbedError, match="FLANNEL_SUBNET"):
        h3.add_container(timeout=0.5)
    assert time.monotonic() - t0 < 20  # liveness: the 0.5 s timeout is honoured, not the default 30 s


# ------------------------------------------------------------------------------------------------------------------
# teardown on every exit path


@pytest.mark.netns
@pytest.mark.etcd
def test_close_removes_everything(make_testbed) -> None:
    tb = make_testbed(2, teardown_grace=1.0)
    h1 = tb.hosts[0]
    h1.subnet_file.write_text(FAKE_SUBNET_ENV)
    c = h1.add_container()
    sleeper = h1.popen(["sleep", "600"])
    orphan = c.popen(["sh", "-c", "trap '' TERM; sleep 600"])  # ignores SIGTERM: needs the SIGKILL step
    untracked = subprocess.Popen(["ip", "netns", "exec", h1.netns, "sleep", "600"], start_new_session=True)
    etcd_pid = tb.etcd[0].pid
    assert etcd_pid is not None
    workdir = tb.workdir
    assert (tbmod.MARKER_DIR / f"{tb.prefix}.pid").exists()
    child = os.fork()
    if child == 0:  # a forked child inherits the testbed (and its atexit hook) but must not tear it down
        try:
            tb.close()
        finally:
            os._exit(0)
    os.waitpid(child, 0)
    assert set(tb.namespaces) <= set(list_netns()) and tb.etcd[0].running
    tb.close()
    untracked.wait(timeout=5)  # killed by the per-namespace sweep; reap it here
    _assert_torn_down(tb.prefix, [etcd_pid, sleeper.pid, orphan.pid, untracked.pid], workdir)
    assert not tb.etcd[0].running
    tb.close()  # idempotent


@pytest.mark.netns
@pytest.mark.etcd
def test_keyboard_interrupt_inside_with_cleans_up() -> None:
    seen: dict[str, object] = {}
    with pytest.raises(KeyboardInterrupt):
        with Testbed(1) as tb:
            seen.update(prefix=tb.prefix, pid=tb.etcd[0].pid, workdir=tb.workdir)
            signal.raise_signal(signal.SIGINT)  # a real Ctrl-C, delivered to this (main) thread
            time.sleep(5)
    _assert_torn_down(seen["prefix"], [seen["pid"]], seen["workdir"])  # type: ignore[arg-type,list-item]


@pytest.mark.netns
@pytest.mark.etcd
def test_second_ctrl_c_during_teardown_is_deferred(monkeypatch: pytest.MonkeyPatch) -> None:
    real = tbnetns._kill_netns_processes
    fired = []

    def interrupting(ns, log):  # a second Ctrl-C lands in the middle of teardown
        if not fired:
            fired.append(ns)
            signal.raise_signal(signal.SIGINT)
        return real(ns, log)

    tb = Testbed(1).start()
    prefix, pid, workdir = tb.prefix, tb.etcd[0].pid, tb.workdir
    monkeypatch.setattr(tbworld, "_kill_netns_processes", interrupting)
    with pytest.raises(KeyboardInterrupt):
        tb.close()
    assert fired
    _assert_torn_down(prefix, [pid], workdir)  # type: ignore[list-item]


@pytest.mark.netns
@pytest.mark.etcd
def test_failure_during_setup_cleans_up(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_spawn(self):
        raise tbmod.EtcdError("simulated etcd failure")

    monkeypatch.setattr(tbmod.EtcdServer, "spawn", broken_spawn)
    tb = Testbed(2)
    with pytest.raises(tbmod.EtcdError, match="simulated"):
        tb.start()
    assert [ns for ns in list_netns() if ns.startswith(tb.prefix + "-")] == []
    assert not tb.workdir.exists()


def _spawn_tool(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "fastflannel.lab.testbed", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _wait_ready(proc: subprocess.Popen[str], timeout: float = 30) -> str:
    """Read the tool's output until it says it is up; return the prefix."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    prefix = ""
    lines = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("testbed: ff") and not prefix:
            prefix = line.split()[1].rstrip(":")
        if "Ctrl-C to tear down" in line:
            return prefix
    proc.kill()
    proc.wait()
    raise AssertionError("testbed tool did not come up:\n" + "".join(lines))


@pytest.mark.netns
@pytest.mark.etcd
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_tool_tears_down_on_signal(sig: int) -> None:
    proc = _spawn_tool("1")
    try:
        prefix = _wait_ready(proc)
        assert any(ns.startswith(prefix + "-") for ns in list_netns())
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 130, out
        assert [ns for ns in list_netns() if ns.startswith(prefix + "-")] == [], out
        assert not (tbmod.MARKER_DIR / f"{prefix}.pid").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.netns
@pytest.mark.etcd
def test_cleanup_stale_after_owner_was_killed() -> None:
    proc = _spawn_tool("1")
    prefix = ""
    try:
        prefix = _wait_ready(proc)
        info = json.loads((tbmod.MARKER_DIR / f"{prefix}.pid").read_text())
        etcd_pids = tbnetns._netns_pids(f"{prefix}-etcd0")
        assert etcd_pids
        assert cleanup_stale(prefix) == []  # owner alive: leave it alone
        proc.kill()  # SIGKILL: no teardown at all
        proc.wait()
        assert any(ns.startswith(prefix + "-") for ns in list_netns())
        assert sorted(cleanup_stale(prefix, dry_run=True)) == sorted(
            ns for ns in list_netns() if ns.startswith(prefix + "-"))
        removed = cleanup_stale(prefix)
        assert f"{prefix}-ul" in removed and f"{prefix}-etcd0" in removed
        assert [ns for ns in list_netns() if ns.startswith(prefix + "-")] == []
        assert all(_gone(p) for p in etcd_pids)
        assert not Path(info["workdir"]).exists()
        assert not (tbmod.MARKER_DIR / f"{prefix}.pid").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if prefix:
            tbmod.remove_namespaces([ns for ns in list_netns() if ns.startswith(prefix + "-")])
            (tbmod.MARKER_DIR / f"{prefix}.pid").unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------------------------
# multi-member etcd


@pytest.mark.netns
@pytest.mark.etcd
def test_three_member_etcd_survives_one_kill_and_restarts(make_testbed) -> None:
    tb = make_testbed(1, etcd_members=3)
    assert [str(m.ip) for m in tb.etcd] == ["10.168.0.250", "10.168.0.251", "10.168.0.252"]
    assert len({m.netns for m in tb.etcd}) == 3
    h1 = tb.hosts[0]
    h1.etcdctl("put", "/testbed/a", "1")
    leader = tb.etcd_leader()
    leader.kill()  # the hard case: the survivors must elect a new leader
    assert not leader.running
    new_leader = tb.etcd_leader(timeout=15)
    assert new_leader is not leader
    h1.etcdctl("put", "/testbed/b", "2", endpoints=tb.live_endpoints)  # a quorum of two still serves writes
    assert tb.etcdctl("get", "--print-value-only", "/testbed/b").strip() == "2"
    leader.start()  # same data dir: the member rejoins the cluster
    assert leader.running
    deadline = time.monotonic() + 10
    out = ""
    while time.monotonic() < deadline and out.strip() != "2":  # serializable read: from the member's own store
        out = leader.etcdctl("get", "--print-value-only", "--consistency=s", "/testbed/b", check=False).stdout
        time.sleep(0.1)
    assert out.strip() == "2"
