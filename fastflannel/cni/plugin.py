# SPDX-License-Identifier: Apache-2.0
"""fastflannel-cni: the Flannel CNI plugin (flannel-io/cni-plugin ``flannel.go``, ``flannel_linux.go``).

What it does (flannel-compat.md section 4.1), per the CNI specification 1.0:
- ADD: read the network configuration (stdin) and subnet.env, build the delegate configuration (default a
  ``bridge`` with ``host-local`` IPAM over FLANNEL_SUBNET and one route per FLANNEL_NETWORK), save it to
  ``<dataDir>/<CNI_CONTAINERID>`` (0600) and run the delegate plugin found in CNI_PATH; its result is our result.
- DEL: run the delegate with the SAVED configuration (the lease may have changed since ADD) and remove the file;
  no saved file means nothing to undo: success, so a repeated DEL succeeds (the spec requires it).
- CHECK: run the delegate's CHECK with the saved configuration plus the runtime's ``prevResult``, and fail if the
  saved range is no longer this host's FLANNEL_SUBNET (Flannel's CHECK is a no-op).
- VERSION: ``{"cniVersion": "1.0.0", "supportedVersions": [...]}``, the versions Debian's plugins support.

Errors are the spec's JSON on stdout (``cniVersion``, ``code``, ``msg``, optional ``details``) with exit status 1;
an error returned by the delegate is passed through unchanged (as libcni's ``invoke`` does). Messages keep
Flannel's words ("loadFlannelSubnetEnv failed: open /run/flannel/subnet.env: no such file or directory").

The pure parts (``parse_subnet_env``, ``build_delegate``, ``check_version``) do no I/O and need no root.
"""
from __future__ import annotations

import copy
import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network, ip_interface
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from fastflannel import __version__

DEFAULT_SUBNET_FILE = "/run/flannel/subnet.env"  # flannel cni-plugin defaultSubnetFile
DEFAULT_DATA_DIR = "/var/lib/cni/flannel"  # flannel cni-plugin defaultDataDir
CURRENT_VERSION = "1.0.0"
# what libcni 1.1 (Debian's containernetworking-plugins) calls version.All: a delegate must understand the version
# we hand it, and we hand it the runtime's, so we support exactly what the delegates support
SUPPORTED_VERSIONS: Tuple[str, ...] = ("0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0")
DELEGATE_TIMEOUT_S = 60.0

# error codes, CNI spec 1.0 section "Error"
ERR_INCOMPATIBLE_VERSION = 1
ERR_UNSUPPORTED_FIELD = 2
ERR_UNKNOWN_CONTAINER = 3
ERR_INVALID_ENV = 4
ERR_IO = 5
ERR_DECODING = 6
ERR_INVALID_CONFIG = 7
ERR_TRY_AGAIN = 11
ERR_INTERNAL = 999  # libcni types.ErrInternal: what skel reports for a plain Go error

Net = Union[IPv4Network, IPv6Network]


class CNIError(Exception):
    """A failure reported to the runtime as the spec's error JSON."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def to_json(self, cni_version: str = CURRENT_VERSION) -> Dict[str, Any]:
        out: Dict[str, Any] = {"cniVersion": cni_version, "code": self.code, "msg": self.msg}
        if self.details:
            out["details"] = self.details
        return out


# ----------------------------------------------------------------------------------------------------------------
# subnet.env


@dataclass(frozen=True)
class SubnetEnv:
    """What the plugin takes from subnet.env (flannel cni-plugin ``subnetEnv``)."""

    networks: Tuple[IPv4Network, ...] = ()
    subnet: Optional[IPv4Network] = None
    ipv6_networks: Tuple[IPv6Network, ...] = ()
    ipv6_subnet: Optional[IPv6Network] = None
    mtu: Optional[int] = None
    ipmasq: Optional[bool] = None


def _parse_cidr(value: str) -> Net:
    """Parse like Go's ``net.ParseCIDR`` keeping the network (host bits dropped); raise ValueError as Go words it."""
    if "/" not in value:
        raise ValueError(f"invalid CIDR address: {value}")
    try:
        return ip_interface(value).network
    except ValueError:
        raise ValueError(f"invalid CIDR address: {value}") from None


def _cidr_list(value: str) -> List[Net]:
    out: List[Net] = []
    for part in value.split(","):
        net = _parse_cidr(part)
        if net not in out:  # the plugin de-duplicates the list
            out.append(net)
    return out


