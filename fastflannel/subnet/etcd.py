# SPDX-License-Identifier: Apache-2.0
"""EtcdRegistry: the ``Registry`` verbs on etcd v3 through its gRPC gateway (the only etcd3gw importer).

Layout and values are Flannel's: ``<prefix>/config`` and ``<prefix>/subnets/<ip>-<len>`` holding exactly
``LeaseAttrs.to_json()``, each subnet bound to its own etcd lease (flannel-compat.md section 1).

etcd3gw notes (2.7.0, checked against Debian's etcd 3.4.23):
- the API path is discovered per client from ``GET /version`` (3.4 -> ``/v3/``; 3.3 -> ``/v3beta/``); we keep
  discovery (or take ``api_path``) and pay it once per endpoint;
- one ``Etcd3Client`` talks to one host:port, so we keep one client per endpoint and rotate on connection errors;
- no user/password support: we call ``/v3/auth/authenticate`` ourselves and send the token in the
  ``Authorization`` header of the client's session (re-authenticating once when etcd says the token is invalid);
- its ``watch()`` ignores the gateway's ``{"canceled": true, "compact_revision": N}`` message, so a watch from a
  compacted revision hangs silently, and it hides the stream's end; it also treats each HTTP chunk as one JSON
  message. We open the ``/watch`` stream on the client's session ourselves, split it by lines on a reader thread,
  and turn compaction into ``CompactedError`` and a broken stream into ``StoreUnavailableError``;
- a keep-alive or TimeToLive on an unknown/expired lease answers TTL -1 (no HTTP error): ``refresh`` maps that to
  ``LeaseNotFoundError``;
- requests sessions ignore the environment (``trust_env = False``): REQUESTS_CA_BUNDLE would otherwise replace
  ``--etcd-cafile``, and proxy variables would reroute etcd traffic;
- unary calls get a timeout (etcd3gw's default is none, so a hung member would block the caller forever);
- every connection has TCP keep-alive (idle 5 s, 3 probes 2 s apart): the watch stream has no read timeout (an
  idle watch is silent) and etcd sends nothing on it unasked, so without probes a stream whose peer vanished
  (partition, firewall, a host cut off) stayed "open" until the next periodic re-list (60 s); with them it ends
  within ~11 s, the watch reconnects, and a compacted start revision triggers the re-list at once.

Creates are a single txn ``if create_revision(key) == 0 then put(key, value, lease) else range(key)``: the else
branch tells a lost race (someone else's lease) from our own retried request (our lease), so a create is never
reported lost when it actually went through. The granted lease is revoked only when the txn definitely failed.
"""
from __future__ import annotations

import json
import logging
import queue
import socket
import threading
import time
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, TypeVar, Union
from urllib.parse import urlsplit

import etcd3gw
import requests
import requests.adapters
from etcd3gw import exceptions as etcd_exc
from etcd3gw.utils import _decode, _encode, _increment_last_byte

from fastflannel.ip import parse_subnet_key
from fastflannel.lease import EventType, Lease, LeaseAttrs
from fastflannel.subnet import StoreUnavailableError, SubnetError
from fastflannel.subnet.etcdhints import probe_hint, tls_hint
from fastflannel.subnet.registry import (
    CompactedError,
    LeaseNotFoundError,
    SubnetExistsError,
    WatchBatch,
    WatchItem,
    config_key,
    lease_from_kv,
    StoredSubnet,
    log_skipped,
    removed_lease,
    stored_subnet,
    subnet_key,
    subnets_prefix,
)

log = logging.getLogger(__name__)

DEFAULT_ENDPOINTS = "http://127.0.0.1:4001,http://127.0.0.1:2379"  # flanneld's --etcd-endpoints default
DEFAULT_PREFIX = "/coreos.com/network"
DEFAULT_PORT = 2379
CONNECT_TIMEOUT_S = 3.0
REQUEST_TIMEOUT_S = 10.0
WATCH_TICK_S = 1.0  # longest gap between two yields of watch_subnets
KEEPALIVE_IDLE_S = 5  # TCP keep-alive on etcd connections: first probe after 5 s idle ...
KEEPALIVE_INTERVAL_S = 2  # ... then every 2 s ...
KEEPALIVE_PROBES = 3  # ... and the connection is dead after 3 unanswered probes (~11 s in all)
INSECURE_WARNING = "no certificate provided: connecting to etcd with http. This is insecure"

