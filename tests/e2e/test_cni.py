# SPDX-License-Identifier: Apache-2.0
"""fastflannel-cni: Flannel's CNI plugin behaviour (flannel-compat.md 4.1) and the CNI 1.0 protocol.

Tier 0 (no root): subnet.env parsing, the delegate configuration, version handling, error JSON, DEL without a saved
configuration, all through ``cni.run`` (the whole plugin minus the process boundary) and once as a process.

Tier 2+3 (``netns``, ``etcd``): 3 simulated hosts run real fastflanneld; the plugin is executed exactly as a container
runtime executes it (found by its type ``flannel`` in CNI_PATH, CNI_* variables, the configuration on stdin, inside
the host's namespace) and delegates to Debian's ``bridge`` and ``host-local`` from /usr/lib/cni. Containers on
different hosts ping each other; DEL removes the veth and releases the address; a repeated DEL succeeds.
"""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from ipaddress import IPv4Interface, IPv4Network
from pathlib import Path

import pytest

from fastflannel.cni import plugin as cni

DEBIAN_CNI_DIR = "/usr/lib/cni"
SUBNET_ENV = "FLANNEL_NETWORK=10.1.0.0/16\nFLANNEL_SUBNET=10.1.17.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n"


def netconf(tmp_path: Path, **extra) -> dict:
    conf = {"cniVersion": "1.0.0", "name": "cbr0", "type": "flannel",
            "subnetFile": str(tmp_path / "subnet.env"), "dataDir": str(tmp_path / "data")}
    conf.update(extra)
    return conf


def run_env(**kw) -> dict:
    env = {"CNI_CONTAINERID": "c0ffee", "CNI_NETNS": "/var/run/netns/x", "CNI_IFNAME": "eth0",
           "CNI_PATH": "/nonexistent"}
    env.update(kw)
    return env


# ------------------------------------------------------------------------------------------------------------------
# subnet.env


def test_parse_subnet_env_like_flannel():
    text = ("FLANNEL_NETWORK=10.1.0.0/16,10.1.0.0/16,10.2.0.0/16\nFLANNEL_SUBNET=10.1.17.1/24\n# comment\n"
            "OTHER=1\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n")
    s = cni.parse_subnet_env(text)
    assert s.networks == (IPv4Network("10.1.0.0/16"), IPv4Network("10.2.0.0/16"))  # de-duplicated
    assert s.subnet == IPv4Network("10.1.17.0/24")  # host bits dropped, as Go's ParseCIDR
    assert (s.mtu, s.ipmasq) == (1450, False)
    assert cni.parse_subnet_env(text.replace("IPMASQ=false", "IPMASQ=True")).ipmasq is False  # only "true" is true
    assert cni.parse_subnet_env(text.replace("IPMASQ=false", "IPMASQ=true")).ipmasq is True


def test_parse_subnet_env_missing_keys_worded_as_flannel():
    with pytest.raises(ValueError) as e:
        cni.parse_subnet_env("FLANNEL_MTU=1450\n", "/run/flannel/subnet.env")
    assert str(e.value) == ("/run/flannel/subnet.env is missing FLANNEL_NETWORK or FLANNEL_IPV6_NETWORK, "
                            "FLANNEL_SUBNET or FLANNEL_IPV6_SUBNET, FLANNEL_IPMASQ")
    with pytest.raises(ValueError, match="invalid CIDR address: nonsense"):
        cni.parse_subnet_env("FLANNEL_SUBNET=nonsense\n")
    with pytest.raises(ValueError, match='parsing "x"'):
        cni.parse_subnet_env("FLANNEL_MTU=x\n")


def test_parse_subnet_env_ipv6_pair():
    s = cni.parse_subnet_env("FLANNEL_IPV6_NETWORK=fd00::/48\nFLANNEL_IPV6_SUBNET=fd00:0:0:5::1/64\n"
                             "FLANNEL_MTU=1400\nFLANNEL_IPMASQ=false\n")
    assert s.subnet is None and str(s.ipv6_subnet) == "fd00:0:0:5::/64"


