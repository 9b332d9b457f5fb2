# SPDX-License-Identifier: Apache-2.0
"""fastflannel.kernel.drops: the kernel-side drop counters the udp backend exports (loopback only)."""
from __future__ import annotations

import socket

from fastflannel.kernel.drops import link_drops, parse_proc_net_dev, socket_drops

PROC_NET_DEV = """Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo: 1281382808 3151964    0    0    0     0          0         0 1281382808 3151964    0    0    0     0       0          0
flannel0: 1000 10 0 2 0 0 0 0 2000 20 0 7 0 0 0 0
"""


def test_parse_proc_net_dev_columns() -> None:
    d = parse_proc_net_dev(PROC_NET_DEV)
    assert d["flannel0"] == {"rx_packets": 10, "rx_dropped": 2, "tx_packets": 20, "tx_dropped": 7}
    assert d["lo"]["rx_packets"] == 3151964
    assert parse_proc_net_dev("header\nheader\ngarbage line\n") == {}


def test_link_drops_reads_this_namespace(tmp_path) -> None:
    p = tmp_path / "dev"
    p.write_text(PROC_NET_DEV)
    assert link_drops("flannel0", str(p))["tx_dropped"] == 7
    assert link_drops("nosuch0", str(p)) is None
    assert link_drops("lo", str(tmp_path / "missing")) is None
    assert link_drops("lo") is not None  # the real file: lo exists in every namespace


def test_socket_drops_counts_receive_buffer_overflow() -> None:
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the kernel doubles it; a few datagrams fit
        rx.bind(("127.0.0.1", 0))
        assert socket_drops(rx) == 0
        for _ in range(500):
            tx.sendto(b"x" * 512, rx.getsockname())
        rx.setblocking(False)
        queued = 0
        while True:
            try:
                rx.recv(2048)
                queued += 1
            except BlockingIOError:
                break
        assert queued + socket_drops(rx) == 500  # every datagram either queued or counted as dropped
        assert socket_drops(rx) > 0
    finally:
        rx.close()
        tx.close()
