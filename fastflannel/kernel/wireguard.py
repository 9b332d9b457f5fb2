# SPDX-License-Identifier: Apache-2.0
"""WireGuard devices: the kernel module over generic netlink, else ``wireguard-go`` over its UAPI socket.

``open_device`` probes and falls back: ``ip link add <name> type wireguard`` through ``Netlink``; when the kernel
answers EOPNOTSUPP (no module) it starts ``wireguard-go -f <name>`` as a child of the daemon, the way
``wg-quick`` runs it on such hosts, and configures it over ``/var/run/wireguard/<name>.sock`` with the text
protocol of wireguard.com/xplatform (``set=1`` / ``get=1``, keys in hex). Neither → ``BackendError`` saying what
to install. Both kinds offer the same small interface (``WgDevice``): device key and port, add/replace a peer,
remove a peer by public key, dump the peers, ``alive``, ``close``.

Ownership of the userspace process: it runs in the foreground (``-f``) as our child, in our process group, with
``PR_SET_PDEATHSIG`` = SIGTERM, so it never outlives the daemon: ``close()`` stops it (SIGTERM, then SIGKILL) and
a ``kill -9`` of the daemon takes it along; its TUN device and socket go with it and the next start creates them
again with the same key (from the key file) and port. The kernel device, like the other backends' devices, is
left in place by ``close()`` and reused on the next start (Flannel deletes it on SIGTERM and recreates it on every
start; see docs/operations.md).

The UAPI socket directory is one per machine, not per network namespace: two ``wireguard-go flannel-wg`` on one
machine clash ("UAPI listen error: unix socket in use"). A host has one; the testbed gives each simulated host a
private ``/var/run/wireguard`` (docs/testing.md).
"""
from __future__ import annotations

import base64
import ctypes
import errno
import logging
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Protocol, Tuple

from fastflannel.errors import BackendError, KernelError

log = logging.getLogger("fastflannel.kernel.wireguard")

UAPI_DIR = "/var/run/wireguard"
WIREGUARD_GO = "wireguard-go"
WIREGUARD_GO_ENV = "FASTFLANNEL_WIREGUARD_GO"  # path of the wireguard-go binary (default: found on PATH)
WIREGUARD_IMPL_ENV = "FASTFLANNEL_WIREGUARD"  # "kernel" | "userspace" | "" (probe)
START_TIMEOUT_S = 10.0  # wireguard-go creates its TUN and socket in ~50 ms; this only catches a hang
STOP_TIMEOUT_S = 5.0
UAPI_TIMEOUT_S = 5.0
PR_SET_PDEATHSIG = 1
ZERO_KEY = base64.b64encode(bytes(32)).decode()


@dataclass(frozen=True)
class WgPeer:
    """One peer as programmed: base64 keys, endpoint ``ip:port`` (or None), allowed IPs as CIDR text."""

    public_key: str
    endpoint: Optional[str] = None
    allowed_ips: Tuple[str, ...] = ()
    preshared_key: Optional[str] = None
    keepalive: int = 0


@dataclass
class WgState:
    listen_port: int = 0
    public_key: str = ""
    peers: Dict[str, WgPeer] = field(default_factory=dict)


class WgDevice(Protocol):
    name: str
    kind: str  # "kernel" or "wireguard-go": said in the log

    def configure(self, private_key: str, listen_port: int) -> None: ...
    def set_peer(self, peer: WgPeer) -> None: ...
    def remove_peer(self, public_key: str) -> None: ...
    def state(self) -> WgState: ...
    def alive(self) -> bool: ...
    def close(self) -> None: ...


def _hex(b64: str) -> str:
    return base64.b64decode(b64).hex()


def _b64(hexkey: str) -> str:
    return base64.b64encode(bytes.fromhex(hexkey)).decode()


def _endpoint_tuple(endpoint: str) -> Tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    return host.strip("[]"), int(port)


# -- UAPI (wireguard-go) ---------------------------------------------------------------------------------------
def uapi_set_lines(private_key: Optional[str] = None, listen_port: Optional[int] = None,
                   peers: List[WgPeer] = (), remove: List[str] = ()) -> List[str]:
    """Return the ``set=1`` request lines (without the blank terminator) for the given changes."""
    lines = ["set=1"]
    if private_key is not None:
        lines.append(f"private_key={_hex(private_key)}")
    if listen_port is not None:
        lines.append(f"listen_port={listen_port}")
    for pub in remove:
        lines += [f"public_key={_hex(pub)}", "remove=true"]
    for p in peers:
        lines.append(f"public_key={_hex(p.public_key)}")
        lines.append(f"preshared_key={_hex(p.preshared_key or ZERO_KEY)}")
        if p.endpoint:
            lines.append(f"endpoint={p.endpoint}")
        lines.append(f"persistent_keepalive_interval={p.keepalive}")
        lines.append("replace_allowed_ips=true")
        lines += [f"allowed_ip={a}" for a in p.allowed_ips]
    return lines


