"""GreenQueuePool: SQLAlchemy's pool interface over a GreenPool.

    engine = create_engine("postgresql+psycopg://app@db/app", poolclass=GreenQueuePool,
                           pool_size=10, max_overflow=0, pool_timeout=5)

SQLAlchemy keeps doing what it does above the pool (its creator and ``do_connect``, the
``connect``/``checkout``/``checkin``/``reset``/``close``/``invalidate`` events, reset on
return, invalidation after a disconnect); greenpool does the pooling: a hard cap of
``pool_size + max_overflow`` connections, first come first served waiting bounded by
``pool_timeout``, connections opened, checked and retired by its own greenlets, and no
leak when a greenlet is killed or times out. See docs/sqlalchemy.md.
"""

from __future__ import annotations

import functools
import os
from time import monotonic
from typing import Any

import gevent
from gevent.lock import RLock
from sqlalchemy import exc as sa_exc
from sqlalchemy.pool import Pool
from sqlalchemy.pool.base import ConnectionPoolEntry

from greenpool import GreenPool, PoolClosed, PoolTimeout, TooManyRequests
from greenpool.drivers import ConnState, get_driver
from greenpool.sqlalchemy.records import GreenRecord, RecordDriver

#: greenpool settings GreenQueuePool passes through unchanged (README's table).
GREENPOOL_SETTINGS = (
    "min_size",
    "min_idle",
    "max_waiting",
    "max_idle",
    "max_lifetime",
    "max_lifetime_jitter",
    "health_check_period",
    "check_idle_after",
    "ping_timeout",
    "connect_timeout",
    "max_connecting",
    "reconnect_timeout",
)

_DRIVERS = {"psycopg": "psycopg", "psycopg2": "psycopg2"}


