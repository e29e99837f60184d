"""Leak detection: connections held too long, and connections whose borrower died.

Swapped in only with ``leak_threshold`` set (through the tracers, so the hot path is
unchanged while it is off). At each borrow it notes the borrowing greenlet and its stack;
the maintenance greenlet logs, once per borrow, every connection held longer than the
threshold, with that stack, and counts it (``leaked_count``). A connection whose
borrowing greenlet has ended without giving it back is reclaimed at once and counted
(``reclaimed_count``): its query is cancelled if one runs, and it is closed rather than
reused, because greenlets the dead borrower spawned may still hold the object; the pool
opens a replacement.
"""

from __future__ import annotations

import logging
import traceback
from time import monotonic
from typing import TYPE_CHECKING, Any

import gevent
from gevent import Greenlet, getcurrent

if TYPE_CHECKING:
    from greenpool.pool import Pool, Record
    from greenpool.tracing import Tracers

logger = logging.getLogger("greenpool")

_STACK_LIMIT = 40


class LeakDetector:
    """Leak detection for one pool (see the module docstring)."""

    def __init__(self, pool: Pool[Any], tracers: Tracers, threshold: float) -> None:
        self._pool = pool
        self.threshold = threshold
        self.leaked_count = 0
        self.reclaimed_count = 0
        self._owners: dict[int, Any] = {}  # id(conn) -> borrowing greenlet
        self._links: dict[Any, int] = {}  # greenlet -> connections it holds
        tracers.add(on_acquire=self._acquired, on_release=self._released)

    def _acquired(self, pool: Any, conn: Any, wait: float) -> None:
        rec = self._pool._lent.get(id(conn))
        if rec is None:
            return
        owner = getcurrent()
        rec.owner = owner
        rec.borrow_stack = traceback.extract_stack(limit=_STACK_LIMIT)[:-3]
        rec.leak_reported = False
        self._owners[id(conn)] = owner
        if isinstance(owner, Greenlet):
            count = self._links.get(owner, 0)
            if count == 0:
                owner.rawlink(self._owner_ended)
            self._links[owner] = count + 1

    def _released(self, pool: Any, conn: Any, held: float) -> None:
        owner = self._owners.pop(id(conn), None)
        if owner is None or owner not in self._links:
            return
        self._links[owner] -= 1
        if self._links[owner] <= 0:
            del self._links[owner]
            owner.unlink(self._owner_ended)

    def _owner_ended(self, greenlet: Any) -> None:
        # Runs in the hub: reclaim in a greenlet of its own.
        self._links.pop(greenlet, None)
        gevent.spawn(self._reclaim_from, greenlet)

    def _reclaim_from(self, greenlet: Any) -> None:
        for rec in [r for r in self._pool._lent.values() if r.owner is greenlet]:
            self._reclaim(rec)

    def _reclaim(self, rec: Record) -> None:
        pool = self._pool
        if pool._lent.get(id(rec.conn)) is not rec:
            return  # given back meanwhile
        del pool._lent[id(rec.conn)]
        self._owners.pop(id(rec.conn), None)
        self.reclaimed_count += 1
        logger.warning(
            "pool %r: reclaimed a connection whose borrowing greenlet ended without giving "
            "it back (held %.1f s); borrowed at:\n%s",
            pool.name,
            monotonic() - rec.lent_at,
            _format(rec.borrow_stack),
        )
        pool._discard(rec)

    def scan(self) -> None:
        """Log connections held past the threshold (once each); reclaim those whose
        borrower ended without a link (plain greenlets). Never switches."""
        now = monotonic()
        for rec in list(self._pool._lent.values()):
            owner = rec.owner
            if owner is not None and getattr(owner, "dead", False):
                self._reclaim(rec)
                continue
            if not rec.leak_reported and rec.lent_at and now - rec.lent_at > self.threshold:
                rec.leak_reported = True
                self.leaked_count += 1
                logger.warning(
                    "pool %r: a connection has been held for %.1f s (leak_threshold %g s); "
                    "borrowed at:\n%s",
                    self._pool.name,
                    now - rec.lent_at,
                    self.threshold,
                    _format(rec.borrow_stack),
                )


def _format(stack: Any) -> str:
    return "".join(traceback.format_list(stack)) if stack else "  (stack not recorded)\n"
