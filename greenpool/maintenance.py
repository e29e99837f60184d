"""The maintenance greenlet and the operations that reshape a pool.

One greenlet per open pool wakes at least once a second (sooner when asked) to close idle
connections that outlived ``max_lifetime``, belong to an older generation (after
``drain()``/``reconnect_all()``) or sat idle longer than ``max_idle`` above ``min_size``;
to ping stale idle connections every ``health_check_period``; and to ask the connector
for what is missing. It logs and survives its own errors.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from time import monotonic
from typing import TYPE_CHECKING, Any

import gevent
from gevent import Greenlet
from gevent.event import Event

from greenpool.errors import ConnectError, PoolClosed
from greenpool.pool import OPEN, Record
from greenpool.settings import PoolSettings
from greenpool.vetting import redacted_copy

if TYPE_CHECKING:
    from greenpool.connector import Connector
    from greenpool.pool import Pool
    from greenpool.vetting import Vetting

logger = logging.getLogger("greenpool")


class Maintenance:
    """Reaping, health checks, resizing, draining and reconnecting for one pool."""

    def __init__(self, pool: Pool[Any], connector: Connector, vetting: Vetting) -> None:
        self._pool = pool
        self._connector = connector
        self._vetting = vetting
        self._greenlet: Greenlet | None = None
        self._wake = Event()
        self._check_soon = False
        self.idle_destroy_count = 0
        #: Extra checks run on every pass (leak scan, health alerts); never switch.
        self.tasks: list[Callable[[], None]] = []

    # ------------------------------------------------------------------ the greenlet

    def start(self) -> None:
        """Start the maintenance greenlet and the first connectors. Never switches."""
        self._greenlet = gevent.spawn(self._loop)
        self._connector.grow()

    @property
    def running(self) -> bool:
        """Whether the maintenance greenlet is alive."""
        return self._greenlet is not None and not self._greenlet.dead

    def greenlets(self) -> list[Greenlet]:
        """The maintenance greenlet, if running (close() kills it)."""
        return [self._greenlet] if self._greenlet is not None else []

    def wake(self, *, check: bool = False) -> None:
        """Run a maintenance pass now (with a health check if ``check``). Never switches."""
        self._check_soon = self._check_soon or check
        self._wake.set()

    def _loop(self) -> None:
        """Keep min sizes, reap, retire, health-check; never dies of its own errors."""
        pool = self._pool
        me = self._greenlet
        next_check = monotonic() + pool.settings.health_check_period
        while pool._state == OPEN and self._greenlet is me:
            try:
                self.reap()
                if self._check_soon or monotonic() >= next_check:
                    self._check_soon = False
                    self.health_check()
                    next_check = monotonic() + pool.settings.health_check_period
                self._connector.grow()
                for task in self.tasks:
                    task()
            except Exception:
                logger.exception("pool %r: maintenance error (continuing)", pool.name)
            self._wake.wait(_interval(pool.settings))
            self._wake.clear()

    # ------------------------------------------------------------------ reaping

    def reap(self) -> None:
        """Close idle connections that are expired, of an old generation, or idle too long.

        Never switches."""
        pool = self._pool
        now = monotonic()
        s = pool.settings
        for rec in list(pool._idle):
            if rec.generation != pool._generation or now >= rec.expires_at:
                pool._idle.remove(rec)
                if rec.generation == pool._generation:
                    self._vetting.lifetime_destroy_count += 1
                pool._close_idle(rec)
        while len(pool._idle) > s.min_idle and pool._slots - pool._closing > s.min_size:
            oldest = min(pool._idle, key=lambda r: r.idle_since)
            if now - oldest.idle_since < s.max_idle:
                break
            pool._idle.remove(oldest)
            self.idle_destroy_count += 1
            pool._close_idle(oldest)
        self.trim_to_max_size()

    def trim_to_max_size(self) -> None:
        """After max_size shrank: close the longest-idle connections above it.

        Never switches."""
        pool = self._pool
        while pool._idle and pool._slots > pool.settings.max_size:
            pool._close_idle(pool._idle.popleft())

    def health_check(self) -> int:
        """Ping idle connections (concurrently); return how many were replaced.

        Connections used within ``check_idle_after`` are known to be alive and skipped.
        Each ping is bounded by ``ping_timeout``, so a black-holed network delays the
        maintenance greenlet by at most that long. Switches.
        """
        pool = self._pool
        now = monotonic()
        after = pool.settings.check_idle_after
        stale = [r for r in pool._idle if now - r.idle_since > after]
        if not stale or pool._state != OPEN:
            return 0
        for rec in stale:
            pool._idle.remove(rec)  # busy now
        results = [True] * len(stale)
        started: set[int] = set()

        def ping(i: int, rec: Record) -> None:
            started.add(i)
            results[i] = self._vetting.ping(rec)
            if results[i]:
                pool._recycle(rec, checked=True)

        greenlets = [gevent.spawn(ping, i, rec) for i, rec in enumerate(stale)]
        try:
            gevent.joinall(greenlets)
        except BaseException:
            gevent.killall(greenlets)  # a started ping discards its record when killed
            for i, rec in enumerate(stale):
                if i not in started:
                    pool._recycle(rec, checked=True)
            raise
        return results.count(False)

    # ------------------------------------------------------------------ operations

    def resize(self, min_size: int, max_size: int | None) -> None:
        """New size limits; surplus idle connections close now. Never switches."""
        pool = self._pool
        new = PoolSettings(**{**pool.settings.__dict__})
        new.min_size = min_size
        new.max_size = max_size if max_size is not None else max(min_size, new.max_size)
        new.validate()
        pool.settings = new
        logger.info("pool %r resized to min=%d max=%d", pool.name, new.min_size, new.max_size)
        self.trim_to_max_size()
        self._connector.grow()

    def reconnect_all(self) -> None:
        """Close every idle connection now and open new ones; lent ones are closed when
        they come back. Never switches."""
        pool = self._pool
        pool._generation += 1
        while pool._idle:
            pool._close_idle(pool._idle.pop())
        self._connector.reset_backoff()
        self._connector.grow()

    def drain(self, timeout: float) -> None:
        """Replace every connection, one at a time, opening the new one before closing
        the old when there is room. Raises ConnectError if a replacement cannot be opened
        before the deadline. Switches."""
        pool = self._pool
        connector = self._connector
        pool._generation += 1
        deadline = monotonic() + timeout
        while True:
            old = next((r for r in pool._idle if r.generation != pool._generation), None)
            if old is None:
                break
            if pool._slots >= pool.settings.max_size:
                pool._idle.remove(old)
                pool._close_idle(old)
                old = None
            if pool._state != OPEN:
                raise PoolClosed(f"pool {pool.name!r} was closed during drain()")
            if not pool._reserve_slot():
                continue  # a connector took the room; the old ones go by generation anyway
            try:
                rec = connector.open_into_slot(max(0.001, deadline - monotonic()))
            except Exception:
                raise ConnectError(
                    f"pool {pool.name!r}: drain could not open a replacement: "
                    f"{connector.last_error}"
                ) from redacted_copy(connector.last_exception, connector.target.redact)
            if rec is not None:
                pool._add_opened(rec)
            if old is not None and old in pool._idle:
                pool._idle.remove(old)
                pool._close_idle(old)
        connector.grow()

    def forget_after_fork(self) -> None:
        """In a forked child: the parent's greenlet is not ours. Never switches."""
        self._greenlet = None
        self._wake = Event()
        self._check_soon = False


def _interval(s: PoolSettings) -> float:
    leaks = s.leak_threshold / 2 if s.leak_threshold else 1.0
    return max(0.05, min(1.0, s.health_check_period, s.max_idle / 2, s.max_lifetime / 4, leaks))

