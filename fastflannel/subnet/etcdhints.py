# SPDX-License-Identifier: Apache-2.0
"""What to change when etcd cannot be reached because of a scheme or TLS mismatch (issue 14).

``tls_hint`` reads the connection error (requests/ssl text) of one endpoint; ``probe_hint`` settles the ambiguous
cases (a reset or an aborted connection) with one probe: an https endpoint that answers a plain ``GET /version``
serves http, an http endpoint that completes a TLS handshake serves https. Both return one sentence naming the
flag to change, or '' for an ordinary outage (refused, timeout), which keeps the general advice.
``ep`` is any object with ``scheme``, ``host``, ``port`` and a URL ``__str__`` (``etcd.Endpoint``).
"""
from __future__ import annotations

import socket
import ssl
from typing import Any


def tls_hint(ep: Any, error: str) -> str:
    """Return what to change when ``error`` (a connection error to ``ep``) is a scheme or TLS mismatch, else ''."""
    e = error.lower()
    if ep.scheme == "https":
        if "wrong version number" in e or "unexpected_eof" in e or "eof occurred in violation" in e \
                or "record layer failure" in e or "http_request" in e:
            return (f"{ep} does not speak TLS (is etcd serving plain http there?): use http:// in --etcd-endpoints, "
                    "or enable TLS on etcd (--cert-file/--key-file).")
        if "certificate verify failed" in e:
            if "mismatch" in e or "doesn't match" in e or "not valid for" in e:
                return (f"etcd's certificate does not name {ep.host}: use an endpoint host/IP listed in the "
                        "certificate's subjectAltName.")
            return (f"etcd's certificate at {ep} is not signed by a CA we trust: set --etcd-cafile to the CA "
                    "that signed etcd's --cert-file.")
        if "bad certificate" in e or "certificate required" in e or "unknown ca" in e:
            return (f"etcd at {ep} refused our client certificate (or we sent none): set --etcd-certfile/"
                    "--etcd-keyfile to a certificate signed by etcd's --trusted-ca-file.")
    elif "http request to an https server" in e:
        return (f"etcd at {ep} serves TLS, not plain http: use https:// in --etcd-endpoints with --etcd-cafile "
                "(and --etcd-certfile/--etcd-keyfile if it requires client certificates).")
    return ""


def probe_hint(ep: Any, error: str, timeout: float) -> str:
    """After a reset/aborted connection, probe once which protocol ``ep`` speaks; return a hint or ''.

    An https endpoint that answers a plain ``GET /version`` serves http; an http endpoint that completes a TLS
    handshake serves https. Anything else (refused, timeout) is an ordinary outage: ''."""
    e = error.lower()
    if not ("reset" in e or "aborted" in e or "eof" in e or "remotedisconnected" in e):
        return ""
    try:
        with socket.create_connection((ep.host, ep.port), timeout=min(timeout, 2.0)) as sock:
            if ep.scheme == "https":
                sock.sendall(b"GET /version HTTP/1.0\r\n\r\n")
                if sock.recv(5) == b"HTTP/":
                    return tls_hint(ep, "wrong version number")
            else:
                ctx = ssl.create_default_context()
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
                try:
                    with ctx.wrap_socket(sock, server_hostname=ep.host):
                        return tls_hint(ep, "http request to an https server")
                except ssl.SSLError as err:  # a TLS server that wants a client certificate still speaks TLS
                    if "alert" in str(err).lower() or "certificate" in str(err).lower():
                        return tls_hint(ep, "http request to an https server")
    except OSError:
        pass
    return ""
