"""The pools under test, behind one small interface.

Import this module only in a worker process, *after* ``gevent.monkey.patch_all()``: every
driver and pool library is imported here and must see the patched ``socket``/``select``/
``threading``.

Every contender lends connections in autocommit mode, so ``SELECT 1`` is exactly one round
trip everywhere and no pool pays for a commit or rollback on release. Each contender uses
its library's idiomatic borrow (``with pool.connection()`` where there is one). Connects
and closes are counted by the connection classes below, which gives the number of
backends a pool opened and the peak it held at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import gevent
import gevent.lock
import gevent.queue
import psycopg

APP_PREFIX = "bench-"


class Counter:
    """Connections opened, closed, and the most open at once (per worker process)."""

    opened = 0
    closed = 0
    peak = 0

    @classmethod
    def reset(cls) -> None:
        cls.opened = cls.closed = cls.peak = 0

    @classmethod
    def on_open(cls) -> None:
        cls.opened += 1
        cls.peak = max(cls.peak, cls.opened - cls.closed)

    @classmethod
    def on_close(cls) -> None:
        cls.closed += 1


class CountedConnection(psycopg.Connection[Any]):
    """A psycopg 3 connection that reports its opening and closing to :class:`Counter`."""

    @classmethod
    def connect(cls, *args: Any, **kwargs: Any) -> Any:
        conn = super().connect(*args, **kwargs)
        Counter.on_open()
        return conn

    def close(self) -> None:
        if not self.closed:
            Counter.on_close()
        super().close()


def query3(conn: Any, sql: str) -> None:
    conn.execute(sql).fetchall()


def query2(conn: Any, sql: str) -> None:
    cur = conn.cursor()
    cur.execute(sql)
    cur.fetchall()
    cur.close()


class Use(Protocol):
    """One borrow: ``__enter__`` returns the driver connection, ``__exit__`` gives it back."""

    def __enter__(self) -> Any: ...

    def __exit__(self, *exc: Any) -> Any: ...


class Contender(Protocol):
    name: str
    driver: str

    def connection(self) -> Use: ...

    def query(self, conn: Any, sql: str) -> None: ...

    def close(self) -> None: ...


# --------------------------------------------------------------------------- greenpool


class GreenpoolContender:
    """greenpool.GreenPool on psycopg 3 (optionally with the prototype gevent wait)."""

    driver = "psycopg"

    def __init__(self, dsn: str, min_size: int, max_size: int, name: str) -> None:
        from greenpool import GreenPool
        from greenpool.drivers.psycopg3 import Psycopg3Driver

        class _CountingDriver(Psycopg3Driver):
            def connect(self, conninfo: str, kwargs: dict[str, Any], timeout: float) -> Any:
                with gevent.Timeout(timeout, TimeoutError(f"connect timed out ({timeout} s)")):
                    return CountedConnection.connect(conninfo, **kwargs)

        self.name = name
        self.pool = GreenPool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            timeout=60.0,
            driver=_CountingDriver(),
            name=APP_PREFIX + name,
            kwargs={"autocommit": True},
            # Same work as the other pools, which reset nothing: the default session
            # reset is a round trip per release (measured in tests/test_security.py).
            reset=None,
            open=False,
        )
        self.pool.open(wait=min_size > 0, timeout=60.0)
        self.query = query3

    def connection(self) -> Use:
        return self.pool.connection()

    def close(self) -> None:
        self.pool.close(timeout=5.0)


# --------------------------------------------------------------------------- psycopg_pool


class PsycopgPoolContender:
    """psycopg_pool.ConnectionPool (its worker threads are greenlets once patched)."""

    driver = "psycopg"

    def __init__(self, dsn: str, min_size: int, max_size: int, name: str) -> None:
        from psycopg_pool import ConnectionPool

        self.name = name
        self.pool: Any = ConnectionPool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            timeout=60.0,
            connection_class=CountedConnection,
            kwargs={"autocommit": True, "application_name": APP_PREFIX + name},
            name=APP_PREFIX + name,
            open=True,
        )
        if min_size > 0:
            self.pool.wait(timeout=60.0)
        self.query = query3

    def connection(self) -> Use:
        return self.pool.connection()  # type: ignore[no-any-return]

    def close(self) -> None:
        self.pool.close(timeout=5.0)


# --------------------------------------------------------------------------- SQLAlchemy


class _FairyUse:
    __slots__ = ("_fairy", "_pool")

    def __init__(self, pool: Any) -> None:
        self._pool = pool
        self._fairy: Any = None

    def __enter__(self) -> Any:
        self._fairy = self._pool.connect()
        return self._fairy.driver_connection

    def __exit__(self, *exc: Any) -> None:
        self._fairy.close()
        self._fairy = None


class SQLAlchemyContender:
    """sqlalchemy.pool.QueuePool with creator = psycopg connect (FIFO or LIFO)."""

    driver = "psycopg"

    def __init__(self, dsn: str, min_size: int, max_size: int, name: str, lifo: bool) -> None:
        from sqlalchemy.pool import QueuePool

        app = APP_PREFIX + name

        def creator() -> Any:
            return CountedConnection.connect(dsn, autocommit=True, application_name=app)

        self.name = name
        self.pool: Any = QueuePool(
            creator, pool_size=max_size, max_overflow=0, timeout=60.0, use_lifo=lifo
        )
        warm = [self.pool.connect() for _ in range(min_size)]
        for fairy in warm:
            fairy.close()
        self.query = query3

    def connection(self) -> Use:
        return _FairyUse(self.pool)

    def close(self) -> None:
        self.pool.dispose()


# --------------------------------------------------------------------------- psycopg2


class _SemaphoreUse:
    """Borrow from a getconn/putconn pool behind a gevent semaphore (blocks, no error)."""

    __slots__ = ("_conn", "_get", "_put", "_sem")

    def __init__(self, sem: Any, get: Callable[[], Any], put: Callable[[Any], None]) -> None:
        self._sem, self._get, self._put = sem, get, put
        self._conn: Any = None

    def __enter__(self) -> Any:
        if not self._sem.acquire(timeout=60.0):
            raise TimeoutError("no connection within 60 s")
        try:
            self._conn = self._get()
        except BaseException:
            self._sem.release()
            raise
        return self._conn

    def __exit__(self, *exc: Any) -> None:
        try:
            self._put(self._conn)
        finally:
            self._conn = None
            self._sem.release()


class Psycopg2Contender:
    """psycopg2.pool.ThreadedConnectionPool + psycogreen, behind a gevent semaphore.

    ThreadedConnectionPool raises "pool exhausted" instead of waiting, so a
    ``gevent.lock.BoundedSemaphore(maxconn)`` in front of it is the usual way to make it
    block. A cold pool (minconn=0) closes every connection it gets back: that is
    psycopg2's documented behaviour (it keeps at most minconn idle).
    """

    driver = "psycopg2"

    def __init__(self, dsn: str, min_size: int, max_size: int, name: str) -> None:
        import psycopg2
        import psycopg2.extensions
        import psycopg2.pool
        from psycogreen.gevent import patch_psycopg

        patch_psycopg()

        class CountedPg2(psycopg2.extensions.connection):  # type: ignore[misc]
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                self.autocommit = True
                Counter.on_open()

            def close(self) -> None:
                if not self.closed:
                    Counter.on_close()
                super().close()

        self.name = name
        self.pool: Any = psycopg2.pool.ThreadedConnectionPool(
            min_size,
            max_size,
            dsn,
            connection_factory=CountedPg2,
            application_name=APP_PREFIX + name,
        )
        self.sem = gevent.lock.BoundedSemaphore(max_size)
        self.query = query2

    def connection(self) -> Use:
        return _SemaphoreUse(self.sem, self.pool.getconn, self.pool.putconn)

    def close(self) -> None:
        self.pool.closeall()


# --------------------------------------------------------------------------- naive


class NaiveQueuePool:
    """What many gevent apps hand-roll: a gevent Queue of psycopg 3 connections.

    Connections are created lazily up to ``max_size``; a returned connection goes back on
    the queue and whoever asks next (often the greenlet that just returned it) gets it.
    """

    def __init__(self, dsn: str, min_size: int, max_size: int, app: str) -> None:
        self.dsn, self.max_size, self.app = dsn, max_size, app
        self.queue: gevent.queue.Queue[Any] = gevent.queue.Queue()
        self.created = 0
        self.all: list[Any] = []
        for _ in range(min_size):
            self.queue.put(self._new())

    def _new(self) -> Any:
        self.created += 1
        try:
            conn = CountedConnection.connect(self.dsn, autocommit=True, application_name=self.app)
        except BaseException:
            self.created -= 1
            raise
        self.all.append(conn)
        return conn

    def getconn(self) -> Any:
        if self.queue.empty() and self.created < self.max_size:
            return self._new()
        return self.queue.get(timeout=60.0)

    def putconn(self, conn: Any) -> None:
        self.queue.put(conn)

    def closeall(self) -> None:
        for conn in self.all:
            conn.close()


class _NaiveUse:
    __slots__ = ("_conn", "_pool")

    def __init__(self, pool: NaiveQueuePool) -> None:
        self._pool = pool
        self._conn: Any = None

    def __enter__(self) -> Any:
        self._conn = self._pool.getconn()
        return self._conn

    def __exit__(self, *exc: Any) -> None:
        self._pool.putconn(self._conn)
        self._conn = None


class NaiveContender:
    driver = "psycopg"

    def __init__(self, dsn: str, min_size: int, max_size: int, name: str) -> None:
        self.name = name
        self.pool = NaiveQueuePool(dsn, min_size, max_size, APP_PREFIX + name)
        self.query = query3

    def connection(self) -> Use:
        return _NaiveUse(self.pool)

    def close(self) -> None:
        self.pool.closeall()


# --------------------------------------------------------------------------- no pool


class _ConnectUse:
    __slots__ = ("_app", "_conn", "_dsn", "_sem")

    def __init__(self, dsn: str, app: str, sem: Any) -> None:
        self._dsn, self._app, self._sem = dsn, app, sem
        self._conn: Any = None

    def __enter__(self) -> Any:
        if not self._sem.acquire(timeout=60.0):
            raise TimeoutError("no connection slot within 60 s")
        try:
            self._conn = CountedConnection.connect(
                self._dsn, autocommit=True, application_name=self._app
            )
        except BaseException:
            self._sem.release()
            raise
        return self._conn

    def __exit__(self, *exc: Any) -> None:
        try:
            self._conn.close()
        finally:
            self._conn = None
            self._sem.release()


class NoPoolContender:
    """Connect per use (psycopg 3), at most ``max_size`` connections at once."""

    driver = "psycopg"

    def __init__(self, dsn: str, min_size: int, max_size: int, name: str) -> None:
        self.name = name
        self.dsn = dsn
        self.app = APP_PREFIX + name
        self.sem = gevent.lock.BoundedSemaphore(max_size)
        self.query = query3

    def connection(self) -> Use:
        return _ConnectUse(self.dsn, self.app, self.sem)

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------- registry


def _greenpool_pw(dsn: str, min_size: int, max_size: int, name: str) -> Contender:
    """greenpool told to keep psycopg's own wait (what it did before it adopted its
    gevent-native wait, greenpool/drivers/gevent_wait.py): shows that change alone."""
    import os

    os.environ["GREENPOOL_PSYCOPG_WAIT"] = "psycopg"  # read when the pool is opened
    return GreenpoolContender(dsn, min_size, max_size, name)


def _sqla(lifo: bool) -> Callable[[str, int, int, str], Contender]:
    def factory(dsn: str, min_size: int, max_size: int, name: str) -> Contender:
        return SQLAlchemyContender(dsn, min_size, max_size, name, lifo=lifo)

    return factory


#: Keys match benchmarks.common.CONTENDERS (which holds the labels).
FACTORIES: dict[str, Callable[[str, int, int, str], Contender]] = {
    "greenpool": GreenpoolContender,
    "psycopg_pool": PsycopgPoolContender,
    "sqla_fifo": _sqla(False),
    "sqla_lifo": _sqla(True),
    "psycopg2": Psycopg2Contender,
    "naive": NaiveContender,
    "nopool": NoPoolContender,
    "greenpool_pw": _greenpool_pw,
}


def make(key: str, dsn: str, min_size: int, max_size: int) -> Contender:
    return FACTORIES[key](dsn, min_size, max_size, key)
