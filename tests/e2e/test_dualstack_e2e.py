# SPDX-License-Identifier: Apache-2.0
"""Dual stack end to end (issue 15): three fastflanneld hosts on a dual-stack underlay, per backend one world.

In each world (vxlan, then host-gw):
- a fourth host ``o1`` configured by hand with ``ip`` exactly as flanneld configures a dual-stack host (vxlan: both
  ``flannel.1`` and ``flannel-v6.1``; host-gw: both families' routes), announced by a lease in flanneld's JSON;
- a fifth host ``o2`` with a v4-only lease (the mixed cluster), configured the same way for IPv4 only;
- ping and ``ping -6`` between the containers of every pair of dual-stack hosts; ``o2`` over IPv4 both ways;
- a bulk TCP transfer over IPv6 with equal sha256;
- keys, lease JSON and subnet.env byte for byte as Flannel writes them (expected values built here by hand);
- ip6tables masquerade rules on the host started with ``--ip-masq``;
- kill -9 and restart keep both subnets (and, for vxlan, both VTEP MACs); a deleted flannel-v6.1 comes back;
- a lease deleted in etcd removes that peer's entries of both families on every host.
"""
from __future__ import annotations

import base64
import json
import signal
from ipaddress import IPv4Interface, IPv4Network, IPv6Interface, IPv6Network

import pytest

import flanneld_by_hand as flanneld
import waiting
from peer_transfer import tcp_transfer

pytestmark = [pytest.mark.netns, pytest.mark.etcd]

NET4, NET6 = IPv4Network("10.5.0.0/16"), IPv6Network("fc00::/48")
UNDERLAY6 = "fd00:168::/64"
# the hand-configured hosts' leases, written before the daemons start (so allocation avoids them)
MANUAL = {"o1": (IPv4Network("10.5.250.0/24"), IPv6Network("fc00:0:0:fa::/64"), "0a:58:0a:05:fa:00", "0e:58:0a:05:fa:06"),
          "o2": (IPv4Network("10.5.251.0/24"), None, "0a:58:0a:05:fb:00", None)}


def ipj(node, *args: str, tool: str = "ip"):
    return json.loads(node.run([tool, "-j", *args]).stdout or "[]")


def stored(tb) -> dict:
    """Return {key name under subnets/: value text} as etcd holds them (etcdctl, an independent client)."""
    out = tb.etcdctl("get", "--prefix", f"{tb.prefix_key}/subnets/", "-w", "json")
    return {base64.b64decode(kv["key"]).decode().rsplit("/", 1)[1]: base64.b64decode(kv["value"]).decode()
            for kv in json.loads(out).get("kvs", [])}


def key_of(v4, v6) -> str:
    return f"{v4.network_address}-{v4.prefixlen}" + (f"&{v6.network_address.compressed}-{v6.prefixlen}" if v6 else "")


def flannel_json(backend: str, ip, ip6, mac4: str, mac6) -> str:
    """flanneld's lease value: Go json.Marshal of LeaseAttrs (field order, no spaces, PublicIPv6 null if absent)."""
    pub6 = f'"{ip6}"' if ip6 else "null"
    if backend == "host-gw":
        return f'{{"PublicIP":"{ip}","PublicIPv6":{pub6},"BackendType":"host-gw"}}'
    v6 = f',"BackendV6Data":{{"VNI":1,"VtepMAC":"{mac6}"}}' if mac6 else ""
    return f'{{"PublicIP":"{ip}","PublicIPv6":{pub6},"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{mac4}"}}{v6}}}'


def flannel_subnet_env(v4, v6, mtu: int, masq: bool) -> str:
    """flanneld's WriteSubnetFile output for a dual-stack lease (v6 None: an IPv4-only one)."""
    text = f"FLANNEL_NETWORK={NET4}\nFLANNEL_SUBNET={v4.network_address + 1}/{v4.prefixlen}\n"
    if v6 is not None:
        text += f"FLANNEL_IPV6_NETWORK={NET6}\nFLANNEL_IPV6_SUBNET={v6.network_address + 1}/{v6.prefixlen}\n"
    return text + f"FLANNEL_MTU={mtu}\nFLANNEL_IPMASQ={'true' if masq else 'false'}\n"


def mac(node, dev: str) -> str:
    return ipj(node, "link", "show", "dev", dev)[0]["address"]


