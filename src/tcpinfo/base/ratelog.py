"""Recurring problems logged at most once a minute per kind, with a count of the ones held back.

A collector polling 100 times a second can hit the same failure 6,000 times a minute, and logging
on the hot path once stalled upstream's parser (its issue #121): each kind of event gets one line a
minute, and the next line says how many were held back in between.
"""
from __future__ import annotations

import logging
import time

LOG_EVERY = 60.0
"""Seconds between two messages about the same recurring event."""


class RateLimitedLog:
    """Logs each kind of recurring event at most once per LOG_EVERY seconds, saying how many
    were held back in between, so a flood of refusals costs a counter, not a log line each."""

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def __call__(self, level: int, key: str, message: str, *args: object,
                 exc_info: bool = False) -> None:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < LOG_EVERY:
            self._held[key] = self._held.get(key, 0) + 1
            return
        self._last[key] = now
        held = self._held.pop(key, 0)
        if held:
            message += " (and %d more times since the last such message)"
            args = (*args, held)
        self._logger.log(level, message, *args, exc_info=exc_info, stacklevel=2)