class GreenQueuePool(Pool):
    """A SQLAlchemy pool whose connections are lent by a gevent-cooperative GreenPool.

    SQLAlchemy's arguments keep their meaning: ``pool_size + max_overflow`` is the hard
    cap on connections (both must be numbers: greenpool has no unlimited mode),
    ``pool_size`` connections are kept open once used (greenpool's ``min_size``; idle
    connections above it are closed after ``max_idle``), ``pool_timeout`` bounds the wait
    and raises SQLAlchemy's ``TimeoutError``, ``pool_recycle`` becomes greenpool's
    ``max_lifetime``, ``pool_pre_ping=True`` pings every connection before it is lent
    (``check_idle_after=0``; without it greenpool pings those idle over 1 s),
    ``pool_reset_on_return``, ``pool_events``, ``pool_logging_name`` and ``echo_pool``
    behave as documented by SQLAlchemy; ``pool_use_lifo`` is accepted and ignored
    (greenpool always reuses the most recently used idle connection, and serves waiting
    greenlets first come, first served).

    greenpool's own settings may be passed to ``create_engine`` under their names:
    ``min_size`` (default ``pool_size``), ``min_idle``, ``max_waiting``, ``max_idle``,
    ``max_lifetime``, ``max_lifetime_jitter``, ``health_check_period``,
    ``check_idle_after``, ``ping_timeout``, ``connect_timeout``, ``max_connecting``,
    ``reconnect_timeout``, and ``reset`` (greenpool's reset policy; a callable gets the
    DBAPI connection). Only the ``postgresql+psycopg`` and ``postgresql+psycopg2``
    dialects are supported.
    """

    def __init__(
        self,
        creator: Any,
        pool_size: int = 5,
        max_overflow: int = 10,
        timeout: float = 30.0,
        use_lifo: bool = False,
        min_size: int | None = None,
        min_idle: int | None = None,
        max_waiting: int | None = None,
        max_idle: float | None = None,
        max_lifetime: float | None = None,
        max_lifetime_jitter: float | None = None,
        health_check_period: float | None = None,
        check_idle_after: float | None = None,
        ping_timeout: float | None = None,
        connect_timeout: float | None = None,
        max_connecting: int | None = None,
        reconnect_timeout: float | None = None,
        reset: Any = "default",
        **kw: Any,
    ) -> None:
        self._recycle_arg = kw.pop("recycle", -1)
        self._pre_ping_arg = bool(kw.pop("pre_ping", False))
        # SQLAlchemy's own recycle and pre-ping would reconnect inside the borrowing
        # greenlet; greenpool does both itself (max_lifetime, the checkout ping).
        super().__init__(creator, recycle=-1, pre_ping=False, **kw)
        _check_size("pool_size", pool_size)
        _check_size("max_overflow", max_overflow)
        if pool_size + max_overflow < 1:
            raise ValueError(
                "pool_size + max_overflow: must allow at least one connection, "
                f"got {pool_size} + {max_overflow}"
            )
        self._pool_size = pool_size
        self._max_overflow = max_overflow
        self._timeout = timeout
        self._use_lifo = use_lifo
        self._reset = reset
        local = locals()
        self._settings: dict[str, Any] = {
            name: local[name] for name in GREENPOOL_SETTINGS if local[name] is not None
        }
        dialect_name = getattr(self._dialect, "name", "postgresql")
        driver = getattr(self._dialect, "driver", "psycopg")
        if dialect_name != "postgresql" or driver not in _DRIVERS or self._dialect.is_async:
            raise ValueError(
                f"GreenQueuePool: the {dialect_name}+{driver} dialect is not supported "
                "(use postgresql+psycopg or postgresql+psycopg2)"
            )
        self._inner = get_driver(_DRIVERS[driver])
        self._invalidating: set[int] = set()
        self._held_active: dict[int, Any] = {}
        self._pid = os.getpid()
        self._disposed = False
        self._open_lock = RLock()
        self._hub: Any = None  # the hub whose greenlets borrow (set at first checkout)
        _install_gc_deferral()
        self._greenpool: GreenPool[Any] | None = self._new_greenpool()  # validates settings

    # ------------------------------------------------------------------ configuration

    def _greenpool_kwargs(self) -> dict[str, Any]:
        settings = dict(self._settings)
        recycle = self._recycle_arg
        if "max_lifetime" not in settings and recycle is not None and recycle > 0:
            settings["max_lifetime"] = float(recycle)
        if self._pre_ping_arg:
            settings.setdefault("check_idle_after", 0.0)
        settings.setdefault("min_size", min(self._pool_size, self._pool_size + self._max_overflow))
        reset = self._reset
        if callable(reset):
            user_reset = reset
            reset = functools.partial(_reset_dbapi, user_reset)
        settings["reset"] = reset
        return settings

    def _new_greenpool(self) -> GreenPool[Any]:
        name = self._orig_logging_name or "sqlalchemy"
        return GreenPool(
            "",
            max_size=self._pool_size + self._max_overflow,
            timeout=self._timeout,
            driver=RecordDriver(self._inner, self),
            name=name,
            open=False,
            **self._greenpool_kwargs(),
        )

    @property
    def greenpool(self) -> GreenPool[Any]:
        """The GreenPool lending this pool's connections (``.stats()`` for figures)."""
        if self._greenpool is None:
            self._greenpool = self._new_greenpool()
        return self._greenpool

    # ------------------------------------------------------------------ borrowing

    def _do_get(self) -> ConnectionPoolEntry:
        if self._hub is None:
            self._hub = gevent.get_hub()
        gp = self.greenpool
        if gp.closed:
            self._open(gp)
        deadline = monotonic() + self._timeout
        first = True
        while True:
            try:
                # The GreenPool's own timeout is pool_timeout: only a retry needs the rest.
                rec: GreenRecord = (
                    gp.getconn() if first else gp.getconn(max(0.0, deadline - monotonic()))
                )
            except (PoolTimeout, TooManyRequests) as ex:
                raise sa_exc.TimeoutError(
                    f"GreenQueuePool limit of size {self._pool_size} overflow "
                    f"{self._max_overflow} reached, connection timed out, timeout "
                    f"{self._timeout:0.2f} ({ex})",
                    code="3o7r",
                ) from ex
            rec.lender = gp
            if (
                rec.dbapi_connection is None
                or self._invalidate_time > rec.starttime
                or rec._soft_invalidate_time > rec.starttime
            ):
                # Invalidated (after a disconnect somewhere in the pool): greenpool
                # closes it, opens a replacement, and this greenlet takes the next one.
                rec.stale = True
                gp.putconn(rec)
                first = False
                continue
            return rec

    def _open(self, gp: GreenPool[Any]) -> None:
        # The first checkouts of a worker arrive together and opening may switch
        # greenlets (logging, the driver's set-up): one greenlet opens, the others wait.
        with self._open_lock:
            if not gp.closed:
                return
            try:
                gp.open()
            except PoolClosed:
                raise sa_exc.InvalidRequestError(
                    f"GreenQueuePool {gp.name!r} was closed (greenpool.close_all()?); "
                    "call engine.dispose() to start a new pool"
                ) from None

    def _do_return_conn(self, record: ConnectionPoolEntry) -> None:
        rec: GreenRecord = record  # type: ignore[assignment]
        lender, rec.lender = rec.lender, None
        if lender is None:
            raise sa_exc.InvalidRequestError("GreenQueuePool: this record is not checked out")
        lender.putconn(rec)

    def _close_connection(self, connection: Any, *, terminate: bool = False) -> None:
        if (
            terminate
            and id(connection) in self._invalidating
            and self._inner.state(connection) is ConnState.ACTIVE
        ):
            # Invalidated mid-query (a killed or timed-out greenlet): greenpool cancels
            # the query on the server, then closes, keeping the slot until it is gone.
            self._held_active[id(connection)] = connection
            return
        super()._close_connection(connection, terminate=terminate)

    # ------------------------------------------------------------------ lifecycle

    def dispose(self) -> None:
        """Close the idle connections now; checked-out ones close when returned.

        The pool stays usable: the next checkout starts a new GreenPool.
        """
        gp, self._greenpool = self._greenpool, None
        self._disposed = True
        if gp is not None and os.getpid() == self._pid:
            gp.close(timeout=0)
        self.logger.info("Pool disposed. %s", self.status())

    def recreate(self) -> GreenQueuePool:
        """A new pool with the same arguments and event listeners.

        Called without a prior :meth:`dispose` (``engine.dispose(close=False)``): in a
        forked child this pool is left untouched (greenpool already forgot the parent's
        connections without closing them); in the process that created it, its
        connections are closed as they become idle, as QueuePool's are when the
        de-referenced pool is garbage collected.
        """
        self.logger.info("Pool recreating")
        if not self._disposed and os.getpid() == self._pid:
            gp, self._greenpool = self._greenpool, None
            if gp is not None:
                gp.close(timeout=0)
        return self.__class__(
            self._creator,
            pool_size=self._pool_size,
            max_overflow=self._max_overflow,
            timeout=self._timeout,
            use_lifo=self._use_lifo,
            reset=self._reset,
            recycle=self._recycle_arg,
            pre_ping=self._pre_ping_arg,
            echo=self.echo,
            logging_name=self._orig_logging_name,
            reset_on_return=self._reset_on_return,
            _dispatch=self.dispatch,
            dialect=self._dialect,
            **self._settings,
        )

    # ------------------------------------------------------------------ figures

    def _stats(self) -> dict[str, Any]:
        gp = self._greenpool
        if gp is None:
            return {"idle": 0, "acquired": 0, "total": 0, "waiting": 0}
        return gp.stats()

    def status(self) -> str:
        stats = self._stats()
        # QueuePool's wording first (tools parse it), then greenpool's queue and cap.
        return (
            f"Pool size: {self.size()}  Connections in pool: {stats['idle']} "
            f"Current Overflow: {stats['total'] - self._pool_size} "
            f"Current Checked out connections: {stats['acquired']} "
            f"Waiting greenlets: {stats['waiting']} "
            f"Max connections: {self._pool_size + self._max_overflow}"
        )

    def size(self) -> int:
        return self._pool_size

    def timeout(self) -> float:
        return self._timeout

    def checkedin(self) -> int:
        return int(self._stats()["idle"])

    def overflow(self) -> int:
        return int(self._stats()["total"]) - self._pool_size

    def checkedout(self) -> int:
        return int(self._stats()["acquired"])