def parse_subnet_env(text: str, path: str = DEFAULT_SUBNET_FILE) -> SubnetEnv:
    """Parse subnet.env as Flannel's plugin does: split each line on the first ``=``, known keys only, every other
    line ignored; FLANNEL_IPMASQ is true only for exactly ``true``. Raise ValueError ("<path> is missing ...")."""
    networks: List[Net] = []
    v6_networks: List[Net] = []
    subnet = v6_subnet = None
    mtu: Optional[int] = None
    ipmasq: Optional[bool] = None
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if key not in ("FLANNEL_NETWORK", "FLANNEL_SUBNET", "FLANNEL_IPV6_NETWORK", "FLANNEL_IPV6_SUBNET",
                       "FLANNEL_MTU", "FLANNEL_IPMASQ"):
            continue
        if not sep:
            raise ValueError(f"{path}: line {line!r} has no value")
        if key == "FLANNEL_NETWORK":
            networks = [n for n in _cidr_list(value) if n.version == 4]
        elif key == "FLANNEL_IPV6_NETWORK":
            v6_networks = [n for n in _cidr_list(value) if n.version == 6]
        elif key == "FLANNEL_SUBNET":
            subnet = _parse_cidr(value)
        elif key == "FLANNEL_IPV6_SUBNET":
            v6_subnet = _parse_cidr(value)
        elif key == "FLANNEL_MTU":
            if not value.isdigit() or int(value) >= 1 << 32:
                raise ValueError(f'strconv.ParseUint: parsing "{value}": invalid syntax')
            mtu = int(value)
        else:
            ipmasq = value == "true"
    missing = []
    if not networks and not v6_networks:
        missing.append("FLANNEL_NETWORK or FLANNEL_IPV6_NETWORK")
    if subnet is None and v6_subnet is None:
        missing.append("FLANNEL_SUBNET or FLANNEL_IPV6_SUBNET")
    if mtu is None:
        missing.append("FLANNEL_MTU")
    if ipmasq is None:
        missing.append("FLANNEL_IPMASQ")
    if missing:
        raise ValueError(f"{path} is missing {', '.join(missing)}")
    return SubnetEnv(tuple(networks), subnet, tuple(v6_networks), v6_subnet, mtu, ipmasq)  # type: ignore[arg-type]


def _go_strerror(e: OSError) -> str:
    """Return the errno text as Go prints it ("no such file or directory")."""
    text = e.strerror or os.strerror(e.errno or 0)
    return text[:1].lower() + text[1:]


def load_subnet_env(path: str) -> SubnetEnv:
    """Read and parse ``path``; raise CNIError worded as Flannel's ``loadFlannelSubnetEnv failed: ...``."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError as e:
        raise CNIError(ERR_INTERNAL, f"loadFlannelSubnetEnv failed: open {path}: {_go_strerror(e)}") from None
    try:
        return parse_subnet_env(text, path)
    except ValueError as e:
        raise CNIError(ERR_INTERNAL, f"loadFlannelSubnetEnv failed: {e}") from None


# ----------------------------------------------------------------------------------------------------------------
# network configuration and the delegate


def load_netconf(data: bytes) -> Dict[str, Any]:
    """Decode the network configuration and fill Flannel's defaults (subnetFile, dataDir); raise CNIError 6."""
    try:
        conf = json.loads(data or b"null")
    except (ValueError, UnicodeDecodeError) as e:
        raise CNIError(ERR_DECODING, f"loadFlannelNetConf failed: failed to load netconf: {e}") from None
    if not isinstance(conf, dict):
        raise CNIError(ERR_DECODING, "loadFlannelNetConf failed: failed to load netconf: not a JSON object")
    conf.setdefault("subnetFile", DEFAULT_SUBNET_FILE)
    conf.setdefault("dataDir", DEFAULT_DATA_DIR)
    for key in ("subnetFile", "dataDir"):
        if not isinstance(conf[key], str) or not conf[key]:
            raise CNIError(ERR_INVALID_CONFIG, f"'{key}' must be a non-empty string")
    for key in ("delegate", "ipam", "runtimeConfig"):
        if conf.get(key) is not None and not isinstance(conf[key], dict):
            raise CNIError(ERR_INVALID_CONFIG, f"'{key}', if present, must be a JSON object")
    return conf


