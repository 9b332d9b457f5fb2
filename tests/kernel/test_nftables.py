# SPDX-License-Identifier: Apache-2.0
"""nftables mode: Flannel's tables, chains and rules exactly once after repeated applies, resync after drift,
removal of the other mode's objects, and masquerade on the wire - all inside fresh namespaces."""
from __future__ import annotations

import shutil
import threading
import time
from ipaddress import IPv4Network, IPv6Network

import pytest
from fakes import Rig, netns_marks, nsexec, rig  # noqa: F401

from fastflannel.kernel import nftables
from fastflannel.kernel.iptables import TrafficManager, removal_payload, remove_iptables_objects
from fastflannel.kernel.nftables import NftTrafficManager, build_script, delete_tables

NET = IPv4Network("10.5.0.0/16")
POD = IPv4Network("10.5.52.0/24")
needs_nft = pytest.mark.skipif(shutil.which("nft") is None, reason="needs nft (Debian nftables)")

# What `nft list ruleset` prints for Flannel's objects (nft 1.0.x), written from flannel's trafficmngr/nftables.
EXPECTED_V4 = """table ip flannel-ipv4 {
	comment "rules for flannel-ipv4"
	chain postrtg {
		comment "chain to manage traffic masquerading by flannel"
		type nat hook postrouting priority srcnat; policy accept;
		meta mark 0x00004000 return
		ip saddr 10.5.52.0/24 ip daddr 10.5.0.0/16 return
		ip saddr 10.5.0.0/16 ip daddr 10.5.52.0/24 return
		ip saddr != 10.5.0.0/16 ip daddr 10.5.52.0/24 return
		ip saddr 10.5.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random
		ip saddr != 10.5.0.0/16 ip daddr 10.5.0.0/16 masquerade fully-random
	}

	chain forward {
		comment "chain to accept flannel traffic"
		type filter hook forward priority filter; policy accept;
		ip saddr 10.5.0.0/16 accept
		ip daddr 10.5.0.0/16 accept
	}
}
table ip6 flannel-ipv6 {
	comment "rules for flannel-ipv6"
}
"""


def ruleset(ns: str) -> str:
    return nsexec(ns, "nft", "list", "ruleset")


def test_script_is_family_parametrized():
    v6 = build_script([(NET, POD), (IPv6Network("fc00::/48"), IPv6Network("fc00:0:0:5::/64"))], True, True, False)
    assert "add rule ip6 flannel-ipv6 postrtg ip6 saddr fc00::/48 ip6 daddr != ff00::/8 masquerade\n" in v6
    assert "add rule ip6 flannel-ipv6 forward ip6 daddr fc00::/48 accept\n" in v6
    assert "fully-random" not in v6
    with pytest.raises(ValueError, match="different address families"):
        build_script([(NET, IPv6Network("fc00::/64"))], True, True, True)
    with pytest.raises(ValueError, match="one .Network, subnet. per family"):
        build_script([(NET, POD), (NET, POD)], True, True, True)


def test_ipv6_only_has_no_ipv4_chains():
    tm = NftTrafficManager([(None, None), (IPv6Network("fc00::/48"), IPv6Network("fc00:0:0:5::/64"))], masq=True,
                           forward=True, random_fully=True)
    script = tm.script()
    assert "add chain ip6 flannel-ipv6 postrtg" in script and "add chain ip flannel-ipv4" not in script
    assert 'add table ip flannel-ipv4 { comment "rules for flannel-ipv4" ; }' in script


def test_removal_payload_removes_jumps_and_chains():
    saved = {"nat": {"POSTROUTING": ['POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG',
                                     "POSTROUTING -j DOCKER"], "FLANNEL-POSTRTG": ["FLANNEL-POSTRTG -j RETURN"]},
             "filter": {"FORWARD": ["FORWARD -j ACCEPT"]}}
    assert removal_payload(saved) == ('*nat\n-D POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG\n'
                                      "-F FLANNEL-POSTRTG\n-X FLANNEL-POSTRTG\nCOMMIT\n")
    assert removal_payload({"nat": {"POSTROUTING": []}, "filter": {}}) == ""