def _check_size(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}: expected a whole number, got {value!r}")
    if value < 0:
        raise ValueError(
            f"{name}: must not be negative, got {value} (greenpool has no unlimited mode: "
            "give pool_size + max_overflow as the cap)"
        )


def _reset_dbapi(user_reset: Any, rec: GreenRecord) -> None:
    user_reset(rec.dbapi_connection)


# ---------------------------------------------------------------------- GC returns
#
# A checked-out connection whose owner forgets to close it (a Session dropped without
# close()) is returned by a weakref finalizer when its proxy is freed. That happens
# wherever memory happens to be freed: inside the gevent hub, or in a greenlet in the
# middle of a gevent switch. SQLAlchemy's finalizer (_finalize_fairy) rolls back right
# there, and the I/O either blocks the hub or switches out of a greenlet that is itself
# switching ("Impossible to call blocking function in the event loop callback",
# "Invalid switch into greenlet"). For GreenQueuePool's connections the finalizer only
# schedules the very same call (reset event, rollback, checkin) in a fresh greenlet.
#
# SQLAlchemy looks _finalize_fairy up as a module global each time it builds a
# connection proxy, so wrapping it there costs nothing per checkout; for any other pool
# the wrapper calls straight through.

_sqlalchemy_finalize_fairy: Any = None


def _install_gc_deferral() -> None:
    global _sqlalchemy_finalize_fairy
    from sqlalchemy.pool import base

    if _sqlalchemy_finalize_fairy is None:
        _sqlalchemy_finalize_fairy = base._finalize_fairy
        base._finalize_fairy = _finalize_fairy


def _finalize_fairy(*args: Any, **kwargs: Any) -> Any:
    if not kwargs.get("is_gc_cleanup"):
        return _sqlalchemy_finalize_fairy(*args, **kwargs)
    pool = args[2] if len(args) > 2 else kwargs.get("pool")
    if isinstance(pool, GreenQueuePool) and pool._hub:
        # No I/O and no switch here: queue a callback that spawns the return.
        pool._hub.loop.run_callback_threadsafe(_spawn_return, args, kwargs)
        return None
    return _sqlalchemy_finalize_fairy(*args, **kwargs)


def _spawn_return(args: Any, kwargs: Any) -> None:
    gevent.spawn(_sqlalchemy_finalize_fairy, *args, **kwargs)
