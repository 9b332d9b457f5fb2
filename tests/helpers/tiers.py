# SPDX-License-Identifier: Apache-2.0
"""The suite's tiers: what each needs, probed once per session, and the one way a test declares it.

A tier is a pytest marker (``netns``, ``etcd``, ``ext``); ``tests/conftest.py`` skips a marked test with the probe's
reason when the machine cannot run it, and under ``FASTFLANNEL_REQUIRE_TIERS=1`` (set by ``.ci/run``) turns every
skip into an error instead. Tests that need a tool outside the tiers use ``needs_tool``; tests parametrized over
the two fast-path implementations use ``IMPLS`` (the Cython case carries the ``ext`` marker).
"""
from __future__ import annotations

import functools
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

REQUIRE_TIERS_ENV = "FASTFLANNEL_REQUIRE_TIERS"


def _base36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = digits[r] + out
        if n == 0:
            return out


# Prefix of the bare namespaces this session makes: "ff_t" + our pid in base36, so the leak guard of a concurrent
# run can tell whose they are; the "_" keeps it distinct from testbed prefixes ("ff" + 5 base36).
SESSION_NETNS_PREFIX = f"ff_t{_base36(os.getpid())}"


# ------------------------------------------------------------------------------------------------------------------
# capability probes (each cached for the session)


@functools.lru_cache(maxsize=None)
def netns_unavailable() -> str | None:
    """Return why network-namespace tests cannot run here, or None if they can."""
    if os.geteuid() != 0:
        return "netns tests need root"
    if shutil.which("ip") is None:
        return "netns tests need iproute2 ('ip' not found)"
    probe = f"{SESSION_NETNS_PREFIX}-probe"
    try:
        add = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, timeout=10)
        if add.returncode != 0:
            return f"'ip netns add' does not work here: {add.stderr.strip()}"
        up = subprocess.run(["ip", "-n", probe, "link", "set", "lo", "up"], capture_output=True, text=True,
                            timeout=10)
        if up.returncode != 0:
            return f"cannot configure a new namespace: {up.stderr.strip()}"
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"'ip netns' unusable: {e}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=10)
    return None


@functools.lru_cache(maxsize=None)
def etcd_unavailable() -> str | None:
    """Return why etcd tests cannot run here, or None if they can."""
    if not (Path("/usr/bin/etcd").exists() or shutil.which("etcd")):
        return "etcd tests need etcd (Debian package etcd-server): /usr/bin/etcd not found"
    if not shutil.which("etcdctl"):
        return "etcd tests need etcdctl (Debian package etcd-client)"
    return None


@functools.lru_cache(maxsize=None)
def ext_unavailable() -> str | None:
    """Return why tests of the compiled extension cannot run here, or None if they can."""
    if os.environ.get("FASTFLANNEL_NO_EXTENSIONS", "") not in ("", "0"):
        return "FASTFLANNEL_NO_EXTENSIONS is set: the tests of the compiled extension do not run"
    try:
        import fastflannel.datapath._fastpath  # noqa: F401
    except ImportError as e:
        return f"extension fastflannel.datapath._fastpath is not built ({e}); run 'make compile'"
    return None


TIER_CHECKS: dict[str, Callable[[], str | None]] = {
    "netns": netns_unavailable,
    "etcd": etcd_unavailable,
    "ext": ext_unavailable,
}


def require(*tiers: str) -> None:
    """Skip the running test with a reason unless every named tier can run here."""
    for tier in tiers:
        reason = TIER_CHECKS[tier]()
        if reason:
            pytest.skip(reason)


def tier_skip_reason(item: pytest.Item) -> str | None:
    """Return why ``item``'s tier markers cannot run here (the first failing tier), or None."""
    for tier, check in TIER_CHECKS.items():
        if item.get_closest_marker(tier) is not None:
            reason = check()
            if reason:
                return reason
    return None


def needs_tool(tool: str, package: str) -> pytest.MarkDecorator:
    """Mark a test that runs ``tool`` (an absolute path or a name on PATH) from Debian ``package``."""
    found = os.access(tool, os.X_OK) if tool.startswith("/") else shutil.which(tool) is not None
    return pytest.mark.skipif(not found, reason=f"needs {tool} (Debian package {package}; `make system-deps`)")


def require_tiers() -> bool:
    """Return True if every skip is an error in this run (CI: ``FASTFLANNEL_REQUIRE_TIERS=1``)."""
    return os.environ.get(REQUIRE_TIERS_ENV, "") not in ("", "0")


# The two fast-path implementations, for tests parametrized over both: the Cython case needs the ``ext`` tier.
IMPLS = [pytest.param("cython", marks=pytest.mark.ext), "python"]


def impl_env(impl: str) -> dict[str, str]:
    """Return the daemon environment that selects ``impl`` ("cython": the default; "python": the twin)."""
    return {"FASTFLANNEL_NO_EXTENSIONS": "1"} if impl == "python" else {}
