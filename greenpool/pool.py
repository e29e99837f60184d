"""GreenPool: a PostgreSQL connection pool whose every wait cooperates with gevent.

State lives in plain Python structures with no locks: greenlets switch only where they
block, so every stretch of bookkeeping between two blocking calls is atomic. A pool
therefore belongs to one OS thread's hub (the normal case under ``gunicorn -k gevent``).

Every connection the pool owns is in exactly one place:

- ``_idle`` (a deque; released connections are appended and taken from the same end, so
  the most recently used is reused first and surplus ones age out at the other end),
- ``_lent`` (handed to a borrower, keyed by ``id(conn)``),
- "busy": held by the pool itself for a moment (checked before checkout, cleaned after
  release, health-checked, or handed to a waiter that has not resumed yet),
- "constructing" (a slot reserved before connecting) or "closing" (being cancelled/closed).

``total == idle + acquired + constructing`` where acquired counts lent and busy ones; the
server never sees more than ``max_size`` backends because a slot is reserved before a
connect starts and freed only after the connection is closed.
"""

from __future__ import annotations

import logging
import os
import random
import warnings
import weakref
from collections import deque
from collections.abc import Callable
from time import monotonic
from typing import Any

import gevent
from gevent import Greenlet, getcurrent
from gevent.event import Event

from greenpool import conninfo as _ci
from greenpool.drivers import ConnState, Driver, get_driver
from greenpool.errors import (
    ConnectError,
    CooperationError,
    PoolClosed,
    PoolError,
    PoolTimeout,
    TooManyRequests,
)
from greenpool.reset import ResetPolicy, get_reset_policy
from greenpool.settings import PoolSettings, build_settings
from greenpool.waiters import WaitQueue

logger = logging.getLogger("greenpool")

_NEW, _OPEN, _CLOSED = "new", "open", "closed"
_IDLE, _IN_TRANSACTION, _IN_ERROR = ConnState.IDLE, ConnState.IN_TRANSACTION, ConnState.IN_ERROR

BACKOFF_INITIAL = 0.1
BACKOFF_MAX = 2.0
BACKOFF_JITTER = 0.2  # +/- 20%

ConnCallback = Callable[[Any], None]
CheckCallback = Callable[[Any], None]

# Connections a forked child inherited: kept referenced forever so that finalising them in
# the child never sends a Terminate on the parent's sockets.
_FORK_ORPHANS: list[Any] = []
_POOLS: weakref.WeakSet[GreenPool] = weakref.WeakSet()


class _Conn:
    """The pool's record of one connection."""

    __slots__ = ("conn", "created", "expires_at", "generation", "idle_since")

    def __init__(self, conn: Any, created: float, expires_at: float, generation: int) -> None:
        self.conn = conn
        self.created = created
        self.expires_at = expires_at
        self.generation = generation
        self.idle_since = created


class _ConnectionContext:
    """``with pool.connection() as conn``: commit on success, roll back on error, release."""

    __slots__ = ("_conn", "_pool", "_timeout")

    def __init__(self, pool: GreenPool, timeout: float | None) -> None:
        self._pool = pool
        self._timeout = timeout
        self._conn: Any = None

    def __enter__(self) -> Any:
        self._conn = self._pool.getconn(self._timeout)
        return self._conn

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        pool, conn = self._pool, self._conn
        self._conn = None
        state: ConnState | None = None  # None: the release reads it afresh
        try:
            if exc_type is None:
                state = pool._driver.state(conn)
                if state is _IN_TRANSACTION:
                    state = None
                    pool._driver.commit(conn)
                elif state is _IN_ERROR:
                    raise PoolError(
                        "the transaction failed inside the 'with pool.connection()' block "
                        "and was rolled back: nothing was committed"
                    )
        finally:
            # The release rolls back whatever is still open (the error case included).
            pool._release(conn, state)


