# SPDX-License-Identifier: Apache-2.0
"""wireguard backend end to end: three fastflanneld hosts on wireguard-go (this kernel has no module), a real etcd.

One world for the module, dual stack (each host gets an IPv6 underlay address; EnableIPv6, so flannel-wg-v6 too),
with PSK and a keepalive configured, so both reach the wire. The state is read back with
wireguard-tools' ``wg`` and iproute2, independent of our UAPI client and pyroute2. Each simulated host has its own
``/var/run/wireguard`` (``Host.private_run``). Order matters: the interop test adds a fourth host configured by hand
as flanneld configures one; the restart test needs it to show that an unchanged key needs no change elsewhere; the
lease-deletion test removes it last.
"""
from __future__ import annotations

import base64
import binascii
import json
import re
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path

import pytest

import waiting as e2e

from fastflannel.lab.measure import ping_rtt, transfer_checksum

pytestmark = [pytest.mark.netns, pytest.mark.etcd]

NETWORK = IPv4Network("100.96.0.0/16")
NETWORK6 = IPv6Network("fd00:100::/48")
DEV, DEV6 = "flannel-wg", "flannel-wg-v6"
PORT, PORT6 = 51820, 51821
KEEPALIVE = 25
CONVERGE_S = 15.0
READY_S = 30.0
PING_MARKER = b"fastflannel-testbed-"  # the testbed pinger's ICMP payload: must never be seen on the underlay

if subprocess.run(["sh", "-c", "command -v wireguard-go && command -v wg && command -v tcpdump"],
                  capture_output=True).returncode != 0:
    pytest.skip("needs wireguard-go, wireguard-tools (wg) and tcpdump (make system-deps)", allow_module_level=True)


def wait_for(pred, timeout=CONVERGE_S, interval=0.2, what="condition"):
    return e2e.wait_for(pred, timeout, interval, what)


def leases(tb) -> dict:
    out = tb.etcdctl("get", "--prefix", f"{tb.prefix_key}/subnets/", "-w", "json")
    res = {}
    for kv in json.loads(out).get("kvs", []):
        v4 = base64.b64decode(kv["key"]).decode().rsplit("/", 1)[1].partition("&")[0]  # dual: <v4>-<len>&<v6>-<len>
        res[IPv4Network(v4.replace("-", "/"))] = base64.b64decode(kv["value"]).decode()
    return res


def lease_key(tb, subnet: IPv4Network) -> str:
    """The etcd key of the lease whose IPv4 part is ``subnet`` (as stored: with its IPv6 part if dual)."""
    for v4, v6 in leases6(tb):
        if v4 == subnet:
            name = str(v4).replace("/", "-") + (f"&{str(v6).replace('/', '-')}" if v6 else "")
            return f"{tb.prefix_key}/subnets/{name}"
    return f"{tb.prefix_key}/subnets/{str(subnet).replace('/', '-')}"


def subnet_of(host) -> IPv4Network:
    return IPv4Network(host.wait_subnet_env()["FLANNEL_SUBNET"], strict=False)


def host_ip6(host) -> IPv6Address:
    return IPv6Address(f"fd00::{str(host.ip).rsplit('.', 1)[1]}")


def subnet6_of(host) -> IPv6Network:
    return IPv6Network(host.wait_subnet_env()["FLANNEL_IPV6_SUBNET"], strict=False)


def wg_dump(host, dev: str = DEV) -> dict:
    """``wg show <dev> dump``: {"port", "public_key", "peers": {pub: (psk, endpoint, allowed, keepalive)}}."""
    lines = host.wg("show", dev, "dump").stdout.strip().splitlines()
    _priv, pub, port, _fwmark = lines[0].split("\t")
    peers = {}
    for line in lines[1:]:
        p, psk, ep, allowed, _hs, _rx, _tx, ka = line.split("\t")
        peers[p] = (psk, ep, allowed, ka)
    return {"port": int(port), "public_key": pub, "peers": peers}


