"""Fast, deterministic pool logic on the fake driver (real-server tests are elsewhere)."""

from __future__ import annotations

import time
from typing import Any

import gevent
import pytest

from greenpool import GreenPool, PoolClosed, PoolError, PoolTimeout, TooManyRequests
from tests.support.fakedriver import FakeDriver
from tests.support.hygiene import outcome
from tests.support.waiting import wait_for


def make(driver: FakeDriver | None = None, **kw: Any) -> tuple[GreenPool[Any], FakeDriver]:
    driver = driver or FakeDriver()
    kw.setdefault("min_size", 0)
    kw.setdefault("max_size", 1)
    pool: GreenPool[Any] = GreenPool("", driver=driver, open=True, **kw)
    return pool, driver


def test_waiter_killed_at_the_moment_it_is_served_gives_the_connection_back() -> None:
    pool, _driver = make()
    conn = pool.getconn(timeout=1)
    waiter = gevent.spawn(pool.getconn, 5)
    gevent.sleep(0)  # the waiter is queued
    assert pool.stats()["waiting"] == 1
    waiter.kill(block=False)  # the kill is delivered first...
    pool.putconn(conn)  # ...but the connection is handed over before it lands
    waiter.join(timeout=1)
    assert waiter.dead and isinstance(waiter.value, gevent.GreenletExit)
    stats = pool.stats()
    assert stats["idle"] == 1 and stats["acquired"] == 0 and stats["waiting"] == 0, stats
    assert pool.getconn(timeout=0) is conn  # the connection is usable again
    pool.close(timeout=0)


def test_waiters_are_served_first_come_first_served() -> None:
    pool, _ = make(max_size=1)
    held = pool.getconn()
    order: list[int] = []

    def borrower(i: int) -> None:
        with pool.connection(timeout=5):
            order.append(i)
            gevent.sleep(0.001)

    greenlets = []
    for i in range(20):
        greenlets.append(gevent.spawn(borrower, i))
        gevent.sleep(0)  # queue them in a known order
    pool.putconn(held)
    gevent.joinall(greenlets, timeout=5, raise_error=True)
    assert order == list(range(20))


def test_releasing_greenlet_asking_again_does_not_jump_the_queue() -> None:
    pool, _ = make(max_size=1)
    conn = pool.getconn()
    served: list[str] = []

    def other() -> None:
        with pool.connection(timeout=5):
            served.append("other")

    g = gevent.spawn(other)
    gevent.sleep(0)
    pool.putconn(conn)
    with pytest.raises(PoolTimeout):
        pool.getconn(timeout=0)  # the connection is already the waiter's
    again = pool.getconn(timeout=5)  # queues behind and is served after it
    assert served == ["other"]
    pool.putconn(again)
    g.join()


def test_timeout_zero_and_max_waiting_and_closed() -> None:
    pool, _ = make(max_size=1, max_waiting=2)
    conn = pool.getconn()
    with pytest.raises(PoolTimeout, match="no connection available"):
        pool.getconn(timeout=0)
    waiters = [gevent.spawn(outcome, pool.getconn, 5) for _ in range(2)]
    gevent.sleep(0)
    with pytest.raises(TooManyRequests):
        pool.getconn(timeout=5)
    waiters[0].kill()  # a killed waiter leaves the queue at once...
    assert pool.stats()["waiting"] == 1
    extra = gevent.spawn(outcome, pool.getconn, 5)  # ...so another one fits
    gevent.sleep(0)
    assert pool.stats()["waiting"] == 2
    pool.close(timeout=0)
    for g in (waiters[1], extra):
        assert isinstance(g.get(timeout=1), PoolClosed)
    with pytest.raises(PoolClosed):
        pool.getconn()
    pool.putconn(conn)  # returned after close: closed, not parked
    assert conn.closed


def test_foreign_and_double_release_change_nothing() -> None:
    pool, _driver = make()
    conn = pool.getconn()
    before = pool.stats()
    with pytest.raises(PoolError, match="did not lend"):
        pool.putconn(object())
    assert pool.stats() == before
    pool.putconn(conn)
    after = pool.stats()
    with pytest.raises(PoolError, match="already"):
        pool.putconn(conn)
    assert pool.stats() == after
    pool.close()


def test_timeout_counts_and_message_include_pool_counts() -> None:
    pool, _ = make(max_size=1)
    pool.getconn()
    with pytest.raises(PoolTimeout) as info:
        pool.getconn(timeout=0.01)
    assert "acquired=1" in str(info.value) and "max_size=1" in str(info.value)
    assert pool.stats()["timeout_count"] == 1
    pool.close(timeout=0)


@pytest.mark.allow_pool_errors(r"cannot connect for \d+ s \(reconnect_timeout\)")
def test_connect_failures_back_off_and_are_reported() -> None:
    driver = FakeDriver()
    driver.fail_connect = OSError("connection refused (fake)")
    reports: list[GreenPool[Any]] = []
    pool, _ = make(driver, min_size=1, reconnect_timeout=0.3, reconnect_failed=reports.append)
    start = time.monotonic()
    with pytest.raises(PoolTimeout, match="connection refused"):
        pool.getconn(timeout=0.5)
    wait_for(lambda: reports, 5, what="reconnect_failed to be called")
    assert time.monotonic() - start >= 0.3, "reported before reconnect_timeout"
    stats = pool.stats()
    # Backoff: 0.1, 0.2, 0.4... so well under one attempt per 10 ms.
    assert 2 <= stats["connect_errors"] <= 10, stats
    assert reports == [pool]
    driver.fail_connect = None
    with pool.connection(timeout=5):
        pass
    assert not pool.stats()["failing"]
    pool.close()


def test_bad_timeouts_are_refused() -> None:
    pool, _ = make()
    for bad in (-1, float("nan"), "1", True):
        with pytest.raises(ValueError, match="timeout"):
            pool.getconn(timeout=bad)  # type: ignore[arg-type]
    assert pool.stats()["acquired"] == 0
    pool.close()


def test_peak_acquired_and_close_all() -> None:
    import greenpool

    pool, driver = make(max_size=3)
    conns = [pool.getconn() for _ in range(3)]
    for conn in conns:
        pool.putconn(conn)
    pool.putconn(pool.getconn())
    assert pool.stats()["peak_acquired"] == 3
    greenpool.close_all(timeout=0)
    assert pool.closed and driver.open_conns() == []


@pytest.mark.parametrize("how", ["reconnect_all", "drain"])
def test_a_connection_opening_when_the_pool_reconnects_is_not_kept(how: str) -> None:
    """A connect that started before reconnect_all()/drain() (old conninfo, old
    credentials) finishes after it: that connection is retired, not lent."""
    driver = FakeDriver(connect_delay=0.2)
    pool, _ = make(driver, min_size=1, max_size=2)
    wait_for(lambda: len(driver.conns) == 0 and pool.stats()["constructing"] == 1)
    if how == "reconnect_all":
        pool.reconnect_all()
    else:
        pool.drain(timeout=5)  # opens its own replacement, in the new generation
    wait_for(lambda: driver.conns, 5, what="the connect that started before to finish")
    first = driver.conns[0]
    wait_for(lambda: first.closed, 5, what="the connection opened before to be closed")
    conn = pool.getconn(timeout=5)
    assert conn is not first and not conn.closed
    pool.putconn(conn)
    pool.close(timeout=1)