class GreenPool:
    """A gevent-cooperative PostgreSQL connection pool.

    Borrow with ``with pool.connection() as conn:`` (commits on success, rolls back on an
    exception) or ``getconn()`` / ``putconn()``. Connections are opened, checked, aged and
    replaced by the pool's own maintenance greenlet and connector greenlets; a borrower
    only ever waits, first come first served, for at most ``timeout`` seconds.

    Settings may also come from the conninfo, pgxpool-style (``pool_max_conns=10``);
    explicit keyword arguments win. With no conninfo and no ``kwargs`` the pool stays
    closed until :meth:`open` is called (pass ``open=True`` to use libpq's environment
    defaults right away).
    """

    def __init__(
        self,
        conninfo: str = "",
        *,
        min_size: int | None = None,
        max_size: int | None = None,
        timeout: float | None = None,
        max_waiting: int | None = None,
        max_idle: float | None = None,
        max_lifetime: float | None = None,
        health_check_period: float | None = None,
        reconnect_timeout: float | None = None,
        driver: str | Driver = "psycopg",
        configure: ConnCallback | None = None,
        check: CheckCallback | None = None,
        reset: ConnCallback | str | None = None,
        name: str | None = None,
        kwargs: dict[str, Any] | None = None,
        open: bool | None = None,
        min_idle: int | None = None,
        max_lifetime_jitter: float | None = None,
        check_idle_after: float | None = None,
        ping_timeout: float | None = None,
        connect_timeout: float | None = None,
        max_connecting: int | None = None,
        reconnect_failed: Callable[[GreenPool], None] | None = None,
    ) -> None:
        self.name = name or "greenpool"
        self._driver: Driver = get_driver(driver)
        self._configure = configure
        self._check = check
        self._reset_policy: ResetPolicy = get_reset_policy(reset)
        self._reconnect_failed = reconnect_failed
        self._kwargs: dict[str, Any] = dict(kwargs or {})
        explicit = {
            "min_size": min_size,
            "max_size": max_size,
            "timeout": timeout,
            "max_waiting": max_waiting,
            "max_idle": max_idle,
            "max_lifetime": max_lifetime,
            "health_check_period": health_check_period,
            "reconnect_timeout": reconnect_timeout,
            "min_idle": min_idle,
            "max_lifetime_jitter": max_lifetime_jitter,
            "check_idle_after": check_idle_after,
            "ping_timeout": ping_timeout,
            "connect_timeout": connect_timeout,
            "max_connecting": max_connecting,
        }
        self._explicit = {k: v for k, v in explicit.items() if v is not None}
        self._set_conninfo(conninfo)

        self._state = _NEW
        self._pid = os.getpid()
        self._epoch = 0  # bumped in a forked child: greenlets of an older epoch stop
        self._forked = False
        self._generation = 0  # bumped by drain()/reset(): older connections are retired
        self._idle: deque[_Conn] = deque()
        self._lent: dict[int, _Conn] = {}
        self._busy = 0
        self._constructing = 0
        self._closing = 0
        self._waiters: WaitQueue[_Conn] = WaitQueue()
        self._waiting = self._waiters.queue  # the raw deque, for cheap emptiness tests
        self._connectors: set[Greenlet] = set()
        self._checkers: set[Greenlet] = set()  # checkout pings a borrower stopped waiting for
        self._maintenance: Greenlet | None = None
        self._maintenance_wake = Event()
        self._check_soon = False
        self._wait_target = 0  # connections wait() wants even when min_size is 0
        self._outcome_events: list[Event] = []
        self._returned_event: Event | None = None

        # Connection failures and backoff.
        self._failing_since: float | None = None
        self._backoff = 0.0
        self._last_error: str | None = None
        self._last_exception: BaseException | None = None
        self._reconnect_reported = False

        # Counters for stats().
        self._acquire_count = 0
        self._peak_acquired = 0
        self._empty_acquire_count = 0
        self._canceled_acquire_count = 0
        self._timeout_count = 0
        self._too_many_count = 0
        self._acquire_wait_total = 0.0
        self._new_conns_count = 0
        self._connect_errors = 0
        self._idle_destroy_count = 0
        self._lifetime_destroy_count = 0
        self._broken_destroy_count = 0
        self._check_failed_count = 0
        self._returns_count = 0
        self._rollback_count = 0
        self._cancel_count = 0

        _POOLS.add(self)
        should_open = open if open is not None else bool(conninfo or kwargs)
        if should_open:
            self.open()

    # ------------------------------------------------------------------ configuration

    def _set_conninfo(self, conninfo: str) -> None:
        parsed = _ci.split_conninfo(conninfo)
        from_conninfo = dict(parsed.pool_settings)
        timeout_param = parsed.params.get("connect_timeout") or self._kwargs.get("connect_timeout")
        if timeout_param is not None:
            # libpq ignores connect_timeout in async mode; the pool enforces it instead.
            from_conninfo["connect_timeout"] = _ci.parse_duration(
                str(timeout_param), name="connect_timeout"
            )
        settings = build_settings(self._explicit, from_conninfo)
        if parsed.conninfo:
            self._driver.validate_conninfo(parsed.conninfo)
        self.settings: PoolSettings = settings  # only once everything was accepted
        self._conninfo = parsed.conninfo
        self._params = parsed.params
        self._redact = _ci.Redactor(_ci.secrets_of(parsed.params, self._kwargs))
        self._connect_kwargs = dict(self._kwargs)
        if "application_name" not in parsed.params and "application_name" not in self._kwargs:
            self._connect_kwargs["application_name"] = self.name
        self._description = _ci.describe(parsed.params, self._connect_kwargs)

    def configure_conninfo(self, conninfo: str, kwargs: dict[str, Any] | None = None) -> None:
        """Set the connection string (and connect kwargs) of a pool that is not open yet."""
        if self._state == _OPEN:
            raise PoolError(f"pool {self.name!r} is open: use drain(conninfo=...) to change it")
        if kwargs is not None:
            self._kwargs = dict(kwargs)
        self._set_conninfo(conninfo)

    @property
    def min_size(self) -> int:
        return self.settings.min_size

    @property
    def max_size(self) -> int:
        return self.settings.max_size

    @property
    def timeout(self) -> float:
        return self.settings.timeout

    @property
    def closed(self) -> bool:
        """True unless the pool is open."""
        return self._state != _OPEN

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {self.name!r} {self._description} {self._state} "
            f"size={self._total()}/{self.settings.max_size} idle={len(self._idle)}>"
        )

    # ------------------------------------------------------------------ lifecycle

    def open(self, wait: bool = False, timeout: float = 30.0) -> None:
        """Start the pool: the maintenance greenlet begins opening min_size connections.

        With ``wait=True`` block until they are ready, failing fast with the real connection
        error (wrong password, no server) and closing the pool again in that case.
        """
        if self._state == _OPEN:
            if wait:
                self.wait(timeout)
            return
        if self._state == _CLOSED:
            raise PoolClosed(f"pool {self.name!r} was closed; create a new pool")
        self._driver.prepare()
        problems = self._driver.cooperation_problems()
        if problems:
            msg = f"pool {self.name!r} will not cooperate with gevent: " + "; ".join(problems)
            logger.warning(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
        self._state = _OPEN
        self._start_maintenance()
        logger.info("pool %r opened (%s)", self.name, self._description)
        if wait:
            try:
                self.wait(timeout)
            except BaseException:
                self.close(timeout=0)
                raise

    def wait(self, timeout: float = 30.0) -> None:
        """Block until min_size (at least one) connections are open.

        Raises ConnectError with the driver's error as soon as a connection attempt fails,
        or PoolTimeout after ``timeout`` seconds.
        """
        self._check_open()
        target = max(self.settings.min_size, 1)
        deadline = monotonic() + timeout
        errors_before = self._connect_errors
        self._wait_target = target
        try:
            self._grow()
            while self._open_count() < target:
                if self._connect_errors > errors_before:
                    raise ConnectError(
                        f"pool {self.name!r} could not connect ({self._description}): "
                        f"{self._last_error}"
                    ) from self._last_exception
                remaining = deadline - monotonic()
                if remaining <= 0:
                    raise PoolTimeout(
                        f"pool {self.name!r}: {self._open_count()} of {target} connections "
                        f"ready after {timeout:g} s{self._error_suffix()}"
                    )
                self._check_open()
                event = Event()
                self._outcome_events.append(event)
                event.wait(remaining)
        finally:
            self._wait_target = 0

    def close(self, timeout: float = 5.0) -> None:
        """Close the pool: waiters get PoolClosed, idle connections are closed now.

        Borrowed connections are closed when they come back; this waits up to ``timeout``
        seconds for them, then returns anyway (logging how many are still out).
        """
        if self._state == _CLOSED:
            return
        self._state = _CLOSED
        current = getcurrent()
        to_kill = [
            g
            for g in (*self._connectors, *self._checkers, self._maintenance)
            if g and g is not current
        ]
        gevent.killall(to_kill, block=False)
        self._waiters.fail_all(PoolClosed(f"pool {self.name!r} was closed"))
        self._notify_outcome()
        while self._idle:
            self._close_now(self._idle.pop())
        deadline = monotonic() + timeout
        while self._lent or self._busy:
            remaining = deadline - monotonic()
            if remaining <= 0:
                logger.warning(
                    "pool %r closed with %d connection(s) still borrowed; they will be closed "
                    "when returned",
                    self.name,
                    len(self._lent) + self._busy,
                )
                break
            self._returned_event = Event()
            self._returned_event.wait(remaining)
        logger.info("pool %r closed", self.name)

    def __enter__(self) -> GreenPool:
        self.open()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._state != _OPEN:
            state = "closed" if self._state == _CLOSED else "not open yet"
            raise PoolClosed(f"pool {self.name!r} is {state}")

    # ------------------------------------------------------------------ borrowing

    def connection(self, timeout: float | None = None) -> _ConnectionContext:
        """Context manager lending a connection; commits on success, rolls back on error."""
        return _ConnectionContext(self, timeout)

    def getconn(self, timeout: float | None = None) -> Any:
        """Borrow a connection, waiting up to ``timeout`` seconds (default: the pool's).

        ``timeout=0`` tries without waiting. Raises PoolTimeout, TooManyRequests (queue
        full) or PoolClosed. Give it back with :meth:`putconn`.
        """
        if self._state != _OPEN:
            self._check_open()
        if self._forked:
            self._restart_after_fork()
        settings = self.settings
        limit = settings.timeout if timeout is None else _check_timeout(timeout)
        start = monotonic()
        deadline = start + limit
        while True:
            if self._idle and not self._waiting:
                rec = self._idle.pop()
                if (  # the common case, inline: fresh, young and of this generation
                    start - rec.idle_since <= settings.check_idle_after
                    and start < rec.expires_at
                    and rec.generation == self._generation
                ):
                    break  # straight from idle to lent: never counted busy
                self._busy += 1
            else:
                rec = self._wait(deadline, start)
            vetted = self._vet(rec, deadline)
            if vetted:
                self._busy -= 1
                break
            if vetted is None or monotonic() >= deadline:
                self._timeout_count += 1
                raise PoolTimeout(self._timeout_message(monotonic() - start))
        lent = self._lent
        lent[id(rec.conn)] = rec
        self._acquire_count += 1
        if len(lent) > self._peak_acquired:
            self._peak_acquired = len(lent)
        return rec.conn

    def _wait(self, deadline: float, start: float) -> _Conn:
        """Queue for a connection; the returned record is counted as busy."""
        settings = self.settings
        if settings.max_waiting and len(self._waiters) >= settings.max_waiting:
            self._too_many_count += 1
            raise TooManyRequests(
                f"pool {self.name!r}: {len(self._waiters)} greenlets already waiting "
                f"(max_waiting={settings.max_waiting}); {self._counts()}"
            )
        remaining = deadline - monotonic()
        if remaining <= 0:
            self._timeout_count += 1
            raise PoolTimeout(self._timeout_message(monotonic() - start))
        waiter = self._waiters.push()
        self._grow()
        try:
            served = waiter.wait(remaining)
        except BaseException:
            # Killed or interrupted (GreenletExit, gevent.Timeout...): leave the queue now,
            # and give back a connection handed over at that very moment.
            self._canceled_acquire_count += 1
            if waiter.item is not None:
                self._recycle(waiter.item)
            else:
                self._waiters.discard(waiter)
            raise
        if waiter.item is not None:
            # Served (even if the timer fired in the same loop iteration: it was in time).
            self._empty_acquire_count += 1
            self._acquire_wait_total += monotonic() - start
            return waiter.item
        if waiter.error is not None:
            raise waiter.error
        assert not served
        self._waiters.discard(waiter)
        self._timeout_count += 1
        raise PoolTimeout(self._timeout_message(monotonic() - start))

    def _vet(self, rec: _Conn, deadline: float) -> bool | None:
        """Check a busy record before lending it; False if it was retired instead, None
        if the borrower's deadline came first (the record then goes back to the pool)."""
        if rec.generation != self._generation:
            self._discard(rec)
            return False
        now = monotonic()
        if now >= rec.expires_at:
            self._lifetime_destroy_count += 1
            self._discard(rec)
            return False
        if now - rec.idle_since > self.settings.check_idle_after:
            if deadline - now >= self.settings.ping_timeout:
                return self._ping(rec)
            return self._ping_within(rec, deadline - now)
        return True

    def _ping_within(self, rec: _Conn, budget: float) -> bool | None:
        """Ping with the full ping_timeout, but stop waiting after ``budget`` seconds.

        A ping cut short by the borrower's deadline says nothing about the connection: the
        check finishes in its own greenlet, which puts a live connection back (or discards
        a dead one), and the borrower gets None (its PoolTimeout).
        """
        borrower_waiting = True

        def check() -> bool:
            ok = self._ping(rec)  # discards a dead one
            if ok and not borrower_waiting:
                self._recycle(rec, checked=True)
            return ok

        checker = gevent.spawn(check)
        try:
            checker.join(max(0.0, budget))
        except BaseException:
            # Killed or timed out by its caller: the check goes on without the borrower,
            # or, if it passed at this very moment, the connection goes back now.
            borrower_waiting = False
            if not checker.ready():
                self._track_checker(checker)
            elif checker.value:
                self._recycle(rec, checked=True)
            raise
        if not checker.ready():
            borrower_waiting = False
            self._track_checker(checker)
            return None
        return bool(checker.value)

    def _track_checker(self, checker: Greenlet) -> None:
        """close() kills it (a killed ping discards its connection)."""
        self._checkers.add(checker)
        checker.link(self._checkers.discard)

    def _ping(self, rec: _Conn, timeout: float | None = None) -> bool:
        """Check a busy record with one round trip; a dead one is discarded (False)."""
        try:
            with gevent.Timeout(timeout or self.settings.ping_timeout, _PingTimeout):
                if self._check is not None:
                    self._check(rec.conn)
                else:
                    self._driver.ping(rec.conn)
        except BaseException as ex:
            self._check_failed_count += 1
            self._broken_destroy_count += 1
            self._discard(rec)
            if not isinstance(ex, (Exception, _PingTimeout)):
                raise
            logger.info(
                "pool %r: connection failed its check and was replaced: %s",
                self.name,
                self._redact(_describe_error(ex)),
            )
            return False
        return True

    def putconn(self, conn: Any) -> None:
        """Give back a borrowed connection.

        It is rolled back if a transaction is open, discarded if it is broken or a query is
        still running (the query is cancelled on the server first), and reset per the reset
        policy. Raises PoolError, changing nothing, for a connection this pool did not lend
        or one already returned.
        """
        self._release(conn, None)

    def _release(self, conn: Any, state: ConnState | None) -> None:
        """putconn, with the connection's state already read by the caller (or None)."""
        rec = self._lent.pop(id(conn), None)
        if rec is None:
            kind = "one of its connections" if self._driver.is_connection(conn) else "a connection"
            raise PoolError(
                f"putconn: pool {self.name!r} did not lend this object or it was already "
                f"returned (expected {kind} currently borrowed from this pool)"
            )
        self._busy += 1
        self._returns_count += 1
        if state is None:
            state = self._driver.state(conn)
        if state is _IDLE and not self._reset_policy.needed:
            self._recycle(rec)
            return
        try:
            state = self._clean(rec, state)
        except BaseException:
            # Killed while cleaning (e.g. mid-rollback): its state is unknown, so discard.
            self._broken_destroy_count += 1
            self._discard(rec)
            raise
        if state is ConnState.IDLE:
            self._recycle(rec)
        else:
            self._broken_destroy_count += 1
            self._discard(rec)
            if state is ConnState.BROKEN:
                # One dead connection often means more (server restart, failover):
                # check the idle ones now rather than at the next health-check period.
                self._wake_maintenance(check=True)

    def _clean(self, rec: _Conn, state: ConnState) -> ConnState:
        """Bring a returned connection back to IDLE; return the state that stopped it."""
        driver = self._driver
        if state is ConnState.IN_TRANSACTION or state is ConnState.IN_ERROR:
            self._rollback_count += 1
            try:
                driver.rollback(rec.conn)
            except Exception as ex:
                logger.info("pool %r: rollback on release failed: %s", self.name, ex)
                return ConnState.BROKEN
            state = driver.state(rec.conn)
        if state is not ConnState.IDLE:
            return state
        if self._reset_policy.needed:
            try:
                self._reset_policy(driver, rec.conn)
            except Exception as ex:
                logger.info("pool %r: reset on release failed: %s", self.name, ex)
                return ConnState.BROKEN
            state = driver.state(rec.conn)
        return state

    # ------------------------------------------------------------------ moving records

    def _recycle(self, rec: _Conn, *, checked: bool = False) -> None:
        """Give a busy, clean record to the oldest waiter, or park it idle."""
        if (
            self._state != _OPEN
            or rec.generation != self._generation
            or len(self._idle) + len(self._lent) + self._busy + self._constructing + self._closing
            > self.settings.max_size
        ):
            self._discard(rec)
            return
        if self._waiting:
            self._waiters.serve(rec)
            rec.idle_since = monotonic()
            return  # stays busy until the waiter resumes
        self._busy -= 1
        if checked:
            self._idle.appendleft(rec)  # keep its age: it is no more recently used
        else:
            rec.idle_since = monotonic()
            self._idle.append(rec)
        if self._returned_event is not None:
            self._notify_returned()

    def _discard(self, rec: _Conn) -> None:
        """Close a busy record, cancelling its query on the server first if one is running."""
        self._busy -= 1
        if self._driver.state(rec.conn) is ConnState.ACTIVE:
            self._closing += 1
            self._cancel_count += 1
            gevent.spawn(self._cancel_and_close, rec.conn)
        else:
            self._close_conn(rec.conn)
        self._notify_returned()
        self._grow()

    def _close_now(self, rec: _Conn) -> None:
        """Close an idle record that was just removed from ``_idle``."""
        self._close_conn(rec.conn)

    def _close_conn(self, conn: Any) -> None:
        self._closing += 1
        try:
            self._driver.close(conn)
        finally:
            self._closing -= 1

    def _cancel_and_close(self, conn: Any) -> None:
        try:
            self._driver.cancel(conn, self.settings.ping_timeout)
        except BaseException as ex:
            logger.info("pool %r: cancelling a query on discard failed: %s", self.name, ex)
        finally:
            self._driver.close(conn)
            self._closing -= 1
            self._grow()

    def _notify_returned(self) -> None:
        event = self._returned_event
        if event is not None and not self._lent and not self._busy:
            self._returned_event = None
            event.set()

    # ------------------------------------------------------------------ counts

    def _open_count(self) -> int:
        return len(self._idle) + len(self._lent) + self._busy

    def _total(self) -> int:
        return len(self._idle) + len(self._lent) + self._busy + self._constructing

    def _counts(self) -> str:
        return (
            f"total={self._total()} idle={len(self._idle)} "
            f"acquired={len(self._lent) + self._busy} constructing={self._constructing} "
            f"waiting={len(self._waiters)} max_size={self.settings.max_size}"
        )

    def _error_suffix(self) -> str:
        if self._failing_since is not None and self._last_error:
            return f"; last connection error: {self._last_error}"
        return ""

    def _timeout_message(self, waited: float) -> str:
        return (
            f"pool {self.name!r}: no connection available after {waited:.3f} s "
            f"({self._counts()}){self._error_suffix()}"
        )

    # ------------------------------------------------------------------ growing

    def _deficit(self) -> int:
        """How many more connections should be opened right now."""
        s = self.settings
        open_count = self._open_count()
        acquired = len(self._lent) + self._busy
        wanted = max(
            s.min_size,
            self._wait_target,
            open_count + len(self._waiters),
            acquired + s.min_idle,
        )
        wanted = min(wanted, s.max_size - self._closing)
        return wanted - open_count - self._constructing

    def _grow(self) -> None:
        """Spawn connector greenlets if connections are wanted and slots are free."""
        if self._state != _OPEN or self._forked:
            return
        if (  # full: the common case while greenlets queue, so skip _deficit
            len(self._idle) + len(self._lent) + self._busy + self._constructing + self._closing
            >= self.settings.max_size
        ):
            return
        deficit = self._deficit()
        if deficit <= 0:
            return
        limit = 1 if self._failing_since is not None else self.settings.max_connecting
        # Connectors busy connecting already count in _constructing, not in the deficit.
        while len(self._connectors) < min(limit, deficit + self._constructing):
            self._connectors.add(gevent.spawn(self._connector, self._epoch))

    def _connector(self, epoch: int) -> None:
        me = getcurrent()
        try:
            while self._state == _OPEN and epoch == self._epoch:
                if self._failing_since is not None and len(self._connectors) > 1:
                    return  # while failing, one connector retries (with backoff) for all
                if self._deficit() <= 0:
                    return
                self._constructing += 1
                try:
                    conn = self._open_one(self.settings.connect_timeout)
                except Exception as ex:
                    self._constructing -= 1
                    self._note_connect_failure(ex)
                    gevent.sleep(self._next_backoff())
                    continue
                except BaseException:
                    self._constructing -= 1
                    raise
                if epoch != self._epoch:  # forked meanwhile: not ours to touch
                    _orphan(conn)
                    return
                self._constructing -= 1
                self._busy += 1
                self._note_connect_success()
                self._recycle(self._new_record(conn))
        finally:
            self._connectors.discard(me)

    def _open_one(self, timeout: float) -> Any:
        """Connect and run the configure callback; the slot must already be reserved."""
        conn = self._driver.connect(self._conninfo, self._connect_kwargs, timeout)
        try:
            if self._configure is not None:
                self._configure(conn)
            state = self._driver.state(conn)
            if state is not ConnState.IDLE:
                raise PoolError(f"the configure callback left the connection {state.value}")
        except BaseException:
            self._driver.close(conn)
            raise
        self._new_conns_count += 1
        return conn

    def _new_record(self, conn: Any) -> _Conn:
        now = monotonic()
        lifetime = self.settings.max_lifetime - random.uniform(0, self.settings.lifetime_jitter())
        return _Conn(conn, now, now + lifetime, self._generation)

    def _note_connect_failure(self, ex: BaseException) -> None:
        self._connect_errors += 1
        self._last_exception = ex.with_traceback(None)  # no frames kept alive
        self._last_error = self._redact(_describe_error(ex))
        now = monotonic()
        if self._failing_since is None:
            self._failing_since = now
            logger.warning("pool %r: connection failed: %s", self.name, self._last_error)
        else:
            logger.debug("pool %r: connection failed again: %s", self.name, self._last_error)
        if (
            not self._reconnect_reported
            and now - self._failing_since >= self.settings.reconnect_timeout
        ):
            self._reconnect_reported = True
            logger.error(
                "pool %r: cannot connect for %.0f s (reconnect_timeout); still retrying: %s",
                self.name,
                now - self._failing_since,
                self._last_error,
            )
            if self._reconnect_failed is not None:
                try:
                    self._reconnect_failed(self)
                except Exception:
                    logger.exception("pool %r: reconnect_failed callback raised", self.name)
        self._notify_outcome()

    def _note_connect_success(self) -> None:
        if self._failing_since is not None:
            logger.warning(
                "pool %r: connected again after %.2f s of failures",
                self.name,
                monotonic() - self._failing_since,
            )
        self._failing_since = None
        self._backoff = 0.0
        self._reconnect_reported = False
        self._notify_outcome()

    def _next_backoff(self) -> float:
        self._backoff = min(BACKOFF_MAX, self._backoff * 2 or BACKOFF_INITIAL)
        return self._backoff * random.uniform(1 - BACKOFF_JITTER, 1 + BACKOFF_JITTER)

    def _notify_outcome(self) -> None:
        events, self._outcome_events = self._outcome_events, []
        for event in events:
            event.set()

    # ------------------------------------------------------------------ maintenance

    def _start_maintenance(self) -> None:
        self._maintenance = gevent.spawn(self._maintain, self._epoch)
        self._grow()

    def _maintain(self, epoch: int) -> None:
        """The maintenance loop: keep min sizes, reap, retire, health-check; never dies."""
        next_check = monotonic() + self.settings.health_check_period
        while self._state == _OPEN and epoch == self._epoch:
            try:
                self._reap()
                if self._check_soon or monotonic() >= next_check:
                    self._check_soon = False
                    self._health_check()
                    next_check = monotonic() + self.settings.health_check_period
                self._grow()
            except Exception:
                logger.exception("pool %r: maintenance error (continuing)", self.name)
            self._maintenance_wake.wait(self._maintenance_interval())
            self._maintenance_wake.clear()

    def _wake_maintenance(self, *, check: bool = False) -> None:
        self._check_soon = self._check_soon or check
        self._maintenance_wake.set()

    def _maintenance_interval(self) -> float:
        s = self.settings
        return max(0.05, min(1.0, s.health_check_period, s.max_idle / 2, s.max_lifetime / 4))

    def _reap(self) -> None:
        """Close idle connections that are expired, of an old generation, or idle too long."""
        now = monotonic()
        s = self.settings
        for rec in list(self._idle):
            if rec.generation != self._generation or now >= rec.expires_at:
                self._idle.remove(rec)
                if rec.generation == self._generation:
                    self._lifetime_destroy_count += 1
                self._close_now(rec)
        while len(self._idle) > s.min_idle and self._total() > s.min_size:
            oldest = min(self._idle, key=lambda r: r.idle_since)
            if now - oldest.idle_since < s.max_idle:
                break
            self._idle.remove(oldest)
            self._idle_destroy_count += 1
            self._close_now(oldest)
        self._trim_idle_to_max_size()

    def _trim_idle_to_max_size(self) -> None:
        """After max_size shrank: close the longest-idle connections above it."""
        while self._idle and self._total() + self._closing > self.settings.max_size:
            self._close_now(self._idle.popleft())

    def _health_check(self) -> int:
        """Ping idle connections (concurrently); return how many were replaced.

        Connections used within ``check_idle_after`` are known to be alive and skipped.
        Each ping is bounded by ``ping_timeout``, so a black-holed network delays the
        maintenance greenlet by at most that long.
        """
        now = monotonic()
        stale = [r for r in self._idle if now - r.idle_since > self.settings.check_idle_after]
        if not stale or self._state != _OPEN:
            return 0
        for rec in stale:
            self._idle.remove(rec)
        self._busy += len(stale)
        results = [True] * len(stale)
        started: set[int] = set()

        def ping(i: int, rec: _Conn) -> None:
            started.add(i)
            results[i] = self._ping(rec)
            if results[i]:
                self._recycle(rec, checked=True)

        greenlets = [gevent.spawn(ping, i, rec) for i, rec in enumerate(stale)]
        try:
            gevent.joinall(greenlets)
        except BaseException:
            gevent.killall(greenlets)  # a started ping discards its record when killed
            for i, rec in enumerate(stale):
                if i not in started:
                    self._recycle(rec, checked=True)
            raise
        return results.count(False)

    def check(self) -> int:
        """Verify idle connections now (those unused for ``check_idle_after``); dead ones
        are replaced. Returns how many were."""
        self._check_open()
        return self._health_check()

    def resize(self, min_size: int, max_size: int | None = None) -> None:
        """Change the pool's size limits; surplus idle connections are closed now."""
        if self._state == _CLOSED:
            raise PoolClosed(f"pool {self.name!r} is closed")
        new = PoolSettings(**{**self.settings.__dict__})
        new.min_size = min_size
        new.max_size = max_size if max_size is not None else max(min_size, new.max_size)
        new.validate()
        self.settings = new
        logger.info("pool %r resized to min=%d max=%d", self.name, new.min_size, new.max_size)
        self._trim_idle_to_max_size()
        self._grow()

    def reset(self) -> None:
        """Close every connection (borrowed ones when they come back) and reconnect.

        For use after a failover or network change, when existing connections are suspect.
        """
        self._check_open()
        self._generation += 1
        while self._idle:
            self._close_now(self._idle.pop())
        self._backoff = 0.0
        self._grow()

    def drain(self, timeout: float = 30.0, *, conninfo: str | None = None) -> None:
        """Replace every connection gracefully, e.g. after credentials rotate.

        Idle connections are replaced one at a time (the new one opened before the old one
        is closed when there is room, so capacity does not dip); borrowed ones are retired
        when they come back. With ``conninfo``, new connections use it. Raises
        ConnectError if a replacement cannot be opened within ``timeout``.
        """
        self._check_open()
        if conninfo is not None:
            self._set_conninfo(conninfo)
        self._generation += 1
        deadline = monotonic() + timeout
        while True:
            old = next((r for r in self._idle if r.generation != self._generation), None)
            if old is None:
                break
            if self._total() + self._closing >= self.settings.max_size:
                self._idle.remove(old)
                self._close_now(old)
                old = None
            self._constructing += 1
            try:
                conn = self._open_one(max(0.001, deadline - monotonic()))
            except Exception as ex:
                self._constructing -= 1
                self._note_connect_failure(ex)
                raise ConnectError(
                    f"pool {self.name!r}: drain could not open a replacement: {self._last_error}"
                ) from None
            except BaseException:
                self._constructing -= 1
                raise
            self._constructing -= 1
            self._busy += 1
            self._note_connect_success()
            self._recycle(self._new_record(conn))
            if old is not None and old in self._idle:
                self._idle.remove(old)
                self._close_now(old)
        self._grow()

    # ------------------------------------------------------------------ cooperation

    def check_cooperation(self) -> None:
        """Raise CooperationError if this pool's database waits would block the hub."""
        problems = self._driver.cooperation_problems()
        if problems:
            raise CooperationError(f"pool {self.name!r}: " + "; ".join(problems))

    # ------------------------------------------------------------------ stats

    def stats(self) -> dict[str, Any]:
        """A snapshot of sizes and counters, free of secrets.

        ``total == idle + acquired + constructing`` always holds.
        """
        idle = len(self._idle)
        acquired = len(self._lent) + self._busy
        return {
            "name": self.name,
            "state": self._state,
            "min_size": self.settings.min_size,
            "max_size": self.settings.max_size,
            "total": idle + acquired + self._constructing,
            "idle": idle,
            "acquired": acquired,
            "constructing": self._constructing,
            "closing": self._closing,
            "waiting": len(self._waiters),
            "peak_acquired": self._peak_acquired,
            "acquire_count": self._acquire_count,
            "empty_acquire_count": self._empty_acquire_count,
            "canceled_acquire_count": self._canceled_acquire_count,
            "timeout_count": self._timeout_count,
            "too_many_requests_count": self._too_many_count,
            "acquire_wait_seconds_total": self._acquire_wait_total,
            "returns_count": self._returns_count,
            "rollback_count": self._rollback_count,
            "cancel_count": self._cancel_count,
            "new_conns_count": self._new_conns_count,
            "connect_errors": self._connect_errors,
            "idle_destroy_count": self._idle_destroy_count,
            "lifetime_destroy_count": self._lifetime_destroy_count,
            "broken_destroy_count": self._broken_destroy_count,
            "check_failed_count": self._check_failed_count,
            "failing": self._failing_since is not None,
            "last_error": self._last_error if self._failing_since is not None else None,
        }

    # ------------------------------------------------------------------ fork

    def _forget_after_fork(self) -> None:
        """In a forked child: drop (never close) the parent's connections and greenlets."""
        for rec in (*self._idle, *self._lent.values()):
            _orphan(rec.conn)
        self._idle.clear()
        self._lent.clear()
        self._busy = self._constructing = self._closing = 0
        self._waiters = WaitQueue()
        self._waiting = self._waiters.queue
        self._connectors = set()
        self._checkers = set()
        self._maintenance = None
        self._maintenance_wake = Event()
        self._outcome_events = []
        self._returned_event = None
        self._epoch += 1
        self._pid = os.getpid()
        if self._state == _OPEN:
            self._forked = True

    def _restart_after_fork(self) -> None:
        self._forked = False
        self._start_maintenance()


class _PingTimeout(Exception):
    def __str__(self) -> str:
        return "connection check timed out"


def _describe_error(ex: BaseException) -> str:
    text = str(ex).strip().replace("\n", " ")
    return f"{type(ex).__name__}: {text}" if text else type(ex).__name__


def _check_timeout(timeout: Any) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout >= 0:
        raise ValueError(f"timeout: must be a non-negative number of seconds, got {timeout!r}")
    return float(timeout)


def _orphan(conn: Any) -> None:
    """In a forked child, make a parent's connection harmless.

    Its socket descriptor is pointed at /dev/null, so whatever the child does with the
    object (close it, or let a finaliser send a Terminate) never reaches the parent's
    server session; the object is also kept referenced so it is never finalised.
    """
    _FORK_ORPHANS.append(conn)
    try:
        fd = conn.fileno()
    except Exception:
        return
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def close_all(timeout: float = 5.0) -> None:
    """Close every open pool of this process (e.g. from gunicorn's ``worker_exit``)."""
    for pool in list(_POOLS):
        if not pool.closed:
            pool.close(timeout)


def _after_fork_in_child() -> None:
    for pool in list(_POOLS):
        pool._forget_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