def expected_peers(tb, host, psk: str, family: int = 4) -> dict:
    """The peers flanneld programs on ``host`` for the leases in etcd: IPv4 on flannel-wg, IPv6 on flannel-wg-v6."""
    own = subnet_of(host)
    want = {}
    for s, v in leases6(tb).items() if family == 6 else leases(tb).items():
        d = json.loads(v)
        if (s[0] if family == 6 else s) == own or d.get("BackendType") != "wireguard":
            continue
        if family == 6:
            if d.get("PublicIPv6") is None or s[1] is None:
                continue
            bd = d["BackendV6Data"]
            want[bd["PublicKey"]] = (psk, f"[{d['PublicIPv6']}]:{bd['Port']}", str(s[1]), str(KEEPALIVE))
        else:
            bd = d["BackendData"]
            want[bd["PublicKey"]] = (psk, f"{d['PublicIP']}:{bd['Port']}", str(s), str(KEEPALIVE))
    return want


def leases6(tb) -> dict:
    """{(v4 subnet, v6 subnet or None): value} from the keys (``<v4>-<len>&<v6>-<len>`` when dual stack)."""
    out = tb.etcdctl("get", "--prefix", f"{tb.prefix_key}/subnets/", "-w", "json")
    res = {}
    for kv in json.loads(out).get("kvs", []):
        name = base64.b64decode(kv["key"]).decode().rsplit("/", 1)[1]
        v4, _, v6 = name.partition("&")
        key = (IPv4Network(v4.replace("-", "/")), IPv6Network(v6.replace("-", "/")) if v6 else None)
        res[key] = base64.b64decode(kv["value"]).decode()
    return res


def log_count(host, needle: str) -> int:
    return host.daemon_log_text().count(needle)


@dataclass
class World:
    tb: object
    hosts: list
    ctrs: list
    psk: str
    interop: object = None
    interop_subnet: IPv4Network | None = None
    interop_ctr_ip: IPv4Address | None = None
    extra: dict = field(default_factory=dict)

    def start(self, host) -> None:
        before = log_count(host, "event=subnet_file_written")
        host.start_daemon()
        wait_for(lambda: log_count(host, "event=subnet_file_written") > before or host.daemon.poll() is not None,
                 timeout=READY_S, what=f"daemon ready on {host.name}")
        assert host.daemon.poll() is None, host.daemon_log_text()[-3000:]

    def converged(self, host) -> bool:
        try:
            return all(wg_dump(host, dev)["peers"] == expected_peers(self.tb, host, self.psk, fam)
                       for fam, dev in ((4, DEV), (6, DEV6)))
        except subprocess.CalledProcessError:
            return False

    def wait_converged(self, hosts=None) -> None:
        for h in hosts or self.hosts:
            try:
                wait_for(lambda: self.converged(h), what=f"wireguard peers converged on {h.name}")
            except AssertionError:
                assert wg_dump(h)["peers"] == expected_peers(self.tb, h, self.psk), h.name
                assert wg_dump(h, DEV6)["peers"] == expected_peers(self.tb, h, self.psk, 6), h.name


@pytest.fixture(scope="module")
def world(make_module_testbed):
    tb = make_module_testbed(3)
    psk = subprocess.run(["wg", "genpsk"], capture_output=True, text=True, check=True).stdout.strip()
    tb.put_config({"Network": str(NETWORK), "EnableIPv6": True, "IPv6Network": str(NETWORK6),
                   "Backend": {"Type": "wireguard", "PSK": psk, "PersistentKeepaliveInterval": KEEPALIVE}})
    for h in tb.hosts:  # dual stack: an IPv6 underlay address beside the testbed's IPv4 one
        h.run(["ip", "-6", "addr", "add", f"{host_ip6(h)}/64", "dev", "eth0", "nodad"])
    w = World(tb, list(tb.hosts), [], psk)
    for h in w.hosts:
        w.start(h)
    w.ctrs = [h.add_container() for h in w.hosts]
    w.wait_converged()
    yield w
    for h in w.hosts:
        if h.daemon is not None and h.daemon.poll() is None:
            # generous: shutdown joins the threads (up to 10 s) and stops wireguard-go, on a contended machine
            assert h.stop_daemon(signal.SIGTERM, timeout=40) == 0, h.daemon_log_text()[-3000:]
            assert "event=wireguard_closed" in h.daemon_log_text()
    tb.close()


