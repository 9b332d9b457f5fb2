# SPDX-License-Identifier: Apache-2.0
"""TCP transfer between two nodes that reports what the receiver saw: byte count, sha256 and the peer address (the
masquerade checks: a container's own address inside the overlay, its host's address outside). A node is anything
with ``name``, ``run(args, ...)`` and ``popen(args, ...)`` (testbed hosts and containers, docker containers)."""
from __future__ import annotations

import subprocess
import sys

_RECV = r"""
import hashlib, socket, sys
v6 = len(sys.argv) > 2 and ":" in sys.argv[2]  # the address the sender dials: an IPv6 one needs an AF_INET6 listener
s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("::" if v6 else "0.0.0.0", int(sys.argv[1])))
s.listen(1); s.settimeout(30); print("ready", flush=True)
c, peer = s.accept(); c.settimeout(30); h = hashlib.sha256(); n = 0
while True:
    b = c.recv(1 << 16)
    if not b:
        break
    h.update(b); n += len(b)
c.close(); print(n, h.hexdigest(), peer[0], flush=True)
"""
_SEND = r"""
import hashlib, random, socket, sys
dst, port, size, src = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
data = random.Random(11).randbytes(size)
c = socket.create_connection((dst, port), timeout=15, source_address=(src, 0) if src else None)
c.sendall(data); c.shutdown(socket.SHUT_WR); c.recv(1); c.close()
print(len(data), hashlib.sha256(data).hexdigest(), flush=True)
"""


def tcp_transfer(src, dst, dst_ip, size: int = 1 << 20, src_ip: str = "", port: int = 5401) -> dict:
    """Send ``size`` bytes over TCP from ``src`` (bound to ``src_ip`` if given) to ``dst_ip`` where ``dst`` listens.

    Return both sides' byte counts and sha256 and the peer address the receiver saw (masquerade checks)."""
    rp = dst.popen([sys.executable, "-I", "-c", _RECV, str(port), str(dst_ip)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                   text=True)
    try:
        line = rp.stdout.readline()
        assert "ready" in line, f"receiver on {dst.name} did not start: {line!r} {rp.stderr.read()}"
        s = src.run([sys.executable, "-I", "-c", _SEND, str(dst_ip), str(port), str(size), src_ip], check=False,
                    timeout=60)
        assert s.returncode == 0, f"sender {src.name} -> {dst_ip} failed: {s.stderr[-800:]}"
        out, err = rp.communicate(timeout=30)
        assert rp.returncode == 0, f"receiver on {dst.name} failed: {err[-800:]}"
        sent_n, sent_h = s.stdout.split()
        got_n, got_h, peer = out.split()
        return {"sent": (int(sent_n), sent_h), "recv": (int(got_n), got_h), "peer": peer}
    finally:
        if rp.poll() is None:
            rp.kill()
            rp.wait(5)
