"""SQLAlchemy connection records as the connections a GreenPool manages.

greenpool lends whatever its driver's ``connect()`` returns. For SQLAlchemy that is a
:class:`GreenRecord`: SQLAlchemy's own ``_ConnectionRecord`` (so the engine's creator,
``do_connect``, the ``first_connect``/``connect`` events and the dialect's initialisation
run exactly as under QueuePool), opened by greenpool's connector greenlets and wrapped by
:class:`RecordDriver`, which answers the pool's questions (state, ping, rollback, cancel,
close) with the psycopg or psycopg2 adapter on the record's DBAPI connection.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import gevent
from sqlalchemy.pool.base import _ConnectionRecord

from greenpool.drivers import ConnState, Driver

if TYPE_CHECKING:
    from greenpool import GreenPool
    from greenpool.sqlalchemy.pool import GreenQueuePool


class GreenRecord(_ConnectionRecord):
    """One DBAPI connection of a :class:`GreenQueuePool`, as SQLAlchemy sees it.

    Extra state lives in the instance ``__dict__``: the GreenPool that lent it, whether
    the pool marked it stale (invalidated pool-wide, to be replaced rather than reused),
    and a connection SQLAlchemy invalidated while its query was still running (handed to
    greenpool, which cancels the query on the server before closing, holding the slot).
    """

    lender: GreenPool[Any] | None
    stale: bool
    pending: Any

    def __init__(self, pool: GreenQueuePool) -> None:
        self.lender = None
        self.stale = False
        self.pending = None
        self._green_owner = pool
        super().__init__(pool)

    def invalidate(self, e: BaseException | None = None, soft: bool = False) -> None:
        """SQLAlchemy's invalidation; a connection busy with a query is not closed here
        but handed to greenpool, which cancels the query first (see the module doc)."""
        conn = self.dbapi_connection
        if soft or conn is None:
            super().invalidate(e, soft)
            return
        owner = self._green_owner
        owner._invalidating.add(id(conn))
        try:
            super().invalidate(e, soft)
        finally:
            owner._invalidating.discard(id(conn))
            held = owner._held_active.pop(id(conn), None)
            if held is not None:
                self.pending = held

    def fileno(self) -> int:
        """The DBAPI connection's socket (greenpool points it at /dev/null in a forked
        child, so the child never talks on the parent's sessions)."""
        conn = self.dbapi_connection if self.dbapi_connection is not None else self.pending
        if conn is None:
            raise ValueError("connection record has no open connection")
        return int(conn.fileno())


class RecordDriver:
    """greenpool driver whose connections are :class:`GreenRecord` objects."""

    def __init__(self, inner: Driver, pool: GreenQueuePool) -> None:
        self.name = f"sqlalchemy+{inner.name}"
        self.inner = inner
        self._pool = pool

    def prepare(self) -> None:
        self.inner.prepare()

    def cooperation_problems(self) -> list[str]:
        return self.inner.cooperation_problems()

    def validate_conninfo(self, conninfo: str) -> None:
        """The engine's URL was validated by SQLAlchemy; greenpool gets no conninfo."""

    def connect(self, conninfo: str, kwargs: dict[str, Any], timeout: float) -> GreenRecord:
        # SQLAlchemy's creator (URL, connect_args, do_connect) and connect events; the
        # greenpool conninfo and kwargs (application_name) are not used.
        with gevent.Timeout(timeout, TimeoutError(f"connect timed out after {timeout:g} s")):
            return GreenRecord(self._pool)

    def _conn(self, rec: GreenRecord) -> Any:
        conn = rec.dbapi_connection
        return conn if conn is not None else rec.pending

    def state(self, rec: GreenRecord) -> ConnState:
        if rec.stale:
            return ConnState.BROKEN
        conn = rec.dbapi_connection
        if conn is None:
            # Invalidated by SQLAlchemy. One invalidated mid-query is still open: ACTIVE
            # makes the pool cancel its query on the server before closing it.
            if rec.pending is not None and self.inner.state(rec.pending) is ConnState.ACTIVE:
                return ConnState.ACTIVE
            return ConnState.BROKEN
        return self.inner.state(conn)

    def ping(self, rec: GreenRecord) -> None:
        self.inner.ping(self._conn(rec))

    def commit(self, rec: GreenRecord) -> None:
        self.inner.commit(self._conn(rec))

    def rollback(self, rec: GreenRecord) -> None:
        self.inner.rollback(self._conn(rec))

    def execute(self, rec: GreenRecord, sql: str) -> None:
        self.inner.execute(self._conn(rec), sql)

    def query(self, rec: GreenRecord, sql: str, params: Any = None) -> list[Any]:
        return self.inner.query(self._conn(rec), sql, params)

    def client_state(self, rec: GreenRecord) -> Any:
        conn = self._conn(rec)
        return None if conn is None else self.inner.client_state(conn)

    def restore_client_state(self, rec: GreenRecord, saved: Any) -> None:
        conn = self._conn(rec)
        if conn is not None and saved is not None:
            self.inner.restore_client_state(conn, saved)

    def host_of(self, rec: GreenRecord) -> str:
        conn = self._conn(rec)
        return "unknown" if conn is None else self.inner.host_of(conn)

    def server_read_only(self, rec: GreenRecord) -> bool | None:
        conn = self._conn(rec)
        return None if conn is None else self.inner.server_read_only(conn)

    def sent_marker(self, rec: GreenRecord) -> int | None:
        conn = rec.dbapi_connection
        return None if conn is None else self.inner.sent_marker(conn)

    def cancel(self, rec: GreenRecord, timeout: float) -> None:
        self.inner.cancel(self._conn(rec), timeout)

    def close(self, rec: GreenRecord) -> None:
        # SQLAlchemy's close: the pool's ``close`` event, then the dialect's do_close.
        with contextlib.suppress(Exception):
            rec.close()
        pending, rec.pending = rec.pending, None
        if pending is not None:
            self.inner.close(pending)

    def backend_pid(self, rec: GreenRecord) -> int | None:
        conn = self._conn(rec)
        return None if conn is None else self.inner.backend_pid(conn)

    def is_connection(self, obj: Any) -> bool:
        return isinstance(obj, GreenRecord)
