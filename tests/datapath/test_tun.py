# SPDX-License-Identifier: Apache-2.0
"""Test open_tun on a real TUN device, and the fast path over it, inside a fresh namespace (tier 2, marker netns).

Every packet stays inside the namespace the test makes (fresh_netns deletes it on every exit path). The test
thread enters it with setns(2) only around fd creation and returns to its own namespace in a finally block;
fds keep the namespace they were made in.
"""
from __future__ import annotations

import ctypes
import errno
import os
import socket
import subprocess
import time
from contextlib import contextmanager
from ipaddress import IPv4Address, IPv4Network
from typing import Iterator

import pytest
from impls import IMPLS
from netns_enter import in_netns, ip
from packets import ipv4_packet

from fastflannel.datapath.fastpath import FastPath, FastPathOptions
from fastflannel.kernel.tun import TunError, open_tun

pytestmark = pytest.mark.netns

def test_open_tun_errors_name_the_device() -> None:
    with pytest.raises(ValueError, match="invalid TUN device name"):
        open_tun("x" * 16)


def test_open_tun_in_netns(fresh_netns: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    with in_netns(fresh_netns):
        fd, name = open_tun("fftun%d")
    try:
        assert name.startswith("fftun")
        assert not os.get_blocking(fd)
        assert fcntl_cloexec(fd)
        with in_netns(fresh_netns):
            with pytest.raises(TunError) as ei:  # the name is taken by an attached TUN
                open_tun(name)
        assert ei.value.errno == errno.EBUSY and name in str(ei.value)
        ip(fresh_netns, "addr", "add", "10.244.1.0/32", "dev", name)
        ip(fresh_netns, "link", "set", name, "up", "mtu", "1472")
        ip(fresh_netns, "route", "add", "10.244.0.0/16", "dev", name)
        with in_netns(fresh_netns):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.sendto(b"hello", ("10.244.2.7", 9999))  # routed into our TUN, inside our namespace
            pkt = read_packet(fd)
            assert pkt[0] >> 4 == 4 and pkt[9] == 17 and pkt[16:20] == IPv4Address("10.244.2.7").packed
            assert pkt.endswith(b"hello")
        finally:
            s.close()
    finally:
        os.close(fd)  # destroys the device


def fcntl_cloexec(fd: int) -> bool:
    import fcntl

    return bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)


def read_packet(fd: int, timeout: float = 10.0) -> bytes:  # liveness bound only
    deadline = time.monotonic() + timeout
    while True:
        try:
            pkt = os.read(fd, 65536)
        except BlockingIOError:
            assert time.monotonic() < deadline, "no packet on the TUN"
            time.sleep(0.005)
            continue
        if pkt[0] >> 4 == 4:  # skip IPv6 router solicitations and the like
            return pkt


@pytest.mark.parametrize("impl", IMPLS)
def test_fastpath_over_real_tun(fresh_netns: str, impl: str) -> None:
    """A datagram routed into the TUN leaves as UDP to the peer; a peer datagram reaches a local socket."""
    with in_netns(fresh_netns):
        fd, name = open_tun("fftun0")
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        app = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    fp = None
    try:
        ip(fresh_netns, "addr", "add", "10.244.1.0/32", "dev", name)
        ip(fresh_netns, "addr", "add", "10.244.1.1/24", "dev", "lo")  # stands in for the docker bridge address
        ip(fresh_netns, "link", "set", name, "up", "mtu", "1472")
        ip(fresh_netns, "route", "add", "10.244.0.0/16", "dev", name)
        udp.bind(("127.0.0.1", 0))
        port = udp.getsockname()[1]
        peer.bind(("127.0.0.2", port))
        peer.settimeout(10)  # liveness bound only
        app.bind(("10.244.1.1", 7777))
        app.settimeout(10)
        fp = FastPath(fd, udp.fileno(), network=IPv4Network("10.244.0.0/16"), subnet_len=24,
                      own_subnet=IPv4Network("10.244.1.0/24"), tun_ip=IPv4Address("10.244.1.0"), mtu=1472,
                      port=port, options=FastPathOptions(implementation=impl))
        fp.set_route(IPv4Network("10.244.2.0/24"), IPv4Address("127.0.0.2"))
        fp.start()
        app.sendto(b"to-remote", ("10.244.2.7", 9999))
        data, src = peer.recvfrom(70000)
        assert src == ("127.0.0.1", port) and data.endswith(b"to-remote")
        assert data[12:16] == IPv4Address("10.244.1.1").packed
        udp_hdr = (5555).to_bytes(2, "big") + (7777).to_bytes(2, "big") + (8 + 7).to_bytes(2, "big") + b"\0\0"
        peer.sendto(ipv4_packet("10.244.2.7", "10.244.1.1", payload=udp_hdr + b"to-pod!"), ("127.0.0.1", port))
        got, frm = app.recvfrom(100)
        assert got == b"to-pod!" and frm == ("10.244.2.7", 5555)
        deadline = time.monotonic() + 20  # liveness bound only
        while fp.stats()["rx_packets"] < 1:  # counted just after the write that woke us
            assert time.monotonic() < deadline, fp.stats()
            time.sleep(0.002)
        fp.check()
        assert fp.stats()["tx_packets"] >= 1
    finally:
        if fp is not None:
            fp.close()
        for sock in (udp, peer, app):
            sock.close()
        os.close(fd)