T = TypeVar("T")
_CONN_ERRORS = (etcd_exc.ConnectionFailedError, etcd_exc.ConnectionTimeoutError,
                etcd_exc.ApiVersionDiscoveryFailedError, etcd_exc.InternalServerError)


def _keepalive_socket_options() -> List[Tuple[int, int, int]]:
    from urllib3.connection import HTTPConnection

    opts = list(HTTPConnection.default_socket_options) + [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
    for name, value in (("TCP_KEEPIDLE", KEEPALIVE_IDLE_S), ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL_S),
                        ("TCP_KEEPCNT", KEEPALIVE_PROBES)):
        if hasattr(socket, name):
            opts.append((socket.IPPROTO_TCP, getattr(socket, name), value))
    return opts


class _KeepAliveAdapter(requests.adapters.HTTPAdapter):
    """An HTTP adapter whose connections probe their peer (TCP keep-alive): a dead watch stream ends."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["socket_options"] = _keepalive_socket_options()
        super().init_poolmanager(*args, **kwargs)


class EtcdConfigError(SubnetError, ValueError):
    """The etcd connection flags are inconsistent (endpoint URL, TLS files)."""


class EtcdRequestError(SubnetError):
    """etcd refused a request for a reason other than availability (permission, bad request)."""


@dataclass(frozen=True)
class Endpoint:
    scheme: str
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def parse_endpoints(endpoints: Union[str, Sequence[str]], tls: bool) -> List[Endpoint]:
    """Parse ``--etcd-endpoints`` (comma list of URLs; a bare host:port means http, or https with TLS)."""
    items = endpoints.split(",") if isinstance(endpoints, str) else list(endpoints)
    out: List[Endpoint] = []
    for raw in (x.strip() for x in items):
        if not raw:
            continue
        url = raw if "://" in raw else ("https://" if tls else "http://") + raw
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise EtcdConfigError(f"--etcd-endpoints: {raw!r} is not an http(s)://host:port URL")
        try:
            port = parts.port or DEFAULT_PORT
        except ValueError:
            raise EtcdConfigError(f"--etcd-endpoints: {raw!r} has an invalid port") from None
        if tls and parts.scheme != "https":
            raise EtcdConfigError(
                f"--etcd-endpoints: {raw!r} is plain http but --etcd-certfile/--etcd-keyfile were given; "
                "use https:// endpoints (refusing to send TLS credentials' traffic in clear)"
            )
        out.append(Endpoint(parts.scheme, parts.hostname, port))
    if not out:
        raise EtcdConfigError("--etcd-endpoints: no endpoint given")
    return out


class EtcdRegistry:
    """``Registry`` on etcd v3 (gRPC gateway via etcd3gw); thread-safe (one lock guards endpoint rotation)."""

    def __init__(
        self,
        endpoints: Union[str, Sequence[str]] = DEFAULT_ENDPOINTS,
        prefix: str = DEFAULT_PREFIX,
        keyfile: str = "",
        certfile: str = "",
        cafile: str = "",
        username: str = "",
        password: str = "",
        timeout: float = REQUEST_TIMEOUT_S,
        connect_timeout: float = CONNECT_TIMEOUT_S,
        api_path: Optional[str] = None,
    ) -> None:
        if bool(keyfile) != bool(certfile):
            raise EtcdConfigError("--etcd-keyfile and --etcd-certfile must be given together for TLS")
        tls = bool(keyfile and certfile)
        self.prefix = prefix.rstrip("/") or "/"
        self.endpoints = parse_endpoints(endpoints, tls)
        if not tls and any(e.scheme == "http" for e in self.endpoints):
            log.warning(INSECURE_WARNING)  # flanneld's words; not said when every endpoint is https
        self.username = username
        self._password = password
        self._timeout: Tuple[float, float] = (connect_timeout, timeout)
        self._connect_timeout = connect_timeout
        self._lock = threading.Lock()
        self._auth_lock = threading.Lock()
        self._idx = 0
        self._clients: List[etcd3gw.Etcd3Client] = []
        for ep in self.endpoints:
            session = requests.Session()
            # REQUESTS_CA_BUNDLE/CURL_CA_BUNDLE would silently override --etcd-cafile (requests #3829), and
            # *_PROXY/netrc must not redirect or decorate etcd traffic: the flags alone decide.
            session.trust_env = False
            adapter = _KeepAliveAdapter()
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            if ep.scheme == "https":
                session.verify = cafile or True
                if tls:
                    session.cert = (certfile, keyfile)
            self._clients.append(
                etcd3gw.Etcd3Client(host=ep.host, port=ep.port, protocol=ep.scheme, timeout=self._timeout,
                                    api_path=api_path, session=session)
            )
        self._authed = [False] * len(self._clients)

    def close(self) -> None:
        """Close the HTTP sessions (idempotent). Open watch iterators should be closed first by their owners."""
        for c in self._clients:
            try:
                c.session.close()
            except Exception:  # noqa: BLE001 - closing is best effort
                pass

    def __enter__(self) -> "EtcdRegistry":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing ----------------------------------------------------------------------------------------------
    def endpoints_text(self) -> str:
        return ",".join(str(e) for e in self.endpoints)

    def api_path(self) -> str:
        """Return the gateway path of the current endpoint (discovering it if needed)."""
        return self._call("version", lambda c: c.api_path)

    def _authenticate(self, i: int, force: bool = False) -> None:
        if not self.username:
            return
        with self._auth_lock:
            if self._authed[i] and not force:
                return
            c = self._clients[i]
            c.session.headers.pop("Authorization", None)
            try:
                r = c.post(c.get_url("/auth/authenticate"), json={"name": self.username, "password": self._password})
            except etcd_exc.Etcd3Exception as e:
                if isinstance(e, _CONN_ERRORS):
                    raise
                raise EtcdRequestError(
                    f"etcd authentication as {self.username!r} at {self.endpoints[i]} failed: {_detail(e)}; "
                    "check --etcd-username/--etcd-password"
                ) from None
            c.session.headers["Authorization"] = r["token"]
            self._authed[i] = True

    def _call(self, op: str, fn: Callable[[etcd3gw.Etcd3Client], T]) -> T:
        """Run ``fn`` on the current endpoint; on connection errors try the others; map errors."""
        with self._lock:
            start = self._idx
        errors: List[str] = []
        failed: List[Endpoint] = []
        n = len(self._clients)
        for k in range(n):
            i = (start + k) % n
            c = self._clients[i]
            try:
                self._authenticate(i)
                try:
                    result = fn(c)
                except etcd_exc.Etcd3Exception as e:
                    if self.username and _is_auth_error(e):
                        self._authenticate(i, force=True)  # token expired (etcd simple tokens live 5 min)
                        result = fn(c)
                    else:
                        raise
            except _CONN_ERRORS as e:
                errors.append(f"{self.endpoints[i]}: {_detail(e)}")
                failed.append(self.endpoints[i])
                continue
            except etcd_exc.Etcd3Exception as e:
                raise EtcdRequestError(f"etcd {op} at {self.endpoints[i]} failed: {_detail(e)}") from None
            if i != start:
                with self._lock:
                    self._idx = i
                log.info("event=etcd_failover op=%s endpoint=%s", op, self.endpoints[i])
            return result
        hints = sorted({h for h in (tls_hint(ep, err) or probe_hint(ep, err, self._connect_timeout)
                                    for ep, err in zip(failed, errors)) if h})
        advice = " ".join(hints) if hints else (
            "Check that etcd is running and reachable from this host, and the --etcd-endpoints and TLS flags "
            "(--etcd-cafile, --etcd-certfile, --etcd-keyfile)")
        raise StoreUnavailableError(f"etcd unavailable ({op}) at {self.endpoints_text()}: {'; '.join(errors)}. {advice}")

    def _range(self, c: etcd3gw.Etcd3Client, key: str, prefix: bool = False) -> Dict[str, Any]:
        payload: Dict[str, Any] = {"key": _encode(key)}
        if prefix:
            payload["range_end"] = _encode(_increment_last_byte(key))
        return c.post(c.get_url("/kv/range"), json=payload)

    # -- Registry ----------------------------------------------------------------------------------------------
    def get_config(self) -> Optional[str]:
        r = self._call("get config", lambda c: self._range(c, config_key(self.prefix)))
        kvs = r.get("kvs") or []
        if not kvs:
            return None
        return _decode(kvs[0].get("value", "")).decode("utf-8", errors="replace")

    def _parse_kv(self, kv: Dict[str, Any]) -> Lease:
        key = _decode(kv["key"]).decode("utf-8", errors="replace")
        try:
            return lease_from_kv(key, _decode(kv.get("value", "")), int(kv.get("lease", 0)))
        except ValueError as e:
            log_skipped(log, key, e)
            raise

    def get_subnets(self) -> Tuple[List[Lease], int]:
        r = self._call("list subnets", lambda c: self._range(c, subnets_prefix(self.prefix), prefix=True))
        out: List[Lease] = []
        for kv in r.get("kvs") or []:
            try:
                out.append(self._parse_kv(kv))
            except ValueError:
                continue
        return out, int(r["header"]["revision"])

    def get_subnet(self, subnet: IPv4Network, subnet6: Optional[IPv6Network] = None) -> Optional[Lease]:
        r = self._call("get subnet", lambda c: self._range(c, subnet_key(self.prefix, subnet, subnet6)))
        kvs = r.get("kvs") or []
        if not kvs:
            return None
        try:
            return self._parse_kv(kvs[0])
        except ValueError:
            return None

    def read_subnet(self, subnet: IPv4Network, subnet6: Optional[IPv6Network] = None) -> Optional[StoredSubnet]:
        r = self._call("get subnet", lambda c: self._range(c, subnet_key(self.prefix, subnet, subnet6)))
        kvs = r.get("kvs") or []
        if not kvs:
            return None
        kv = kvs[0]
        key = _decode(kv["key"]).decode("utf-8", errors="replace")
        return stored_subnet(key, _decode(kv.get("value", "")), int(kv.get("mod_revision", 0)), int(kv.get("lease", 0)))

    def replace_subnet(self, subnet: IPv4Network, attrs: LeaseAttrs, ttl: int, mod_revision: int,
                       lease_id: Optional[int] = None, subnet6: Optional[IPv6Network] = None) -> Lease:
        key = subnet_key(self.prefix, subnet, subnet6)
        lid, remaining, granted = 0, 0, False
        if ttl > 0:
            if lease_id:
                remaining = self._lease_ttl(lease_id)
                lid = lease_id if remaining > 0 else 0
            if not lid:
                lid, remaining, granted = self._grant(ttl), ttl, True
        put: Dict[str, Any] = {"key": _encode(key), "value": _encode(attrs.to_json())}
        if lid:
            put["lease"] = lid
        txn = {
            "compare": [{"key": _encode(key), "result": "EQUAL", "target": "MOD", "mod_revision": mod_revision}],
            "success": [{"request_put": put}],
            "failure": [{"request_range": {"key": _encode(key)}}],
        }
        try:
            r = self._call("replace subnet", lambda c: c.post(c.get_url("/kv/txn"), data=json.dumps(txn)))
        except StoreUnavailableError:
            raise  # may have been applied: a granted lease is left to its TTL
        except SubnetError:
            if granted:
                self._revoke(lid)
            raise
        if not r.get("succeeded"):
            existing = _failure_kv(r)
            if not (lid and existing is not None and int(existing.get("lease", 0)) == lid
                    and _decode(existing.get("value", "")) == attrs.to_json().encode()):
                if granted:
                    self._revoke(lid)
                raise SubnetExistsError(subnet, key)
            # else our own write, answered on a retry after a lost response
        return Lease(subnet, attrs, time.time() + remaining if lid else 0.0, lid)

    def _grant(self, ttl: int) -> int:
        r = self._call("grant lease", lambda c: c.post(c.get_url("/lease/grant"), json={"TTL": ttl, "ID": 0}))
        return int(r["ID"])

    def _revoke(self, lease_id: int) -> None:
        try:
            self._call("revoke lease", lambda c: c.post(c.get_url("/kv/lease/revoke"), json={"ID": lease_id}))
        except SubnetError as e:
            log.warning("event=lease_revoke_failed lease_id=%x error=%r", lease_id, str(e))

    def create_subnet(self, subnet: IPv4Network, attrs: LeaseAttrs, ttl: int,
                      subnet6: Optional[IPv6Network] = None) -> Lease:
        key = subnet_key(self.prefix, subnet, subnet6)
        lease_id = self._grant(ttl) if ttl > 0 else 0
        put: Dict[str, Any] = {"key": _encode(key), "value": _encode(attrs.to_json())}
        if lease_id:
            put["lease"] = lease_id
        txn = {
            "compare": [{"key": _encode(key), "result": "EQUAL", "target": "CREATE", "create_revision": 0}],
            "success": [{"request_put": put}],
            "failure": [{"request_range": {"key": _encode(key)}}],
        }
        try:
            r = self._call("create subnet", lambda c: c.post(c.get_url("/kv/txn"), data=json.dumps(txn)))
        except StoreUnavailableError:
            # the txn may or may not have been applied: leave the lease to its TTL (acquire finds the key by PublicIP)
            raise
        except SubnetError:
            if lease_id:
                self._revoke(lease_id)
            raise
        if not r.get("succeeded"):
            existing = _failure_kv(r)
            if lease_id and existing is not None and int(existing.get("lease", 0)) == lease_id:
                pass  # our own write, answered on a retry after a lost response: it did go through
            else:
                if lease_id:
                    self._revoke(lease_id)
                raise SubnetExistsError(subnet, key)
        return Lease(subnet, attrs, time.time() + ttl if lease_id else 0.0, lease_id, subnet6=subnet6)

    def _lease_ttl(self, lease_id: int) -> int:
        r = self._call("lease ttl", lambda c: c.post(c.get_url("/kv/lease/timetolive"), json={"ID": lease_id}))
        return int(r.get("TTL", -1))

    def update_subnet(self, subnet: IPv4Network, attrs: LeaseAttrs, ttl: int,
                      lease_id: Optional[int] = None, subnet6: Optional[IPv6Network] = None) -> Lease:
        key = subnet_key(self.prefix, subnet, subnet6)
        for _ in range(2):
            lid = 0
            remaining = 0
            if ttl > 0:
                if lease_id:
                    remaining = self._lease_ttl(lease_id)
                    lid = lease_id if remaining > 0 else 0
                if not lid:
                    lid, remaining = self._grant(ttl), ttl
            payload: Dict[str, Any] = {"key": _encode(key), "value": _encode(attrs.to_json())}
            if lid:
                payload["lease"] = lid
            try:
                self._call("update subnet", lambda c: c.post(c.get_url("/kv/put"), json=payload))
            except EtcdRequestError as e:
                if lid and lid == lease_id and "lease not found" in str(e):
                    lease_id = None  # it expired between the check and the put: grant a new one
                    continue
                raise
            return Lease(subnet, attrs, time.time() + remaining if lid else 0.0, lid, subnet6=subnet6)
        raise EtcdRequestError(f"update of {key} failed: etcd lease vanished twice")  # pragma: no cover

    def refresh(self, lease_id: int) -> int:
        r = self._call("keep-alive", lambda c: c.post(c.get_url("/lease/keepalive"), json={"ID": lease_id}))
        ttl = int((r.get("result") or {}).get("TTL", -1))
        if ttl <= 0:
            raise LeaseNotFoundError(lease_id)
        return ttl

    def delete_subnet(self, subnet: IPv4Network, subnet6: Optional[IPv6Network] = None) -> None:
        key = subnet_key(self.prefix, subnet, subnet6)
        self._call("delete subnet", lambda c: c.post(c.get_url("/kv/deleterange"), json={"key": _encode(key)}))

    # -- watch -------------------------------------------------------------------------------------------------
    def _open_watch(self, start_revision: int) -> requests.Response:
        pfx = subnets_prefix(self.prefix)
        body = {"create_request": {"key": _encode(pfx), "range_end": _encode(_increment_last_byte(pfx)),
                                   "start_revision": start_revision}}

        def open_stream(c: etcd3gw.Etcd3Client) -> requests.Response:
            try:
                resp = c.session.post(c.get_url("/watch"), json=body, stream=True,
                                      timeout=(self._connect_timeout, None))
            except requests.exceptions.RequestException as e:
                raise etcd_exc.ConnectionFailedError(str(e)) from None
            if resp.status_code != 200:
                text = resp.text
                resp.close()
                exc = etcd_exc.ConnectionFailedError if resp.status_code in (500, 502, 503, 504) else etcd_exc.Etcd3Exception
                raise exc(text, resp.reason)
            return resp

        return self._call("watch", open_stream)

    def watch_subnets(self, start_revision: int, stop: threading.Event) -> Iterator[WatchBatch]:
        resp = self._open_watch(start_revision)
        q: "queue.Queue[Tuple[str, Any]]" = queue.Queue()

        def reader() -> None:
            try:
                for line in resp.iter_lines(chunk_size=8192):
                    if line.strip():
                        q.put(("msg", line))
                q.put(("eof", None))
            except Exception as e:  # noqa: BLE001 - any end of the stream is reported to the consumer
                q.put(("eof", e))

        t = threading.Thread(target=reader, name="etcd-watch-reader", daemon=True)
        t.start()
        revision = start_revision - 1
        try:
            while not stop.is_set():
                try:
                    kind, data = q.get(timeout=WATCH_TICK_S)
                except queue.Empty:
                    yield WatchBatch([], revision, [])
                    continue
                if kind == "eof":
                    raise StoreUnavailableError(
                        f"etcd watch stream on {subnets_prefix(self.prefix)} at {self.endpoints_text()} ended"
                        + (f": {data}" if data else "")
                    )
                msg = json.loads(data)
                if "error" in msg:
                    raise StoreUnavailableError(f"etcd watch error: {msg['error']}")
                result = msg.get("result") or {}
                compact = int(result.get("compact_revision", 0) or 0)
                if compact:
                    raise CompactedError(start_revision, compact)
                if result.get("canceled"):
                    raise StoreUnavailableError(f"etcd cancelled the watch: {result.get('cancel_reason', '')}")
                events = result.get("events")
                if not events:
                    continue  # created / progress notification
                items: List[WatchItem] = []
                skipped: List[str] = []
                for ev in events:
                    kv = ev.get("kv") or {}
                    revision = max(revision, int(kv.get("mod_revision", 0)))
                    key = _decode(kv.get("key", "")).decode("utf-8", errors="replace")
                    try:
                        if ev.get("type") == "DELETE":
                            net, net6 = parse_subnet_key(key.rsplit("/", 1)[-1])
                            items.append((EventType.REMOVED, removed_lease(net, net6)))
                        else:
                            items.append((EventType.ADDED, self._parse_kv(kv)))
                    except ValueError as e:
                        if ev.get("type") == "DELETE":
                            log_skipped(log, key, e)
                        skipped.append(key)
                yield WatchBatch(items, revision, skipped)
        finally:
            _close_stream(resp)
            t.join(2)


def _failure_kv(txn_result: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    for r in txn_result.get("responses") or []:
        kvs = (r.get("response_range") or {}).get("kvs") or []
        if kvs:
            return kvs[0]
    return None


def _detail(e: Exception) -> str:
    d = getattr(e, "detail_text", None)
    if d:
        try:
            j = json.loads(d)
            return str(j.get("message") or j.get("error") or d)
        except (ValueError, AttributeError):
            return str(d)[:300]
    return str(e)[:300] or type(e).__name__


def _is_auth_error(e: Exception) -> bool:
    d = _detail(e).lower()
    return "invalid auth token" in d or "user name is empty" in d or "auth: " in d and "token" in d


def _close_stream(resp: requests.Response) -> None:
    """Cancel a streaming watch: shut the socket down (unblocks the reader thread), then close."""
    try:
        fp = resp.raw._fp  # http.client.HTTPResponse
        s = socket.fromfd(fp.fileno(), socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.shutdown(socket.SHUT_RDWR)
        finally:
            s.close()
    except Exception:  # noqa: BLE001 - already closed or not a socket: nothing to shut down
        pass
    try:
        resp.close()
    except Exception:  # noqa: BLE001
        pass
