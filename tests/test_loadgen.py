"""The load generator's own checks can fail: it counts a connection lent to two borrowers
(even while the first one's release is still running), and a dirty one."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import gevent
from gevent.lock import Semaphore

from greenpool import GreenPool
from greenpool.drivers.base import ConnState
from tests.support.fakedriver import FakeConn, FakeDriver
from tests.support.loadgen import LoadGen


def fake_conn_ok(conn: Any) -> bool:
    return isinstance(conn, FakeConn) and not conn.closed and conn.state is ConnState.IDLE


def short_query(conn: Any) -> None:
    gevent.sleep(0.0005)


class LendsDuringRelease:
    """A broken pool of one connection: the next borrower gets it as soon as a release
    starts, while the releasing borrower's cleanup (a round trip) is still running."""

    def __init__(self) -> None:
        self.conn = FakeConn()
        self.lock = Semaphore()

    @contextmanager
    def connection(self, timeout: float | None = None) -> Iterator[FakeConn]:
        self.lock.acquire()
        try:
            yield self.conn
        finally:
            self.lock.release()  # lent again now...
            gevent.sleep(0.001)  # ...while this release still "rolls back"


class LendsDirty:
    """A broken pool that hands out a connection left in a transaction."""

    def __init__(self) -> None:
        self.conn = FakeConn()
        self.conn.state = ConnState.IN_TRANSACTION

    @contextmanager
    def connection(self, timeout: float | None = None) -> Iterator[FakeConn]:
        yield self.conn


def run(pool: Any, workers: int = 20) -> LoadGen:
    return LoadGen(
        pool, workers=workers, timeout=1, duration=5, max_ops=20, query=short_query,
        check_conn=fake_conn_ok,
    ).run()  # fmt: skip


def test_a_connection_lent_during_its_release_counts_as_duplicated() -> None:
    lg = run(LendsDuringRelease())
    assert lg.outcomes() == {"ok": 20 * 20}, lg.summary()
    assert lg.duplicated > 0, lg.summary()


def test_a_dirty_connection_counts_as_bad_state() -> None:
    lg = run(LendsDirty(), workers=1)
    assert lg.bad_state == 20, lg.summary()


def test_greenpool_on_the_fake_driver_lends_each_connection_once_and_clean() -> None:
    driver = FakeDriver(connect_delay=0.001, op_delay=0.001)  # the reset is a round trip
    pool: GreenPool[Any] = GreenPool("", driver=driver, min_size=1, max_size=3, open=True)
    try:
        lg = run(pool, workers=30)
    finally:
        pool.close()
    assert set(lg.outcomes()) == {"ok"}, lg.summary()
    assert lg.duplicated == 0 and lg.bad_state == 0, lg.summary()
    assert driver.open_conns() == []
