# SPDX-License-Identifier: Apache-2.0
"""``/healthz`` and ``/readyz`` as flanneld serves them (port 0 = off), on a daemon thread."""
from __future__ import annotations

import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Dict, Optional, Tuple

log = logging.getLogger("fastflannel.service.healthz")

Route = Callable[[], Tuple[int, str, bytes]]  # -> (status, content type, body)


class HealthServer:
    """Serve health endpoints; ``ready`` is flipped once subnet.env is written. Extra routes may be added
    (``/metrics``). Idempotent ``close()``."""

    def __init__(self, ip: str, port: int) -> None:
        self.ready = threading.Event()
        self.routes: Dict[str, Route] = {
            "/healthz": lambda: (200, "text/plain", b"flanneld is running"),
            "/readyz": self._readyz,
        }
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server API)
                route = server.routes.get(self.path.split("?", 1)[0])
                try:
                    status, ctype, body = route() if route else (404, "text/plain", b"not found")
                except Exception as e:  # noqa: BLE001 - a failing route is a 500, never a dropped connection
                    log.warning("event=healthz_route_failed path=%s error=%r", self.path, str(e))
                    status, ctype, body = 500, "text/plain", f"{type(e).__name__}: {e}".encode()
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt: str, *args) -> None:
                log.debug("healthz: " + fmt, *args)

        self._httpd: Optional[ThreadingHTTPServer] = ThreadingHTTPServer((ip, port), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="healthz", daemon=True)
        self._thread.start()
        log.info("event=healthz_listening addr=%s:%d", ip, self.port)

    def _readyz(self) -> Tuple[int, str, bytes]:
        if self.ready.is_set():
            return 200, "text/plain", b"flanneld is ready"
        return 503, "text/plain", b"flanneld is not ready yet"

    def close(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
            self._thread.join(timeout=5)
