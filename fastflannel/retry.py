# SPDX-License-Identifier: Apache-2.0
"""Retry pacing shared by every retry loop of the daemon: capped exponential back-off and once-per-state logging.

``Backoff`` hands out the delays (first, first*2, ... up to cap; optional +-jitter so hosts restarted together do
not retry in step); ``reset()`` after a success. ``FailureLog`` logs a failing operation once when it starts
failing (or fails differently) and once when it works again, so a failure that lasts an hour costs two log lines,
not one per attempt. The audit of the loops that use them is in docs/operations.md ("Retry loops").
"""
from __future__ import annotations

import logging
import random
import threading
from typing import Any, Callable, Dict, Hashable, Iterable, Optional, Tuple


class Backoff:
    """Capped exponential delays: ``next()`` returns first, 2*first, 4*first, ... up to ``cap``."""

    def __init__(self, first: float, cap: float, factor: float = 2.0, jitter: float = 0.0,
                 rng: Optional[random.Random] = None) -> None:
        if not 0 < first <= cap or factor < 1 or not 0 <= jitter < 1:
            raise ValueError(f"bad back-off: first={first} cap={cap} factor={factor} jitter={jitter}")
        self.first, self.cap, self.factor, self.jitter = first, cap, factor, jitter
        self.rng = rng or random.Random()
        self._next = first
        self.attempts = 0

    def next(self) -> float:
        """Return the delay before the next attempt and advance."""
        d = self._next
        self._next = min(self._next * self.factor, self.cap)
        self.attempts += 1
        if self.jitter:
            d *= 1 + self.rng.uniform(-self.jitter, self.jitter)
        return d

    def peek(self) -> float:
        """Return the next delay without advancing (no jitter)."""
        return self._next

    def reset(self) -> None:
        self._next = self.first
        self.attempts = 0

    @property
    def failing(self) -> bool:
        """True between the first ``next()`` and ``reset()``."""
        return self.attempts > 0


class FailureLog:
    """Log ``event=<failed>`` once per failure state and ``event=<recovered>`` once when it ends.

    ``failed(error, **fields)`` logs (at ``level``) only when the operation was working (the first error of an
    outage names it; later ones, even with another text, are counted); returns True when it logged. ``ok(**fields)`` logs the recovery (INFO) if it was failing."""

    def __init__(self, logger: logging.Logger, failed_event: str, recovered_event: str,
                 level: int = logging.WARNING, **fields: Any) -> None:
        self.log, self.failed_event, self.recovered_event, self.level = logger, failed_event, recovered_event, level
        self.fields = fields
        self.error: Optional[str] = None
        self.count = 0

    def _kv(self, extra: dict) -> str:
        return " ".join(f"{k}={v}" for k, v in {**self.fields, **extra}.items())

    def failed(self, error: object, exc_info: bool = False, **fields: Any) -> bool:
        text = str(error)
        self.count += 1
        if self.error is not None:
            return False
        self.error = text
        self.log.log(self.level, "event=%s %s error=%r action=retry_with_backoff", self.failed_event,
                     self._kv(fields), text, exc_info=exc_info)
        return True

    def ok(self, **fields: Any) -> bool:
        if self.error is None:
            return False
        self.log.info("event=%s %s failed_attempts=%d", self.recovered_event, self._kv(fields), self.count)
        self.error = None
        self.count = 0
        return True

    @property
    def failing(self) -> bool:
        return self.error is not None


class EntryFailures:
    """Once-per-state logging for the entries of a periodic pass (a route the kernel refuses, retried every
    reconcile): ``is_new(key, error)`` is True the first time ``key`` fails and whenever its error text changes,
    False while it keeps failing the same way; ``ok(key)`` forgets it (it works again); ``retain(keys)`` forgets
    every key not in ``keys`` (entries no longer tried), so the table never outgrows one pass."""

    def __init__(self) -> None:
        self._errors: Dict[Hashable, str] = {}

    def is_new(self, key: Hashable, error: object) -> bool:
        text = str(error)
        if self._errors.get(key) == text:
            return False
        self._errors[key] = text
        return True

    def ok(self, key: Hashable) -> None:
        self._errors.pop(key, None)

    def retain(self, keys: Iterable[Hashable]) -> None:
        keep = set(keys)
        for k in [k for k in self._errors if k not in keep]:
            del self._errors[k]

    def __len__(self) -> int:
        return len(self._errors)


def run_periodic(stop: "threading.Event", period: float, step: Callable[[], Any], failure: FailureLog,
                 cap: float = 60.0, errors: Tuple[type, ...] = (Exception,)) -> None:
    """Call ``step()`` every ``period`` seconds until ``stop`` is set. While it raises one of ``errors`` the
    period backs off (period, 2*period, ... up to ``cap``) and ``failure`` logs once per failure state."""
    backoff = Backoff(period, max(period, cap))
    delay = period
    while not stop.wait(delay):
        try:
            step()
        except errors as e:
            failure.failed(e)
            delay = backoff.next()
            continue
        failure.ok()
        backoff.reset()
        delay = period
