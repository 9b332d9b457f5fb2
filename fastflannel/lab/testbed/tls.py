# SPDX-License-Identifier: Apache-2.0
"""TLS material for etcd, made with openssl (a CA, server and client certificates, a second CA)."""
from __future__ import annotations

import subprocess
from collections.abc import Iterable
from ipaddress import IPv4Address
from pathlib import Path

from fastflannel.lab.testbed.base import TestbedError


def make_tls_files(directory: Path | str, ips: Iterable[IPv4Address | str]) -> dict[str, str]:
    """Make a CA, a server certificate for ``ips`` and a client certificate with openssl; return their paths.

    Keys are written 0600. The names: ca, server_cert, server_key, client_cert, client_key, and other_ca (a second
    CA that signed nothing here, for "wrong CA" tests).
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)

    def openssl(*args: str) -> None:
        proc = subprocess.run(["openssl", *args], capture_output=True, text=True, cwd=d, timeout=60)
        if proc.returncode != 0:
            raise TestbedError(f"openssl {' '.join(args[:2])} failed: {proc.stderr.strip()[-500:]}")

    for ca in ("ca", "other_ca"):
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN=fastflannel-{ca}",
                "-keyout", f"{ca}.key", "-out", f"{ca}.crt")
    sans = ",".join(f"IP:{ip}" for ip in ips)
    # etcd's gRPC gateway dials the gRPC server with the server certificate as its client certificate: with
    # --client-cert-auth that certificate needs clientAuth too, or every gateway (HTTP/JSON) request fails
    (d / "server.ext").write_text(f"subjectAltName={sans}\nextendedKeyUsage=serverAuth,clientAuth\n")
    (d / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name in ("server", "client"):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN=fastflannel-{name}", "-keyout",
                f"{name}.key", "-out", f"{name}.csr")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.crt")
    for key in d.glob("*.key"):
        key.chmod(0o600)
    return {k: str(d / v) for k, v in {"ca": "ca.crt", "other_ca": "other_ca.crt", "server_cert": "server.crt",
                                       "server_key": "server.key", "client_cert": "client.crt",
                                       "client_key": "client.key"}.items()}


# --------------------------------------------------------------------------------------------------------------------
# stale runs
