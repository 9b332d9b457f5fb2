# SPDX-License-Identifier: Apache-2.0
"""iptables masquerade/forward rules: exact order, idempotent apply, previous-subnet cleanup, resync, and a
masquerade-on-the-wire check - all inside fresh namespaces."""
from __future__ import annotations

import shutil
import threading
import time
from ipaddress import IPv4Network

import pytest
from fakes import Rig, ipn, netns_marks, nsexec, rig  # noqa: F401

from fastflannel.kernel.iptables import TrafficManager, forward_rules, masq_rules, parse_save

NET = IPv4Network("10.5.0.0/16")
POD = IPv4Network("10.5.52.0/24")
needs_iptables = pytest.mark.skipif(shutil.which("iptables-restore") is None, reason="needs iptables")

EXPECTED_NAT = [
    '-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG',
    '-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment "flanneld masq" -j RETURN',
    '-A FLANNEL-POSTRTG -s 10.5.52.0/24 -d 10.5.0.0/16 -m comment --comment "flanneld masq" -j RETURN',
    '-A FLANNEL-POSTRTG -s 10.5.0.0/16 -d 10.5.52.0/24 -m comment --comment "flanneld masq" -j RETURN',
    '-A FLANNEL-POSTRTG ! -s 10.5.0.0/16 -d 10.5.52.0/24 -m comment --comment "flanneld masq" -j RETURN',
    '-A FLANNEL-POSTRTG -s 10.5.0.0/16 ! -d 224.0.0.0/4 -m comment --comment "flanneld masq" -j MASQUERADE --random-fully',
    '-A FLANNEL-POSTRTG ! -s 10.5.0.0/16 -d 10.5.0.0/16 -m comment --comment "flanneld masq" -j MASQUERADE --random-fully',
]
EXPECTED_FILTER = [
    '-A FORWARD -m comment --comment "flanneld forward" -j FLANNEL-FWD',
    '-A FLANNEL-FWD -s 10.5.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT',
    '-A FLANNEL-FWD -d 10.5.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT',
]


def _rules(ns: str, table: str) -> list:
    return [line for line in nsexec(ns, "iptables-save", "-t", table).splitlines() if line.startswith("-A ")]


def test_rule_text_matches_iptables_save_format():
    assert ["-A " + r.text() for r in masq_rules(NET, POD, True)] == EXPECTED_NAT
    assert ["-A " + r.text() for r in forward_rules(NET)] == EXPECTED_FILTER
    assert "--random-fully" not in " ".join(r.text() for r in masq_rules(NET, POD, False))
    saved = parse_save("*nat\n:POSTROUTING ACCEPT [0:0]\n:X - [0:0]\n" + "\n".join(EXPECTED_NAT) + "\nCOMMIT\n")
    assert saved["nat"]["X"] == [] and len(saved["nat"]["FLANNEL-POSTRTG"]) == 6


@needs_iptables
@netns_marks
def test_apply_three_times_exact_once_in_order(rig):
    ns = rig.netns("i")
    tm = TrafficManager(network=NET, subnet=POD, masq=True, forward=True, resync_s=5.0, netns=ns)
    assert tm.random_fully  # iptables >= 1.6.2 here
    assert not tm.check()
    for _ in range(3):
        tm.apply()
    assert _rules(ns, "nat") == EXPECTED_NAT
    assert _rules(ns, "filter") == EXPECTED_FILTER
    assert tm.check()


@needs_iptables
@netns_marks
def test_previous_subnet_rules_removed(rig):
    ns = rig.netns("i")
    old_net, old_pod = IPv4Network("10.9.0.0/16"), IPv4Network("10.9.7.0/24")
    TrafficManager(network=old_net, subnet=old_pod, masq=True, forward=True, netns=ns).apply()
    tm = TrafficManager(network=NET, subnet=POD, masq=True, forward=True, prev_network=old_net,
                        prev_subnet=old_pod, netns=ns)
    tm.apply()
    assert _rules(ns, "nat") == EXPECTED_NAT and _rules(ns, "filter") == EXPECTED_FILTER
    # masquerade turned off now: the previous masq rules (jump included) still go
    TrafficManager(network=old_net, subnet=old_pod, masq=True, forward=False, netns=ns).apply()
    TrafficManager(network=NET, subnet=POD, masq=False, forward=True, prev_network=old_net,
                   prev_subnet=old_pod, netns=ns).apply()
    assert not any("10.9." in line or "POSTROUTING" in line for line in _rules(ns, "nat"))


@needs_iptables
@netns_marks
def test_resync_restores_deleted_rule(rig):
    ns = rig.netns("i")
    tm = TrafficManager(network=NET, subnet=POD, masq=True, forward=True, resync_s=0.2, netns=ns)
    tm.apply()
    nsexec(ns, "iptables", "-t", "nat", "-D", "FLANNEL-POSTRTG", "-m", "mark", "--mark", "0x4000/0x4000",
           "-m", "comment", "--comment", "flanneld masq", "-j", "RETURN")
    nsexec(ns, "iptables", "-t", "filter", "-D", "FORWARD", "-m", "comment", "--comment", "flanneld forward",
           "-j", "FLANNEL-FWD")
    assert not tm.check()
    stop = threading.Event()
    t = threading.Thread(target=tm.run, args=(stop,))
    t.start()
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not tm.check():
            time.sleep(0.1)
    finally:
        stop.set()
        t.join(5)
    assert _rules(ns, "nat") == EXPECTED_NAT and _rules(ns, "filter") == EXPECTED_FILTER


@needs_iptables
@netns_marks
def test_masquerade_on_the_wire(rig):
    a, b = rig.pair("10.168.0.2/24", "10.168.0.3/24")  # b has no route back to the pod network
    Rig.pod_bridge(a, "10.5.52.1/24")
    ping = ["ping", "-c", "1", "-W", "1", "-I", "10.5.52.1", "10.168.0.3"]
    assert "1 received" not in nsexec(a, *ping, check=False)
    TrafficManager(network=NET, subnet=POD, masq=True, forward=False, netns=a).apply()
    assert "1 received" in nsexec(a, *ping)  # b answered 10.168.0.2: the source was masqueraded
