"""Model-based test: random sequences of acquire, release, kill, timeout, resize, drop and
close against a pool on the fake driver, checking the pool's invariants after every step.
"""

from __future__ import annotations

from typing import Any

import gevent
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from greenpool import GreenPool, PoolClosed, PoolError, PoolTimeout, TooManyRequests
from greenpool.drivers.base import ConnState
from tests.support.fakedriver import FakeConn, FakeDriver

EXPECTED_ACQUIRE_ERRORS = (PoolTimeout, PoolClosed, TooManyRequests)


class PoolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.driver = FakeDriver(connect_delay=0.001, op_delay=0.0005)
        self.cap = 3
        self.pool: GreenPool[Any] = GreenPool(
            "",
            driver=self.driver,
            min_size=1,
            max_size=3,
            max_waiting=6,
            check_idle_after=0.0,
            timeout=0.05,
            open=True,
        )
        self.pending: list[gevent.Greenlet] = []
        self.held: list[FakeConn] = []
        self.returned: list[FakeConn] = []

    # ---------------------------------------------------------------- helpers
    def settle(self, seconds: float = 0.003) -> None:
        gevent.sleep(seconds)
        still = []
        for g in self.pending:
            if not g.ready():
                still.append(g)
                continue
            if g.successful() and isinstance(g.value, FakeConn):
                conn = g.value
                assert conn not in self.held, f"{conn} handed to two borrowers"
                assert not conn.closed and conn.state is ConnState.IDLE, f"dirty: {conn}"
                assert not conn.dead, f"dead connection handed out: {conn}"
                self.held.append(conn)
            elif g.exception is not None:
                assert isinstance(g.exception, (gevent.GreenletExit, gevent.Timeout)), repr(
                    g.exception
                )
        self.pending = still

    # ---------------------------------------------------------------- rules
    def _acquire(self, timeout: float) -> FakeConn | BaseException:
        try:
            conn: FakeConn = self.pool.getconn(timeout)
            return conn
        except EXPECTED_ACQUIRE_ERRORS as ex:
            return ex

    @rule(timeout=st.sampled_from([0, 0.01, 0.05, 0.2]))
    def acquire(self, timeout: float) -> None:
        self.pending.append(gevent.spawn(self._acquire, timeout))
        self.settle()

    @rule(
        index=st.integers(min_value=0),
        state=st.sampled_from(
            [
                ConnState.IDLE,
                ConnState.IN_TRANSACTION,
                ConnState.IN_ERROR,
                ConnState.ACTIVE,
                ConnState.BROKEN,
            ]
        ),
    )
    def release(self, index: int, state: ConnState) -> None:
        if not self.held:
            return
        conn = self.held.pop(index % len(self.held))
        if state is ConnState.BROKEN:
            conn.closed = True
        else:
            conn.state = state
        self.pool.putconn(conn)
        self.returned.append(conn)
        if state is ConnState.ACTIVE:
            self.settle(0.005)
            assert conn.cancelled and conn.closed, "query in flight must be cancelled, conn closed"
        self.settle()

    @rule(index=st.integers(min_value=0))
    def release_killed_midway(self, index: int) -> None:
        if not self.held:
            return
        conn = self.held.pop(index % len(self.held))
        conn.state = ConnState.IN_TRANSACTION  # needs a rollback: a yield point
        g = gevent.spawn(self.pool.putconn, conn)
        gevent.sleep(0)  # let it start the rollback
        g.kill()
        self.returned.append(conn)
        self.settle()

    @rule(index=st.integers(min_value=0))
    def release_twice(self, index: int) -> None:
        if not self.returned:
            return
        conn = self.returned[index % len(self.returned)]
        if conn in self.held:
            return
        before = self.pool.stats()
        with pytest.raises(PoolError):
            self.pool.putconn(conn)
        after = self.pool.stats()
        assert before == after, "a refused putconn must change nothing"

    @rule(index=st.integers(min_value=0), with_timeout=st.booleans())
    def kill_waiter(self, index: int, with_timeout: bool) -> None:
        if not self.pending:
            return
        g = self.pending[index % len(self.pending)]
        if with_timeout:
            g.kill(gevent.Timeout(), block=False)
        else:
            g.kill(block=False)
        self.settle()

    @rule(min_size=st.integers(0, 3), extra=st.integers(0, 3))
    def resize(self, min_size: int, extra: int) -> None:
        if self.pool.closed:
            return
        max_size = max(1, min_size + extra)
        self.cap = max(self.cap, max_size)
        self.pool.resize(min_size, max_size)
        self.settle()

    @rule()
    def server_drops_idle(self) -> None:
        for rec in list(self.pool._idle):
            rec.conn.dead = True
        self.settle()

    @rule()
    def wait_a_bit(self) -> None:
        self.settle(0.02)

    @rule()
    def close(self) -> None:
        if self.pool.closed:
            return
        g = gevent.spawn(self.pool.close, 0.01)
        self.settle(0.02)
        g.join()
        for p in self.pending:
            p.join(timeout=1)
        self.settle()
        assert not self.pending

    # ---------------------------------------------------------------- invariants
    @invariant()
    def counts_add_up(self) -> None:
        s = self.pool.stats()
        assert s["total"] == s["idle"] + s["acquired"] + s["constructing"], s
        assert len(self.pool._lent) == len(self.held), (self.pool._lent, self.held)
        open_conns = self.driver.open_conns()
        assert len(open_conns) <= self.cap, open_conns
        idle = {id(r.conn) for r in self.pool._idle}
        assert not idle & {id(c) for c in self.held}, "a lent connection is also idle"
        assert len(idle) == len(self.pool._idle), "a connection is idle twice"

    def teardown(self) -> None:
        for g in self.pending:
            g.kill()
        self.settle()
        for conn in self.held:
            self.pool.putconn(conn)
        self.pool.close(timeout=1)
        gevent.sleep(0.01)
        assert self.driver.open_conns() == [], "connections leaked after close"
        s = self.pool.stats()
        assert s["total"] == 0 and s["closing"] == 0, s


TestPoolModel = PoolMachine.TestCase
TestPoolModel.settings = settings(
    max_examples=60,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
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
