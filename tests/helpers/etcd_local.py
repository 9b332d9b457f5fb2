# SPDX-License-Identifier: Apache-2.0
"""A throw-away etcd on 127.0.0.1 for tests: random free ports, data dir in a temp dir, killed on every exit path.

Only loopback is ever used: the server listens on 127.0.0.1 and clients are given http://127.0.0.1:<port>.
"""
from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from typing import List, Optional

ETCD_BIN = os.environ.get("FASTFLANNEL_TEST_ETCD", "/usr/bin/etcd")
ETCDCTL_BIN = os.environ.get("FASTFLANNEL_TEST_ETCDCTL", "/usr/bin/etcdctl")
LOOPBACK = "127.0.0.1"

_live: "List[LocalEtcd]" = []


def etcd_available() -> Optional[str]:
    """Return None if a local etcd can be started, else the reason to skip."""
    for b in (ETCD_BIN, ETCDCTL_BIN):
        if not (os.path.isfile(b) and os.access(b, os.X_OK)):
            return f"{b} not found (install Debian's etcd-server and etcd-client)"
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


class LocalEtcd:
    """One etcd member on loopback. ``start()``/``stop()``/``kill()`` may be repeated; data survives restarts."""

    def __init__(self, extra_args: Optional[List[str]] = None) -> None:
        self.data_dir = tempfile.mkdtemp(prefix="fastflannel-etcd-")
        self.client_port = free_port()
        self.peer_port = free_port()
        self.extra_args = list(extra_args or [])
        self.proc: Optional[subprocess.Popen] = None
        self.scheme = "http"
        self.ctl_extra: List[str] = []  # e.g. --cacert/--cert/--key for a TLS server
        self.log_path = os.path.join(self.data_dir, "etcd.log")
        _live.append(self)

    @property
    def endpoint(self) -> str:
        return f"{self.scheme}://{LOOPBACK}:{self.client_port}"

    def start(self, timeout: float = 20.0) -> "LocalEtcd":
        if self.proc is not None and self.proc.poll() is None:
            return self
        args = [
            ETCD_BIN,
            "--name", "fastflannel-test",
            "--data-dir", os.path.join(self.data_dir, "data"),
            "--listen-client-urls", self.endpoint,
            "--advertise-client-urls", self.endpoint,
            "--listen-peer-urls", f"http://{LOOPBACK}:{self.peer_port}",
            "--initial-advertise-peer-urls", f"http://{LOOPBACK}:{self.peer_port}",
            "--initial-cluster", f"fastflannel-test=http://{LOOPBACK}:{self.peer_port}",
            "--initial-cluster-state", "new",
            "--listen-metrics-urls", "",
            *self.extra_args,
        ]
        env = dict(os.environ, ETCD_UNSUPPORTED_ARCH=os.environ.get("ETCD_UNSUPPORTED_ARCH", ""))
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        finally:
            log.close()
        self.wait_healthy(timeout)
        return self

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.proc.returncode}; log: {self.tail_log()}")
            if self.scheme == "http":
                try:
                    with urllib.request.urlopen(self.endpoint + "/health", timeout=1) as r:
                        if b'"true"' in r.read():
                            return
                except OSError as e:
                    last = str(e)
            else:
                rc = subprocess.run(self.ctl_args("endpoint", "health"), capture_output=True,
                                    env=dict(os.environ, ETCDCTL_API="3"), timeout=10).returncode
                if rc == 0:
                    return
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"etcd at {self.endpoint} not healthy after {timeout}s ({last}); log: {self.tail_log()}")

    def tail_log(self, n: int = 2000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM and wait; SIGKILL if it does not exit."""
        p = self.proc
        if p is None or p.poll() is not None:
            return
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL the process (by its own pid) and reap it."""
        p = self.proc
        if p is None or p.poll() is not None:
            return
        p.kill()
        p.wait(10)

    def ctl_args(self, *args: str) -> List[str]:
        return [ETCDCTL_BIN, f"--endpoints={self.endpoint}", *self.ctl_extra, *args]

    def ctl(self, *args: str, check: bool = True) -> bytes:
        env = dict(os.environ, ETCDCTL_API="3")
        r = subprocess.run(self.ctl_args(*args), capture_output=True, env=env, timeout=30)
        if check and r.returncode != 0:
            raise RuntimeError(f"etcdctl {' '.join(args)} failed: {r.stderr.decode(errors='replace')}")
        return r.stdout

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.data_dir, ignore_errors=True)
        if self in _live:
            _live.remove(self)


@atexit.register
def _cleanup() -> None:
    for e in list(_live):
        e.close()


def make_tls_files(directory: str) -> dict:
    """Create a CA, a server certificate for 127.0.0.1 and a client certificate with openssl; return their paths."""
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=directory, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=fastflannel-test-ca",
        "-keyout", "ca.key", "-out", "ca.crt")
    with open(os.path.join(directory, "san.ext"), "w") as f:
        f.write("subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n")
    for name in ("server", "client"):
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
            "-out", f"{name}.csr")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "2", "-extfile", "san.ext", "-out", f"{name}.crt")
    return {k: os.path.join(directory, v) for k, v in {
        "ca": "ca.crt", "server_cert": "server.crt", "server_key": "server.key",
        "client_cert": "client.crt", "client_key": "client.key"}.items()}


def tls_etcd() -> "LocalEtcd":
    """Return a started etcd that requires TLS client certificates on its https client URL."""
    e = LocalEtcd()
    files = make_tls_files(e.data_dir)
    e.scheme = "https"
    e.extra_args = ["--cert-file", files["server_cert"], "--key-file", files["server_key"],
                    "--trusted-ca-file", files["ca"], "--client-cert-auth"]
    e.ctl_extra = [f"--cacert={files['ca']}", f"--cert={files['client_cert']}", f"--key={files['client_key']}"]
    e.tls_files = files  # type: ignore[attr-defined]
    try:
        e.start()
    except BaseException:
        e.close()
        raise
    return e
