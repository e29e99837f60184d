"""The pool's mechanism: connection slots, the idle stack and the FIFO hand-off.

This module knows nothing of how connections are opened, checked, cleaned or aged: those
are the policies (:mod:`greenpool.connector`, :mod:`greenpool.vetting`,
:mod:`greenpool.maintenance`) that :class:`greenpool.GreenPool` plugs into :class:`Pool`.

State lives in plain Python structures with no locks. Greenlets switch only where they
block, so every stretch of bookkeeping between two blocking calls is atomic; each method
says whether it may switch greenlets. A pool therefore belongs to one OS thread's hub (the
normal case under ``gunicorn -k gevent``).

Every connection the pool owns is in exactly one place:

- ``_idle``: a deque used as a stack (released connections are appended and taken from the
  same end, so the most recently used is reused first and surplus ones age out at the
  other end);
- ``_lent``: handed to a borrower, keyed by ``id(conn)``;
- *busy*: held by the pool itself for a moment (checked before checkout, cleaned after
  release, health-checked, or handed to a waiter that has not resumed yet);
- *constructing* (a slot reserved before connecting) or *closing*.

``_slots`` counts all of them. It is the only number compared with ``max_size``: a slot is
taken before a connect starts and given back only once the connection is closed, so the
server never sees more than ``max_size`` backends from one pool.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from time import monotonic
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import gevent
from gevent.event import Event

from greenpool.drivers.base import ConnState, Driver
from greenpool.errors import PoolClosed, PoolError, PoolTimeout, TooManyRequests
from greenpool.settings import PoolSettings, seconds
from greenpool.waiters import WaitQueue

if TYPE_CHECKING:
    from types import TracebackType

logger = logging.getLogger("greenpool")

ConnT = TypeVar("ConnT")

NEW, OPEN, CLOSED, FORKED = "new", "open", "closed", "forked"
READ_ONLY_SQLSTATE = "25006"  # read_only_sql_transaction
_IDLE, _IN_TRANSACTION, _IN_ERROR = ConnState.IDLE, ConnState.IN_TRANSACTION, ConnState.IN_ERROR


class Record:
    """The pool's record of one connection."""

    __slots__ = (
        "borrow_stack",
        "client_state",
        "conn",
        "created",
        "expires_at",
        "generation",
        "host",
        "idle_since",
        "leak_reported",
        "lent_at",
        "owner",
        "session_settings",
    )

    def __init__(self, conn: Any, expires_at: float, generation: int) -> None:
        self.conn = conn
        self.created = self.idle_since = monotonic()
        self.expires_at = expires_at
        self.generation = generation
        self.host = ""  # "host:port" of its server (see greenpool.hosts)
        self.client_state: Any = None  # vetting's CleanState (client attributes, sent mark)
        self.session_settings: list[tuple[str, str]] | None = None  # set by `configure`
        # Only while tracers or leak detection are on (see tracing.py, leaks.py):
        self.lent_at = 0.0
        self.owner: Any = None
        self.borrow_stack: Any = None
        self.leak_reported = False


class Connection(Generic[ConnT]):
    """``with pool.connection() as conn``: commit on success, roll back on error, release.

    Leaving the block normally commits an open transaction; leaving it after the
    transaction failed (an error was swallowed inside the block) raises PoolError
    instead of pretending the commit happened. An exception rolls back. Either way the
    connection goes back to the pool.
    """

    __slots__ = ("_conn", "_pool", "_timeout")

    def __init__(self, pool: Pool[ConnT], timeout: float | None) -> None:
        self._pool = pool
        self._timeout = timeout
        self._conn: Any = None

    def __enter__(self) -> ConnT:
        self._conn = self._pool.getconn(self._timeout)
        return self._conn  # type: ignore[no-any-return]

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        pool, conn = self._pool, self._conn
        self._conn = None
        state: ConnState | None = None  # None: the release reads it afresh
        if exc is not None and getattr(exc, "sqlstate", None) == READ_ONLY_SQLSTATE:
            pool._on_read_only_error(conn)  # a demoted primary? (greenpool.hosts)
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


class ReadOnlyConnection(Connection[ConnT]):
    """``with pool.connection(read_only=True)``: the same, borrowing from a replica."""

    __slots__ = ("_after",)

    def __init__(self, pool: Pool[ConnT], timeout: float | None, after: str | None) -> None:
        super().__init__(pool, timeout)
        self._after = after

    def __enter__(self) -> ConnT:
        self._conn = self._pool._getconn_read_only(self._timeout, self._after)
        return self._conn  # type: ignore[no-any-return]


def _no_policy(*args: Any) -> Any:  # pragma: no cover - replaced by GreenPool
    raise PoolError("this pool has no policies plugged in")


