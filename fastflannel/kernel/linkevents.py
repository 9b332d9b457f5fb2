# SPDX-License-Identifier: Apache-2.0
"""Watch rtnetlink link events (RTM_NEWLINK/RTM_DELLINK) on a raw NETLINK_ROUTE socket.

Apart from ``netlink.py`` because it is a different kind of object: a long-lived subscription drained by a watcher
thread, not request/response. A raw socket drained until EAGAIN after every wake-up, not pyroute2's: pyroute2 0.9's
synchronous ``get()`` reads every queued datagram into its own buffer but returns only the first, so ``select()``
on its fd never fires for the rest - deleting a device sends RTM_NEWLINK (going down) and then RTM_DELLINK, and the
RTM_DELLINK stayed stuck until some later link event. ``Netlink.link_events`` is the usual entry point.
"""
from __future__ import annotations

import ctypes
import errno
import logging
import os
import select
import socket
import struct
import threading
from typing import Iterator, Optional

from fastflannel.errors import KernelError

log = logging.getLogger("fastflannel.kernel.netlink")

RTM_NEWLINK = "RTM_NEWLINK"
RTM_DELLINK = "RTM_DELLINK"
LINK_EVENTS_OVERRUN = "OVERRUN"  # link_events(): the kernel dropped events, re-check the state
RTMGRP_LINK = 0x1  # linux/rtnetlink.h: multicast group for link events
NETLINK_ROUTE = 0
IFLA_IFNAME = 3  # linux/if_link.h
CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/var/run/netns"
EVENT_RECV_BYTES = 1 << 16  # one datagram; link messages are a few KB
EVENT_RCVBUF_BYTES = 1 << 20
_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_IFINFOMSG = struct.Struct("=BxHiII")  # family, pad, type, index, flags, change
_RTATTR = struct.Struct("=HH")  # len, type
_LINK_MSG_TYPES = {16: RTM_NEWLINK, 17: RTM_DELLINK}  # linux/rtnetlink.h


def link_events(stop: threading.Event, *, netns: Optional[str] = None, poll_s: float = 1.0,
                ready: Optional[threading.Event] = None) -> Iterator[tuple]:
    """Yield ``(event, name, index)`` for link add/delete events until ``stop`` is set; blocks the caller's
    thread (meant for a watcher thread). Uses its own socket (in the named namespace ``netns`` if given), closed
    on exit; ``ready`` is set once subscribed. If the kernel dropped events (the socket overran, ENOBUFS) yield
    ``(LINK_EVENTS_OVERRUN, None, 0)``: the caller must re-check whatever it watches."""
    sock = event_socket(RTMGRP_LINK, netns)
    try:
        if ready is not None:
            ready.set()
        while not stop.is_set():
            r, _, _ = select.select([sock], [], [], poll_s)
            if not r:
                continue
            while True:
                try:
                    data = sock.recv(EVENT_RECV_BYTES)
                except BlockingIOError:
                    break
                except OSError as e:
                    if e.errno != errno.ENOBUFS:
                        raise
                    log.warning("event=netlink_events_overrun groups=link")
                    yield LINK_EVENTS_OVERRUN, None, 0
                    continue
                yield from parse_link_messages(data)
    finally:
        sock.close()


def event_socket(groups: int, netns: Optional[str] = None) -> socket.socket:
    """Return a non-blocking NETLINK_ROUTE socket subscribed to ``groups``, in the named namespace ``netns`` if
    set (the calling thread enters the namespace to create it and returns at once; the socket stays in it)."""
    if netns is None:
        return _bound_socket(groups)
    libc = ctypes.CDLL(None, use_errno=True)
    with open("/proc/thread-self/ns/net") as home, open(os.path.join(NETNS_RUN_DIR, netns)) as target:
        if libc.setns(target.fileno(), CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise KernelError(f"setns {netns}", os.strerror(err), err)
        try:
            return _bound_socket(groups)
        finally:
            if libc.setns(home.fileno(), CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise KernelError("setns back to the original netns", os.strerror(err), err)


def _bound_socket(groups: int) -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
                         NETLINK_ROUTE)
    try:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, EVENT_RCVBUF_BYTES)
        except OSError:
            pass
        sock.bind((0, groups))
    except OSError as e:
        sock.close()
        raise KernelError("netlink event socket", os.strerror(e.errno or 0), e.errno or 0) from e
    return sock


def parse_link_messages(data: bytes) -> Iterator[tuple]:
    """Yield ``(RTM_NEWLINK|RTM_DELLINK, ifname, index)`` for each link message in one netlink datagram."""
    off = 0
    while off + _NLMSGHDR.size <= len(data):
        length, mtype, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, off)
        if length < _NLMSGHDR.size or off + length > len(data):
            break
        if mtype in _LINK_MSG_TYPES and length >= _NLMSGHDR.size + _IFINFOMSG.size:
            _family, _type, index, _iflags, _change = _IFINFOMSG.unpack_from(data, off + _NLMSGHDR.size)
            name = None
            a, end = off + _NLMSGHDR.size + _IFINFOMSG.size, off + length
            while a + _RTATTR.size <= end:
                alen, atype = _RTATTR.unpack_from(data, a)
                if alen < _RTATTR.size or a + alen > end:
                    break
                if atype == IFLA_IFNAME:
                    name = data[a + _RTATTR.size:a + alen].split(b"\0", 1)[0].decode(errors="replace")
                    break
                a += (alen + 3) & ~3
            yield _LINK_MSG_TYPES[mtype], name, index
        off += (length + 3) & ~3