# ------------------------------------------------------------------------------------------------------------------
# delegate configuration


def test_build_delegate_defaults(tmp_path):
    senv = cni.parse_subnet_env(SUBNET_ENV)
    d = cni.build_delegate(netconf(tmp_path, ipam={"routes": [{"dst": "192.0.2.0/24"}]}), senv)
    assert d == {
        "name": "cbr0", "type": "bridge", "ipMasq": False, "mtu": 1450, "isGateway": True, "cniVersion": "1.0.0",
        "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.1.17.0/24"}]],
                 "routes": [{"dst": "192.0.2.0/24"}, {"dst": "10.1.0.0/16"}]},
    }


def test_build_delegate_user_keys_win_and_runtime_config(tmp_path):
    senv = cni.parse_subnet_env(SUBNET_ENV.replace("IPMASQ=true", "IPMASQ=false"))
    conf = netconf(tmp_path, delegate={"hairpinMode": True, "isDefaultGateway": True, "mtu": 1400},
                   ipam={"type": "host-local", "dataDir": "/x"}, runtimeConfig={"portMappings": []})
    d = cni.build_delegate(conf, senv)
    assert d["ipMasq"] is True and d["mtu"] == 1400 and d["hairpinMode"] is True
    assert d["runtimeConfig"] == {"portMappings": []} and d["ipam"]["dataDir"] == "/x"
    assert "isGateway" in d
    other = cni.build_delegate(netconf(tmp_path, delegate={"type": "ptp"}), senv)
    assert "isGateway" not in other  # only the bridge gets Flannel's isGateway default


@pytest.mark.parametrize("delegate,msg", [
    ({"name": "x"}, "must not have 'name' field"),
    ({"ipam": {}}, "must not have 'ipam' field"),
    ({"type": 3}, "must have (string) 'type' field"),
])
def test_build_delegate_rejects_what_flannel_rejects(tmp_path, delegate, msg):
    with pytest.raises(cni.CNIError) as e:
        cni.build_delegate(netconf(tmp_path, delegate=delegate), cni.parse_subnet_env(SUBNET_ENV))
    assert msg in e.value.msg


def test_prev_result_gets_the_gateway_bridge_programmed():
    prev = {"cniVersion": "1.0.0", "ips": [{"address": "10.1.17.2/24", "gateway": "10.1.17.1", "interface": 2}],
            "routes": [{"dst": "10.1.0.0/16"}, {"dst": "192.0.2.0/24", "gw": "10.1.17.9"}]}
    out = cni.prev_result_with_gateways(prev)
    assert out["routes"] == [{"dst": "10.1.0.0/16", "gw": "10.1.17.1"}, {"dst": "192.0.2.0/24", "gw": "10.1.17.9"}]
    assert prev["routes"][0] == {"dst": "10.1.0.0/16"}  # input untouched


def test_check_fails_when_the_lease_changed_since_add(tmp_path):
    (tmp_path / "subnet.env").write_text(SUBNET_ENV)
    senv = cni.parse_subnet_env(SUBNET_ENV)
    cni.save_delegate(str(tmp_path / "data"), "c0ffee",
                      json.dumps(cni.build_delegate(netconf(tmp_path), senv)).encode())
    (tmp_path / "subnet.env").write_text(SUBNET_ENV.replace("10.1.17.1/24", "10.1.99.1/24"))
    rc, out, _ = cni.run(run_env(CNI_COMMAND="CHECK"), json.dumps(netconf(tmp_path)).encode())
    assert rc == 1 and "subnet changed" in json.loads(out)["msg"]
    rc, out, _ = cni.run(run_env(CNI_COMMAND="CHECK", CNI_CONTAINERID="other"), json.dumps(netconf(tmp_path)).encode())
    assert rc == 1 and json.loads(out)["code"] == 3


# ------------------------------------------------------------------------------------------------------------------
# the protocol, through cni.run


def test_version():
    rc, out, _ = cni.run({"CNI_COMMAND": "VERSION"}, b'{"cniVersion":"1.0.0"}')
    assert rc == 0
    assert json.loads(out) == {"cniVersion": "1.0.0",
                               "supportedVersions": ["0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0"]}