def parse_uapi_get(text: str) -> WgState:
    """Parse a ``get=1`` answer (``key=value`` lines; ``public_key`` starts a peer). Raise BackendError on errno."""
    st = WgState()
    cur: Optional[dict] = None

    def flush() -> None:
        if cur is not None:
            psk = cur.get("psk")
            st.peers[cur["pub"]] = WgPeer(cur["pub"], cur.get("endpoint"), tuple(cur["ips"]),
                                          None if psk in (None, ZERO_KEY) else psk, cur.get("ka", 0))

    for line in text.splitlines():
        k, sep, v = line.partition("=")
        if not sep:
            continue
        if k == "errno":
            if v != "0":
                raise BackendError(f"wireguard-go get: errno {v}")
        elif k == "listen_port" and cur is None:
            st.listen_port = int(v)
        elif k == "private_key" and cur is None:
            st.public_key = ""  # derived by the caller if needed; the private key is never kept here
        elif k == "public_key":
            flush()
            cur = {"pub": _b64(v), "ips": []}
        elif cur is not None:
            if k == "preshared_key":
                cur["psk"] = _b64(v)
            elif k == "endpoint":
                cur["endpoint"] = v
            elif k == "persistent_keepalive_interval":
                cur["ka"] = int(v)
            elif k == "allowed_ip":
                cur["ips"].append(v)
    flush()
    return st


class UapiClient:
    """One request per connection on ``<dir>/<name>.sock``; the answer ends with a blank line after ``errno=N``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def request(self, lines: List[str]) -> str:
        data = ("\n".join(lines) + "\n\n").encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
                s.settimeout(UAPI_TIMEOUT_S)
                s.connect(self.path)
                s.sendall(data)
                buf = b""
                while not buf.endswith(b"\n\n"):
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    buf += chunk
        except OSError as e:
            raise KernelError(f"wireguard UAPI {self.path} ({lines[0]})", e.strerror or str(e), e.errno or 0) from e
        return buf.decode(errors="replace")

    def set(self, lines: List[str]) -> None:
        answer = self.request(lines)
        for line in answer.splitlines():
            if line.startswith("errno="):
                if line != "errno=0":
                    code = -int(line[6:]) if line[6:].lstrip("-").isdigit() else 0
                    raise KernelError(f"wireguard UAPI {self.path} set", os.strerror(code) if code else line, code)
                return
        raise KernelError(f"wireguard UAPI {self.path} set", f"no errno in answer {answer[:200]!r}")

    def get(self) -> WgState:
        return parse_uapi_get(self.request(["get=1"]))


def _pdeathsig(parent: int):
    """Return the child's pre-exec hook: SIGTERM when the daemon dies; exit at once if it already died (the
    fork -> prctl window)."""
    def hook() -> None:  # runs in the child between fork and exec
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)
    return hook


class UserspaceDevice:
    """A ``wireguard-go -f <name>`` child process and its UAPI socket."""

    kind = "wireguard-go"

    def __init__(self, name: str, binary: str, uapi_dir: str = UAPI_DIR) -> None:
        self.name = name
        self.binary = binary
        self.sock = os.path.join(uapi_dir, f"{name}.sock")
        self.uapi = UapiClient(self.sock)
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> None:
        """Start the process and wait for its socket; raise BackendError with its output if it fails."""
        if self._socket_in_use():  # its answers would look like ours: never start beside it
            raise BackendError(
                f"{self.sock} is in use by another wireguard-go serving {self.name} (one UAPI directory per "
                f"machine, not per netns); stop it, or give this daemon a private /var/run/wireguard")
        env = dict(os.environ, WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD="1", LOG_LEVEL="error")
        # stdout/stderr: the daemon's (its errors land in the daemon log); the PDEATHSIG fires when the thread
        # that forked exits, so start() is called from the main or the network thread, both live until shutdown
        self.proc = subprocess.Popen([self.binary, "-f", self.name], env=env, stdin=subprocess.DEVNULL,
                                     preexec_fn=_pdeathsig(os.getpid()), close_fds=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            rc = self.proc.poll()
            if rc is not None:
                self.proc = None
                raise BackendError(
                    f"{self.binary} {self.name} exited with {rc} at start (see its message above); is "
                    f"{self.sock} in use by another wireguard-go (one UAPI directory per machine, not per netns)?")
            if os.path.exists(self.sock):
                try:
                    self.uapi.get()
                    return
                except BackendError:
                    pass
            if time.monotonic() > deadline:
                self.close()
                raise BackendError(f"{self.binary} {self.name}: no UAPI socket {self.sock} after "
                                   f"{START_TIMEOUT_S:.0f} s")
            time.sleep(0.02)

    def _socket_in_use(self, grace_s: float = 2.0) -> bool:
        """True if a live process answers on our socket path for ``grace_s`` (one whose device was just deleted
        needs a moment to exit); a stale socket of a dead process is fine (wireguard-go replaces it)."""
        deadline = time.monotonic() + grace_s
        while os.path.exists(self.sock):
            try:
                self.uapi.get()
            except BackendError:
                return False
            if time.monotonic() > deadline:
                return True
            time.sleep(0.1)
        return False

    def configure(self, private_key: str, listen_port: int) -> None:
        self.uapi.set(uapi_set_lines(private_key=private_key, listen_port=listen_port))

    def set_peer(self, peer: WgPeer) -> None:
        self.uapi.set(uapi_set_lines(peers=[peer]))

    def remove_peer(self, public_key: str) -> None:
        self.uapi.set(uapi_set_lines(remove=[public_key]))

    def state(self) -> WgState:
        return self.uapi.get()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def close(self) -> None:
        """Stop the process (SIGTERM, then SIGKILL); its device and socket go with it. Idempotent."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(STOP_TIMEOUT_S)


