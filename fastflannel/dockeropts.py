# SPDX-License-Identifier: Apache-2.0
"""``fastflannel docker-opts``: turn subnet.env into dockerd options, as Flannel's ``dist/mk-docker-opts.sh`` does.

Options (mk-docker-opts.sh's, same letters and defaults):

    -f FILE   subnet.env to read (default /run/flannel/subnet.env)
    -d FILE   docker env file to write (default /run/docker_opts.env)
    -i        write each option as its own variable (DOCKER_OPT_BIP="--bip=...")
    -c        write the combined options into one variable (DOCKER_OPTS="...")
    -k KEY    name of the combined variable (default DOCKER_OPTS)
    -m        do not output --ip-masq (older docker)

Neither ``-i`` nor ``-c`` means both. Output, byte for byte the script's: the individual variables in the order the
shell's ``set`` lists them (alphabetical: BIP, IPMASQ, MTU), each ``NAME="value"``; then ``KEY="<combined>"`` where
<combined> is the value ``KEY`` already has in the environment (plus one space, when set) followed by `` <value>``
for every option (so it starts with a space). ``FLANNEL_IPMASQ=true`` (fastflanneld masquerades) gives
``--ip-masq=false`` so docker's own MASQUERADE rule does not hide container addresses; ``false`` gives
``--ip-masq=true``.

Differences from the script, on purpose: a missing subnet.env or one without FLANNEL_SUBNET is an error (the script
writes options without ``--bip`` and docker starts on its default bridge, off the overlay); the file is written
atomically; the script's final routing-table check is not repeated (the daemon owns the routes).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from fastflannel.subnet.subnetfile import _parse_env  # the one subnet.env reader

DEFAULT_SUBNET_ENV = "/run/flannel/subnet.env"
DEFAULT_DOCKER_ENV = "/run/docker_opts.env"
DEFAULT_KEY = "DOCKER_OPTS"


class DockerOptsError(ValueError):
    """subnet.env is missing or unusable; the message says which and what to do."""


def docker_options(env: Mapping[str, str], ipmasq: bool = True) -> List[Tuple[str, str]]:
    """Return [(variable, option)] for a parsed subnet.env, in the script's (alphabetical) order."""
    opts: Dict[str, str] = {}
    if env.get("FLANNEL_SUBNET"):
        opts["DOCKER_OPT_BIP"] = f"--bip={env['FLANNEL_SUBNET']}"
    if env.get("FLANNEL_MTU"):
        opts["DOCKER_OPT_MTU"] = f"--mtu={env['FLANNEL_MTU']}"
    masq = env.get("FLANNEL_IPMASQ", "")
    if masq and ipmasq:
        if masq not in ("true", "false"):
            raise DockerOptsError(f"Invalid value of FLANNEL_IPMASQ: {masq} (want true or false)")
        opts["DOCKER_OPT_IPMASQ"] = "--ip-masq=false" if masq == "true" else "--ip-masq=true"
    return sorted(opts.items())


def render(env: Mapping[str, str], *, individual: bool, combined: bool, key: str = DEFAULT_KEY,
           ipmasq: bool = True, initial: str = "") -> str:
    """Return the docker env file text. ``initial`` is the combined variable's value before (the environment's)."""
    if not individual and not combined:
        individual = combined = True
    lines: List[str] = []
    joined = initial + " " if initial else ""
    for name, value in docker_options(env, ipmasq):
        if individual:
            lines.append(f'{name}="{value}"')
        joined += f" {value}"
    if combined:
        lines.append(f'{key}="{joined}"')
    return "".join(line + "\n" for line in lines)


def read_subnet_env(path: str) -> Dict[str, str]:
    """Return subnet.env's variables (the last value of a repeated key wins, as with ``. file``)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise DockerOptsError(f"cannot read {path}: {e.strerror}; is fastflanneld running (it writes the file "
                              f"when it holds a lease)? Pass another file with -f") from None
    env = {k: v[-1] for k, v in _parse_env(text).items()}
    if not env.get("FLANNEL_SUBNET"):
        raise DockerOptsError(f"{path} has no FLANNEL_SUBNET; it is not a subnet.env written by fastflanneld")
    return env


def write_atomic(path: str, text: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".docker-opts.", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastflannel docker-opts",
                                description="Generate Docker daemon options from subnet.env (mk-docker-opts.sh)")
    p.add_argument("-f", dest="subnet_env", default=DEFAULT_SUBNET_ENV, metavar="FLANNEL-ENV-FILE",
                   help=f"path to the subnet.env file (default {DEFAULT_SUBNET_ENV})")
    p.add_argument("-d", dest="docker_env", default=DEFAULT_DOCKER_ENV, metavar="DOCKER-ENV-FILE",
                   help=f"path to the docker env file to write (default {DEFAULT_DOCKER_ENV}; - for stdout)")
    p.add_argument("-i", dest="individual", action="store_true", help="output each option as its own variable")
    p.add_argument("-c", dest="combined", action="store_true", help="output the combined options in one variable")
    p.add_argument("-k", dest="key", default=DEFAULT_KEY, metavar="COMBINED-KEY",
                   help=f"name of the combined variable (default {DEFAULT_KEY})")
    p.add_argument("-m", dest="no_ipmasq", action="store_true", help="do not output --ip-masq (older docker)")
    return p


def main(argv: Optional[Sequence[str]] = None, environ: Optional[Mapping[str, str]] = None) -> int:
    ns = build_parser().parse_args(argv)
    environ = os.environ if environ is None else environ
    if not ns.key.isidentifier():
        print(f"fastflannel docker-opts: -k {ns.key!r}: not a variable name", file=sys.stderr)
        return 1
    try:
        env = read_subnet_env(ns.subnet_env)
        text = render(env, individual=ns.individual, combined=ns.combined, key=ns.key, ipmasq=not ns.no_ipmasq,
                      initial=environ.get(ns.key, ""))
    except DockerOptsError as e:
        print(f"fastflannel docker-opts: {e}", file=sys.stderr)
        return 1
    if ns.docker_env == "-":
        sys.stdout.write(text)
        return 0
    try:
        write_atomic(ns.docker_env, text)
    except OSError as e:
        print(f"fastflannel docker-opts: cannot write {ns.docker_env}: {e}", file=sys.stderr)
        return 1
    return 0