@pytest.fixture(autouse=True)
def _dump_logs_on_failure(request, world):
    yield
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        for h in world.hosts:
            sys.stderr.write(f"----- {h.name} fastflanneld log -----\n{h.daemon_log_text()[-8000:]}\n")


class Capture:
    """tcpdump on the underlay bridge (every host's traffic), hex dump to a file; ``packets()`` parses it."""

    def __init__(self, tb, exclude: list) -> None:
        self.path = Path(tb.workdir) / "underlay.txt"
        self.err_path = Path(tb.workdir) / "underlay.err"
        flt = " and ".join(["ip"] + [f"not host {ip}" for ip in exclude])
        self.out, self.err = open(self.path, "w"), open(self.err_path, "w")
        self.proc = subprocess.Popen(["ip", "netns", "exec", tb.ul_netns, "tcpdump", "-i", tb.ul_bridge, "-nn",
                                      "-l", "-x", "-s", "0", "-U", flt], stdout=self.out, stderr=self.err,
                                     start_new_session=True)
        tb._track(self.proc)
        wait_for(lambda: "listening on" in self.err_path.read_text() or self.proc.poll() is not None, timeout=10,
                 what="tcpdump listening")
        assert self.proc.poll() is None, self.err_path.read_text()

    def stop(self) -> list:
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(10)
        self.out.close()
        self.err.close()
        return self.packets()

    def packets(self) -> list:
        """Return [(summary line, raw IP packet bytes)]."""
        pkts, cur, hexs = [], None, []
        for line in self.path.read_text().splitlines():
            m = re.match(r"^\s+0x[0-9a-f]+:\s+(.*)$", line)
            if m and cur is not None:
                hexs.append(m.group(1).replace(" ", ""))
                continue
            if cur is not None:
                pkts.append((cur, binascii.unhexlify("".join(hexs))))
            cur, hexs = (line, []) if line.strip() else (None, [])
        if cur is not None:
            pkts.append((cur, binascii.unhexlify("".join(hexs))))
        return pkts


# ----------------------------------------------------------------------------------------------------------------


def test_encrypted_data_path_and_only_wireguard_udp_on_the_wire(world):
    """Ping every container pair both ways, 20 MB over TCP with equal sha256; the underlay capture shows only UDP
    between the hosts' WireGuard ports and never an inner packet (no ICMP payload, no overlay address)."""
    tb = world.tb
    cap = Capture(tb, [str(ip) for ip in tb.etcd_ips])
    c = world.ctrs
    for a, b in ((c[0], c[1]), (c[1], c[2]), (c[2], c[0])):
        for src, dst in ((a, b), (b, a)):
            r = ping_rtt(src, dst.ip, count=3, interval=0.1, timeout=10)
            assert r.received == 3, f"{src.name}@{src.host.name} -> {dst.ip}: {r}"
    res = transfer_checksum(c[0], c[2], size_mb=20, timeout=90)
    assert res["sent_bytes"] == res["recv_bytes"] == str(20 << 20), res
    assert res["sent_sha256"] == res["recv_sha256"], res
    assert world.hosts[1].ping(c[0].ip), "a host itself reaches a remote container through flannel-wg"
    pkts = cap.stop()
    host_ips = {str(h.ip) for h in world.hosts}
    assert len(pkts) > 1000, f"the capture saw the transfer: {len(pkts)} packets"
    for summary, raw in pkts:
        m = re.search(r" IP (\d+\.\d+\.\d+\.\d+)\.(\d+) > (\d+\.\d+\.\d+\.\d+)\.(\d+): UDP", summary)
        assert m, f"not UDP between hosts: {summary}"
        src, sport, dst, dport = m.groups()
        assert {src, dst} <= host_ips and sport == dport == str(PORT), summary
        assert raw[9] == 17, summary  # the outer IP protocol is UDP
        assert PING_MARKER not in raw, f"cleartext ICMP payload on the underlay: {summary}"
        for ctr in c:  # no inner header in clear: no container address anywhere in the datagram
            assert IPv4Address(str(ctr.ip)).packed not in raw[28:], f"inner address {ctr.ip} in clear: {summary}"
    print(f"wireguard: {len(pkts)} underlay packets, all UDP {PORT}<->{PORT} between {sorted(host_ips)}")