class WireGuardGenl:
    """Configure a kernel WireGuard device over generic netlink (pyroute2's socket from ``netlink.wireguard_socket``);
    keys are base64 text. Calls are serialised by a lock; every error is a ``KernelError`` naming the request."""

    def __init__(self, sock: Any = None) -> None:
        from fastflannel.kernel.netlink import call_translated, wireguard_socket

        self._translated = call_translated
        self._lock = threading.Lock()
        self._wg: Any = sock if sock is not None else wireguard_socket()  # ``sock``: tests pass a stand-in

    def close(self) -> None:
        with self._lock:
            wg, self._wg = self._wg, None
        if wg is not None:
            wg.close()

    def _call(self, what: str, fn: Callable[[Any], Any]) -> Any:
        with self._lock:
            if self._wg is None:
                raise KernelError(what, "wireguard netlink socket is closed")
            wg = self._wg
            return self._translated(what, lambda: fn(wg))

    def set_device(self, ifname: str, private_key: str, listen_port: int) -> None:
        self._call(f"wg set {ifname} private-key listen-port {listen_port}",
                   lambda w: w.set(ifname, private_key=private_key, listen_port=listen_port))

    def set_peer(self, ifname: str, public_key: str, endpoint: Optional[tuple], allowed_ips: List[str],
                 preshared_key: Optional[str], keepalive: int) -> None:
        """Add or update a peer; its allowed IPs are replaced by ``allowed_ips`` (``replace_allowed_ips``)."""
        peer: dict = {"public_key": public_key, "replace_allowed_ips": True, "allowed_ips": list(allowed_ips),
                      "persistent_keepalive": keepalive, "preshared_key": preshared_key or ZERO_KEY}
        if endpoint is not None:
            peer["endpoint_addr"], peer["endpoint_port"] = str(endpoint[0]), int(endpoint[1])
        self._call(f"wg set {ifname} peer {public_key} allowed-ips {','.join(allowed_ips)}",
                   lambda w: w.set(ifname, peer=peer))

    def remove_peer(self, ifname: str, public_key: str) -> None:
        self._call(f"wg set {ifname} peer {public_key} remove",
                   lambda w: w.set(ifname, peer={"public_key": public_key, "remove": True}))

    def dump(self, ifname: str) -> WgState:
        """``wg show <ifname> dump`` as a WgState (a device with many peers spans several messages)."""
        msgs = self._call(f"wg show {ifname}", lambda w: w.info(ifname))
        st = WgState()
        for m in msgs:
            st.listen_port = m.get_attr("WGDEVICE_A_LISTEN_PORT") or st.listen_port
            st.public_key = _genl_key(m.get_attr("WGDEVICE_A_PUBLIC_KEY")) or st.public_key
            for p in m.get_attr("WGDEVICE_A_PEERS") or []:
                ep = p.get_attr("WGPEER_A_ENDPOINT")
                endpoint = None
                if ep is not None and ep.get("port"):
                    addr = ep.get("addr")
                    endpoint = f"[{addr}]:{ep['port']}" if ":" in str(addr) else f"{addr}:{ep['port']}"
                pub, psk = _genl_key(p.get_attr("WGPEER_A_PUBLIC_KEY")), _genl_key(p.get_attr("WGPEER_A_PRESHARED_KEY"))
                ips = tuple(a["addr"] for a in (p.get_attr("WGPEER_A_ALLOWEDIPS") or []) if "addr" in a)
                st.peers[pub] = WgPeer(pub, endpoint, ips, None if psk in ("", ZERO_KEY) else psk,
                                       p.get_attr("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL") or 0)
        return st


