# SPDX-License-Identifier: Apache-2.0
"""Drops the udp fast path cannot count itself, read from the kernel (issue 12: loss by place).

- :func:`socket_drops`: datagrams the kernel dropped at a socket because its receive buffer was full (the
  socket's own ``sk_drops``, ``getsockopt(SOL_SOCKET, SO_MEMINFO)`` index ``SK_MEMINFO_DROPS``; Linux >= 4.19,
  ``None`` where unsupported). Unlike ``Udp: RcvbufErrors`` it is this socket's, not the namespace's.
- :func:`link_drops`: a device's rx/tx drop counters from ``/proc/net/dev``, which shows the *reader's* network
  namespace (``/proc/net`` is ``/proc/self/net``), so the daemon sees its own ``flannel0``. For a TUN device
  ``tx_dropped`` counts packets the kernel could not queue for our ``read()`` (its queue was full: the loop read
  too late), ``rx_dropped`` packets our ``write()`` handed over that the stack refused.

Both are cheap (one syscall, one small file read) and are read at scrape time, never by the loop.
"""
from __future__ import annotations

import socket
import struct
from typing import Dict, Optional

SO_MEMINFO = 55  # include/uapi/asm-generic/socket.h
SK_MEMINFO_VARS = 9  # include/uapi/linux/sock_diag.h: ... SK_MEMINFO_BACKLOG, SK_MEMINFO_DROPS
SK_MEMINFO_DROPS = 8
PROC_NET_DEV = "/proc/net/dev"


def socket_drops(sock: socket.socket) -> Optional[int]:
    """Return the datagrams dropped at ``sock`` (receive buffer full), or None if the kernel cannot say."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, SK_MEMINFO_VARS * 4)
    except OSError:
        return None
    if len(raw) < (SK_MEMINFO_DROPS + 1) * 4:
        return None
    return struct.unpack_from("I", raw, SK_MEMINFO_DROPS * 4)[0]


def parse_proc_net_dev(text: str) -> Dict[str, Dict[str, int]]:
    """Parse ``/proc/net/dev`` into ``{ifname: {rx_packets, rx_dropped, tx_packets, tx_dropped}}``."""
    out: Dict[str, Dict[str, int]] = {}
    for line in text.splitlines()[2:]:
        name, sep, rest = line.partition(":")
        f = rest.split()
        if not sep or len(f) < 16:
            continue
        out[name.strip()] = {"rx_packets": int(f[1]), "rx_dropped": int(f[3]), "tx_packets": int(f[9]),
                             "tx_dropped": int(f[11])}
    return out


def link_drops(ifname: str, path: str = PROC_NET_DEV) -> Optional[Dict[str, int]]:
    """Return ``ifname``'s counters from ``/proc/net/dev`` of the caller's namespace, None if it is not there."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    return parse_proc_net_dev(text).get(ifname)
