# SPDX-License-Identifier: Apache-2.0
"""``fastflannel``: the tools around the daemon: ``demo``, ``bench``, ``testbed`` and ``docker-opts`` (argument parsing
only; ``docker-opts`` is the product's fastflannel.dockeropts, which parses its own mk-docker-opts.sh flags)."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from fastflannel.lab.demo import ALL_BACKENDS, cmd_demo


def cmd_testbed(ns: argparse.Namespace) -> int:
    from fastflannel.lab.testbed import cleanup_stale

    if ns.cleanup:
        removed = cleanup_stale(include_unowned=ns.include_unowned, log=print)
        print(f"removed {len(removed)} namespaces")
        return 0
    from fastflannel.lab.testbed.__main__ import _main

    return _main([str(ns.hosts)])


def cmd_bench(ns: argparse.Namespace) -> int:
    from fastflannel.lab.bench import run_bench

    return run_bench(ns)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastflannel", description="fastflannel tools: demo, bench, testbed, docker-opts")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="3 hosts in namespaces, each backend in turn, then a table")
    d.add_argument("--backends", default=",".join(ALL_BACKENDS), help=f"comma list (default: {','.join(ALL_BACKENDS)})")
    d.add_argument("--seconds", type=float, default=3.0, help="iperf3 duration per backend")
    d.add_argument("-v", "--verbose", action="store_true", help="also print every testbed step")
    d.add_argument("--dual-stack", action="store_true",
                   help="IPv4 and IPv6 (EnableIPv6): ping and ping -6 between containers (udp is skipped: IPv4 only)")
    d.set_defaults(func=cmd_demo)
    b = sub.add_parser("bench", help="udp vs vxlan vs host-gw, side by side, interleaved")
    b.add_argument("--quick", action="store_true", help="one short repetition (a CI smoke test)")
    b.add_argument("--reps", type=int, default=3)
    b.add_argument("--seconds", type=float, default=5.0)
    b.add_argument("--modes", default="host-gw,vxlan,udp,udp-plain,udp-python,wireguard")
    b.add_argument("--tests", default="ping,rr,flood,tcp1,tcp4,udp64,idle",
                   help="comma list of tests (default: all): ping,rr,flood,tcp1,tcp4,udp64,idle")
    b.add_argument("--variant", action="append", default=[], metavar="NAME=MODE[:ENV=V,...]",
                   help="one more mode: MODE's setup with extra daemon environment, e.g. "
                        "udp-base=udp:PYTHONPATH=/tmp/ffbase (run from outside the checkout); repeatable")
    b.add_argument("--out", default="bench-results", help="directory for the JSON and the PNG")
    b.set_defaults(func=cmd_bench)
    t = sub.add_parser("testbed", help="bring up a testbed until Ctrl-C, or clean up stale ones")
    t.add_argument("--cleanup", action="store_true", help="remove namespaces left by dead runs")
    t.add_argument("--include-unowned", action="store_true")
    t.add_argument("hosts", nargs="?", type=int, default=3)
    t.set_defaults(func=cmd_testbed)
    sub.add_parser("docker-opts", add_help=False,
                   help="subnet.env -> dockerd options, as mk-docker-opts.sh (-f -d -i -c -k -m; -h for details)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["docker-opts"]:
        from fastflannel.dockeropts import main as docker_opts

        return docker_opts(argv[1:])
    ns = build_parser().parse_args(argv)
    return ns.func(ns)


if __name__ == "__main__":
    raise SystemExit(main())
