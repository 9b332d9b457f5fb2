# SPDX-License-Identifier: Apache-2.0
"""The testbed's ground floor: naming rules, errors, running commands (with timeouts), process teardown, signals."""
from __future__ import annotations

import logging
import os
import re
import secrets
import signal
import string
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

_logger = logging.getLogger(__name__)

MARKER_DIR = Path("/run/fastflannel-testbed")
DEFAULT_PREFIX_KEY = "/coreos.com/network"
ETCD_CLIENT_PORT = 2379
ETCD_PEER_PORT = 2380
IFNAMSIZ_MAX = 15  # linux IFNAMSIZ (16) minus the NUL
CMD_TIMEOUT_S = 30.0  # upper bound for any one iproute2/etcdctl command
TEARDOWN_GRACE_S = 5.0  # SIGTERM -> SIGKILL for tracked processes
_PREFIX_RE = re.compile(r"^ff[0-9a-z]{5}$")
_NODE_NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,7}$")  # <prefix>(7) + name(<=8) <= 15 chars
_BASE36 = string.digits + string.ascii_lowercase

LogFn = Union[Callable[[str], Any], logging.Logger, None]


# Prefixes of every Testbed created by this process (for leak checks in tests).
_OWNED_PREFIXES: set[str] = set()


class TestbedError(Exception):
    """Raise when the simulated world cannot be built, used or torn down."""

    __test__ = False  # not a pytest test class


class EtcdError(TestbedError):
    """Raise when an etcd member fails to start, become healthy or stop."""


class CommandError(subprocess.CalledProcessError, TestbedError):
    """Raise when a command run by the testbed exits non-zero; the message names the namespace and stderr."""

    def __init__(self, returncode: int, cmd: Sequence[str], output: str | None = None,
                 stderr: str | None = None, netns: str | None = None) -> None:
        super().__init__(returncode, list(cmd), output, stderr)
        self.netns = netns

    def __str__(self) -> str:
        where = f" in netns {self.netns}" if self.netns else ""
        err = (self.stderr or "").strip() or (self.output or "").strip()
        tail = f": {err[-800:]}" if err else ""
        return f"command {' '.join(map(str, self.cmd))!r}{where} exited with {self.returncode}{tail}"


# --------------------------------------------------------------------------------------------------------------------
# small helpers


def _as_logfn(log: LogFn) -> Callable[[str], Any]:
    if log is None:
        return _logger.info
    if isinstance(log, logging.Logger):
        return log.info
    return log


def _random_prefix() -> str:
    return "ff" + "".join(secrets.choice(_BASE36) for _ in range(5))


def _run(cmd: Sequence[str], *, netns: str | None = None, check: bool = True, timeout: float | None = CMD_TIMEOUT_S,
         env: Mapping[str, str] | None = None, input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` (already wrapped for its namespace), capture text output, raise CommandError if check fails."""
    try:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, input=input,
                              env=dict(env) if env is not None else None)
    except subprocess.TimeoutExpired as e:
        raise TestbedError(f"command {' '.join(cmd)!r}{f' in netns {netns}' if netns else ''} "
                           f"timed out after {timeout} s") from e
    if check and proc.returncode != 0:
        raise CommandError(proc.returncode, cmd, proc.stdout, proc.stderr, netns=netns)
    return proc


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return _run(["ip", *args], check=check)


def _ipn(netns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``ip -n <netns> ...``: iproute2 switches namespace before it touches the kernel."""
    return _run(["ip", "-n", netns, *args], netns=netns, check=check)


def _netns_exec(netns: str, args: Sequence[str]) -> list[str]:
    return ["ip", "netns", "exec", netns, *map(str, args)]


def _merge_env(env: Mapping[str, str] | None, *, drop_prefixes: Iterable[str] = ()) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not any(k.startswith(p) for p in drop_prefixes)}
    if env:
        out.update(env)
    return out


def _terminate(procs: Sequence[subprocess.Popen[Any]], grace: float) -> None:
    """SIGTERM each live process group, wait up to ``grace`` seconds overall, then SIGKILL the rest and reap."""
    live = [p for p in procs if p.poll() is None]
    for p in live:
        _signal_group(p, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in live:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for p in live:
        if p.poll() is None:
            _signal_group(p, signal.SIGKILL)
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass


def _signal_group(p: subprocess.Popen[Any], sig: int) -> None:
    # Children normally run in their own session (start_new_session), so pgid == pid and signalling the group also
    # reaches anything they forked. Only called while p is unreaped, so the pid cannot have been recycled.
    try:
        if os.getpgid(p.pid) == p.pid:
            os.killpg(p.pid, sig)
        else:
            p.send_signal(sig)
    except ProcessLookupError:
        pass


def _tail(path: Path | None, n: int = 2000) -> str:
    if path is None:
        return ""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - n))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


# --------------------------------------------------------------------------------------------------------------------
# signals


def install_signal_handlers(*, sigterm: type[BaseException] = SystemExit) -> dict[int, Any]:
    """Make SIGTERM and SIGHUP raise ``sigterm`` (SystemExit(143) by default, or KeyboardInterrupt) in the main thread.

    Tools call this once before ``with Testbed():`` so a ``kill`` unwinds the with-block and tears everything down
    (SIGINT already raises KeyboardInterrupt). Return the previous handlers for ``restore_signal_handlers``.
    Raise ValueError if not called from the main thread (a Python restriction).
    """

    def _handler(signum: int, _frame: Any) -> None:
        if sigterm is SystemExit:
            raise SystemExit(128 + signum)
        raise sigterm()

    previous = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        previous[sig] = signal.signal(sig, _handler)
    return previous


def restore_signal_handlers(previous: Mapping[int, Any]) -> None:
    """Reinstall handlers returned by ``install_signal_handlers``."""
    for sig, handler in previous.items():
        signal.signal(sig, handler)


class _BlockedSignals:
    """Block SIGINT/SIGTERM/SIGHUP on the main thread for the duration (no-op elsewhere); pending ones fire after."""

    _SIGS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}

    def __enter__(self) -> None:
        self._old: set[int] | None = None
        if threading.current_thread() is threading.main_thread():
            self._old = set(signal.pthread_sigmask(signal.SIG_BLOCK, self._SIGS))

    def __exit__(self, *exc: object) -> None:
        if self._old is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, self._old)


# --------------------------------------------------------------------------------------------------------------------
# etcd