def test_missing_subnet_env_gives_flannels_error(tmp_path):
    rc, out, _ = cni.run(run_env(CNI_COMMAND="ADD"), json.dumps(netconf(tmp_path)).encode())
    assert rc == 1
    err = json.loads(out)
    assert err == {"cniVersion": "1.0.0", "code": 999,
                   "msg": f"loadFlannelSubnetEnv failed: open {tmp_path}/subnet.env: no such file or directory"}
    assert not (tmp_path / "data").exists()  # nothing saved when ADD fails before delegating


def test_incompatible_version_and_bad_env(tmp_path):
    conf = netconf(tmp_path, cniVersion="9.9.9")
    rc, out, _ = cni.run(run_env(CNI_COMMAND="ADD"), json.dumps(conf).encode())
    err = json.loads(out)
    assert rc == 1 and err["code"] == 1 and err["msg"] == "incompatible CNI versions"
    assert err["details"].startswith('config is "9.9.9", plugin supports ["0.1.0"')
    rc, out, _ = cni.run({"CNI_COMMAND": "ADD", "CNI_PATH": "/x"}, json.dumps(netconf(tmp_path)).encode())
    assert rc == 1 and json.loads(out)["code"] == 4
    assert json.loads(out)["msg"] == "required env variables [CNI_CONTAINERID,CNI_NETNS,CNI_IFNAME] missing"
    rc, out, _ = cni.run(run_env(CNI_COMMAND="BOGUS"), b"{}")
    assert rc == 1 and json.loads(out)["code"] == 4
    rc, out, _ = cni.run(run_env(CNI_COMMAND="ADD"), b"{not json")
    assert rc == 1 and json.loads(out)["code"] == 6
    rc, out, _ = cni.run(run_env(CNI_COMMAND="CHECK"), json.dumps(netconf(tmp_path, cniVersion="0.3.1")).encode())
    assert rc == 1 and json.loads(out)["msg"] == "config version does not allow CHECK"


def test_del_without_saved_config_succeeds_and_needs_no_netns(tmp_path):
    env = run_env(CNI_COMMAND="DEL")
    del env["CNI_NETNS"]
    for _ in range(2):
        rc, out, _ = cni.run(env, json.dumps(netconf(tmp_path)).encode())
        assert (rc, out) == (0, b"")


def test_add_saves_delegate_0600_then_reports_a_missing_delegate(tmp_path):
    (tmp_path / "subnet.env").write_text(SUBNET_ENV)
    rc, out, _ = cni.run(run_env(CNI_COMMAND="ADD", CNI_PATH=str(tmp_path / "bin")),
                         json.dumps(netconf(tmp_path)).encode())
    assert rc == 1
    assert json.loads(out)["msg"] == f'failed to find plugin "bridge" in path [{tmp_path}/bin]'
    saved = tmp_path / "data" / "c0ffee"
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "data").stat().st_mode) == 0o700
    assert json.loads(saved.read_text())["ipam"]["ranges"] == [[{"subnet": "10.1.17.0/24"}]]


def test_delegate_error_is_passed_through(tmp_path):
    """A fake delegate that fails: its code, msg and details reach the runtime unchanged; DEL keeps trying."""
    (tmp_path / "subnet.env").write_text(SUBNET_ENV)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "bridge"
    fake.write_text("#!/bin/sh\ncat >/dev/null\necho \"$CNI_COMMAND\" >&2\n"
                    "echo '{\"code\": 11, \"msg\": \"busy\", \"details\": \"try later\"}'\nexit 1\n")
    fake.chmod(0o755)
    conf = json.dumps(netconf(tmp_path)).encode()
    rc, out, _ = cni.run(run_env(CNI_COMMAND="ADD", CNI_PATH=str(bindir)), conf)
    assert rc == 1 and json.loads(out) == {"cniVersion": "1.0.0", "code": 11, "msg": "busy", "details": "try later"}
    rc, out, _ = cni.run(run_env(CNI_COMMAND="DEL", CNI_PATH=str(bindir)), conf)
    assert rc == 1 and (tmp_path / "data" / "c0ffee").exists()  # kept so the runtime's retry can finish the job


