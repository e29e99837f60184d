"""Opening connections: the connector greenlets, backoff after failures, and the one
routine that opens a connection into a reserved slot (used for growth and for drain).

Borrowers never connect: when the pool wants more connections (fewer than min_size or
min_idle, or greenlets waiting) :meth:`Connector.grow` spawns up to ``max_connecting``
connector greenlets, which reserve a slot, connect, run ``configure`` and hand the new
connection to the oldest waiter or park it. While connecting fails, one connector retries
for all, with exponential backoff (0.1 s doubling to 2 s, +/-20 % jitter).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from time import monotonic
from typing import TYPE_CHECKING, Any

import gevent
from gevent import Greenlet, getcurrent
from gevent.event import Event

from greenpool.conninfo import SECRET_KEYS, Target
from greenpool.drivers.base import ConnState, Driver
from greenpool.errors import ConnectError, PoolError
from greenpool.hosts import Attempt, HostTable
from greenpool.pool import OPEN, Record
from greenpool.vetting import describe_error

if TYPE_CHECKING:
    from greenpool.pool import Pool
    from greenpool.tracing import Tracers
    from greenpool.vetting import Vetting

logger = logging.getLogger("greenpool")

BACKOFF_INITIAL = 0.1
BACKOFF_MAX = 2.0
BACKOFF_JITTER = 0.2  # +/- 20%
#: After this many checks failed in a row (a server that accepts connections and then
#: fails every check, or a ``check`` callback that always raises), replacements back off.
CHECK_FAILURES_BEFORE_BACKOFF = 3


class _ConnectTimeout(Exception):
    def __str__(self) -> str:
        return "connecting (with the configure callback) timed out"


class Connector:
    """Opens the connections of one pool."""

    def __init__(
        self,
        pool: Pool[Any],
        driver: Driver,
        target: Target,
        vetting: Vetting,
        configure: Callable[[Any], None] | None,
        reconnect_failed: Callable[[Any], None] | None,
        before_connect: Callable[[dict[str, Any]], None] | None = None,
        hosts: HostTable | None = None,
    ) -> None:
        self._pool = pool
        self._driver = driver
        self.target = target
        self._vetting = vetting
        self._configure = configure
        self._reconnect_failed = reconnect_failed
        self._before_connect = before_connect
        self.hosts = hosts if hosts is not None else HostTable(None)
        self._greenlets: set[Greenlet] = set()
        self._epoch = 0  # bumped in a forked child: older connectors stop
        self.wait_target = 0  # connections wait() wants even when min_size is 0
        self._pending_extra = 0  # a try-now acquire wanted one; cleared once one opened
        self._outcome_events: list[Event] = []
        self.failing_since: float | None = None
        self._backoff = 0.0
        self._reported = False
        self.last_error: str | None = None
        self.last_exception: BaseException | None = None
        self.connect_errors = 0
        self.new_conns_count = 0
        #: Set once a connect tracer is added (see greenpool.tracing).
        self.tracers: Tracers | None = None

    # ------------------------------------------------------------------ growing

    def deficit(self, extra: int = 0) -> int:
        """How many more connections should be opened right now, ``extra`` borrowers
        wanting one besides the queued ones. Never switches."""
        pool = self._pool
        s = pool.settings
        open_count = pool.open_count()
        wanted = max(
            s.min_size,
            self.wait_target,
            open_count + len(pool._waiting) + extra,
            pool.acquired_count() + s.min_idle,
        )
        wanted = min(wanted, s.max_size - pool._closing)
        return wanted - open_count - pool._constructing

    def grow(self, extra: int = 0) -> None:
        """Spawn connector greenlets if connections are wanted and slots are free;
        ``extra``: borrowers that want one without queueing (a try-now acquire).

        Never switches (spawned greenlets run later)."""
        pool = self._pool
        if pool._state != OPEN or pool._slots >= pool.settings.max_size:
            return  # full: the common case while greenlets queue
        deficit = self.deficit(extra)
        if deficit <= 0:
            return
        limit = 1 if self.failing_since is not None else pool.settings.max_connecting
        # Connectors busy connecting already count in _constructing, not in the deficit.
        self._pending_extra = max(self._pending_extra, extra)
        while len(self._greenlets) < min(limit, deficit + pool._constructing):
            self._greenlets.add(gevent.spawn(self._run, self._epoch))

    def _run(self, epoch: int) -> None:
        """A connector greenlet: open connections while they are wanted. Switches."""
        me = getcurrent()
        pool = self._pool
        try:
            while pool._state == OPEN and epoch == self._epoch:
                if self.failing_since is not None and len(self._greenlets) > 1:
                    return  # while failing, one connector retries (with backoff) for all
                failed_checks = self._vetting.checks_failed_in_row
                if failed_checks >= CHECK_FAILURES_BEFORE_BACKOFF:
                    gevent.sleep(_backoff(failed_checks - CHECK_FAILURES_BEFORE_BACKOFF))
                    if pool._state != OPEN or epoch != self._epoch:
                        return
                if self.deficit(self._pending_extra) <= 0 or not pool._reserve_slot():
                    return
                try:
                    rec = self.open_into_slot(pool.settings.connect_timeout, epoch)
                except Exception:
                    gevent.sleep(self._next_backoff())
                    continue
                if rec is not None:
                    self._pending_extra = 0
                    pool._add_opened(rec)
        finally:
            self._greenlets.discard(me)

    def open_into_slot(self, timeout: float, epoch: int | None = None) -> Record | None:
        """Open a connection into a slot the caller reserved, within ``timeout`` seconds.

        Connect, ``configure`` and the vetting's snapshot all count against the timeout.
        On failure the slot is given back, the failure recorded, and the error raised; None
        means the process forked meanwhile (the connection is the parent's). Switches.
        """
        pool = self._pool
        epoch = self._epoch if epoch is None else epoch
        # The generation the connect starts in: one that drain()/reconnect_all() ends while
        # it connects (old conninfo, old credentials) is retired as soon as it is added.
        generation = pool._generation
        started = monotonic()
        try:
            with gevent.Timeout(timeout, _ConnectTimeout):
                conn = self._connect_configured(timeout)
                try:
                    rec = self._new_record(conn, generation)
                    rec.host = self._driver.host_of(conn)
                    self._vetting.after_connect(rec, self._configure is not None)
                except BaseException:
                    self._driver.close(conn)
                    raise
        except (Exception, _ConnectTimeout) as ex:
            if epoch == self._epoch:
                pool._release_slot()
                self._note_failure(ex)
            if isinstance(ex, _ConnectTimeout):
                raise TimeoutError(str(ex)) from None
            raise
        except BaseException as ex:
            if epoch == self._epoch:
                pool._release_slot()
            # Killed mid-connect (close() kills connectors): the driver's half-open
            # connection is referenced only from the frames of this traceback, which the
            # dead greenlet keeps in a reference cycle. Drop them, so that the connection
            # (and its server backend) goes now, not at the next garbage collection.
            raise ex.with_traceback(None)  # noqa: B904 (the same exception, re-raised)
        if epoch != self._epoch:  # forked meanwhile: not ours to touch
            from greenpool.fork import orphan

            orphan(conn)
            return None
        self.new_conns_count += 1
        self._note_success()
        if self.tracers is not None and self.tracers.on_connect:
            self.tracers.connected(conn, monotonic() - started)
        return rec

    def _connect_configured(self, timeout: float) -> Any:
        """Connect (``before_connect`` may change the connect keywords, e.g. a fresh IAM
        token as the password) and run ``configure``. Switches."""
        target = self.target
        kwargs = target.attempt_kwargs if target.attempts else target.kwargs
        if self._before_connect is not None:
            kwargs = dict(kwargs)  # type: ignore[arg-type]
            self._before_connect(kwargs)
            target.redact.add(str(v) for k, v in kwargs.items() if k in SECRET_KEYS and v)
        conn = self._connect_some_host(kwargs, timeout)  # type: ignore[arg-type]
        try:
            if self._configure is not None:
                self._configure(conn)
                state = self._driver.state(conn)
                if state is not ConnState.IDLE:
                    raise PoolError(f"the configure callback left the connection {state.value}")
        except BaseException:
            self._driver.close(conn)
            raise
        return conn

    def _connect_some_host(self, kwargs: dict[str, Any], timeout: float) -> Any:
        """Connect to the one host, or try the hosts in libpq's order, each within its own
        bound and all within ``timeout``. Switches."""
        driver = self._driver
        target = self.target
        if not target.attempts:
            try:
                conn = driver.connect(target.conninfo, kwargs, timeout)
            except Exception:
                self.hosts.connect_failed(self._label())
                raise
        else:
            conn = self._try_hosts(target.attempts, kwargs, timeout)
        try:
            host = driver.host_of(conn)
            read_only = driver.server_read_only(conn)
            if read_only is not None:
                self.hosts.saw_role(host, read_only)
        except Exception:
            driver.close(conn)
            raise
        return conn

    def _try_hosts(self, attempts: list[Attempt], kwargs: dict[str, Any], timeout: float) -> Any:
        deadline = monotonic() + timeout
        failures: list[str] = []
        for attempt in attempts:
            remaining = deadline - monotonic()
            if remaining <= 0:
                failures.append(f"{attempt.host}: not tried (connect_timeout reached)")
                break
            try:
                return self._driver.connect(
                    attempt.conninfo, kwargs, min(remaining, attempt.timeout)
                )
            except Exception as ex:
                self.hosts.connect_failed(attempt.host)
                failures.append(f"{attempt.host}: {describe_error(ex)}")
        raise ConnectionError("no host accepted the connection: " + "; ".join(failures))

    def _label(self) -> str:
        params = self.target.params
        return f"{params.get('host') or params.get('hostaddr', '')}:{params.get('port', '')}"

    def open_dedicated(self, timeout: float) -> Any:
        """A connection outside the pool, opened as the pool opens its own (no slot, not
        counted). Errors come redacted. Switches."""
        try:
            with gevent.Timeout(timeout, _ConnectTimeout):
                return self._connect_configured(timeout)
        except (Exception, _ConnectTimeout) as ex:
            raise ConnectError(
                f"pool {self._pool.name!r}: a dedicated connection failed "
                f"({self.target.description}): {self.target.redact(describe_error(ex))}"
            ) from None

    def _new_record(self, conn: Any, generation: int) -> Record:
        s = self._pool.settings
        lifetime = s.max_lifetime - random.uniform(0, s.lifetime_jitter())
        return Record(conn, monotonic() + lifetime, generation)

    # ------------------------------------------------------------------ failures

    def _note_failure(self, ex: BaseException) -> None:
        self.connect_errors += 1
        self.last_exception = ex.with_traceback(None)  # no frames kept alive
        self.last_error = self.target.redact(describe_error(ex))
        now = monotonic()
        name = self._pool.name
        if self.failing_since is None:
            self.failing_since = now
            logger.warning("pool %r: connection failed: %s", name, self.last_error)
        else:
            logger.debug("pool %r: connection failed again: %s", name, self.last_error)
        if not self._reported and now - self.failing_since >= self._pool.settings.reconnect_timeout:
            self._reported = True
            logger.error(
                "pool %r: cannot connect for %.0f s (reconnect_timeout); still retrying: %s",
                name,
                now - self.failing_since,
                self.last_error,
            )
            if self._reconnect_failed is not None:
                try:
                    self._reconnect_failed(self._pool)
                except Exception:
                    logger.exception("pool %r: reconnect_failed callback raised", name)
        self.notify_outcome()

    def _note_success(self) -> None:
        if self.failing_since is not None:
            logger.warning(
                "pool %r: connected again after %.2f s of failures",
                self._pool.name,
                monotonic() - self.failing_since,
            )
        self.failing_since = None
        self._backoff = 0.0
        self._reported = False
        self.notify_outcome()

    def reset_backoff(self) -> None:
        """Retry at once (after reconnect_all()). Never switches."""
        self._backoff = 0.0

    def _next_backoff(self) -> float:
        self._backoff = min(BACKOFF_MAX, self._backoff * 2 or BACKOFF_INITIAL)
        return self._backoff * random.uniform(1 - BACKOFF_JITTER, 1 + BACKOFF_JITTER)


    def error_suffix(self) -> str:
        """``; last connection error: ...`` while connecting fails, else empty."""
        if self.failing_since is not None and self.last_error:
            return f"; last connection error: {self.last_error}"
        return ""

    # ------------------------------------------------------------------ outcomes

    def wait_outcome(self, timeout: float) -> None:
        """Block until a connection attempt succeeds or fails, or ``timeout`` passes.

        Switches."""
        event = Event()
        self._outcome_events.append(event)
        event.wait(timeout)

    def notify_outcome(self) -> None:
        """Wake everything in :meth:`wait_outcome` (an attempt ended, or the pool closed)."""
        events, self._outcome_events = self._outcome_events, []
        for event in events:
            event.set()

    # ------------------------------------------------------------------ stopping

    def greenlets(self) -> list[Greenlet]:
        """The connector greenlets running now (close() kills them)."""
        return list(self._greenlets)

    def forget_after_fork(self) -> None:
        """In a forked child: the parent's connectors are not ours. Never switches."""
        self._epoch += 1
        self._greenlets = set()
        self._outcome_events = []


def _backoff(step: int) -> float:
    """The ``step``-th delay of the backoff sequence (0.1 s doubling to 2 s, jittered)."""
    delay: float = min(BACKOFF_MAX, BACKOFF_INITIAL * 2.0 ** min(step, 10))
    return delay * random.uniform(1 - BACKOFF_JITTER, 1 + BACKOFF_JITTER)
