# SPDX-License-Identifier: Apache-2.0
"""Share test tiers, skips and the testbed fixtures across the suite.

Tiers (design A2 rule 11) are pytest markers, skipped with a reason when the machine cannot run them (the probes
live in tests/helpers/tiers.py):
- ``netns``: needs root and a working ``ip netns`` (probed once by creating and deleting a namespace);
- ``etcd``: needs Debian's etcd-server (``/usr/bin/etcd`` or ``etcd`` on PATH) and ``etcdctl``;
- ``ext``: needs the compiled ``fastflannel.datapath._fastpath`` (and ``FASTFLANNEL_NO_EXTENSIONS`` unset).
With ``FASTFLANNEL_REQUIRE_TIERS=1`` (set by ``.ci/run``) every skip - a tier, a missing tool, a module-level
``importorskip`` - is reported as an error naming what is missing, so CI cannot pass with part of the suite unrun.

The ``make_testbed`` fixture also performs the netns/etcd checks, so a test that forgets a marker skips rather
than errors. A session-level guard compares ``ip netns list`` before and after the run: namespaces this session
created and left behind are removed and the run fails loudly. Namespaces made by other, concurrent runs (a testbed
marker with another live owner pid) are not counted. Tests that need a bare namespace use ``fresh_netns`` or name
theirs with ``netns_name()`` so the guard can attribute them. SIGTERM is turned into KeyboardInterrupt so a killed
pytest still unwinds fixtures and tears testbeds down.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from tiers import REQUIRE_TIERS_ENV, SESSION_NETNS_PREFIX, require, require_tiers, tier_skip_reason

# The machine is shared and noisy: a per-example time limit would make property tests flaky, not stricter.
settings.register_profile("fastflannel", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("fastflannel")

_NETNS_COUNTER = iter(range(1, 1 << 30))


def pytest_runtest_setup(item: pytest.Item) -> None:
    reason = tier_skip_reason(item)
    if reason:
        pytest.skip(reason)


# ------------------------------------------------------------------------------------------------------------------
# FASTFLANNEL_REQUIRE_TIERS=1 (CI): a skip is an error that names what is missing


def _as_required(rep: Any) -> None:
    """Turn the skipped report ``rep`` into a failure that keeps the skip's reason."""
    reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) and len(rep.longrepr) == 3 else str(rep.longrepr)
    reason = reason.removeprefix("Skipped: ")
    rep.outcome = "failed"
    rep.longrepr = (f"{REQUIRE_TIERS_ENV}=1: skipped, and every tier must run here: {reason}\n"
                    "Install what is missing (`make system-deps`, `make compile`) or run without "
                    f"{REQUIRE_TIERS_ENV}.")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()
    if rep.skipped and require_tiers():  # a whole module skipped (importorskip, allow_module_level)
        _as_required(rep)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()
    if rep.skipped and not hasattr(rep, "wasxfail") and require_tiers():
        _as_required(rep)
    setattr(item, f"rep_{rep.when}", rep)  # lets fixtures see whether the test failed


@pytest.fixture(autouse=True)
def _restore_product_log_level() -> Iterator[None]:
    """Undo a test's change to the ``fastflannel`` logger's level (lab/scale.py sets WARNING in-process), which
    otherwise hides the INFO lines later tests assert on (``caplog.set_level`` sets only the root logger)."""
    logger = logging.getLogger("fastflannel")
    level = logger.level
    yield
    logger.setLevel(level)


# ------------------------------------------------------------------------------------------------------------------
# SIGTERM -> KeyboardInterrupt, so fixtures (and testbeds) unwind when the run is killed


def pytest_sessionstart(session: pytest.Session) -> None:
    # A runner that starts the suite in the background of a non-interactive shell hands SIGINT down *ignored*, and
    # an ignored signal stays ignored across exec: the Ctrl-C tests (demo, testbed) would then see their SIGINT
    # vanish. Restore Python's handler, so the suite and the children it starts get Ctrl-C as a terminal gives it.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        from fastflannel.lab.testbed import install_signal_handlers

        install_signal_handlers(sigterm=KeyboardInterrupt)


# ------------------------------------------------------------------------------------------------------------------
# namespace leak guard


def _list_netns() -> set[str]:
    try:
        out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return set()
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _owner_alive_elsewhere(ns: str) -> bool:
    """Return True if ``ns`` provably belongs to another live process (a concurrent test run)."""
    from fastflannel.lab.testbed import MARKER_DIR, owned_prefixes, pid_alive

    prefix = ns.split("-", 1)[0]
    if prefix in owned_prefixes() or prefix == SESSION_NETNS_PREFIX:
        return False
    if prefix.startswith("ff_t"):  # another session's netns_name(): owner pid in base36
        try:
            pid = int(prefix[4:], 36)
        except ValueError:
            return False
        return pid != os.getpid() and pid_alive(pid)
    marker = MARKER_DIR / f"{prefix}.pid"
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    try:
        pid = int(info["pid"])
    except (KeyError, TypeError, ValueError):
        return False
    return pid != os.getpid() and pid_alive(pid, info.get("start_time"))


