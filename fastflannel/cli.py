# SPDX-License-Identifier: Apache-2.0
"""``fastflanneld``: flanneld's flags (names, defaults, meanings) -> ``DaemonOptions`` -> ``Daemon.run()``.

Thin on purpose: no network logic here. Every flag can also come from ``FLANNELD_<FLAG>`` (upper case,
dashes as underscores); the command line wins, as in flanneld. ``--flag value`` and ``--flag=value``
both work, and so does Go's single-dash spelling (``-etcd-endpoints=...``).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from ipaddress import IPv4Address
from typing import Dict, List, Optional, Sequence

from fastflannel import __version__
from fastflannel.options import (DEFAULT_ENDPOINTS, DEFAULT_PREFIX, DEFAULT_SUBNET_FILE, RENEW_MARGIN_MAX,
                                 RENEW_MARGIN_MIN, DaemonOptions)


class UsageError(ValueError):
    """A flag value is invalid; the message names the flag."""


def _bool(text: str) -> bool:
    low = str(text).strip().lower()
    if low in ("1", "t", "true", "yes", "on"):
        return True
    if low in ("0", "f", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {text!r} (use true or false)")


# (flag, dest, kind, default, help); kind: str | list | int | bool
_FLAGS = [
    ("etcd-endpoints", "etcd_endpoints", "str", DEFAULT_ENDPOINTS, "comma-separated etcd endpoints"),
    ("etcd-prefix", "etcd_prefix", "str", DEFAULT_PREFIX, "etcd prefix"),
    ("etcd-keyfile", "etcd_keyfile", "str", "", "SSL key file used to secure etcd communication"),
    ("etcd-certfile", "etcd_certfile", "str", "", "SSL certification file used to secure etcd communication"),
    ("etcd-cafile", "etcd_cafile", "str", "", "SSL Certificate Authority file used to secure etcd communication"),
    ("etcd-username", "etcd_username", "str", "", "username for BasicAuth to etcd"),
    ("etcd-password", "etcd_password", "str", "", "password for BasicAuth to etcd"),
    ("iface", "iface", "list", None, "interface to use (IP or name) for inter-host communication; repeatable"),
    ("iface-regex", "iface_regex", "list", None, "regex matching the first interface (IP, then name) to use; repeatable"),
    ("iface-can-reach", "iface_can_reach", "str", "", "detect the interface to use from the route to this IP (what 'ip route get <ip>' uses)"),
    ("public-ip", "public_ip", "str", "", "IP accessible by other nodes for inter-host communication"),
    ("public-ipv6", "public_ipv6", "str", "", "IPv6 accessible by other nodes for inter-host communication"),
    ("subnet-file", "subnet_file", "str", DEFAULT_SUBNET_FILE, "filename where env variables (subnet, MTU, ...) will be written to"),
    ("subnet-lease-renew-margin", "subnet_lease_renew_margin", "int", 60, "subnet lease renewal margin, in minutes, ranging from 1 to 1439"),
    ("ip-masq", "ip_masq", "bool", False, "setup IP masquerade rule for traffic destined outside of overlay network"),
    ("iptables-resync", "iptables_resync", "int", 5, "resync period for iptables rules, in seconds"),
    ("iptables-forward-rules", "iptables_forward_rules", "bool", True, "add default accept rules to FORWARD chain in iptables"),
    ("healthz-ip", "healthz_ip", "str", "0.0.0.0", "the IP address for healthz server to listen"),
    ("healthz-port", "healthz_port", "int", 0, "the port for healthz server to listen (0 to disable)"),
]
_LONG = {f[0] for f in _FLAGS} | {"version", "v"}


def _go_style(argv: Sequence[str]) -> List[str]:
    """Accept Go's single-dash long flags (``-ip-masq``) as flanneld does."""
    out = []
    for a in argv:
        if a.startswith("-") and not a.startswith("--") and len(a) > 2:
            name = a[1:].split("=", 1)[0]
            if name in _LONG and name != "v":
                a = "-" + a
        out.append(a)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastflanneld",
        description="Flannel-compatible overlay network daemon. Every flag may also be set as FLANNELD_<FLAG>.",
        argument_default=argparse.SUPPRESS,  # absent flags stay absent, so the environment can fill them
    )
    for flag, dest, kind, default, help_ in _FLAGS:
        h = f"{help_} (default {default!r}; env FLANNELD_{dest.upper()})"
        if kind == "list":
            p.add_argument(f"--{flag}", dest=dest, action="append", metavar="VALUE", help=h)
        elif kind == "bool":
            p.add_argument(f"--{flag}", dest=dest, nargs="?", const=True, type=_bool, metavar="BOOL", help=h)
        elif kind == "int":
            p.add_argument(f"--{flag}", dest=dest, type=int, metavar="N", help=h)
        else:
            p.add_argument(f"--{flag}", dest=dest, metavar="VALUE", help=h)
    p.add_argument("-v", dest="verbosity", nargs="?", const=1, type=int, metavar="LEVEL",
                   help="log level for V logs (-v or -v=2); env FLANNELD_V")
    p.add_argument("--version", action="store_true", help="print version and exit")
    return p