def _genl_key(v: Any) -> str:
    """pyroute2 decodes a key attribute to ``{"key": raw, "value": base64 bytes}`` (or the value); return text."""
    if v is None:
        return ""
    if isinstance(v, dict):
        v = v.get("value", b"")
    return v.decode() if isinstance(v, bytes) else str(v)


class KernelDevice:
    """A kernel ``wireguard`` link configured over generic netlink."""

    kind = "kernel"

    def __init__(self, name: str, genl) -> None:
        self.name = name
        self.genl = genl
        self._netlink = None

    def configure(self, private_key: str, listen_port: int) -> None:
        self.genl.set_device(self.name, private_key, listen_port)

    def set_peer(self, peer: WgPeer) -> None:
        ep = _endpoint_tuple(peer.endpoint) if peer.endpoint else None
        self.genl.set_peer(self.name, peer.public_key, ep, list(peer.allowed_ips), peer.preshared_key,
                           peer.keepalive)

    def remove_peer(self, public_key: str) -> None:
        self.genl.remove_peer(self.name, public_key)

    def state(self) -> WgState:
        return self.genl.dump(self.name)

    def alive(self) -> bool:
        return self._netlink is None or self._netlink.link_info(self.name) is not None

    def close(self) -> None:
        """Close the generic netlink socket; the device stays (reused by the next start)."""
        self.genl.close()


def find_wireguard_go() -> Optional[str]:
    path = os.environ.get(WIREGUARD_GO_ENV) or shutil.which(WIREGUARD_GO)
    return path if path and os.access(path, os.X_OK) else None


def open_device(netlink, name: str, mtu: int, impl: Optional[str] = None) -> WgDevice:
    """Create (or for the kernel, reuse) WireGuard device ``name`` with ``mtu``; return it up to the key/port step.

    ``impl``: "kernel", "userspace" or None (probe the kernel, fall back to wireguard-go; default from
    ``$FASTFLANNEL_WIREGUARD``). Raise BackendError when neither is available."""
    impl = (impl if impl is not None else os.environ.get(WIREGUARD_IMPL_ENV, "")).strip().lower()
    if impl not in ("", "kernel", "userspace"):
        raise BackendError(f"{WIREGUARD_IMPL_ENV}={impl!r}: must be kernel, userspace or empty (probe)")
    existing = netlink.link_info(name)
    kernel_error: Optional[KernelError] = None
    if impl in ("", "kernel"):
        if existing is not None and existing.kind == "wireguard":
            log.info("event=wireguard_reused dev=%s", name)
            if mtu > 0 and existing.mtu != mtu:
                netlink.set_mtu(name, mtu)
            return _kernel_device(netlink, name)
        if existing is not None:
            log.warning("event=wireguard_exists dev=%s kind=%s msg=\"%s already exists; recreating device\"",
                        name, existing.kind or "unknown", name)
            netlink.delete_link(name)  # a wireguard-go TUN: its process exits when the device goes
            _wait_gone(netlink, name)
            existing = None
        try:
            netlink.add_wireguard(name, mtu)
            return _kernel_device(netlink, name)
        except KernelError as e:
            if e.errno != errno.EOPNOTSUPP or impl == "kernel":
                raise
            kernel_error = e
    binary = find_wireguard_go()
    if binary is None:
        why = "the kernel has no wireguard module" if kernel_error is not None else f"{WIREGUARD_IMPL_ENV}=userspace"
        raise BackendError(
            f"wireguard: {why} and {WIREGUARD_GO} is not installed (PATH or ${WIREGUARD_GO_ENV}); load the module "
            f"(modprobe wireguard, kernel >= 5.6 or the wireguard package) or install wireguard-go")
    if existing is not None:
        log.warning("event=wireguard_exists dev=%s kind=%s msg=\"%s already exists; recreating device\"",
                    name, existing.kind or "unknown", name)
        netlink.delete_link(name)
        _wait_gone(netlink, name)
    dev = UserspaceDevice(name, binary)
    dev.start()
    if mtu > 0:
        try:
            netlink.set_mtu(name, mtu)
        except BackendError:
            dev.close()
            raise
    return dev


def _kernel_device(netlink, name: str) -> KernelDevice:
    dev = KernelDevice(name, WireGuardGenl())
    dev._netlink = netlink
    return dev


def _wait_gone(netlink, name: str, timeout: float = STOP_TIMEOUT_S) -> None:
    """Wait until link ``name`` is gone (a deleted wireguard-go TUN takes its process a moment)."""
    deadline = time.monotonic() + timeout
    while netlink.link_info(name) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
