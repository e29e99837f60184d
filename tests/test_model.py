"""Model-based test: random sequences of everything a pool's users and its environment do,
checked after every step against ground truth.

The same state machine runs on two backends:

- the fake driver (fast, many examples): ground truth is the set of connections the
  driver holds open, which must be exactly the pool's slots that are not still being
  opened, and never more than the current ``max_size`` (more only while borrowed
  connections above a shrunk size are still out);
- the real server (``slow``, fewer examples): ground truth is the server's backends for
  the pool's ``application_name``, never more than the same bound once closes settle,
  and none left after the pool closed.

Rules: acquire (with timeouts from try-now to 0.2 s), release in every transaction state
with session and client-side state left behind, release killed mid-rollback, release
twice, kill or time out a waiter, resize, the server dropping connections, connecting
failing and recovering, drain, reconnect_all, check, and time passing (a fake clock
advanced by the test, so lifetimes, idle timeouts and health checks come due), closing
(rarely, then reopening). Pools are drawn with their sizes, ``min_idle`` and reset
policy. Every connection handed out is checked: lent once, clean, alive, younger than
``max_lifetime``, and reset as its policy promises.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Callable
from typing import Any

import gevent
import psycopg
import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import greenpool.api
import greenpool.connector
import greenpool.maintenance
import greenpool.pool
import greenpool.vetting
from greenpool import ConnectError, GreenPool, PoolClosed, PoolError, PoolTimeout, TooManyRequests
from greenpool.drivers.base import ConnState
from greenpool.drivers.psycopg3 import Psycopg3Driver
from tests.support.fakedriver import FakeConn, FakeDriver
from tests.support.hygiene import outcome
from tests.support.invariants import backend_pids, counts_non_negative, fake_driver_agrees
from tests.support.server import Server
from tests.support.waiting import wait_for

ACQUIRE_OUTCOMES = (PoolTimeout, PoolClosed, TooManyRequests, gevent.GreenletExit, gevent.Timeout)
STATES = [
    ConnState.IDLE,
    ConnState.IN_TRANSACTION,
    ConnState.IN_ERROR,
    ConnState.ACTIVE,
    ConnState.BROKEN,
]
POLICIES: list[str | None] = [None, "client", "session", "light", "discard"]
SERVER_SIDE = {"session", "light", "discard"}
# Far apart, so that each shows on its own when the fake clock jumps by one of JUMPS.
MAX_LIFETIME, MAX_IDLE, HEALTH_CHECK_PERIOD = 600.0, 30.0, 10.0
JUMPS = [0.5, 5.0, 12.0, 40.0, 700.0]


class FakeClock:
    """The pool's ``monotonic()``: real time plus an offset the test advances, installed
    in every greenpool module that reads the clock (gevent's timers stay real)."""

    MODULES = (greenpool.pool, greenpool.connector, greenpool.vetting, greenpool.maintenance,
               greenpool.api)  # fmt: skip

    def __init__(self) -> None:
        self.offset = 0.0
        self._saved: list[tuple[Any, Any]] = []

    def __call__(self) -> float:
        return time.monotonic() + self.offset

    def install(self) -> None:
        for module in self.MODULES:
            self._saved.append((module, module.monotonic))
            module.monotonic = self  # type: ignore[attr-defined]

    def uninstall(self) -> None:
        for module, original in self._saved:
            module.monotonic = original
        self._saved = []


# --------------------------------------------------------------------------- backends


class FakeBackend:
    """The fake driver: exact ground truth, fast."""

    def __init__(self, clock: FakeClock) -> None:
        self.driver = FakeDriver(connect_delay=0.001, op_delay=0.0005)
        self.driver.clock = clock
        self.dropped: dict[int, int] = {}  # id(conn) -> the drop that killed it

    def make_pool(self, **kw: Any) -> GreenPool[Any]:
        return GreenPool("", driver=self.driver, open=True, **kw)

    def fail_connect(self, on: bool) -> None:
        self.driver.fail_connect = OSError("connection refused (model)") if on else None

    def leave(self, conn: Any, state: ConnState, session: bool, client: bool) -> None:
        if session:
            conn.session = "tenant-1"
        if client:
            conn.autocommit = True
        if state is ConnState.BROKEN:
            conn.closed = True
        else:
            conn.state = state

    def rollback_started(self, conn: Any) -> bool:
        return bool(conn.state is ConnState.ACTIVE)  # the fake rollback's round trip

    def usable(self, conn: Any) -> str:
        if conn.closed:
            return "closed"
        return "" if conn.state is ConnState.IDLE else f"in state {conn.state}"

    def session_left(self, conn: Any) -> bool:
        return conn.session is not None

    def client_left(self, conn: Any) -> bool:
        return bool(conn.autocommit)

    def created(self, conn: Any) -> float:
        return float(conn.created)

    def closed(self, conn: Any) -> bool:
        return bool(conn.closed)

    def drop(self, pool: GreenPool[Any], held: list[Any], drop: int) -> None:
        for conn in self.driver.open_conns():
            if conn not in held and not conn.dead:
                conn.dead = True
                self.dropped[id(conn)] = drop

    def dead(self, conn: Any, before: int | None = None) -> bool:
        """Dropped by the server (by drop number ``before`` or earlier, if given)."""
        if not conn.dead:
            return False
        return before is None or self.dropped[id(conn)] <= before

    def pool_owned(self, held: list[Any]) -> list[Any]:
        """The open connections the test does not hold (idle, being checked or closed)."""
        return [c for c in self.driver.open_conns() if c not in held]

    def eventually(self, problem: Callable[[], str]) -> None:
        """Exact ground truth: true now, or never."""
        found = problem()
        assert not found, found

    def check(self, pool: GreenPool[Any], held: list[Any]) -> None:
        fake_driver_agrees(pool, self.driver)
        open_conns = len(self.driver.open_conns())
        bound = max(pool.max_size, len(held))
        assert open_conns <= bound, f"{open_conns} open connections, max_size {pool.max_size}"

    def gone(self, pool: GreenPool[Any]) -> None:
        assert self.driver.open_conns() == [], "connections left open after close"


class ModelDriver(Psycopg3Driver):
    """The psycopg driver, with connecting made to fail on demand and each connection's
    birth noted on the fake clock."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__()
        self.clock = clock
        self.failing = False
        self.births: dict[int, float] = {}  # backend pid -> fake time of connecting

    def connect(self, conninfo: str, kwargs: dict[str, Any], timeout: float) -> Any:
        if self.failing:
            gevent.sleep(0.001)
            raise OSError("connection refused (model)")
        conn = super().connect(conninfo, kwargs, timeout)
        self.births[conn.info.backend_pid] = self.clock()
        return conn


class RealBackend:
    """The real server: ground truth from pg_stat_activity."""

    names = itertools.count()

    def __init__(self, clock: FakeClock, dsn: str, server: Server) -> None:
        self.driver = ModelDriver(clock)
        self.dsn = dsn
        self.server = server
        self.name = f"gp_model_{next(self.names)}"

    def make_pool(self, **kw: Any) -> GreenPool[Any]:
        self.name = f"gp_model_{next(self.names)}"  # a fresh name per pool
        return GreenPool(self.dsn, driver=self.driver, name=self.name, open=True, **kw)

    def fail_connect(self, on: bool) -> None:
        self.driver.failing = on

    def leave(self, conn: Any, state: ConnState, session: bool, client: bool) -> None:
        if session:
            conn.execute("SET app.tenant = 'tenant-1'")
            conn.commit()
        if client:
            conn.autocommit = True
        if state is ConnState.IN_TRANSACTION:
            conn.execute("SELECT 1")
        elif state is ConnState.IN_ERROR:
            with contextlib.suppress(psycopg.Error):
                conn.execute("SELECT 1/0")
        elif state is ConnState.ACTIVE:
            conn.pgconn.send_query(b"SELECT pg_sleep(5)")  # a borrower died mid-query
        elif state is ConnState.BROKEN:
            conn.close()

    def rollback_started(self, conn: Any) -> bool:
        return bool(conn.pgconn.transaction_status == psycopg.pq.TransactionStatus.ACTIVE)

    def usable(self, conn: Any) -> str:
        if conn.closed or conn.broken:
            return "closed or broken"
        status = conn.pgconn.transaction_status
        return "" if status == psycopg.pq.TransactionStatus.IDLE else f"in status {status}"

    def session_left(self, conn: Any) -> bool:
        row = conn.execute("SELECT current_setting('app.tenant', true)").fetchone()
        conn.rollback()
        return bool(row and row[0])

    def client_left(self, conn: Any) -> bool:
        return bool(conn.autocommit)

    def created(self, conn: Any) -> float:
        """When ``conn`` (or the backend with this pid) connected, on the fake clock. A
        backend the server already lists while its connect() has not returned yet (a
        connector mid-handshake) is being born now."""
        pid = conn if isinstance(conn, int) else conn.info.backend_pid
        return self.driver.births.get(pid, self.driver.clock())

    def closed(self, conn: Any) -> bool:
        return bool(conn.closed)

    def drop(self, pool: GreenPool[Any], held: list[Any], drop: int) -> None:
        keep = [c.info.backend_pid for c in held if not c.closed]
        self.server.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = %s AND NOT pid = ANY(%s)",
            [pool.name, keep],
        )

    def dead(self, conn: Any, before: int | None = None) -> bool:
        return False  # not observable without a round trip; the pool's checks find out

    def pool_owned(self, held: list[Any]) -> list[Any]:
        """The pids of the server's backends of the pool that the test does not hold."""
        mine = {c.info.backend_pid for c in held if not c.closed}
        return sorted(backend_pids(self.server, self.name) - mine)

    def eventually(self, problem: Callable[[], str]) -> None:
        """The server sees a close a moment after the client sent it."""
        if problem():
            try:
                wait_for(lambda: not problem(), 3, interval=0.01)
            except AssertionError:
                raise AssertionError(problem()) from None

    def check(self, pool: GreenPool[Any], held: list[Any]) -> None:
        counts_non_negative(pool.stats())
        bound = max(pool.max_size, len(held))

        def within() -> bool:
            return self.server.backend_count(pool.name) <= bound

        if not within():  # a close just sent is seen by the server a moment later
            wait_for(within, 3, what=f"at most {bound} backends of {pool.name}")

    def gone(self, pool: GreenPool[Any]) -> None:
        wait_for(
            lambda: self.server.backend_count(pool.name) == 0,
            5,
            what=f"no backend of {pool.name} after close",
        )


Backend = FakeBackend | RealBackend


# --------------------------------------------------------------------------- the machine


class PoolMachine(RuleBasedStateMachine):
    #: Set per test: makes the backend for each example.
    make_backend: Callable[[FakeClock], Backend]

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.clock.install()
        self.backoff = (greenpool.connector.BACKOFF_INITIAL, greenpool.connector.BACKOFF_MAX)
        # Backoff in milliseconds: a recovered connection is not minutes of real time away.
        greenpool.connector.BACKOFF_INITIAL, greenpool.connector.BACKOFF_MAX = 0.001, 0.004
        self.backend = type(self).make_backend(self.clock)
        self.pool: GreenPool[Any] | None = None
        self.settings: dict[str, Any] = {}
        self.policy: str | None = None
        # (acquire, drops before it, the fake clock's offset when it began)
        self.pending: list[tuple[gevent.Greenlet, int, float]] = []
        self.drops = 0
        self.unnoticed_drop = False  # dropped since the pool last checked everything
        self.held: list[Any] = []
        self.returned: list[Any] = []
        self.failing = False

    # ---------------------------------------------------------------- helpers

    @property
    def p(self) -> GreenPool[Any]:
        assert self.pool is not None
        return self.pool

    def open_pool(self) -> None:
        self.pool = self.backend.make_pool(**self.settings)

    def settle(self, seconds: float = 0.003) -> None:
        """Let background work run, then check what finished acquires got."""
        gevent.sleep(seconds)
        self.collect()

    def collect(self) -> None:
        """Check what finished acquires got (never switches)."""
        still = []
        for g, drops, offset in self.pending:
            if not g.ready():
                still.append((g, drops, offset))
                continue
            value = g.get()
            if isinstance(value, BaseException):
                assert isinstance(value, ACQUIRE_OUTCOMES), repr(value)
            else:
                self.handed_out(value, drops, self.clock.offset - offset)
        self.pending = still

    def handed_out(self, conn: Any, drops: int = 0, jumped: float = 0.0) -> None:
        """A borrower got ``conn``: it must be its alone, clean, alive and young.

        ``drops``: how many times the server had dropped connections when the acquire
        began (a connection it dropped later may have passed its check before);
        ``jumped``: fake time that passed during the acquire (a connection checked
        young may have aged while its ping ran)."""
        backend = self.backend
        assert conn not in self.held, f"{conn} lent to two borrowers"
        problem = backend.usable(conn)
        assert not problem, f"lent {conn} {problem}"
        assert not backend.dead(conn, drops), f"lent {conn}, dropped before the acquire"
        age = self.clock() - backend.created(conn)
        assert age < MAX_LIFETIME + jumped, f"lent {conn} aged {age:.0f} s (max {MAX_LIFETIME})"
        if self.policy is not None:
            assert not backend.client_left(conn), f"{conn}: a client attribute crossed"
        if self.policy in SERVER_SIDE and conn in self.returned:
            assert not backend.session_left(conn), f"{conn}: session state crossed"
        self.held.append(conn)

    def closed_down(self, pool: GreenPool[Any]) -> None:
        """After close(): nothing left, on the server (or in the driver) and in the pool.
        close() does not wait for the connectors it kills: a connect in flight ends (and
        gives its slot back, closing its connection) a moment later, so the driver or the
        server is asked once every slot is back."""
        wait_for(
            lambda: pool.stats()["total"] == pool.stats()["closing"] == 0,
            5,
            interval=0.001,
            what=f"every slot given back: {pool.stats()}",
        )
        self.backend.gone(pool)

    def _acquire(self, timeout: float) -> Any:
        return self.p.getconn(timeout)

    def borrow_now(self) -> None:
        """Borrow synchronously (up to 0.2 s); what is handed out is checked and held."""
        g = gevent.spawn(outcome, self._acquire, 0.2)
        self.pending.append((g, self.drops, self.clock.offset))
        g.join(timeout=5)
        self.collect()

    def take(self, index: int) -> Any:
        """A held connection to give back (borrowed now if none is held), or None."""
        if not self.held:
            self.borrow_now()
        if not self.held:
            return None
        return self.held.pop(index % len(self.held))

    def pool_quiet(self) -> bool:
        return not self.pending and not self.failing

    # ---------------------------------------------------------------- setup

    @initialize(
        max_size=st.integers(1, 4),
        min_size=st.integers(0, 4),
        min_idle=st.integers(0, 2),
        policy=st.sampled_from(POLICIES),
        max_waiting=st.sampled_from([0, 3]),
    )
    def setup(
        self, max_size: int, min_size: int, min_idle: int, policy: str | None, max_waiting: int
    ) -> None:
        self.policy = policy
        self.settings = {
            "min_size": min(min_size, max_size),
            "max_size": max_size,
            "min_idle": min(min_idle, max_size),
            "reset": policy,
            "max_waiting": max_waiting,
            "timeout": 0.05,
            "check_idle_after": 0.0,  # every checkout pings: dropped connections are found
            "max_lifetime": MAX_LIFETIME,
            "max_idle": MAX_IDLE,
            "health_check_period": HEALTH_CHECK_PERIOD,
            "ping_timeout": 1.0,
        }
        self.open_pool()

    # ---------------------------------------------------------------- borrowers

    @rule(timeout=st.sampled_from([0, 0.01, 0.05, 0.2]))
    def acquire(self, timeout: float) -> None:
        g = gevent.spawn(outcome, self._acquire, timeout)
        self.pending.append((g, self.drops, self.clock.offset))
        self.settle()

    @rule(
        index=st.integers(min_value=0),
        state=st.sampled_from(STATES),
        session=st.booleans(),
        client=st.booleans(),
        reborrow=st.booleans(),
    )
    def release(
        self, index: int, state: ConnState, session: bool, client: bool, reborrow: bool
    ) -> None:
        """Give a connection back in ``state``, with session and client-side state left on
        it; with ``reborrow``, borrow again at once (the most recently returned connection
        is lent first: the next borrower of the same session)."""
        conn = self.take(index)
        if conn is None:
            return
        self.backend.leave(conn, state, session and state is not ConnState.BROKEN, client)
        self.p.putconn(conn)
        self.returned.append(conn)
        if state in (ConnState.ACTIVE, ConnState.BROKEN):
            # Discarded: a query in flight is cancelled first, in the background.
            wait_for(lambda: self.backend.closed(conn), 5, interval=0.001, what="discarded")
        self.settle()
        if reborrow:
            self.borrow_now()

    @rule(n=st.integers(1, 4), then_quiet=st.booleans())
    def spike(self, n: int, then_quiet: bool) -> None:
        """n borrowers at once, each for a moment: the pool grows, then has them idle
        (and, with ``then_quiet``, nobody asks for longer than max_idle)."""
        before = len(self.held)
        for _ in range(n):
            g = gevent.spawn(outcome, self._acquire, 0.2)
            self.pending.append((g, self.drops, self.clock.offset))
        gevent.joinall([g for g, _, _ in self.pending[-n:]], timeout=5)
        self.collect()
        for conn in self.held[before:]:
            self.p.putconn(conn)
            self.returned.append(conn)
        del self.held[before:]
        self.settle()
        if then_quiet:
            self.time_passes(MAX_IDLE + 10)

    @rule(index=st.integers(min_value=0))
    def release_killed_midway(self, index: int) -> None:
        conn = self.take(index)
        if conn is None:
            return
        self.backend.leave(conn, ConnState.IN_TRANSACTION, False, False)
        g = gevent.spawn(outcome, self.p.putconn, conn)
        wait_for(lambda: self.backend.rollback_started(conn) or g.ready(), 5, interval=0.0005)
        g.kill()
        result = g.get()
        # Killed mid-rollback: the kill reaches the caller and the connection is discarded;
        # or the rollback had finished (a real server can be that fast) and it is back.
        assert result is None or isinstance(result, gevent.GreenletExit), repr(result)
        if isinstance(result, gevent.GreenletExit):
            wait_for(lambda: self.backend.closed(conn), 5, interval=0.001, what="discarded")
        self.returned.append(conn)
        self.settle()

    @rule(index=st.integers(min_value=0))
    def release_twice(self, index: int) -> None:
        if not self.returned:
            return
        conn = self.returned[index % len(self.returned)]
        if conn in self.held:
            return
        before = self.p.stats()
        with pytest.raises(PoolError):
            self.p.putconn(conn)
        assert self.p.stats() == before, "a refused putconn must change nothing"

    @rule(index=st.integers(min_value=0), with_timeout=st.booleans())
    def kill_waiter(self, index: int, with_timeout: bool) -> None:
        if not self.pending:
            return
        g = self.pending[index % len(self.pending)][0]
        g.kill(gevent.Timeout() if with_timeout else gevent.GreenletExit(), block=False)
        self.settle()

    # ---------------------------------------------------------------- operators

    @rule(min_size=st.integers(0, 4), extra=st.integers(0, 3))
    def resize(self, min_size: int, extra: int) -> None:
        max_size = min(4, max(1, min_size + extra))
        min_size = min(min_size, max_size)
        if self.settings["min_idle"] > max_size:  # refused, changing nothing
            before = (self.p.min_size, self.p.max_size)
            with pytest.raises(ValueError, match="min_idle"):
                self.p.resize(min_size, max_size)
            assert (self.p.min_size, self.p.max_size) == before
            return
        self.p.resize(min_size, max_size)
        self.settings.update(min_size=min_size, max_size=max_size)
        self.settle()

    @rule()
    def drain(self) -> None:
        before = set(self.backend.pool_owned(self.held))
        try:
            self.p.drain(timeout=0.5)
        except ConnectError:
            assert self.failing, "drain failed although connecting works"
            self.settle()
            return
        self.settle()
        # Every connection the pool had is replaced: closed, or still with its borrower.
        self.backend.eventually(lambda: self.left_over("drain", before))

    @rule()
    def reconnect_all(self) -> None:
        before = set(self.backend.pool_owned(self.held))
        self.p.reconnect_all()
        self.settle()
        self.backend.eventually(lambda: self.left_over("reconnect_all", before))

    def left_over(self, what: str, before: set[Any]) -> str:
        left = [c for c in self.backend.pool_owned(self.held) if c in before]
        return f"{what} left {left} in the pool" if left else ""

    @rule()
    def check(self) -> None:
        self.p.check()
        self.settle()
        self.unnoticed_drop = False
        dead = [c for c in self.backend.pool_owned(self.held) if self.backend.dead(c)]
        assert not dead, f"check() kept dead connections {dead}"

    # ---------------------------------------------------------------- the environment

    @rule()
    def server_drops_connections(self) -> None:
        self.collect()  # a borrower served already holds its connection
        self.drops += 1
        self.unnoticed_drop = True
        self.backend.drop(self.p, self.held, self.drops)
        self.settle()

    @rule(on=st.booleans())
    def connecting_fails(self, on: bool) -> None:
        self.failing = on
        self.backend.fail_connect(on)
        self.settle()

    @rule(seconds=st.sampled_from(JUMPS))
    def time_passes(self, seconds: float) -> None:
        """The fake clock jumps; the maintenance greenlet runs a pass at once."""
        self.clock.offset += seconds
        jumped_at = self.clock()
        self.p._maintenance.wake()  # the pass it would make at its next tick
        self.settle(0.01)
        if seconds >= HEALTH_CHECK_PERIOD:
            self.unnoticed_drop = False  # that pass health-checked every idle connection
        backend = self.backend

        def too_old() -> str:
            owned = backend.pool_owned(self.held)
            old = [c for c in owned if self.clock() - backend.created(c) >= MAX_LIFETIME]
            return f"connections past max_lifetime kept: {old}" if old else ""

        backend.eventually(too_old)
        if seconds < MAX_IDLE:
            return
        # Idle through the whole jump: beyond what min_size and min_idle keep, they go.
        # (Connections opened during the pass are new: a pool whose connections are busy
        # being health-checked counts them as in use and may open min_idle more.)
        s = self.settings
        bound = max(s["min_idle"], s["min_size"] - len(self.held), 0)

        def kept_idle() -> str:
            owned = backend.pool_owned(self.held)
            idled = [c for c in owned if backend.created(c) < jumped_at]
            if len(idled) <= bound:
                return ""
            return (
                f"{len(idled)} connections kept after {seconds:g} s idle; expected at most "
                f"{bound} (min_size {s['min_size']}, min_idle {s['min_idle']}, "
                f"{len(self.held)} borrowed)"
            )

        backend.eventually(kept_idle)

    @rule()
    def pool_fills_up(self) -> None:
        """With nothing failing, the pool gets to min_size and keeps min_idle ready."""
        if not self.pool_quiet() or self.unnoticed_drop:
            return  # the pool counts dropped connections until a check finds them dead
        s = self.settings
        wanted = min(s["max_size"], max(s["min_size"], len(self.held) + s["min_idle"]))
        wait_for(
            lambda: len(self.backend.pool_owned(self.held)) + len(self.held) >= wanted,
            2,
            interval=0.002,
            what=f"{wanted} connections (min_size {s['min_size']}, min_idle {s['min_idle']})",
        )

    @rule(dice=st.integers(0, 9))
    def close_and_reopen(self, dice: int) -> None:
        """Rarely (1 in 10 when chosen): close the pool, then go on with a new one."""
        if dice:
            return
        g = gevent.spawn(self.p.close, 0.01)
        g.get(timeout=5)  # close's own errors count
        for p, _, _ in self.pending:
            value = p.get(timeout=5)
            assert not isinstance(value, BaseException) or isinstance(value, ACQUIRE_OUTCOMES)
            if not isinstance(value, BaseException):
                self.held.append(value)  # served just before the close
        self.pending = []
        for conn in self.held:
            self.p.putconn(conn)  # after close: closed, not kept
            assert self.backend.closed(conn), "a connection returned after close was kept"
        self.held = []
        self.closed_down(self.p)
        self.returned = []
        self.open_pool()

    # ---------------------------------------------------------------- invariants

    @invariant()
    def ground_truth(self) -> None:
        if self.pool is not None:
            self.backend.check(self.pool, self.held)

    def teardown(self) -> None:
        try:
            if self.pool is not None:
                for g, _, _ in self.pending:
                    g.kill()
                self.settle()
                for conn in self.held:
                    self.pool.putconn(conn)
                self.pool.close(timeout=1)
                self.closed_down(self.pool)
        finally:
            self.clock.uninstall()
            greenpool.connector.BACKOFF_INITIAL, greenpool.connector.BACKOFF_MAX = self.backoff


# Time passing makes the pool report that it has failed to connect for reconnect_timeout.
ALLOW_RECONNECT_REPORT = pytest.mark.allow_pool_errors(r"\(reconnect_timeout\)")


class FakeMachine(PoolMachine):
    make_backend = FakeBackend


# Runs depend on timing (greenlets on real gevent timers), so a failure rarely replays
# exactly: shrinking it would mostly take minutes to report "flaky". A failure is reported
# as found, with every step that led to it.
NO_SHRINK = [Phase.explicit, Phase.reuse, Phase.generate]


@ALLOW_RECONNECT_REPORT
class TestPoolModel(FakeMachine.TestCase):  # type: ignore[valid-type,misc]
    settings = settings(
        max_examples=80,
        stateful_step_count=30,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
        phases=NO_SHRINK,
    )


@pytest.mark.slow
@ALLOW_RECONNECT_REPORT
def test_pool_model_on_the_real_server(dsn: str, admin: Server) -> None:
    class RealMachine(PoolMachine):
        @staticmethod
        def make_backend(clock: FakeClock) -> Backend:
            return RealBackend(clock, dsn, admin)

    from hypothesis.stateful import run_state_machine_as_test

    run_state_machine_as_test(
        RealMachine,
        settings=settings(
            max_examples=25,
            stateful_step_count=25,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
            phases=NO_SHRINK,
        ),
    )


def test_fake_driver_smoke() -> None:
    driver = FakeDriver()
    pool: GreenPool[Any] = GreenPool("", driver=driver, min_size=1, max_size=2, open=True)
    with pool.connection() as conn:
        assert isinstance(conn, FakeConn)
        conn.state = ConnState.IN_TRANSACTION
    assert conn.state is ConnState.IDLE  # committed
    pool.close()
    assert driver.open_conns() == []