def parse_options(argv: Sequence[str], environ: Optional[Dict[str, str]] = None) -> DaemonOptions:
    """Return options from argv, then ``FLANNELD_*`` for flags not given, then flanneld's defaults."""
    env = os.environ if environ is None else environ
    ns = vars(build_parser().parse_args(_go_style(argv)))
    opts = DaemonOptions()
    for flag, dest, kind, default, _ in _FLAGS:
        if dest in ns:
            value = ns[dest]
        else:
            raw = env.get("FLANNELD_" + dest.upper())
            if raw is None:
                continue
            try:
                value = _from_env(kind, raw)
            except (ValueError, argparse.ArgumentTypeError) as e:
                raise UsageError(f"FLANNELD_{dest.upper()}={raw!r}: {e}") from None
        if dest == "etcd_endpoints":
            value = [e.strip() for e in value.split(",") if e.strip()]
        setattr(opts, dest, value)
    if "verbosity" in ns:
        opts.verbosity = ns["verbosity"]
    elif env.get("FLANNELD_V"):
        opts.verbosity = int(env["FLANNELD_V"])
    check_options(opts)
    return opts


def _from_env(kind: str, raw: str):
    if kind == "list":
        return [v for v in raw.split(",") if v]
    if kind == "bool":
        return _bool(raw)
    if kind == "int":
        return int(raw)
    return raw


def check_options(opts: DaemonOptions) -> None:
    """Raise ``UsageError`` for values flanneld would reject."""
    if not RENEW_MARGIN_MIN <= opts.subnet_lease_renew_margin <= RENEW_MARGIN_MAX:
        raise UsageError(
            f"--subnet-lease-renew-margin={opts.subnet_lease_renew_margin}: must be between "
            f"{RENEW_MARGIN_MIN} and {RENEW_MARGIN_MAX} minutes"
        )
    if not opts.etcd_endpoints:
        raise UsageError("--etcd-endpoints: at least one endpoint is required")
    if bool(opts.etcd_keyfile) != bool(opts.etcd_certfile):
        raise UsageError("--etcd-keyfile and --etcd-certfile must be given together (TLS needs both)")
    if opts.iface_can_reach:
        try:
            IPv4Address(opts.iface_can_reach)
        except ValueError:
            raise UsageError(f"--iface-can-reach={opts.iface_can_reach}: not an IPv4 address") from None
    if not 0 <= opts.healthz_port <= 65535:
        raise UsageError(f"--healthz-port={opts.healthz_port}: not a port number")


def setup_logging(verbosity: int) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbosity > 0 else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if "--version" in argv or "-version" in argv:
            print(__version__)
            return 0
        opts = parse_options(argv)
    except UsageError as e:
        print(f"fastflanneld: {e}", file=sys.stderr)
        return 1
    setup_logging(opts.verbosity)
    from fastflannel.daemon import Daemon  # imported late: --help and --version stay light

    return Daemon(opts).run()


if __name__ == "__main__":
    raise SystemExit(main())