def check_version(conf: Mapping[str, Any]) -> str:
    """Return the configuration's cniVersion ("" means 0.1.0); raise CNIError 1 if we do not support it."""
    version = conf.get("cniVersion") or "0.1.0"
    if version not in SUPPORTED_VERSIONS:
        supported = " ".join(f'"{v}"' for v in SUPPORTED_VERSIONS)
        raise CNIError(ERR_INCOMPATIBLE_VERSION, "incompatible CNI versions",
                       f'config is "{version}", plugin supports [{supported}]')
    return str(version)


def _version_tuple(v: str) -> Tuple[int, ...]:
    return tuple(int(x) for x in v.split("."))


def build_delegate(conf: Mapping[str, Any], senv: SubnetEnv) -> Dict[str, Any]:
    """Return the delegate configuration Flannel's plugin builds for ADD (``doCmdAdd`` + ``getDelegateIPAM``).

    User keys in ``delegate`` win over the defaults, except ``name`` and ``ipam`` which flannel sets (an error)."""
    user = conf.get("delegate")
    delegate: Dict[str, Any] = copy.deepcopy(dict(user)) if user else {}
    if "type" in delegate and not isinstance(delegate["type"], str):
        raise CNIError(ERR_INTERNAL, "'delegate' dictionary, if present, must have (string) 'type' field")
    if "name" in delegate:
        raise CNIError(ERR_INTERNAL, "'delegate' dictionary must not have 'name' field, it'll be set by flannel")
    if "ipam" in delegate:
        raise CNIError(ERR_INTERNAL, "'delegate' dictionary must not have 'ipam' field, it'll be set by flannel")
    if conf.get("runtimeConfig") is not None:
        delegate["runtimeConfig"] = copy.deepcopy(conf["runtimeConfig"])
    delegate["name"] = conf.get("name")
    delegate.setdefault("type", "bridge")
    delegate.setdefault("ipMasq", not senv.ipmasq)  # flanneld masquerades itself with --ip-masq; else the bridge does
    delegate.setdefault("mtu", senv.mtu)
    if delegate["type"] == "bridge":
        delegate.setdefault("isGateway", True)
    if conf.get("cniVersion"):
        delegate["cniVersion"] = conf["cniVersion"]

    ipam: Dict[str, Any] = copy.deepcopy(dict(conf.get("ipam") or {}))
    ipam.setdefault("type", "host-local")
    ranges = []
    if senv.subnet is not None:
        ranges.append([{"subnet": str(senv.subnet)}])
    if senv.ipv6_subnet is not None:
        ranges.append([{"subnet": str(senv.ipv6_subnet)}])
    ipam["ranges"] = ranges
    routes = ipam.get("routes") or []
    if not isinstance(routes, list):
        raise CNIError(ERR_INTERNAL, "failed to assemble Delegate IPAM: failed to read IPAM routes: not a list")
    routes = list(routes) + [{"dst": str(n)} for n in (*senv.networks, *senv.ipv6_networks)]
    ipam["routes"] = routes
    delegate["ipam"] = ipam
    return delegate


# ----------------------------------------------------------------------------------------------------------------
# saved configurations (flannel cni-plugin saveScratchNetConf / consumeScratchNetConf)


def saved_path(data_dir: str, container_id: str) -> str:
    if not container_id or "/" in container_id or container_id in (".", ".."):
        raise CNIError(ERR_INVALID_ENV, f"invalid CNI_CONTAINERID {container_id!r}")
    return os.path.join(data_dir, container_id)