def test_plugin_process_exit_status_and_about(tmp_path):
    """The console entry point as a process: error JSON on stdout, exit 1; bare invocation prints the about line."""
    env = {**os.environ, **run_env(CNI_COMMAND="ADD")}
    p = subprocess.run([sys.executable, "-m", "fastflannel.cni.plugin"], input=json.dumps(netconf(tmp_path)).encode(),
                       env=env, capture_output=True, timeout=30)
    assert p.returncode == 1 and json.loads(p.stdout)["code"] == 999
    env.pop("CNI_COMMAND")
    p = subprocess.run([sys.executable, "-m", "fastflannel.cni.plugin"], stdin=subprocess.DEVNULL, env=env,
                       capture_output=True, timeout=30)
    assert p.returncode == 0 and b"CNI Plugin fastflannel version" in p.stderr


# ------------------------------------------------------------------------------------------------------------------
# end to end: real daemons, the real Debian plugins, 3 hosts


def _plugin_dir(tmp_path: Path) -> Path:
    """Return a CNI bin dir holding ``flannel`` = this checkout's fastflannel-cni (a runtime finds it by type)."""
    d = tmp_path / "cni-bin"
    d.mkdir(exist_ok=True)
    script = Path(sys.executable).parent / "fastflannel-cni"
    target = d / "flannel"
    if target.exists():
        return d
    if script.exists():
        target.symlink_to(script)
    else:  # an editable install older than the entry point: same code, same process boundary
        target.write_text(f"#!/bin/sh\nexec {sys.executable} -m fastflannel.cni.plugin \"$@\"\n")
        target.chmod(0o755)
    return d


def _runtime_call(host, command, cid, netns, conf, cni_path, *, check=True):
    """Execute the plugin named by conf["type"] from CNI_PATH as a runtime does; return (rc, parsed stdout)."""
    plugin = next(Path(d) / conf["type"] for d in cni_path.split(":") if (Path(d) / conf["type"]).exists())
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_NETNS": f"/var/run/netns/{netns}",
           "CNI_IFNAME": "eth0", "CNI_PATH": cni_path}
    p = host.run([str(plugin)], env=env, input=json.dumps(conf), check=False, timeout=60)
    out = json.loads(p.stdout) if p.stdout.strip() else None
    if check and p.returncode != 0:
        raise AssertionError(f"CNI {command} on {host.name} failed ({p.returncode}): {p.stdout} {p.stderr}")
    return p.returncode, out


@pytest.fixture
def cni_ready():
    if not Path(DEBIAN_CNI_DIR, "bridge").exists() or not Path(DEBIAN_CNI_DIR, "host-local").exists():
        pytest.skip("needs Debian's containernetworking-plugins (/usr/lib/cni/bridge, host-local): apt-get install "
                    "containernetworking-plugins, or make system-deps")


@pytest.fixture
def container_netns(netns_name):
    """Create bare container namespaces (names the leak guard attributes to us); delete them at teardown."""
    made = []

    def make() -> str:
        name = netns_name("cni")
        subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True, timeout=10)
        made.append(name)
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True, capture_output=True, timeout=10)
        return name

    yield make
    from fastflannel.lab.testbed import remove_namespaces
    remove_namespaces(made)


