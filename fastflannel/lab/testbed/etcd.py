# SPDX-License-Identifier: Apache-2.0
"""``EtcdServer``: one etcd member in its own namespace (start, stop, kill, restart with its data dir)."""
from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections.abc import Mapping
from ipaddress import IPv4Address
from pathlib import Path
from typing import IO

from fastflannel.lab.testbed.base import (CMD_TIMEOUT_S, ETCD_CLIENT_PORT, ETCD_PEER_PORT, EtcdError, LogFn, _as_logfn,
                                          _merge_env, _netns_exec, _run, _signal_group, _tail)


class EtcdServer:
    """Run one etcd member inside an existing network namespace, with its data dir under ``workdir``.

    ``start()`` blocks until the member reports healthy. ``stop()``/``kill()`` keep the data dir, so a later
    ``start()`` restarts the same member with its data; ``close()`` stops it and removes the data dir.
    """

    def __init__(self, name: str, netns: str, ip: IPv4Address | str, workdir: Path | str, *,
                 initial_cluster: str | None = None, cluster_token: str = "fastflannel-testbed",
                 client_port: int = ETCD_CLIENT_PORT, peer_port: int = ETCD_PEER_PORT,
                 etcd_bin: str = "etcd", etcdctl_bin: str = "etcdctl", log: LogFn = None,
                 tls: Mapping[str, str] | None = None) -> None:
        self.name = name
        self.netns = netns
        self.ip = IPv4Address(str(ip))
        self.client_port = client_port
        self.peer_port = peer_port
        self.tls = dict(tls) if tls else None  # make_tls_files() paths: client URLs over https, client certs required
        self.user: str | None = None  # "name:password" for etcdctl once the test enabled etcd authentication
        self.scheme = "https" if self.tls else "http"
        self.endpoint = f"{self.scheme}://{self.ip}:{client_port}"
        self.peer_url = f"http://{self.ip}:{peer_port}"
        self.initial_cluster = initial_cluster or f"{name}={self.peer_url}"
        self.cluster_token = cluster_token
        self.data_dir = Path(workdir) / f"{name}.etcd"
        self.log_path = Path(workdir) / f"{name}.log"
        self.etcd_bin = etcd_bin
        self.etcdctl_bin = etcdctl_bin
        self._log = _as_logfn(log)
        self._proc: subprocess.Popen[bytes] | None = None
        self._logfile: IO[bytes] | None = None

    def __repr__(self) -> str:
        return f"EtcdServer({self.name!r}, netns={self.netns!r}, endpoint={self.endpoint!r}, pid={self.pid})"

    @property
    def pid(self) -> int | None:
        """Return the etcd pid while the process is running, else None."""
        return self._proc.pid if self.running and self._proc else None

    @property
    def running(self) -> bool:
        """Return True if the etcd process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def command(self) -> list[str]:
        """Return the etcd command line (without the ``ip netns exec`` wrapper)."""
        return [
            self.etcd_bin,
            f"--name={self.name}",
            f"--data-dir={self.data_dir}",
            f"--listen-client-urls={self.endpoint},{self.scheme}://127.0.0.1:{self.client_port}",
            f"--advertise-client-urls={self.endpoint}",
            f"--listen-peer-urls={self.peer_url}",
            f"--initial-advertise-peer-urls={self.peer_url}",
            f"--initial-cluster={self.initial_cluster}",
            f"--initial-cluster-token={self.cluster_token}",
            "--initial-cluster-state=new",  # ignored when the data dir already holds a member (restart)
            "--heartbeat-interval=100",
            "--election-timeout=1000",
            *([f"--cert-file={self.tls['server_cert']}", f"--key-file={self.tls['server_key']}",
               f"--trusted-ca-file={self.tls['ca']}", "--client-cert-auth"] if self.tls else []),
        ]

    def ctl_flags(self) -> list[str]:
        """Return the etcdctl flags this member needs (client certificate, user), without the endpoints."""
        flags = []
        if self.tls:
            flags += [f"--cacert={self.tls['ca']}", f"--cert={self.tls['client_cert']}",
                      f"--key={self.tls['client_key']}"]
        if self.user:
            flags.append(f"--user={self.user}")
        return flags

    def spawn(self) -> None:
        """Start the etcd process without waiting for health; no-op if it is running. Raise EtcdError on failure."""
        if self.running:
            return
        self._close_logfile()
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        self._logfile = open(self.log_path, "ab")
        env = _merge_env(None, drop_prefixes=("ETCD_", "ETCDCTL_"))
        try:
            self._proc = subprocess.Popen(_netns_exec(self.netns, self.command()), stdin=subprocess.DEVNULL,
                                          stdout=self._logfile, stderr=subprocess.STDOUT, env=env,
                                          start_new_session=True)
        except OSError as e:
            self._close_logfile()
            raise EtcdError(f"failed to spawn etcd member {self.name} in {self.netns}: {e}") from e
        self._log(f"testbed: etcd {self.name} pid {self._proc.pid} in {self.netns} at {self.endpoint}")

    def etcdctl(self, *args: str, endpoints: str | None = None, check: bool = True,
                timeout: float = CMD_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
        """Run ``etcdctl`` (API v3) inside this member's namespace against ``endpoints`` (default: this member)."""
        env = _merge_env({"ETCDCTL_API": "3"}, drop_prefixes=("ETCDCTL_",))
        cmd = _netns_exec(self.netns, [self.etcdctl_bin, f"--endpoints={endpoints or self.endpoint}",
                                       *self.ctl_flags(), *args])
        return _run(cmd, netns=self.netns, check=check, timeout=timeout, env=env)

    def healthy(self) -> bool:
        """Return True if ``etcdctl endpoint health`` succeeds against this member."""
        proc = self.etcdctl("--dial-timeout=1s", "--command-timeout=2s", "endpoint", "health",
                            check=False, timeout=5)
        return proc.returncode == 0

    def wait_healthy(self, timeout: float = 20.0) -> None:
        """Block until the member is healthy; raise EtcdError (with the log tail) on timeout or if etcd exits."""
        deadline = time.monotonic() + timeout
        while True:
            if self._proc is None or self._proc.poll() is not None:
                rc = None if self._proc is None else self._proc.returncode
                raise EtcdError(f"etcd member {self.name} in {self.netns} exited (rc={rc}) before becoming "
                                f"healthy; log {self.log_path}:\n{_tail(self.log_path)}")
            if self.healthy():
                return
            if time.monotonic() > deadline:
                raise EtcdError(f"etcd member {self.name} at {self.endpoint} not healthy after {timeout} s; "
                                f"log {self.log_path}:\n{_tail(self.log_path)}")
            time.sleep(0.2)

    def start(self, timeout: float = 20.0) -> None:
        """Spawn etcd (keeping any existing data dir) and block until it is healthy; raise EtcdError on failure."""
        self.spawn()
        self.wait_healthy(timeout)

    def stop(self, timeout: float = 10.0) -> int | None:
        """Send SIGTERM and wait (SIGKILL after ``timeout``); keep the data dir. Return the exit code, None if idle."""
        return self._signal(signal.SIGTERM, timeout)

    def kill(self) -> int | None:
        """Send SIGKILL and reap; keep the data dir. Return the exit code, or None if it was not running."""
        return self._signal(signal.SIGKILL, 5.0)

    def close(self) -> None:
        """Stop the member and remove its data dir and log handle; idempotent."""
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def _signal(self, sig: int, timeout: float) -> int | None:
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            _signal_group(proc, sig)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._log(f"testbed: etcd {self.name} ignored signal {sig} for {timeout} s; killing")
                _signal_group(proc, signal.SIGKILL)
                proc.wait(timeout=5)
        self._close_logfile()
        return proc.returncode

    def _close_logfile(self) -> None:
        if self._logfile is not None:
            self._logfile.close()
            self._logfile = None


# --------------------------------------------------------------------------------------------------------------------
# hosts and containers