def save_delegate(data_dir: str, container_id: str, data: bytes) -> str:
    """Write the delegate configuration to ``<dataDir>/<containerID>`` (dir 0700, file 0600) atomically."""
    path = saved_path(data_dir, container_id)
    try:
        os.makedirs(data_dir, mode=0o700, exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except OSError as e:
        raise CNIError(ERR_IO, f"failed to save delegate config {path}: {_go_strerror(e)}") from None
    return path


def read_saved(data_dir: str, container_id: str) -> Optional[bytes]:
    """Return the saved delegate configuration, or None if there is none."""
    path = saved_path(data_dir, container_id)
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise CNIError(ERR_IO, f"open {path}: {_go_strerror(e)}") from None


# ----------------------------------------------------------------------------------------------------------------
# delegation (libcni invoke.DelegateAdd/Del/Check)


def find_plugin(name: str, cni_path: str) -> str:
    dirs = [d for d in cni_path.split(":") if d]
    for d in dirs:
        cand = os.path.join(d, name)
        if os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    raise CNIError(ERR_INTERNAL, f'failed to find plugin "{name}" in path [{" ".join(dirs)}]')


def delegate(command: str, plugin_type: str, config: bytes, env: Mapping[str, str]) -> bytes:
    """Run the delegate plugin with ``CNI_COMMAND=command`` and ``config`` on stdin; return its stdout.

    Its stderr goes to ours. On failure raise its own error (code, msg, details) as libcni does."""
    if not isinstance(plugin_type, str) or not plugin_type or "/" in plugin_type:
        raise CNIError(ERR_INVALID_CONFIG, f"delegate type {plugin_type!r} is not a plugin name")
    path = find_plugin(plugin_type, env.get("CNI_PATH", ""))
    child_env = dict(env)
    child_env["CNI_COMMAND"] = command
    try:
        proc = subprocess.run([path], input=config, env=child_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              timeout=DELEGATE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise CNIError(ERR_TRY_AGAIN, f"delegate {plugin_type} {command} timed out after {DELEGATE_TIMEOUT_S:.0f} s")
    except OSError as e:
        raise CNIError(ERR_INTERNAL, f"failed to run delegate {path}: {_go_strerror(e)}") from None
    if proc.stderr:
        sys.stderr.buffer.write(proc.stderr)
        sys.stderr.flush()
    if proc.returncode == 0:
        return proc.stdout
    if not proc.stdout.strip():
        if proc.stderr:
            raise CNIError(ERR_INTERNAL, f"netplugin failed: {proc.stderr.decode(errors='replace')!r}")
        raise CNIError(ERR_INTERNAL, f"netplugin failed with no error message: exit status {proc.returncode}")
    try:
        err = json.loads(proc.stdout)
        code = int(err["code"])
    except (ValueError, KeyError, TypeError):
        raise CNIError(ERR_INTERNAL, "netplugin failed but error parsing its diagnostic message "
                                     f"{proc.stdout.decode(errors='replace')!r}") from None
    raise CNIError(code, str(err.get("msg", "")), str(err.get("details", "") or ""))


# ----------------------------------------------------------------------------------------------------------------
# commands


def _require_env(env: Mapping[str, str], names: Sequence[str]) -> None:
    missing = [n for n in names if not env.get(n)]
    if missing:
        raise CNIError(ERR_INVALID_ENV, f"required env variables [{','.join(missing)}] missing")


def cmd_add(conf: Dict[str, Any], env: Mapping[str, str]) -> bytes:
    senv = load_subnet_env(conf["subnetFile"])
    dconf = build_delegate(conf, senv)
    data = json.dumps(dconf).encode()
    save_delegate(conf["dataDir"], env["CNI_CONTAINERID"], data)
    # a failed ADD leaves the saved file: the runtime's DEL that follows cleans up with it (as Flannel)
    return delegate("ADD", dconf["type"], data, env)


def cmd_del(conf: Dict[str, Any], env: Mapping[str, str]) -> bytes:
    data_dir = conf["dataDir"]
    cid = env["CNI_CONTAINERID"]
    saved = read_saved(data_dir, cid)
    if saved is None:
        return b""  # nothing was set up, or a previous DEL finished: success (spec: DEL is idempotent)
    try:
        dconf = json.loads(saved)
        plugin_type = dconf["type"]
    except (ValueError, KeyError, TypeError) as e:
        raise CNIError(ERR_DECODING, f"failed to parse netconf: {e}") from None
    delegate("DEL", plugin_type, saved, env)
    try:
        os.unlink(saved_path(data_dir, cid))
    except FileNotFoundError:
        pass
    except OSError as e:
        raise CNIError(ERR_IO, f"remove {saved_path(data_dir, cid)}: {_go_strerror(e)}") from None
    return b""


def prev_result_with_gateways(prev: Mapping[str, Any]) -> Dict[str, Any]:
    """Return ``prev`` with each gateway-less route given the gateway of its address family.

    The bridge plugin programs such a route via the gateway (``ip.ConfigureIface``) but its CHECK looks for the route
    with no gateway (``ip.ValidateExpectedRoute``, containernetworking-plugins 1.1), so Flannel's own routes (one per
    FLANNEL_NETWORK, without ``gw``) always fail CHECK. Filling in what ADD actually programmed makes CHECK test the
    real state."""
    out = copy.deepcopy(dict(prev))
    gateways: Dict[int, str] = {}
    for entry in out.get("ips") or []:
        gw = entry.get("gateway") if isinstance(entry, dict) else None
        if gw:
            gateways.setdefault(ip_interface(gw).version, gw)
    for route in out.get("routes") or []:
        if isinstance(route, dict) and not route.get("gw") and route.get("dst"):
            gw = gateways.get(ip_interface(route["dst"]).version)
            if gw:
                route["gw"] = gw
    return out


def cmd_check(conf: Dict[str, Any], env: Mapping[str, str]) -> bytes:
    saved = read_saved(conf["dataDir"], env["CNI_CONTAINERID"])
    if saved is None:
        raise CNIError(ERR_UNKNOWN_CONTAINER, f"container {env['CNI_CONTAINERID']} was not added by this plugin",
                       f"no saved delegate config in {conf['dataDir']}")
    try:
        dconf = json.loads(saved)
        plugin_type = dconf["type"]
    except (ValueError, KeyError, TypeError) as e:
        raise CNIError(ERR_DECODING, f"failed to parse netconf: {e}") from None
    senv = load_subnet_env(conf["subnetFile"])
    want = [[{"subnet": str(s)}] for s in (senv.subnet, senv.ipv6_subnet) if s is not None]
    have = dconf.get("ipam", {}).get("ranges")
    if have != want:
        raise CNIError(ERR_INTERNAL, "the node's subnet changed since ADD: the container must be re-created",
                       f"ranges at ADD {json.dumps(have)}, subnet.env now {json.dumps(want)}")
    if isinstance(conf.get("prevResult"), dict):
        dconf["prevResult"] = prev_result_with_gateways(conf["prevResult"])
    if conf.get("cniVersion"):
        dconf["cniVersion"] = conf["cniVersion"]
    return delegate("CHECK", plugin_type, json.dumps(dconf).encode(), env)


def version_info() -> Dict[str, Any]:
    return {"cniVersion": CURRENT_VERSION, "supportedVersions": list(SUPPORTED_VERSIONS)}


ABOUT = f"CNI Plugin fastflannel version {__version__} ({platform.system().lower()}/{platform.machine()})"


def run(env: Mapping[str, str], stdin: bytes) -> Tuple[int, bytes, str]:
    """Run one plugin invocation; return (exit status, stdout bytes, stderr text). No exceptions escape."""
    command = env.get("CNI_COMMAND", "")
    if not command:
        return 0, b"", ABOUT + "\n"  # skel prints the "about" line for a bare invocation
    version = CURRENT_VERSION
    try:
        if command == "VERSION":
            return 0, json.dumps(version_info()).encode() + b"\n", ""
        if command not in ("ADD", "DEL", "CHECK"):
            raise CNIError(ERR_INVALID_ENV, f"unknown CNI_COMMAND: {command}")
        conf = load_netconf(stdin)
        if isinstance(conf.get("cniVersion"), str) and conf["cniVersion"]:
            version = conf["cniVersion"]
        required = ["CNI_CONTAINERID", "CNI_IFNAME", "CNI_PATH"]
        if command != "DEL":
            required.insert(1, "CNI_NETNS")  # DEL may come after the namespace is gone
        _require_env(env, required)
        check_version(conf)
        if command == "CHECK" and _version_tuple(version) < (0, 4, 0):
            raise CNIError(ERR_INCOMPATIBLE_VERSION, "config version does not allow CHECK")
        fn = {"ADD": cmd_add, "DEL": cmd_del, "CHECK": cmd_check}[command]
        return 0, fn(conf, env), ""
    except CNIError as e:
        return 1, json.dumps(e.to_json(version), indent=4).encode() + b"\n", ""
    except Exception as e:  # noqa: BLE001 - the runtime must get the spec's JSON whatever went wrong
        err = CNIError(ERR_INTERNAL, f"{type(e).__name__}: {e}")
        return 1, json.dumps(err.to_json(version), indent=4).encode() + b"\n", ""


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``fastflannel-cni``: the CNI environment in, the result or error JSON on stdout."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("--version", "-version", "version"):
        print(ABOUT)
        return 0
    quiet = os.environ.get("CNI_COMMAND", "") in ("", "VERSION") and sys.stdin.isatty()  # nothing to read by hand
    stdin = b"" if quiet else sys.stdin.buffer.read()
    rc, out, err = run(os.environ, stdin)
    if err:
        sys.stderr.write(err)
    if out:
        sys.stdout.buffer.write(out)
        sys.stdout.flush()
    return rc


if __name__ == "__main__":
    sys.exit(main())