def announce(tb, o, backend: str) -> None:
    """Write ``o``'s lease as flanneld does: its JSON under its key, bound to a fresh 24 h etcd lease."""
    v4, v6, m4, m6 = MANUAL[o.name]
    lease_id = tb.etcdctl("lease", "grant", "86400").split()[1]
    value = flannel_json(backend, o.ip, o.ip6 if v6 else None, m4, m6 if v6 else None)
    tb.etcdctl("put", f"--lease={lease_id}", f"{tb.prefix_key}/subnets/{key_of(v4, v6)}", value)


def configure_by_hand(o, backend: str, peers) -> None:
    """Program host ``o`` with plain iproute2 exactly as flanneld does (flannel-compat.md sections 5 and 6)."""
    v4, v6, m4, m6 = MANUAL[o.name]
    run = lambda argv: o.run(argv)  # noqa: E731
    if backend == "vxlan":
        flanneld.vxlan_device(run, dev="flannel.1", mac=m4, local=o.ip, addr=v4.network_address, mtu=1450)
        if v6 is not None:
            flanneld.vxlan_device(run, dev="flannel-v6.1", mac=m6, local=o.ip6, addr=v6.network_address, mtu=1430)
    for pv4, pv6, pip, pip6, pm4, pm6 in peers:  # every fastflannel host
        fams = [("flannel.1", pv4, pip, pm4)] + ([("flannel-v6.1", pv6, pip6, pm6)] if v6 is not None else [])
        for dev, sub, pub, pmac in fams:
            if backend == "vxlan":
                flanneld.vxlan_peer(run, dev=dev, subnet=sub, public_ip=pub, mac=pmac)
            else:
                flanneld.hostgw_peer(run, subnet=sub, public_ip=pub)
    mtu = 1450 if backend == "vxlan" else 1500
    o.subnet_file.write_text(flannel_subnet_env(v4, v6, mtu, False))


def routes_to(node, subnet) -> list:
    fam = "-6" if subnet.version == 6 else "-4"
    return ipj(node, fam, "route", "show", "table", "main", "match", str(subnet), "exact", str(subnet))


