# SPDX-License-Identifier: Apache-2.0
"""The exception hierarchy the kernel layer and the backends share (the kernel layer never imports a backend).

``FlannelError`` is the root. A backend raises ``BackendError`` when it cannot set up its device or program the
kernel; the kernel layer raises its subclasses, which carry the object and the kernel's reason.
"""
from __future__ import annotations


class FlannelError(Exception):
    """Something fastflannel could not do; the message says what failed and to what."""


class BackendError(FlannelError):
    """A backend could not set up its device or program the kernel; the message names the object."""


class KernelError(BackendError):
    """A netlink request failed; ``errno`` is the kernel's error code (0 if not from the kernel)."""

    def __init__(self, what: str, reason: str, code: int = 0) -> None:
        super().__init__(f"{what}: {reason}")
        self.what = what
        self.reason = reason
        self.errno = code


class TrafficError(BackendError):
    """iptables could not be read or programmed; the message carries iptables' own error."""


class FatalBackendError(BackendError):
    """The data plane cannot go on in this process (e.g. the udp fast path loop died): the daemon exits non-zero
    so that its service manager restarts it; retry loops re-raise it instead of backing off."""