def test_device_lease_and_peers_match_flannel(world):
    tb = world.tb
    for h in world.hosts:
        s = subnet_of(h)
        key = h.wg_key_file.read_text()
        assert h.wg_key_file.stat().st_mode & 0o777 == 0o400
        pub = subprocess.run(["wg", "pubkey"], input=key, capture_output=True, text=True, check=True).stdout.strip()
        assert leases(tb)[s] == ('{"PublicIP":"%s","PublicIPv6":"%s","BackendType":"wireguard",'
                                 '"BackendData":{"PublicKey":"%s","Port":%d},"BackendV6Data":{"PublicKey":"%s",'
                                 '"Port":%d}}' % (h.ip, host_ip6(h), pub, PORT, pub, PORT6))
        d = wg_dump(h)
        assert (d["public_key"], d["port"]) == (pub, PORT)
        assert d["peers"] == expected_peers(tb, h, world.psk) and len(d["peers"]) == 2
        link = json.loads(h.run(["ip", "-j", "-d", "link", "show", "dev", DEV]).stdout)[0]
        assert link["mtu"] == 1420 and "UP" in link["flags"]
        addrs = json.loads(h.run(["ip", "-j", "-4", "addr", "show", "dev", DEV]).stdout)[0]["addr_info"]
        assert [(a["local"], a["prefixlen"]) for a in addrs] == [(str(s.network_address), 32)]
        routes = json.loads(h.run(["ip", "-j", "-4", "route", "show", "dev", DEV]).stdout)
        assert [(r["dst"], r.get("scope"), r.get("gateway")) for r in routes] == [(str(NETWORK), "link", None)]
        assert h.read_subnet_env()["FLANNEL_MTU"] == "1420"
        assert "impl=wireguard-go" in h.daemon_log_text()
        s6, d6 = subnet6_of(h), wg_dump(h, DEV6)  # IPv6: flannel-wg-v6, the same key, its own port
        assert (d6["public_key"], d6["port"]) == (pub, PORT6)
        assert d6["peers"] == expected_peers(tb, h, world.psk, 6) and len(d6["peers"]) == 2
        addrs6 = json.loads(h.run(["ip", "-j", "-6", "addr", "show", "dev", DEV6, "scope", "global"]).stdout)
        assert [(a["local"], a["prefixlen"]) for a in addrs6[0]["addr_info"] if "local" in a] == [(str(s6.network_address), 128)]
        routes6 = json.loads(h.run(["ip", "-j", "-6", "route", "show", "dev", DEV6]).stdout)
        assert str(NETWORK6) in [r["dst"] for r in routes6]


