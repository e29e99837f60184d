"""Health warnings in the log, rate-limited (repodb's health monitoring).

Run by the maintenance greenlet on every pass: a warning when the pool has stayed at or
above 90 % of ``max_size`` in use for ``saturation_warning_after`` seconds, an error when
acquires timed out or were refused because the pool was exhausted. Each at most once a
minute per pool.
"""

from __future__ import annotations

import logging
from time import monotonic
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from greenpool.pool import Pool

logger = logging.getLogger("greenpool")

SATURATED = 0.9
EVERY = 60.0  # seconds between two records of the same kind


class Alerts:
    """Saturation and exhaustion records for one pool."""

    def __init__(self, pool: Pool[Any]) -> None:
        self._pool = pool
        self._since: float | None = None
        self._warned_at = -EVERY
        self._errored_at = -EVERY
        self._refused_seen = 0

    def __call__(self) -> None:
        """One check. Never switches."""
        pool = self._pool
        now = monotonic()
        in_use = pool.acquired_count() / pool.settings.max_size
        if in_use < SATURATED:
            self._since = None
        elif self._since is None:
            self._since = now
        elif (
            now - self._since >= pool.settings.saturation_warning_after
            and now - self._warned_at >= EVERY
        ):
            self._warned_at = now
            logger.warning(
                "pool %r: %.0f%% of max_size in use for %.0f s (%s); raise max_size or "
                "find what holds connections (leak_threshold)",
                pool.name,
                in_use * 100,
                now - self._since,
                pool.counts(),
            )
        refused = pool.timeout_count + pool.too_many_count
        if refused > self._refused_seen and now - self._errored_at >= EVERY:
            logger.error(
                "pool %r is exhausted: %d acquire(s) timed out or were refused since the last "
                "report (%s)",
                pool.name,
                refused - self._refused_seen,
                pool.counts(),
            )
            self._errored_at = now
            self._refused_seen = refused