def _remove_netns(names: list[str]) -> None:
    from fastflannel.lab.testbed import remove_namespaces

    remove_namespaces(names, log=logging.getLogger("fastflannel.lab.testbed").warning)


def _remove_own_markers(prefixes: set[str]) -> None:
    """Remove testbed markers (and temp workdirs) of leaked testbeds this process created."""
    from fastflannel.lab.testbed import MARKER_DIR, owned_prefixes

    for prefix in prefixes & owned_prefixes():
        marker = MARKER_DIR / f"{prefix}.pid"
        try:
            info = json.loads(marker.read_text())
        except (OSError, ValueError):
            continue
        workdir = info.get("workdir") or ""
        if not info.get("keep_workdir") and Path(workdir).name.startswith(prefix + "-"):
            shutil.rmtree(workdir, ignore_errors=True)
        marker.unlink(missing_ok=True)


@pytest.fixture(scope="session", autouse=True)
def netns_leak_guard() -> Iterator[None]:
    """Fail the run loudly if this session leaves network namespaces behind (after removing them)."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        yield
        return
    before = _list_netns()
    yield
    new = sorted(_list_netns() - before)
    leaked = [ns for ns in new if not _owner_alive_elsewhere(ns)]
    if leaked:
        _remove_netns(leaked)
        _remove_own_markers({ns.split("-", 1)[0] for ns in leaked})
        still = sorted(set(leaked) & _list_netns())
        pytest.fail(f"LEAK: this test session left network namespaces behind: {leaked} "
                    f"(removed now{'; could NOT remove ' + str(still) if still else ''}). "
                    "Every namespace must be deleted on every exit path.", pytrace=False)


# ------------------------------------------------------------------------------------------------------------------
# namespace and testbed fixtures


@pytest.fixture
def netns_name() -> Callable[[str], str]:
    """Return a factory of unique namespace names ``ff_t<pid>-<tag><n>`` that the leak guard attributes to us."""

    def make(tag: str = "t") -> str:
        return f"{SESSION_NETNS_PREFIX}-{tag}{next(_NETNS_COUNTER)}"

    return make


@pytest.fixture
def fresh_netns(netns_name: Callable[[str], str]) -> Iterator[str]:
    """Create a bare namespace (loopback up) for one test, yield its name, and delete it with its processes."""
    require("netns")
    name = netns_name("n")
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True, timeout=10)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True, capture_output=True, timeout=10)
        yield name
    finally:
        _remove_netns([name])


class TestbedFactory:
    """Start testbeds on demand and close every one of them (newest first) at teardown."""

    __test__ = False

    def __init__(self) -> None:
        self.beds: list[Any] = []

    def __call__(self, n_hosts: int = 3, **kw: Any) -> Any:
        require("netns", "etcd")
        from fastflannel.lab.testbed import Testbed

        kw.setdefault("log", logging.getLogger("fastflannel.lab.testbed").info)
        tb = Testbed(n_hosts, **kw)
        self.beds.append(tb)
        tb.start()
        return tb

    def dump_logs(self) -> None:
        for tb in self.beds:
            for host in tb.hosts:
                if host.daemon_log is not None:
                    sys.stderr.write(f"----- {tb.prefix} {host.name} fastflanneld log -----\n"
                                     f"{host.daemon_log_text()[-20000:]}\n")

    def close(self) -> list[str]:
        errors = []
        for tb in reversed(self.beds):
            try:
                tb.close()
            except Exception as e:  # close every bed, then report
                errors.append(f"{tb.prefix}: {e}")
        self.beds.clear()
        return errors


def _factory_fixture(request: pytest.FixtureRequest) -> Iterator[TestbedFactory]:
    factory = TestbedFactory()
    try:
        yield factory
    finally:
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            factory.dump_logs()
        errors = factory.close()
        if errors:
            pytest.fail(f"testbed teardown failed: {errors}", pytrace=False)


@pytest.fixture
def make_testbed(request: pytest.FixtureRequest) -> Iterator[TestbedFactory]:
    """Return ``make(n_hosts=3, **Testbed kwargs)`` that starts a Testbed; all are torn down after the test."""
    yield from _factory_fixture(request)


@pytest.fixture(scope="module")
def make_module_testbed(request: pytest.FixtureRequest) -> Iterator[TestbedFactory]:
    """Like ``make_testbed`` but the testbeds live until the end of the module (share one world across tests)."""
    yield from _factory_fixture(request)
