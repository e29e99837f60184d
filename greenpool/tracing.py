"""Acquire, release and connect tracers (pgxpool's AcquireTracer/ReleaseTracer).

``on_acquire(pool, conn, wait_seconds)`` runs after a borrow, ``on_release(pool, conn,
hold_seconds)`` after a give-back, ``on_connect(pool, conn, connect_seconds)`` after the
pool opened a connection (connect, ``configure`` and the first snapshot; failed attempts
are counted in ``connect_errors`` instead). Nothing is on the hot path while no tracer is
set: adding the first acquire or release tracer replaces the pool's ``getconn`` and
``_release`` *on the instance* with traced versions (the class's stay as they are); a
connect tracer alone leaves them alone. A tracer that raises is logged and never breaks
the borrow, the release or the connect.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from time import monotonic
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from greenpool.pool import Pool

logger = logging.getLogger("greenpool")

Tracer = Callable[[Any, Any, float], None]


class Tracers:
    """The tracers of one pool."""

    def __init__(self, pool: Pool[Any]) -> None:
        self._pool = pool
        self.on_acquire: list[Tracer] = []
        self.on_release: list[Tracer] = []
        self.on_connect: list[Tracer] = []
        self._installed = False

    def add(
        self,
        on_acquire: Tracer | None = None,
        on_release: Tracer | None = None,
        on_connect: Tracer | None = None,
    ) -> Callable[[], None]:
        """Add tracers; returns a function that removes them again. Never switches."""
        for hook in (on_acquire, on_release, on_connect):
            if hook is not None and not callable(hook):
                raise ValueError("tracers must be callables (pool, conn, seconds)")
        if on_acquire is not None:
            self.on_acquire.append(on_acquire)
        if on_release is not None:
            self.on_release.append(on_release)
        if on_connect is not None:
            self.on_connect.append(on_connect)
            connector = getattr(self._pool, "_connector", None)
            if connector is not None:
                connector.tracers = self  # the connector calls connected() from now on
        if not self._installed and (on_acquire is not None or on_release is not None):
            self._install()

        def remove() -> None:
            for hooks, hook in (
                (self.on_acquire, on_acquire),
                (self.on_release, on_release),
                (self.on_connect, on_connect),
            ):
                if hook in hooks:
                    hooks.remove(hook)

        return remove

    def connected(self, conn: Any, seconds: float) -> None:
        """Call the connect tracers (the connector calls this). Never switches unless a
        tracer does."""
        for hook in list(self.on_connect):
            self._call(hook, conn, seconds)

    def _install(self) -> None:
        pool = self._pool
        base_getconn = type(pool).getconn
        base_release = type(pool)._release

        def getconn(timeout: float | None = None, read_only: bool = False) -> Any:
            if read_only:
                return base_getconn(pool, timeout, True)
            start = monotonic()
            conn = base_getconn(pool, timeout)
            now = monotonic()
            rec = pool._lent.get(id(conn))
            if rec is not None:
                rec.lent_at = now
            for hook in list(self.on_acquire):
                self._call(hook, conn, now - start)
            return conn

        def release(conn: Any, state: Any) -> None:
            rec = pool._lent.get(id(conn))
            held = monotonic() - rec.lent_at if rec is not None and rec.lent_at else 0.0
            base_release(pool, conn, state)
            for hook in list(self.on_release):
                self._call(hook, conn, held)

        setattr(pool, "getconn", getconn)  # noqa: B010 - an instance override, on purpose
        setattr(pool, "_release", release)  # noqa: B010
        self._installed = True

    def _call(self, hook: Tracer, conn: Any, seconds: float) -> None:
        try:
            hook(self._pool, conn, seconds)
        except Exception:
            logger.exception("pool %r: a tracer raised (ignored)", self._pool.name)
