# SPDX-License-Identifier: Apache-2.0
"""A FastPath on socketpairs for the data-path tests: the geometry, ``make`` and ``Rig`` (a running loop between a
SEQPACKET socketpair standing in for the TUN and UDP on 127.0.0.1, with a peer on 127.0.0.2)."""
from __future__ import annotations

import socket
import time
from ipaddress import IPv4Address, IPv4Network

from fastflannel.datapath.fastpath import FastPath, FastPathOptions

NETWORK = IPv4Network("10.244.0.0/16")
OWN = IPv4Network("10.244.1.0/24")
REMOTE = IPv4Network("10.244.2.0/24")
OTHER = IPv4Network("10.244.3.0/24")
TUN_IP = IPv4Address("10.244.1.0")
PEER = IPv4Address("127.0.0.2")
STRANGER = IPv4Address("127.0.0.3")
PEER2 = IPv4Address("127.0.0.4")
TIMEOUT = 20.0  # liveness bound only (a hang), never a speed goal: the machine may be busy


def make(impl: str, tun_fd: int = 0, udp_fd: int = 0, port: int = 8285, **opts: object) -> FastPath:
    return FastPath(tun_fd, udp_fd, network=NETWORK, subnet_len=24, own_subnet=OWN, tun_ip=TUN_IP, mtu=1472,
                    port=port, options=FastPathOptions(implementation=impl, **opts))  # type: ignore[arg-type]


class Rig:
    """A running FastPath between a SEQPACKET socketpair (the TUN) and UDP on 127.0.0.1, with a peer on .2."""

    def __init__(self, impl: str, **opts: object) -> None:
        self.tun_loop, self.tun = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.tun.settimeout(TIMEOUT)
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.port = self.udp.getsockname()[1]
        self.peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.peer.bind((str(PEER), self.port))
        self.peer.settimeout(TIMEOUT)
        self.fp = make(impl, self.tun_loop.fileno(), self.udp.fileno(), self.port, **opts)

    def close(self) -> None:
        self.fp.close()  # first: the loop must not see its fds closed
        for s in (self.tun_loop, self.tun, self.udp, self.peer):
            s.close()

    def from_peer(self, data: bytes, sender: socket.socket | None = None) -> None:
        (sender or self.peer).sendto(data, ("127.0.0.1", self.port))

    def wait_for(self, cond, what: str) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + TIMEOUT
        while not cond():
            self.fp.check()
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}: {self.fp.stats()}")
            time.sleep(0.002)