def test_ipv6_between_hosts_only_wireguard_udp_on_the_wire(world):
    """Dual stack: each host reaches the others' flannel-wg-v6 address through the tunnel; on the underlay that is
    only UDP 51821 <-> 51821 between the hosts' IPv6 addresses, never the inner ICMPv6 payload."""
    tb = world.tb
    out, err = open(Path(tb.workdir) / "underlay6.txt", "w"), open(Path(tb.workdir) / "underlay6.err", "w")
    cap = subprocess.Popen(["ip", "netns", "exec", tb.ul_netns, "tcpdump", "-i", tb.ul_bridge, "-nn", "-l", "-x",
                            "-s", "0", "-U", "ip6 and not icmp6"], stdout=out, stderr=err, start_new_session=True)
    tb._track(cap)
    wait_for(lambda: "listening on" in (Path(tb.workdir) / "underlay6.err").read_text(), timeout=10,
             what="tcpdump listening")
    for a in world.hosts:
        for b in world.hosts:
            if a is not b:
                dst = str(subnet6_of(b).network_address)
                r = a.run(["ping", "-6", "-n", "-c", "2", "-i", "0.2", "-W", "3", "-p", PING_MARKER[:16].hex(), dst],
                          check=False)
                assert r.returncode == 0, f"{a.name} -> {b.name}'s {DEV6} {dst}: {r.stdout}{r.stderr}"
    cap.send_signal(signal.SIGINT)
    cap.wait(10)
    out.close()
    err.close()
    text = (Path(tb.workdir) / "underlay6.txt").read_text()
    summaries = [ln for ln in text.splitlines() if ln and not ln[0].isspace()]
    hexdump = "".join(m.group(1).replace(" ", "") for m in re.finditer(r"^\s+0x[0-9a-f]+:\s+(.*)$", text, re.M))
    host6 = {str(host_ip6(h)) for h in world.hosts}
    assert len(summaries) >= 12, summaries  # 6 pairs x 2 pings, each way
    for line in summaries:
        m = re.search(r" IP6 ([0-9a-f:]+)\.(\d+) > ([0-9a-f:]+)\.(\d+): UDP", line)
        assert m and {m.group(1), m.group(3)} <= host6 and m.group(2) == m.group(4) == str(PORT6), line
    assert PING_MARKER[:16].hex() not in hexdump, "cleartext ICMPv6 payload on the underlay"


def test_interop_with_flannel_configured_host(world):
    """A fourth host set up by hand exactly as flanneld sets up a wireguard host, announced by flanneld's JSON."""
    tb = world.tb
    used = set(leases(tb))
    subnet = next(s for s in (IPv4Network(f"100.96.{i}.0/24") for i in range(200, 255)) if s not in used)
    gw_ip = subnet.network_address + 1
    f4 = tb.add_host()
    world.interop, world.interop_subnet, world.interop_ctr_ip = f4, subnet, gw_ip

    def ip(*args: str) -> None:
        f4.run(["ip", *args])

    key_file, psk_file = f4.tmpdir / "wgkey", f4.tmpdir / "psk"
    key = subprocess.run(["wg", "genkey"], capture_output=True, text=True, check=True).stdout.strip()
    pub = subprocess.run(["wg", "pubkey"], input=key, capture_output=True, text=True, check=True).stdout.strip()
    key_file.write_text(key)
    psk_file.write_text(world.psk)
    key_file.chmod(0o400)
    ip("link", "add", "docker0", "type", "bridge")  # the subnet's first address, as docker0 holds it
    ip("addr", "add", f"{gw_ip}/24", "dev", "docker0")
    ip("link", "set", "docker0", "up")
    # flanneld: LinkAdd flannel-wg (MTU-80), ConfigureDevice {key, port}, address /32, up, Network route
    wg_go = f4.popen(f4.private_run(["wireguard-go", "-f", DEV]),
                     env={"WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD": "1"})
    wait_for(lambda: f4.wg("show", DEV, check=False).returncode == 0 or wg_go.poll() is not None, timeout=10,
             what="wireguard-go up on the hand-made host")
    f4.wg("set", DEV, "private-key", str(key_file), "listen-port", str(PORT))
    ip("link", "set", DEV, "mtu", "1420")
    ip("addr", "add", f"{subnet.network_address}/32", "dev", DEV)
    ip("link", "set", DEV, "up")
    ip("route", "replace", str(NETWORK), "dev", DEV, "scope", "link")
    value = ('{"PublicIP":"%s","PublicIPv6":null,"BackendType":"wireguard","BackendData":{"PublicKey":"%s",'
             '"Port":%d}}' % (f4.ip, pub, PORT))
    tb.etcdctl("put", lease_key(tb, subnet), value)
    for s, v in leases(tb).items():  # flanneld's peer per remote lease
        if s == subnet:
            continue
        d = json.loads(v)
        f4.wg("set", DEV, "peer", d["BackendData"]["PublicKey"], "preshared-key", str(psk_file),
              "persistent-keepalive", str(KEEPALIVE), "endpoint", f"{d['PublicIP']}:{d['BackendData']['Port']}",
              "allowed-ips", str(s))
    world.wait_converged()  # every fastflannel host has the hand-made host as a peer
    for ctr in world.ctrs:
        assert ctr.ping(gw_ip, count=2), f"{ctr.name}@{ctr.host.name} -> hand-made host {gw_ip}"
        r = f4.run(["ping", "-n", "-c", "2", "-i", "0.2", "-W", "3", "-I", str(gw_ip), str(ctr.ip)], check=False)
        assert r.returncode == 0, f"hand-made host {gw_ip} -> {ctr.ip}: {r.stdout}{r.stderr}"


