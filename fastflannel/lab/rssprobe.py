# SPDX-License-Identifier: Apache-2.0
"""RSS side by side: ``python -m fastflannel.lab.rssprobe`` - one testbed, one daemon per variant (a variant is an
environment for its daemon, e.g. ``PYTHONPATH`` of another checkout), lease churn, RSS sampled, slopes compared.

Why: a soak judges one build per backend; when its slope is near the line, two builds (or two settings) must be
compared under the same churn on the same machine at the same time, as the benchmarks compare speed. This is how
udp's slope was traced to pyroute2's requests in reconcile (docs/soak.md, "What udp's slope was"):

    python -m fastflannel.lab.rssprobe --backend udp --minutes 35 \\
        --variant now= --variant before=PYTHONPATH=/tmp/ff-before --copies 2

(``/tmp/ff-before``: a checkout of the older commit with its extension built in place, ``setup.py build_ext -i``.)
No traffic: only the control plane's periodic work and the churn. Prints one line per sample and a table at the
end; ``--json`` keeps the samples.
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from fastflannel.lab.bench import parse_env
from fastflannel.lab.soak import churn_step, proc_sample, slope_per_hour
from fastflannel.lab.testbed import Testbed

NETWORK = "100.96.0.0/16"


def parse_variant(text: str) -> Tuple[str, Dict[str, str]]:
    """``NAME=[ENV=VALUE,...]`` -> (name, env); ``now=`` is the current build with no extra environment."""
    name, sep, rest = text.partition("=")
    if not sep or not name:
        raise ValueError(f"--variant {text!r}: expected NAME=[ENV=VALUE,...], e.g. before=PYTHONPATH=/tmp/ff-before")
    return name, parse_env(text, rest)


def summarize(samples: Sequence[Dict[str, Any]], names: Sequence[str], warmup_s: float) -> List[Dict[str, Any]]:
    """Per daemon: RSS at the first sample after ``warmup_s`` and at the last, and the slope (MiB/h) between."""
    out = []
    for n in names:
        pts = [(s["t"], s[n] / 1024) for s in samples if s["t"] >= warmup_s and s.get(n, -1) > 0]
        out.append({"daemon": n, "rss_first_mib": round(pts[0][1], 2) if pts else None,
                    "rss_last_mib": round(pts[-1][1], 2) if pts else None,
                    "slope_mib_h": round(slope_per_hour(pts), 2)})
    return out


def run(args: argparse.Namespace, say: Callable[[str], Any] = print) -> List[Dict[str, Any]]:
    variants = [parse_variant(v) for v in args.variant]
    daemons = [(f"{name}#{k + 1}" if args.copies > 1 else name, env) for name, env in variants
               for k in range(args.copies)]
    samples: List[Dict[str, Any]] = []
    with Testbed(len(daemons), log=lambda m: None) as tb:
        tb.put_config({"Network": NETWORK, "Backend": {"Type": args.backend}})
        for h, (_name, env) in zip(tb.hosts, daemons):
            h.start_daemon(env=env)
        for h in tb.hosts:
            h.wait_subnet_env(timeout=90)
        t0 = time.monotonic()
        live: List[str] = []
        n = 0
        next_sample = next_churn = t0
        while (now := time.monotonic()) - t0 < args.minutes * 60:
            if now >= next_churn:
                n = churn_step(tb, args.backend, live, n)
                next_churn = now + args.churn_s
            if now >= next_sample:
                s: Dict[str, Any] = {"t": round(now - t0, 1)}
                for h, (name, _env) in zip(tb.hosts, daemons):
                    alive = h.daemon is not None and h.daemon.poll() is None
                    s[name] = proc_sample(h.daemon.pid)["rss_kb"] if alive else -1
                samples.append(s)
                say(f"t={s['t']:7.1f}s " + " ".join(f"{name}={s[name] / 1024:.2f}MiB" for name, _ in daemons))
                next_sample = now + args.interval
            time.sleep(max(0.0, min(next_sample, next_churn) - time.monotonic()))
    rows = summarize(samples, [name for name, _ in daemons], args.warmup_min * 60)
    say("| daemon | RSS after warm-up -> last (MiB) | slope (MiB/h) |")
    say("|---|---|---|")
    for r in rows:
        say(f"| {r['daemon']} | {r['rss_first_mib']} -> {r['rss_last_mib']} | {r['slope_mib_h']:+.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"backend": args.backend, "variants": args.variant, "samples": samples, "summary": rows}, f)
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastflannel.lab.rssprobe", description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="udp")
    p.add_argument("--variant", action="append", required=True, help="NAME=[ENV=VALUE,...] (repeat; one daemon each)")
    p.add_argument("--copies", type=int, default=1, help="daemons per variant")
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--churn-s", type=float, default=10.0, help="seconds between lease writes/deletes")
    p.add_argument("--interval", type=float, default=30.0, help="seconds between samples")
    p.add_argument("--warmup-min", type=float, default=3.0, help="left out of the slope")
    p.add_argument("--json")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        [parse_variant(v) for v in args.variant]
    except ValueError as e:
        build_parser().error(str(e))
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
