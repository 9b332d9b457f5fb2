# SPDX-License-Identifier: Apache-2.0
"""``python -m fastflannel.lab.testbed [--cleanup | N]``."""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from fastflannel.lab.testbed.base import _logger, install_signal_handlers
from fastflannel.lab.testbed.netns import cleanup_stale
from fastflannel.lab.testbed.world import Testbed


def _main(argv: Sequence[str] | None = None) -> int:
    """Run ``python -m fastflannel.lab.testbed [--cleanup | N]`` (a stop-gap until ``fastflannel testbed`` exists)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m fastflannel.lab.testbed")
    parser.add_argument("--cleanup", action="store_true", help="remove namespaces of dead testbed runs")
    parser.add_argument("--include-unowned", action="store_true")
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("hosts", nargs="?", type=int, default=3, help="hosts to bring up, then wait for Ctrl-C")
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if ns.cleanup:
        removed = cleanup_stale(include_unowned=ns.include_unowned, dry_run=ns.dry_run)
        _logger.info("%s %d namespaces", "would remove" if ns.dry_run else "removed", len(removed))
        return 0
    install_signal_handlers(sigterm=KeyboardInterrupt)
    try:
        with Testbed(ns.hosts) as tb:
            for h in tb.hosts:
                _logger.info("%s: netns %s ip %s", h.name, h.netns, h.ip)
            _logger.info("etcd: %s; Ctrl-C to tear down", tb.endpoints)
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(_main())
