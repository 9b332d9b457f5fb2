# SPDX-License-Identifier: Apache-2.0
"""Lease values and the pure lease watcher (flannel ``pkg/lease``).

``LeaseAttrs`` serialises to Flannel's JSON byte for byte (Go ``json.Marshal`` field order, no spaces,
``PublicIPv6`` always present, ``BackendType``/``BackendData``/``BackendV6Data`` omitted when empty) and
parses it the way Go does (field names case-insensitive, unknown fields ignored).

``LeaseWatcher`` turns a snapshot or a batch of store events into Added/Removed events for the backends.
It is pure: no I/O, no clock. Two deliberate improvements over Flannel (flannel-compat.md section 3):
- a snapshot in which a known subnet has *changed* attributes (new VtepMAC or PublicIP) emits Added with
  the new attributes, so the backend reprograms it (Flannel emits nothing, PR #1247);
- an event that could not be parsed never reaches the watcher (the registry skips it), so one bad value
  cannot make every remote lease look removed;
- leases are known by their IPv4 subnet (unique in the Network); a removal whose IPv6 part differs from the
  known lease's is the delete of a key the host no longer uses (re-keyed from ``<v4>`` to ``<v4>&<v6>``) and
  leaves the known lease in place.
"""
from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any, Dict, Iterable, List, Optional, Tuple

from fastflannel.ip import parse_ipv4


class LeaseParseError(ValueError):
    """A lease value is not Flannel lease JSON; the message says which field is wrong."""


@dataclass(frozen=True)
class LeaseAttrs:
    """What a host advertises in its lease value."""

    public_ip: IPv4Address
    backend_type: str = ""
    backend_data: Optional[Any] = field(default=None, compare=True, hash=False)
    public_ipv6: Optional[IPv6Address] = None
    backend_v6_data: Optional[Any] = field(default=None, compare=True, hash=False)

    def to_json(self) -> str:
        """Return Flannel's exact JSON encoding (field order of flannel's Go struct, compact)."""
        parts = [
            '"PublicIP":' + json.dumps(str(self.public_ip)),
            '"PublicIPv6":' + (json.dumps(str(self.public_ipv6)) if self.public_ipv6 else "null"),
        ]
        if self.backend_type:
            parts.append('"BackendType":' + json.dumps(self.backend_type))
        if self.backend_data is not None:
            parts.append('"BackendData":' + _compact(self.backend_data))
        if self.backend_v6_data is not None:
            parts.append('"BackendV6Data":' + _compact(self.backend_v6_data))
        return "{" + ",".join(parts) + "}"

    @classmethod
    def from_json(cls, text: "str | bytes") -> "LeaseAttrs":
        """Parse a lease value; raise ``LeaseParseError`` naming the problem."""
        try:
            raw = json.loads(text)
        except (ValueError, TypeError) as e:
            raise LeaseParseError(f"lease value is not JSON: {e}") from None
        if not isinstance(raw, dict):
            raise LeaseParseError(f"lease value must be a JSON object, got {type(raw).__name__}")
        low = {k.lower(): v for k, v in raw.items()}
        pub = low.get("publicip")
        if not isinstance(pub, str):
            raise LeaseParseError(f"PublicIP: missing or not a string ({pub!r})")
        try:
            public_ip = parse_ipv4(pub)
        except ValueError:
            raise LeaseParseError(f"PublicIP: {pub!r} is not an IPv4 address") from None
        pub6 = low.get("publicipv6")
        public_ipv6 = None
        if pub6 is not None:
            try:
                public_ipv6 = IPv6Address(pub6)
            except (ValueError, TypeError):
                raise LeaseParseError(f"PublicIPv6: {pub6!r} is not an IPv6 address") from None
        btype = low.get("backendtype") or ""
        if not isinstance(btype, str):
            raise LeaseParseError(f"BackendType: must be a string, got {btype!r}")
        return cls(
            public_ip=public_ip,
            backend_type=btype,
            backend_data=_freeze(low.get("backenddata")),
            public_ipv6=public_ipv6,
            backend_v6_data=_freeze(low.get("backendv6data")),
        )

    def vxlan_data(self) -> Tuple[int, str]:
        """Return (VNI, VtepMAC) from BackendData; raise ``LeaseParseError`` if absent or malformed."""
        d = self.backend_data
        if not isinstance(d, dict):
            raise LeaseParseError(f"BackendData: vxlan lease needs an object with VNI and VtepMAC, got {d!r}")
        low = {k.lower(): v for k, v in d.items()}
        vni, mac = low.get("vni"), low.get("vtepmac")
        if not isinstance(vni, int) or not isinstance(mac, str):
            raise LeaseParseError(f"BackendData: bad VNI/VtepMAC in {d!r}")
        return vni, mac.lower()