@pytest.mark.parametrize("backend", ["vxlan", "host-gw"])
def test_dual_stack_world(make_testbed, backend):
    tb = make_testbed(3, underlay6=UNDERLAY6)
    tb.put_config({"Network": str(NET4), "EnableIPv6": True, "IPv6Network": str(NET6), "Backend": {"Type": backend}})
    o1, o2 = tb.add_outside_host("o1"), tb.add_outside_host("o2")
    for o in (o1, o2):
        announce(tb, o, backend)
    h1, h2, h3 = tb.hosts
    for h in tb.hosts:
        h.start_daemon(*(["--ip-masq"] if h is h1 else []))
    envs = {h.name: h.wait_subnet_env() for h in tb.hosts}

    # -- keys, JSON and subnet.env byte for byte ----------------------------------------------------------------
    kv = stored(tb)
    peers = []
    mtu = 1450 if backend == "vxlan" else 1500
    for h in tb.hosts:
        v4 = IPv4Interface(envs[h.name]["FLANNEL_SUBNET"]).network
        v6 = IPv6Interface(envs[h.name]["FLANNEL_IPV6_SUBNET"]).network
        assert v4.subnet_of(NET4) and v4.prefixlen == 24 and v6.subnet_of(NET6) and v6.prefixlen == 64
        m4 = mac(h, "flannel.1") if backend == "vxlan" else ""
        m6 = mac(h, "flannel-v6.1") if backend == "vxlan" else ""
        assert kv[key_of(v4, v6)] == flannel_json(backend, h.ip, h.ip6, m4, m6)
        assert h.subnet_file.read_text() == flannel_subnet_env(v4, v6, mtu, h is h1)
        peers.append((v4, v6, h.ip, h.ip6, m4, m6))
        if backend == "vxlan":
            v6dev = ipj(h, "-d", "link", "show", "dev", "flannel-v6.1")[0]
            assert v6dev["mtu"] == 1430 and v6dev["linkinfo"]["info_data"].get("local6") == str(h.ip6)
    assert len(kv) == 5  # three fastflannel leases and the two hand-written ones, nothing else
    nat6 = h1.run(["ip6tables-save", "-t", "nat"]).stdout
    assert f'-A FLANNEL-POSTRTG -s {NET6} ! -d ff00::/8 -m comment --comment "flanneld masq" -j MASQUERADE' in nat6

    # -- the hand-configured flanneld hosts and every container ---------------------------------------------------
    for o in (o1, o2):
        configure_by_hand(o, backend, peers)
    ctrs = {n.name: n.add_container() for n in (*tb.hosts, o1, o2)}
    dual = [ctrs[n] for n in ("h1", "h2", "h3", "o1")]

    def ping(a, ip) -> bool:
        return waiting.wait_for(lambda: a.ping(ip, count=1, timeout=3), 15, 0.2, f"{a.name} -> {ip}")

    for a in dual:
        for b in dual:
            if a is not b:
                assert ping(a, b.ip) and ping(a, b.ip6)
    c_o2 = ctrs["o2"]
    assert c_o2.ip6 is None
    for h in tb.hosts:  # the v4-only host and the dual-stack ones reach each other over IPv4
        assert ping(c_o2, ctrs[h.name].ip) and ping(ctrs[h.name], c_o2.ip)
        # ... and the dual-stack hosts have IPv6 routes for the dual-stack peers only (none for o2, none extra)
        overlay6 = [r for r in ipj(h, "-6", "route", "show", "table", "main")
                    if "/" in r.get("dst", "") and IPv6Network(r["dst"]).subnet_of(NET6) and r.get("gateway")]
        assert len(overlay6) == 3, overlay6

    # -- bulk TCP over IPv6 ------------------------------------------------------------------------------------
    for src, dst in ((ctrs["h1"], ctrs["h3"]), (ctrs["h2"], ctrs["o1"])):
        r = tcp_transfer(src, dst, dst.ip6, size=8 << 20)
        assert r["recv"] == r["sent"] and r["sent"][0] == 8 << 20
        assert r["peer"] == str(src.ip6)  # no masquerade inside the overlay

    # -- kill -9 and restart keep both subnets (and both VTEP MACs) --------------------------------------------
    before_kv, before_env = stored(tb), h2.subnet_file.read_text()
    before_macs = (mac(h2, "flannel.1"), mac(h2, "flannel-v6.1")) if backend == "vxlan" else ()
    h2.stop_daemon(signal.SIGKILL)
    h2.start_daemon()
    waiting.wait_for(lambda: h2.daemon_log_text().count("event=subnet_file_written") == 2, 30, 0.2,
                     "h2 restarted and ready")
    assert stored(tb) == before_kv and h2.subnet_file.read_text() == before_env
    if backend == "vxlan":
        assert (mac(h2, "flannel.1"), mac(h2, "flannel-v6.1")) == before_macs
    assert ping(ctrs["h1"], ctrs["h2"].ip6) and ping(ctrs["h2"], ctrs["o1"].ip6) and ping(ctrs["h2"], ctrs["h3"].ip)

    # -- vxlan: a deleted flannel-v6.1 comes back at once (link watcher) with its MAC, and IPv6 flows again -------
    if backend == "vxlan":
        mac6 = mac(h1, "flannel-v6.1")
        h1.run(["ip", "link", "del", "flannel-v6.1"])
        waiting.wait_for(lambda: h1.run(["ip", "link", "show", "dev", "flannel-v6.1"], check=False).returncode == 0,
                         10, 0.1, "flannel-v6.1 re-created on h1")
        assert mac(h1, "flannel-v6.1") == mac6
        assert ping(ctrs["h1"], ctrs["h3"].ip6) and ping(ctrs["o1"], ctrs["h1"].ip6)

    # -- a lease deleted in etcd: that peer's entries of both families go everywhere ----------------------------
    h3.stop_daemon()  # SIGTERM: its kernel state and lease stay (Flannel's shutdown); then the lease is deleted
    gone = [peers[2][:2], MANUAL["o1"][:2]]
    macs_gone = {peers[2][4], peers[2][5], MANUAL["o1"][2], MANUAL["o1"][3]}
    for v4, v6 in gone:
        tb.etcdctl("del", f"{tb.prefix_key}/subnets/{key_of(v4, v6)}")
    for h in (h1, h2):
        for v4, v6 in gone:
            waiting.wait_for(lambda: not routes_to(h, v4) and not routes_to(h, v6), 10, 0.2,
                             f"{h.name}: routes to {v4} and {v6} removed")
        if backend == "vxlan":
            for dev in ("flannel.1", "flannel-v6.1"):
                left = {n.get("lladdr") for n in ipj(h, "neigh", "show", "dev", dev)} | \
                       {f["mac"] for f in ipj(h, "fdb", "show", "dev", dev, tool="bridge")}
                assert not left & macs_gone, (h.name, dev, left & macs_gone)
    assert ping(ctrs["h1"], ctrs["h2"].ip6) and ping(ctrs["h2"], ctrs["h1"].ip6)  # the rest keeps working
    assert h1.daemon.poll() is None and h2.daemon.poll() is None  # the daemons that ran the whole time are up
