# SPDX-License-Identifier: Apache-2.0
"""How backends log a batch of peer events: one line per peer for a live change, one summary line for a snapshot
(a 5,000-lease snapshot would otherwise write 5,000 INFO lines). ``service/metrics.py`` counts peers from both."""
from __future__ import annotations

import logging

PEER_LOG_MAX = 16  # event batches up to this size log one INFO line per peer; larger ones one summary line


def peer_log_level(n_events: int) -> int:
    """Level of the per-peer ``event=peer_added``/``peer_removed`` lines for a batch of ``n_events``: INFO for
    a live change, DEBUG (``-v``) for a snapshot, which gets one INFO ``event=peers_programmed`` line instead
    (a 5,000-lease snapshot would otherwise write 5,000 lines)."""
    return logging.INFO if n_events <= PEER_LOG_MAX else logging.DEBUG


def log_peers_summary(logger: logging.Logger, backend: str, n_events: int, added: int, removed: int, failed: int,
                      seconds: float) -> None:
    """The one summary line of a batch (INFO when the per-peer lines went to DEBUG, else DEBUG). metrics.py
    counts peers from it, so its ``added=``/``removed=`` fields are a contract."""
    level = logging.INFO if peer_log_level(n_events) == logging.DEBUG else logging.DEBUG
    if logger.isEnabledFor(level):
        logger.log(level, "event=peers_programmed backend=%s events=%d added=%d removed=%d failed=%d took_s=%.3f",
                   backend, n_events, added, removed, failed, seconds)