@pytest.mark.netns
@pytest.mark.etcd
@pytest.mark.parametrize("backend", ["vxlan", "udp"])
def test_cni_attach_three_hosts(make_testbed, container_netns, cni_ready, tmp_path, backend):
    from waiting import wait_for

    tb = make_testbed(3)
    tb.put_config({"Network": "100.96.0.0/16", "Backend": {"Type": backend}})
    for h in tb.hosts:
        h.start_daemon("--ip-masq")  # FLANNEL_IPMASQ=true: the bridge must not masquerade (Kubernetes' setup)
    cni_path = f"{_plugin_dir(tmp_path)}:{DEBIAN_CNI_DIR}"
    attached = []  # (host, cid, netns, conf, ip)
    for h in tb.hosts:
        senv = h.wait_subnet_env(timeout=60)
        assert senv["FLANNEL_IPMASQ"] == "true"
        conf = {"cniVersion": "1.0.0", "name": "fastflannel", "type": "flannel",
                "subnetFile": str(h.subnet_file), "dataDir": str(h.tmpdir / "cni-flannel"),
                "ipam": {"dataDir": str(h.tmpdir / "cni-ipam")}}
        ns = container_netns()
        cid = f"cid-{ns}"
        rc, result = _runtime_call(h, "ADD", cid, ns, conf, cni_path)
        assert result["cniVersion"] == "1.0.0"
        ip = IPv4Interface(result["ips"][0]["address"])
        assert ip.network == IPv4Network(senv["FLANNEL_SUBNET"], strict=False)
        assert any(i.get("sandbox") == f"/var/run/netns/{ns}" for i in result["interfaces"])
        saved = h.tmpdir / "cni-flannel" / cid
        assert stat.S_IMODE(saved.stat().st_mode) == 0o600
        assert json.loads(saved.read_text())["mtu"] == int(senv["FLANNEL_MTU"])
        mtu = json.loads(subprocess.run(["ip", "-n", ns, "-j", "link", "show", "eth0"], capture_output=True,
                                        text=True, check=True).stdout)[0]["mtu"]
        assert mtu == int(senv["FLANNEL_MTU"])
        routes = subprocess.run(["ip", "-n", ns, "route"], capture_output=True, text=True, check=True).stdout
        assert "100.96.0.0/16 via" in routes
        assert "CNI-" not in h.run(["iptables-save", "-t", "nat"]).stdout  # ipMasq=false: no bridge masquerade
        attached.append((h, cid, ns, conf, ip.ip))

    def ping(src_ns, dst):
        return subprocess.run(["ip", "netns", "exec", src_ns, "ping", "-c", "1", "-W", "2", str(dst)],
                              capture_output=True, timeout=10).returncode == 0

    for a in attached:
        for b in attached:
            if a is not b:
                wait_for(lambda: ping(a[2], b[4]), timeout=30, what=f"{a[0].name} container -> {b[4]}")

    # CHECK with the ADD result as prevResult (what a runtime sends)
    h, cid, ns, conf, ip = attached[0]
    chk_ns = container_netns()
    rc, result = _runtime_call(h, "ADD", cid + "-chk", chk_ns, conf, cni_path)
    rc, out = _runtime_call(h, "CHECK", cid + "-chk", chk_ns, dict(conf, prevResult=result), cni_path)
    assert rc == 0 and out is None
    _runtime_call(h, "DEL", cid + "-chk", chk_ns, conf, cni_path)

    # DEL: veth and address gone, saved config removed; a second DEL succeeds
    for h, cid, ns, conf, ip in attached:
        ipam_dir = h.tmpdir / "cni-ipam" / conf["name"]
        assert (ipam_dir / str(ip)).exists()
        rc, out = _runtime_call(h, "DEL", cid, ns, conf, cni_path)
        assert rc == 0
        assert not (ipam_dir / str(ip)).exists()  # host-local released the address
        assert not (h.tmpdir / "cni-flannel" / cid).exists()
        links = subprocess.run(["ip", "-n", ns, "-j", "link", "show"], capture_output=True, text=True).stdout
        assert "eth0" not in links
        assert json.loads(h.run(["ip", "-j", "link", "show", "master", "cni0"]).stdout or "[]") == []  # veth gone
        rc, out = _runtime_call(h, "DEL", cid, ns, conf, cni_path)
        assert (rc, out) == (0, None)
    # a DEL from a runtime whose container namespace is already gone also succeeds
    h, cid, ns, conf, ip = attached[1]
    p = h.run([str(_plugin_dir(tmp_path) / "flannel")], check=False, input=json.dumps(conf),
              env={"CNI_COMMAND": "DEL", "CNI_CONTAINERID": cid, "CNI_IFNAME": "eth0", "CNI_PATH": cni_path})
    assert p.returncode == 0, p.stdout


