# SPDX-License-Identifier: Apache-2.0
"""kernel/wireguard.py against a real wireguard-go in a namespace (this kernel has no WireGuard module).

The product code runs in a child Python inside ``ip netns exec <ns>`` with a private ``/var/run/wireguard`` (the UAPI
socket directory is per machine, docs/testing.md); ``wg`` (wireguard-tools, independent of our UAPI client) reads the
device back in the same mount namespace.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.netns]

if shutil.which("wireguard-go") is None or shutil.which("wg") is None:
    pytest.skip("needs wireguard-go and wireguard-tools (make system-deps)", allow_module_level=True)

CHILD = r"""
import json, os, subprocess, sys
from fastflannel.backend.wgkey import generate_private_key, public_key
from fastflannel.errors import BackendError
from fastflannel.kernel.netlink import Netlink
from fastflannel.kernel.wireguard import UserspaceDevice, WgPeer, find_wireguard_go, open_device

out = {}
priv, peer_pub, psk = generate_private_key(), public_key(generate_private_key()), generate_private_key()
with Netlink() as nl:
    dev = open_device(nl, "flannel-wg", 1420)  # probe: no module here, so wireguard-go
    out["kind"], out["mtu"] = dev.kind, nl.link_info("flannel-wg").mtu
    dev.configure(priv, 51820)
    dev.set_peer(WgPeer(peer_pub, "10.168.0.3:51820", ("100.96.2.0/24",), psk, 25))
    dev.set_peer(WgPeer(peer_pub, "10.168.0.3:51820", ("100.96.3.0/24",), psk, 25))  # replace, not add
    st = dev.state()
    out["state"] = [st.listen_port, {k: [p.endpoint, list(p.allowed_ips), p.preshared_key, p.keepalive]
                                     for k, p in st.peers.items()}]
    out["wg"] = subprocess.run(["wg", "show", "flannel-wg", "dump"], capture_output=True, text=True).stdout
    second = UserspaceDevice("flannel-wg", find_wireguard_go())
    try:
        second.start()
        out["second"] = "started"
    except BackendError as e:
        out["second"] = str(e)
    dev.remove_peer(peer_pub)
    out["after_remove"] = list(dev.state().peers)
    dev.close()
    out["gone"] = nl.link_info("flannel-wg") is None and not os.path.exists("/var/run/wireguard/flannel-wg.sock")
out["expect"] = [priv, public_key(priv), peer_pub, psk]
print(json.dumps(out))
"""


def test_wireguard_go_device_over_uapi_and_clear_error_on_a_clash(fresh_netns, tmp_path):
    run_dir = tmp_path / "wgrun"
    run_dir.mkdir()
    r = subprocess.run(
        ["ip", "netns", "exec", fresh_netns, "sh", "-c",
         'mkdir -p /var/run/wireguard && mount --bind "$0" /var/run/wireguard && exec "$@"', str(run_dir),
         sys.executable, "-c", CHILD],
        capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    priv, pub, peer_pub, psk = out["expect"]
    assert out["kind"] == "wireguard-go" and out["mtu"] == 1420
    assert out["state"] == [51820, {peer_pub: ["10.168.0.3:51820", ["100.96.3.0/24"], psk, 25]}]
    dump = [line.split("\t") for line in out["wg"].strip().splitlines()]
    assert dump[0][:3] == [priv, pub, "51820"]  # wg reads what our UAPI client wrote
    assert dump[1][:4] == [peer_pub, psk, "10.168.0.3:51820", "100.96.3.0/24"] and dump[1][7] == "25"
    assert "is in use by another wireguard-go serving flannel-wg" in out["second"], out["second"]
    assert out["after_remove"] == [] and out["gone"] is True