def test_kill9_restart_same_subnet_same_key_traffic_back(world):
    tb, h1 = world.tb, world.hosts[0]
    s, s6, pub = subnet_of(h1), subnet6_of(h1), wg_dump(h1)["public_key"]
    before = log_count(h1, "event=wireguard_key")
    h1.stop_daemon(signal.SIGKILL)
    wait_for(lambda: h1.run(["ip", "link", "show", DEV], check=False).returncode != 0, timeout=10,
             what="wireguard-go gone with its daemon (PR_SET_PDEATHSIG)")
    world.start(h1)
    assert log_count(h1, "event=wireguard_key") == before + 1 and "created=False" in h1.daemon_log_text()[-4000:]
    assert subnet_of(h1) == s and subnet6_of(h1) == s6
    assert wg_dump(h1)["public_key"] == pub and wg_dump(h1, DEV6)["public_key"] == pub
    world.wait_converged()
    r = world.hosts[1].run(["ping", "-6", "-n", "-c", "2", "-i", "0.2", "-W", "3", str(s6.network_address)],
                           check=False)
    assert r.returncode == 0, f"IPv6 back after the restart: {r.stdout}{r.stderr}"
    for ctr in world.ctrs[1:]:
        assert ctr.ping(world.ctrs[0].ip, count=2, timeout=15), f"{ctr.name} -> {world.ctrs[0].ip} after restart"
    assert world.ctrs[0].ping(world.interop_ctr_ip, count=2, timeout=15), "the hand-made host needed no change"


def test_dead_wireguard_go_is_replaced_by_the_reconcile(world):
    """kill -9 of h2's wireguard-go (its device and peers go with it): the daemon's reconcile (every 10 s) starts a
    new one with the same key, port, address, route and peers; traffic comes back with no change elsewhere."""
    h2 = world.hosts[1]
    children = Path(f"/proc/{h2.daemon.pid}/task/{h2.daemon.pid}/children").read_text().split()
    wg_pids = [int(p) for p in children if Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")[-2:-1] == [DEV.encode()]]
    assert len(wg_pids) == 1, children
    pub = wg_dump(h2)["public_key"]
    before = log_count(h2, "event=wireguard_device_recreate")
    import os

    os.kill(wg_pids[0], signal.SIGKILL)
    wait_for(lambda: log_count(h2, "event=wireguard_device_recreate") > before, timeout=25,
             what="the reconcile re-created flannel-wg")
    world.wait_converged([h2])
    assert wg_dump(h2)["public_key"] == pub and h2.daemon.poll() is None
    assert world.ctrs[0].ping(world.ctrs[1].ip, count=2, timeout=15), "traffic back through the new wireguard-go"


def test_deleted_lease_removes_the_peer_everywhere(world):
    tb, subnet = world.tb, world.interop_subnet
    pub = json.loads(leases(tb)[subnet])["BackendData"]["PublicKey"]
    assert all(pub in wg_dump(h)["peers"] for h in world.hosts)
    tb.etcdctl("del", lease_key(tb, subnet))
    wait_for(lambda: all(pub not in wg_dump(h)["peers"] for h in world.hosts), what="peer removed on every host")
    world.wait_converged()
    assert world.ctrs[0].ping(world.ctrs[1].ip, count=2)
    assert not world.ctrs[0].ping(world.interop_ctr_ip, count=1, timeout=2), "no path to the removed host"
