# SPDX-License-Identifier: Apache-2.0
"""nftables mode end to end (issue 16): vxlan, ``EnableNFTables: true`` and ``--ip-masq`` on two simulated hosts
with real fastflanneld processes and a real etcd; the kernel is read back with ``nft`` and ``iptables-save``.

One world, in the order a user would live it: iptables mode first (FLANNEL chains exist), then nftables mode
(Flannel's tables, the iptables chains gone, masquerade to the outside host, none inside the overlay, restarts
leave the tables unchanged), then back to iptables mode (the nft tables gone)."""
from __future__ import annotations

import signal
from ipaddress import IPv4Network

import pytest
from peer_transfer import tcp_transfer
from waiting import wait_for

pytestmark = [pytest.mark.netns, pytest.mark.etcd]

NETWORK = "100.96.0.0/16"
VXLAN = {"Network": NETWORK, "Backend": {"Type": "vxlan"}}
READY_S = 30.0


def start(host, *args: str) -> None:
    """(Re)start the daemon and wait until it programmed its traffic rules and wrote subnet.env."""
    host.stop_daemon()
    before = host.daemon_log_text().count("event=subnet_file_written")
    host.start_daemon(*args)
    wait_for(lambda: host.daemon_log_text().count("event=subnet_file_written") > before
             or host.daemon.poll() is not None, READY_S, what=f"daemon ready on {host.name}")
    assert host.daemon.poll() is None, host.daemon_log_text()[-3000:]


def pod(host) -> IPv4Network:
    return IPv4Network(host.read_subnet_env()["FLANNEL_SUBNET"], strict=False)


def expected_ruleset(p: IPv4Network) -> str:
    """Flannel's objects as ``nft list ruleset`` prints them (nft 1.0.x), for lease ``p``."""
    c = NETWORK
    return f"""table ip flannel-ipv4 {{
	comment "rules for flannel-ipv4"
	chain postrtg {{
		comment "chain to manage traffic masquerading by flannel"
		type nat hook postrouting priority srcnat; policy accept;
		meta mark 0x00004000 return
		ip saddr {p} ip daddr {c} return
		ip saddr {c} ip daddr {p} return
		ip saddr != {c} ip daddr {p} return
		ip saddr {c} ip daddr != 224.0.0.0/4 masquerade fully-random
		ip saddr != {c} ip daddr {c} masquerade fully-random
	}}

	chain forward {{
		comment "chain to accept flannel traffic"
		type filter hook forward priority filter; policy accept;
		ip saddr {c} accept
		ip daddr {c} accept
	}}
}}
table ip6 flannel-ipv6 {{
	comment "rules for flannel-ipv6"
}}
"""


def flannel_tables(host) -> str:
    """Return the flannel-ipv4/flannel-ipv6 part of ``nft list ruleset`` ('' when absent)."""
    out = host.run(["nft", "list", "ruleset"]).stdout
    parts = [blk for blk in ("table " + b for b in out.split("table ")[1:]) if blk.startswith(
        ("table ip flannel-ipv4 ", "table ip6 flannel-ipv6 "))]
    return "".join(parts)


def test_vxlan_nftables_mode_with_ip_masq(make_testbed):
    tb = make_testbed(2)
    h1, h2 = tb.hosts
    # 1. iptables mode first: the FLANNEL chains exist (iptables here is iptables-nft, so nft shows them too)
    tb.put_config(VXLAN)
    for h in (h1, h2):
        start(h, "--ip-masq")
    assert "FLANNEL-POSTRTG" in h1.run(["iptables-save", "-t", "nat"]).stdout
    assert "FLANNEL-FWD" in h1.run(["iptables-save", "-t", "filter"]).stdout

    # 2. nftables mode: Flannel's tables, exactly; no iptables FLANNEL chain left anywhere
    tb.put_config({**VXLAN, "EnableNFTables": True})
    for h in (h1, h2):
        start(h, "--ip-masq")
    for h in (h1, h2):
        ruleset = h.run(["nft", "list", "ruleset"]).stdout
        assert flannel_tables(h) == expected_ruleset(pod(h)), ruleset
        assert "FLANNEL" not in ruleset, ruleset
        assert "FLANNEL" not in h.run(["iptables-save"]).stdout
        assert h.read_subnet_env()["FLANNEL_IPMASQ"] == "true"

    c1, c2 = h1.add_container(), h2.add_container()
    wait_for(lambda: c1.ping(c2.ip, count=1, timeout=2), 20, what="c1 -> c2 over vxlan")
    # inside the overlay: not masqueraded, both directions
    for a, b in ((c1, c2), (c2, c1)):
        r = tcp_transfer(a, b, b.ip, size=64 << 10)
        assert r["sent"] == r["recv"] and r["peer"] == str(a.ip), r
    # to an address outside the overlay: masqueraded to the host's address
    out = tb.add_outside_host()
    r = tcp_transfer(c1, out, out.ip, size=64 << 10)
    assert r["sent"] == r["recv"] and r["peer"] == str(h1.ip), r

    # 3. restarts (clean and killed) do not duplicate or change anything
    before = flannel_tables(h1)
    start(h1, "--ip-masq")
    h1.stop_daemon(signal.SIGKILL)
    start(h1, "--ip-masq")
    assert flannel_tables(h1) == before
    r = tcp_transfer(c1, out, out.ip, size=16 << 10)
    assert r["peer"] == str(h1.ip), r

    # 4. back to iptables mode: the nft tables go, as Flannel removes them at start
    tb.put_config(VXLAN)
    for h in (h1, h2):
        start(h, "--ip-masq")
        assert flannel_tables(h) == ""
        assert "FLANNEL-POSTRTG" in h.run(["iptables-save", "-t", "nat"]).stdout
    r = tcp_transfer(c2, c1, c1.ip, size=16 << 10)
    assert r["peer"] == str(c2.ip), r