class Pool(Generic[ConnT]):
    """The mechanism under :class:`greenpool.GreenPool`; use that class, not this one.

    The policies are plugged in by assigning ``_grow`` (open connections when more are
    wanted), ``_vet`` (check a record before lending it), ``_clean`` (bring a returned
    record back to idle) and ``_on_broken`` (a returned connection was dead).
    """

    def __init__(self, name: str, driver: Driver, settings: PoolSettings) -> None:
        self.name = name
        self._driver = driver
        self.settings = settings
        self._state = NEW
        self._generation = 0  # bumped by drain()/reconnect_all(): older records retire
        self._idle: deque[Record] = deque()
        self._lent: dict[int, Record] = {}
        self._waiters: WaitQueue[Record] = WaitQueue()
        self._waiting = self._waiters.queue  # the raw deque, for cheap emptiness tests
        self._slots = 0  # idle + lent + busy + constructing + closing
        self._constructing = 0
        self._closing = 0
        self._returned_event: Event | None = None
        # Plugged in by GreenPool (see the class docstring).
        self._grow: Callable[..., None] = _no_policy
        self._vet: Callable[[Record, float], bool | None] = _no_policy
        self._clean: Callable[[Record, ConnState], ConnState] = _no_policy
        self._cleaning_needed = True  # False: an IDLE connection goes straight back
        self._on_broken: Callable[[], None] = _no_policy
        self._restart: Callable[[], None] = _no_policy
        self._on_read_only_error: Callable[[Any], None] = _no_policy
        #: Read-only borrows (replicas); the primary serves them until a router is set.
        self._getconn_read_only: Callable[[float | None, str | None], Any] = (
            lambda timeout, after: self.getconn(timeout)
        )
        #: Connections lent through this pool by another (a replica's, by id; see
        #: greenpool.routing): given back here, they go to the pool that owns them.
        self._foreign: dict[int, Pool[Any]] = {}
        # Counters (see greenpool.stats).
        self.acquire_count = 0
        self.peak_acquired = 0
        self.empty_acquire_count = 0
        self.canceled_acquire_count = 0
        self.timeout_count = 0
        self.too_many_count = 0
        self.acquire_wait_total = 0.0
        self.returns_count = 0
        self.cancel_count = 0

    # ------------------------------------------------------------------ state

    @property
    def closed(self) -> bool:
        """True unless the pool is open. Never switches."""
        return self._state != OPEN and self._state != FORKED

    def _check_open(self) -> None:
        """Raise PoolClosed unless the pool is open; restart it in a forked child.

        May switch (restarting spawns greenlets, which only run later)."""
        if self._state == OPEN:
            return
        if self._state == FORKED:
            self._state = OPEN
            self._restart()
            return
        state = "closed" if self._state == CLOSED else "not open yet"
        raise PoolClosed(f"pool {self.name!r} is {state}")

    def idle_count(self) -> int:
        """Connections parked idle. Never switches."""
        return len(self._idle)

    def acquired_count(self) -> int:
        """Connections lent out or held busy by the pool. Never switches."""
        return self._slots - len(self._idle) - self._constructing - self._closing

    def open_count(self) -> int:
        """Connections that are open (idle, lent or busy). Never switches."""
        return self._slots - self._constructing - self._closing

    def waiting_count(self) -> int:
        """Greenlets queued for a connection. Never switches."""
        return len(self._waiting)

    def counts(self) -> str:
        """The pool's sizes, for messages. Never switches."""
        return (
            f"total={self._slots - self._closing} idle={len(self._idle)} "
            f"acquired={self.acquired_count()} constructing={self._constructing} "
            f"waiting={len(self._waiting)} max_size={self.settings.max_size}"
        )

    # ------------------------------------------------------------------ borrowing

    def connection(
        self, timeout: float | None = None, *, read_only: bool = False, after: str | None = None
    ) -> Connection[ConnT]:
        """Context manager lending a connection; commits on success, rolls back on error.

        ``read_only=True`` borrows from a replica when the pool has some (``after``: a
        commit token the replica must have replayed). Switches while waiting for a
        connection and while committing/releasing."""
        if read_only:
            return ReadOnlyConnection(self, timeout, after)
        return Connection(self, timeout)

    def getconn(self, timeout: float | None = None, read_only: bool = False) -> ConnT:
        """Borrow a connection, waiting up to ``timeout`` seconds (default: the pool's).

        ``timeout=0`` tries without waiting (and still asks for the pool to grow). Raises
        PoolTimeout, TooManyRequests (queue full) or PoolClosed; give the connection back
        with :meth:`putconn`. ``read_only=True`` borrows from a replica when the pool has
        some. Never switches when a fresh idle connection is at hand; otherwise switches
        while it waits in the queue or checks a stale connection.
        """
        if read_only:
            return self._getconn_read_only(timeout, None)  # type: ignore[no-any-return]
        if self._state != OPEN:
            self._check_open()
        if timeout is not None:
            timeout = seconds("timeout", timeout)  # refused even when one is at hand
        settings = self.settings
        start = monotonic()
        deadline = 0.0  # computed when first needed: the common case never needs it
        while True:
            if self._idle and not self._waiting:
                rec = self._idle.pop()
                if (  # the common case, inline: fresh, young and of this generation
                    start - rec.idle_since <= settings.check_idle_after
                    and start < rec.expires_at
                    and rec.generation == self._generation
                ):
                    break  # straight from idle to lent
                if not deadline:
                    deadline = start + (settings.timeout if timeout is None else timeout)
            else:
                if not deadline:
                    deadline = start + (settings.timeout if timeout is None else timeout)
                rec = self._wait(deadline, start)
            vetted = self._vet(rec, deadline)  # may switch (a ping)
            if vetted:
                break
            if vetted is None or monotonic() >= deadline:
                self.timeout_count += 1
                raise PoolTimeout(self._timeout_message(monotonic() - start))
        lent = self._lent
        lent[id(rec.conn)] = rec
        self.acquire_count += 1
        if len(lent) > self.peak_acquired:
            self.peak_acquired = len(lent)
        if settings.min_idle and len(self._idle) < settings.min_idle:
            self._grow()  # prime now, not at the next maintenance tick
        return rec.conn  # type: ignore[no-any-return]

    def _wait(self, deadline: float, start: float) -> Record:
        """Queue for a connection; the returned record is busy. Switches while queued."""
        self._grow(1)  # this borrower wants one: even a try-now call (timeout=0) grows
        settings = self.settings
        if settings.max_waiting and len(self._waiting) >= settings.max_waiting:
            self.too_many_count += 1
            raise TooManyRequests(
                f"pool {self.name!r}: {len(self._waiting)} greenlets already waiting "
                f"(max_waiting={settings.max_waiting}); {self.counts()}"
            )
        remaining = deadline - monotonic()
        if remaining <= 0:
            self.timeout_count += 1
            raise PoolTimeout(self._timeout_message(monotonic() - start))
        waiter = self._waiters.push()
        try:
            served = waiter.wait(remaining)
        except BaseException:
            # Killed or interrupted (GreenletExit, gevent.Timeout...): leave the queue now,
            # and give back a connection handed over at that very moment.
            self.canceled_acquire_count += 1
            if waiter.item is not None:
                self._recycle(waiter.item)
            else:
                self._waiters.discard(waiter)
            raise
        if waiter.item is not None:
            # Served (even if the timer fired in the same loop iteration: it was in time).
            self.empty_acquire_count += 1
            self.acquire_wait_total += monotonic() - start
            return waiter.item
        if waiter.error is not None:
            raise waiter.error
        assert not served
        self._waiters.discard(waiter)
        self.timeout_count += 1
        raise PoolTimeout(self._timeout_message(monotonic() - start))

    def putconn(self, conn: ConnT, discard: bool = False) -> None:
        """Give back a borrowed connection.

        It is rolled back if a transaction is open, discarded if it is broken or a query
        is still running (the query is cancelled on the server first), and cleaned per the
        reset policy; ``discard=True`` closes it instead (a replacement is opened). Raises
        PoolError, changing nothing, for a connection this pool did not lend or one
        already returned. Switches while cleaning (a round trip).
        """
        self._release(conn, ConnState.BROKEN if discard else None)

    def _release(self, conn: Any, state: ConnState | None) -> None:
        """putconn, with the connection's state already read by the caller (or None)."""
        rec = self._lent.pop(id(conn), None)
        if rec is None:
            owner = self._foreign.pop(id(conn), None)
            if owner is not None:
                owner._release(conn, state)
                return
            kind = "one of its connections" if self._driver.is_connection(conn) else "a connection"
            raise PoolError(
                f"putconn: pool {self.name!r} did not lend this object or it was already "
                f"returned (expected {kind} currently borrowed from this pool)"
            )
        self.returns_count += 1
        if state is None:
            state = self._driver.state(conn)
        if state is _IDLE and not self._cleaning_needed:
            self._recycle(rec)
            return
        try:
            state = self._clean(rec, state)  # may switch (rollback, reset)
        except BaseException:
            # Killed while cleaning (e.g. mid-rollback): its state is unknown, so discard.
            self._discard(rec)
            raise
        if state is _IDLE:
            self._recycle(rec)
            return
        self._discard(rec)
        if state is ConnState.BROKEN:
            self._on_broken()

    # ------------------------------------------------------------------ moving records

    def _recycle(self, rec: Record, *, checked: bool = False) -> None:
        """Give a busy, clean record to the oldest waiter, or park it idle.

        A record of an old generation, of a closed pool, or above max_size (after a
        shrink) is discarded instead. Never switches (a waiter is only scheduled).
        """
        if (
            self._state != OPEN
            or rec.generation != self._generation
            or self._slots > self.settings.max_size
        ):
            self._discard(rec)
            return
        if self._waiting:
            self._waiters.serve(rec)
            rec.idle_since = monotonic()
            return  # stays busy until the waiter resumes
        if checked:
            self._idle.appendleft(rec)  # keep its age: it is no more recently used
        else:
            rec.idle_since = monotonic()
            self._idle.append(rec)
        if self._returned_event is not None:
            self._notify_returned()

    def _discard(self, rec: Record) -> None:
        """Close a busy record, cancelling its query on the server first if one runs.

        Never switches: a cancel runs in a greenlet of its own."""
        if self._driver.state(rec.conn) is ConnState.ACTIVE:
            self._closing += 1
            self.cancel_count += 1
            gevent.spawn(self._cancel_and_close, rec.conn)
        else:
            self._closing += 1
            self._close_conn(rec.conn)
        self._notify_returned()
        self._grow()

    def _close_idle(self, rec: Record) -> None:
        """Close a record just removed from ``_idle``. Never switches."""
        self._closing += 1
        self._close_conn(rec.conn)

    def _close_conn(self, conn: Any) -> None:
        """Close a connection already counted as closing; free its slot. Never switches."""
        try:
            self._driver.close(conn)
        finally:
            self._closing -= 1
            self._slots -= 1

    def _cancel_and_close(self, conn: Any) -> None:
        """Cancel the query in flight, then close. Switches (the cancel is a round trip)."""
        try:
            self._driver.cancel(conn, self.settings.ping_timeout)
        except BaseException as ex:
            logger.info("pool %r: cancelling a query on discard failed: %s", self.name, ex)
        finally:
            self._close_conn(conn)
            self._grow()

    def _notify_returned(self) -> None:
        """Wake close() once nothing is lent or busy any more. Never switches."""
        event = self._returned_event
        if event is not None and self.acquired_count() <= 0:
            self._returned_event = None
            event.set()

    # ------------------------------------------------------------------ slots

    def _reserve_slot(self) -> bool:
        """Take a slot for a connection about to be opened; False when the pool is full.

        Never switches."""
        if self._slots >= self.settings.max_size:
            return False
        self._slots += 1
        self._constructing += 1
        return True

    def _release_slot(self) -> None:
        """Give back a slot whose connection could not be opened. Never switches."""
        self._constructing -= 1
        self._slots -= 1

    def _add_opened(self, rec: Record) -> None:
        """A reserved slot now holds an open connection: lend or park it. Never switches."""
        self._constructing -= 1
        self._recycle(rec)

    # ------------------------------------------------------------------ closing

    def _close_mechanism(self, timeout: float) -> None:
        """Fail the waiters, close idle connections, wait for lent ones.

        Borrowed connections are closed when they come back; this waits up to ``timeout``
        seconds for them. Switches while waiting."""
        self._state = CLOSED
        self._waiters.fail_all(PoolClosed(f"pool {self.name!r} was closed"))
        while self._idle:
            self._close_idle(self._idle.pop())
        deadline = monotonic() + timeout
        while self.acquired_count() > 0:
            remaining = deadline - monotonic()
            if remaining <= 0:
                logger.warning(
                    "pool %r closed with %d connection(s) still borrowed; they will be closed "
                    "when returned",
                    self.name,
                    self.acquired_count(),
                )
                break
            self._returned_event = Event()
            self._returned_event.wait(remaining)

    def _forget_records(self) -> list[Any]:
        """In a forked child: drop every record without closing it; return their
        connections (the parent's, not ours to touch). Never switches."""
        conns = [rec.conn for rec in (*self._idle, *self._lent.values())]
        self._idle.clear()
        self._lent.clear()
        self._foreign.clear()
        self._slots = self._constructing = self._closing = 0
        self._waiters = WaitQueue()
        self._waiting = self._waiters.queue
        self._returned_event = None
        if self._state == OPEN:
            self._state = FORKED
        return conns

    def _timeout_message(self, waited: float) -> str:
        return f"pool {self.name!r}: no connection available after {waited:.3f} s ({self.counts()})"