class _FrozenDict(dict):
    """A dict that hashes, so frozen dataclasses holding BackendData stay hashable."""

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(json.dumps(self, sort_keys=True))


def _freeze(v: Any) -> Any:
    if isinstance(v, dict):
        return _FrozenDict({k: _freeze(x) for k, x in v.items()})
    return v


def _compact(v: Any) -> str:
    return json.dumps(v, separators=(",", ":"))


@dataclass(frozen=True)
class Lease:
    """A subnet held by a host. ``expiration`` is a Unix time (0 = unknown); ``lease_id`` the etcd lease."""

    subnet: IPv4Network
    attrs: LeaseAttrs
    expiration: float = field(default=0.0, compare=False)
    lease_id: int = field(default=0, compare=False)
    subnet6: Optional[IPv6Network] = None


class EventType(enum.Enum):
    ADDED = "added"
    REMOVED = "removed"


@dataclass(frozen=True)
class Event:
    type: EventType
    lease: Lease


class LeaseWatcher:
    """Track remote leases (own subnet filtered out) and emit Added/Removed events. Pure."""

    def __init__(self, own_subnet: Optional[IPv4Network] = None) -> None:
        self.own_subnet = own_subnet
        self.leases: Dict[IPv4Network, Lease] = {}

    def reset(self, snapshot: Iterable[Lease]) -> List[Event]:
        """Diff a full snapshot against the known set; return the events that make them equal."""
        new: Dict[IPv4Network, Lease] = {}
        for lease in snapshot:
            if lease.subnet != self.own_subnet:
                new[lease.subnet] = lease
        events: List[Event] = []
        for subnet, old in self.leases.items():
            if subnet not in new:
                events.append(Event(EventType.REMOVED, old))
        for subnet, lease in new.items():
            old = self.leases.get(subnet)
            if old is None or old.attrs != lease.attrs:
                events.append(Event(EventType.ADDED, lease))
        self.leases = new
        return events

    def update(self, events: Iterable[Event]) -> List[Event]:
        """Apply store events; a removal carries the last known attributes."""
        out: List[Event] = []
        for ev in events:
            subnet = ev.lease.subnet
            if subnet == self.own_subnet:
                continue
            if ev.type is EventType.ADDED:
                self.leases[subnet] = ev.lease
                out.append(ev)
            else:
                known = self.leases.get(subnet)
                if known is None:  # an unknown removal has nothing programmed to clean up
                    continue
                if known.subnet6 != ev.lease.subnet6:
                    # the key of another (IPv4 subnet, IPv6 subnet) pair went: the host re-keyed its lease (e.g.
                    # from v4-only to dual stack) and the lease we know is still there
                    continue
                del self.leases[subnet]
                out.append(Event(EventType.REMOVED, known))
        return out


def project(lease: Lease, family: int) -> Optional[Lease]:
    """Return ``lease`` as one address family's backend sees it, or None if it has no such family.

    Family 4 is the lease itself. Family 6 is a Lease whose ``subnet``, ``attrs.public_ip`` and
    ``attrs.backend_data`` are the IPv6 subnet, PublicIPv6 and BackendV6Data (None without an IPv6 subnet or
    PublicIPv6: a v4-only lease, which the IPv6 side skips as Flannel does), so one backend class programs either
    family (no per-family copies of the code)."""
    if family == 4:
        return lease
    if lease.subnet6 is None or lease.attrs.public_ipv6 is None:
        return None
    a = lease.attrs
    return Lease(
        subnet=lease.subnet6,  # type: ignore[arg-type]
        attrs=LeaseAttrs(public_ip=a.public_ipv6, backend_type=a.backend_type,  # type: ignore[arg-type]
                         backend_data=a.backend_v6_data),
        expiration=lease.expiration,
        lease_id=lease.lease_id,
    )