@needs_nft
@netns_marks
def test_apply_three_times_exact_once(rig):
    ns = rig.netns("n")
    tm = NftTrafficManager([(NET, POD)], masq=True, forward=True, netns=ns)
    assert tm.random_fully  # this kernel accepts fully-random
    assert not tm.check()
    for _ in range(3):
        tm.apply()
    assert ruleset(ns) == EXPECTED_V4
    assert tm.check()
    # a new manager (a restart) with another lease: still one copy, the old subnet gone
    NftTrafficManager([(NET, IPv4Network("10.5.9.0/24"))], masq=True, forward=True, netns=ns).apply()
    out = ruleset(ns)
    assert "10.5.52.0" not in out and out.count("meta mark") == 1 and out.count("10.5.9.0/24") == 3
    # masquerade off: the postrtg chain goes, forward stays
    NftTrafficManager([(NET, POD)], masq=False, forward=True, netns=ns).apply()
    out = ruleset(ns)
    assert "postrtg" not in out and "chain forward" in out


@needs_nft
@netns_marks
def test_resync_restores_flushed_chain(rig):
    ns = rig.netns("n")
    tm = NftTrafficManager([(NET, POD)], masq=True, forward=True, resync_s=0.2, netns=ns)
    tm.apply()
    nsexec(ns, "nft", "flush", "chain", "ip", "flannel-ipv4", "postrtg")
    nsexec(ns, "nft", "delete", "table", "ip6", "flannel-ipv6")
    assert not tm.check()
    stop = threading.Event()
    t = threading.Thread(target=tm.run, args=(stop,))
    t.start()
    try:
        deadline = time.monotonic() + 10  # liveness bound only
        while time.monotonic() < deadline and not tm.check():
            time.sleep(0.1)
    finally:
        stop.set()
        t.join(5)
    assert ruleset(ns) == EXPECTED_V4


@needs_nft
@netns_marks
def test_mode_switch_removes_the_other_modes_objects(rig):
    ns = rig.netns("n")
    TrafficManager(network=NET, subnet=POD, masq=True, forward=True, netns=ns).apply()
    nsexec(ns, "iptables", "-t", "nat", "-A", "POSTROUTING", "-j", "RETURN")  # not ours: must stay
    remove_iptables_objects(netns=ns)
    nat, filt = nsexec(ns, "iptables-save", "-t", "nat"), nsexec(ns, "iptables-save", "-t", "filter")
    assert "FLANNEL" not in nat + filt and "-A POSTROUTING -j RETURN" in nat
    remove_iptables_objects(netns=ns)  # nothing left to remove: no error
    NftTrafficManager([(NET, POD)], masq=True, forward=True, netns=ns).apply()
    assert delete_tables(netns=ns)
    assert "flannel" not in ruleset(ns)
    assert delete_tables(netns=ns)  # absent tables: still fine


@needs_nft
@netns_marks
def test_masquerade_on_the_wire(rig):
    a, b = rig.pair("10.168.0.2/24", "10.168.0.3/24")  # b has no route back to the pod network
    Rig.pod_bridge(a, "10.5.52.1/24")
    ping = ["ping", "-c", "1", "-W", "1", "-I", "10.5.52.1", "10.168.0.3"]
    assert "1 received" not in nsexec(a, *ping, check=False)
    NftTrafficManager([(NET, POD)], masq=True, forward=False, netns=a).apply()
    assert "1 received" in nsexec(a, *ping)  # b answered 10.168.0.2: the source was masqueraded


def test_missing_nft_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(nftables.TrafficError, match="install nftables or set EnableNFTables to false"):
        nftables.Nft().run(["list", "tables"])
    assert delete_tables() is False


@needs_nft
@netns_marks
def test_dual_stack_programs_flannel_ipv6(rig):
    ns = rig.netns("n")
    net6, pod6 = IPv6Network("fc00::/48"), IPv6Network("fc00:0:0:5::/64")
    NftTrafficManager([(NET, POD), (net6, pod6)], masq=True, forward=True, netns=ns).apply()
    out = nsexec(ns, "nft", "list", "table", "ip6", "flannel-ipv6")
    rules = [ln.strip() for ln in out.splitlines() if ln.strip().startswith(("meta", "ip6"))]
    assert rules == [
        "meta mark 0x00004000 return",
        "ip6 saddr fc00:0:0:5::/64 ip6 daddr fc00::/48 return",
        "ip6 saddr fc00::/48 ip6 daddr fc00:0:0:5::/64 return",
        "ip6 saddr != fc00::/48 ip6 daddr fc00:0:0:5::/64 return",
        "ip6 saddr fc00::/48 ip6 daddr != ff00::/8 masquerade fully-random",
        "ip6 saddr != fc00::/48 ip6 daddr fc00::/48 masquerade fully-random",
        "ip6 saddr fc00::/48 accept",
        "ip6 daddr fc00::/48 accept",
    ], out
    assert "type nat hook postrouting priority srcnat" in out and "type filter hook forward priority filter" in out
    assert ruleset(ns).startswith(EXPECTED_V4.split("table ip6")[0])  # the IPv4 table unchanged