@pytest.mark.netns
@pytest.mark.etcd
def test_cni_error_when_daemon_has_not_written_subnet_env(make_testbed, container_netns, cni_ready, tmp_path):
    tb = make_testbed(1)  # no daemon: no subnet.env
    h = tb.hosts[0]
    conf = {"cniVersion": "1.0.0", "name": "fastflannel", "type": "flannel", "subnetFile": str(h.subnet_file),
            "dataDir": str(h.tmpdir / "cni-flannel")}
    rc, err = _runtime_call(h, "ADD", "cid-x", container_netns(), conf, f"{_plugin_dir(tmp_path)}:{DEBIAN_CNI_DIR}",
                            check=False)
    assert rc == 1
    assert err == {"cniVersion": "1.0.0", "code": 999,
                   "msg": f"loadFlannelSubnetEnv failed: open {h.subnet_file}: no such file or directory"}
    rc, out = _runtime_call(h, "VERSION", "cid-x", "unused", {"cniVersion": "1.0.0", "type": "flannel"},
                            f"{_plugin_dir(tmp_path)}:{DEBIAN_CNI_DIR}")
    assert out["supportedVersions"][-1] == "1.0.0"


@pytest.mark.netns
@pytest.mark.etcd
def test_cni_dual_stack_hands_out_both_families(make_testbed, container_netns, cni_ready, tmp_path):
    """EnableIPv6 (issue 15): ADD gives each container an address of both lease subnets and a route for both
    Networks, as Flannel's plugin does (ranges for both, routes for both); ping -6 crosses host-gw."""
    from ipaddress import IPv6Interface, IPv6Network

    from waiting import wait_for

    tb = make_testbed(2, underlay6="fd00:168::/64")
    tb.put_config({"Network": "100.96.0.0/16", "EnableIPv6": True, "IPv6Network": "fc00::/48",
                   "Backend": {"Type": "host-gw"}})
    for h in tb.hosts:
        h.start_daemon("--ip-masq")  # as the three-host test: flanneld masquerades, the bridge does not
    cni_path = f"{_plugin_dir(tmp_path)}:{DEBIAN_CNI_DIR}"
    attached = []
    for h in tb.hosts:
        senv = h.wait_subnet_env(timeout=60)
        conf = {"cniVersion": "1.0.0", "name": "fastflannel", "type": "flannel", "subnetFile": str(h.subnet_file),
                "dataDir": str(h.tmpdir / "cni-flannel"), "ipam": {"dataDir": str(h.tmpdir / "cni-ipam")}}
        ns = container_netns()
        _rc, result = _runtime_call(h, "ADD", f"cid-{ns}", ns, conf, cni_path)
        addrs = [a["address"] for a in result["ips"]]
        v4 = [IPv4Interface(a) for a in addrs if ":" not in a]
        v6 = [IPv6Interface(a) for a in addrs if ":" in a]
        assert len(v4) == 1 and v4[0].network == IPv4Network(senv["FLANNEL_SUBNET"], strict=False)
        assert len(v6) == 1 and v6[0].network == IPv6Network(senv["FLANNEL_IPV6_SUBNET"], strict=False)
        routes6 = subprocess.run(["ip", "-n", ns, "-6", "route"], capture_output=True, text=True, check=True).stdout
        assert "fc00::/48 via" in routes6
        attached.append((ns, v4[0].ip, v6[0].ip))

    def ping(src_ns, dst):
        return subprocess.run(["ip", "netns", "exec", src_ns, "ping", "-c", "1", "-W", "2", str(dst)],
                              capture_output=True, timeout=10).returncode == 0

    (a_ns, a4, a6), (b_ns, b4, b6) = attached
    for src, dst in ((a_ns, b4), (a_ns, b6), (b_ns, a4), (b_ns, a6)):
        wait_for(lambda: ping(src, dst), timeout=30, what=f"{src} -> {dst}")
