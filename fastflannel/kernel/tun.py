# SPDX-License-Identifier: Apache-2.0
"""Open a TUN device the way flannel's udp backend does: IFF_TUN | IFF_NO_PI (raw IPv4, no packet-info header).

The returned fd is non-blocking (the fast path drains it until EAGAIN) and close-on-exec; the caller owns it and
closing it destroys the device with its addresses and routes. Constants from linux/if_tun.h.
"""
from __future__ import annotations

import errno
import fcntl
import os
import struct
from typing import Tuple

TUN_DEVICE = "/dev/net/tun"
TUNSETIFF = 0x400454CA  # _IOW('T', 202, int)
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000  # every read/write starts with a struct virtio_net_hdr (10 bytes)
TUNSETOFFLOAD = 0x400454D0  # _IOW('T', 208, unsigned int); the flags are passed by value
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_USO4 = 0x20
TUN_F_USO6 = 0x40
# What the offload fast path handles: TCP super-packets (TSO6 too: IPv6 is then dropped unsplit, as before).
# No USO on reads: the loop splits TCP only; UDP-in-pod traffic is read per packet (the kernel segments it for us).
# Writes of UDP runs (VIRTIO_NET_HDR_GSO_UDP_L4) need no device flag, only a kernel that has USO: uso_supported.
TUN_OFFLOADS = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6
IFNAMSIZ = 16  # including the trailing NUL
_IFREQ = "16sH22x"  # struct ifreq: ifr_name[IFNAMSIZ], ifr_flags, padding to 40 bytes


class TunError(OSError):
    """Report that a TUN device could not be opened, naming the device and what to do about it."""


def open_tun(name: str = "flannel0", *, flags: int = IFF_TUN | IFF_NO_PI) -> Tuple[int, str]:
    """Create (or attach to) TUN device ``name`` and return ``(fd, ifname)``.

    ``name`` may be a template such as ``flannel%d``; the kernel then picks the number and ``ifname`` is the
    result. The fd is O_NONBLOCK | O_CLOEXEC and owned by the caller. Raises ValueError for a bad name and
    TunError (errno kept) when /dev/net/tun is missing, access is denied or the ioctl fails; the fd is closed on
    every error path.
    """
    raw = name.encode()
    if not raw or len(raw) >= IFNAMSIZ or b"/" in raw or b"\0" in raw or any(c.isspace() for c in name):
        raise ValueError(f"invalid TUN device name {name!r}: 1..{IFNAMSIZ - 1} bytes, no '/' or whitespace")
    try:
        fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError as e:
        raise TunError(e.errno, f"cannot open TUN device {name!r}: {TUN_DEVICE} does not exist; load the tun "
                       f"module ('modprobe tun') or, in a container, pass the device in (--device {TUN_DEVICE})"
                       ) from e
    except PermissionError as e:
        raise TunError(e.errno, f"cannot open TUN device {name!r}: {TUN_DEVICE}: {e.strerror}; run as root or "
                       f"grant CAP_NET_ADMIN") from e
    except OSError as e:
        raise TunError(e.errno, f"cannot open TUN device {name!r}: {TUN_DEVICE}: {e.strerror}") from e
    try:
        ifr = fcntl.ioctl(fd, TUNSETIFF, struct.pack(_IFREQ, raw, flags))
    except OSError as e:
        os.close(fd)
        hint = {
            errno.EPERM: "run as root or grant CAP_NET_ADMIN",
            errno.EBUSY: "another process holds the device, or it exists with other flags (e.g. a TAP); "
                         "stop that process or delete the link ('ip link del ...')",
            errno.EINVAL: "the name or the flags are not accepted by this kernel",
        }.get(e.errno or 0, "see the kernel log")
        raise TunError(e.errno, f"TUNSETIFF on {TUN_DEVICE} for device {name!r} failed: {e.strerror}; {hint}"
                       ) from e
    except BaseException:
        os.close(fd)
        raise
    ifname = struct.unpack(_IFREQ, ifr)[0].rstrip(b"\0").decode()
    return fd, ifname


def open_tun_offload(name: str = "flannel0", offloads: int = TUN_OFFLOADS) -> Tuple[int, str]:
    """Create TUN ``name`` with IFF_VNET_HDR and enable ``offloads`` (TUNSETOFFLOAD); return ``(fd, ifname)``.

    Raises TunError when the kernel refuses either step (the fd is closed, so the device is gone); the caller
    then falls back to ``open_tun`` (plain per-packet TUN).
    """
    fd, ifname = open_tun(name, flags=IFF_TUN | IFF_NO_PI | IFF_VNET_HDR)
    try:
        fcntl.ioctl(fd, TUNSETOFFLOAD, offloads)
    except OSError as e:
        os.close(fd)
        raise TunError(e.errno, f"TUNSETOFFLOAD {offloads:#x} on {ifname} refused: {e.strerror}") from e
    return fd, ifname


def uso_supported(fd: int, offloads: int = TUN_OFFLOADS) -> bool:
    """Probe whether the kernel under offload TUN ``fd`` takes UDP GSO (USO) super-packets on write.

    Linux 6.2 taught tun USO: TUNSETOFFLOAD accepts TUN_F_USO4/6 from that release on, the same one whose write
    path turns a VIRTIO_NET_HDR_GSO_UDP_L4 header into a UDP GSO skb (older kernels refuse the write with EINVAL).
    The probe sets the USO flags and at once puts ``offloads`` back, so reads never bring UDP super-packets
    (the loop does not split those). wireguard-go probes the same way. False on any refusal.
    """
    try:
        fcntl.ioctl(fd, TUNSETOFFLOAD, offloads | TUN_F_USO4 | TUN_F_USO6)
    except OSError:
        return False
    try:
        fcntl.ioctl(fd, TUNSETOFFLOAD, offloads)
    except OSError as e:  # pragma: no cover - the kernel took these flags a moment ago in open_tun_offload
        raise TunError(e.errno, f"TUNSETOFFLOAD {offloads:#x} (after the USO probe) refused: {e.strerror}") from e
    return True
