"""The gevent-native psycopg wait functions: installed by the pool, same semantics."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Generator, Iterator
from typing import Any

import gevent
import gevent.event
import psycopg
import pytest
from psycopg import errors, pq, waiting

from greenpool import GreenPool
from greenpool.drivers import gevent_wait
from tests.support.hygiene import outcome
from tests.support.server import Server
from tests.support.waiting import wait_for


@pytest.fixture
def conn(dsn: str, make_pool: Callable[..., GreenPool[Any]]) -> Iterator[psycopg.Connection]:
    make_pool(min_size=0)  # creating a pool installs the wait functions
    assert gevent_wait.installed()
    with psycopg.connect(dsn, autocommit=True) as c:
        yield c


def test_compatible_with_this_psycopg_and_selftest_passes() -> None:
    assert gevent_wait.compatible() == []
    assert gevent_wait.socketpair_selftest() == []


def test_pool_installs_it_and_uninstall_restores_psycopg_own(
    make_pool: Callable[..., GreenPool[Any]],
) -> None:
    make_pool(min_size=0)
    assert waiting.wait is gevent_wait.wait
    gevent_wait.uninstall()
    try:
        assert waiting.wait is not gevent_wait.wait
    finally:
        assert gevent_wait.install() == []
    assert gevent_wait.installed()


def test_results_large_reads_and_large_writes(conn: psycopg.Connection) -> None:
    assert conn.execute("SELECT 1").fetchone() == (1,)
    assert len(conn.execute("SELECT generate_series(1, 200000)").fetchall()) == 200000
    big = "x" * (8 << 20)  # the send has to wait for the socket to drain
    assert conn.execute("SELECT length(%s)", (big,)).fetchone() == (len(big),)


def test_server_errors_and_statement_timeout(conn: psycopg.Connection) -> None:
    conn.execute("SET statement_timeout = 50")
    with pytest.raises(errors.QueryCanceled):
        conn.execute("SELECT pg_sleep(1)")
    conn.execute("SET statement_timeout = 0")
    with pytest.raises(errors.DivisionByZero):
        conn.execute("SELECT 1/0")


def test_gevent_timeout_mid_query_propagates_and_leaks_no_watcher(
    conn: psycopg.Connection,
) -> None:
    loop = gevent.get_hub().loop
    gevent.sleep(0)
    before = loop.activecnt
    with pytest.raises(gevent.Timeout), gevent.Timeout(0.1):
        conn.execute("SELECT pg_sleep(5)")
    conn.cancel_safe(timeout=5)
    conn.close()  # the cancelled query's result is still pending on it
    gevent.sleep(0)
    assert loop.activecnt <= before


def test_socket_closed_under_a_waiter_raises_instead_of_hanging(
    dsn: str, admin: Server, conn: object
) -> None:
    app = "gp_gevent_wait_victim"
    victim_conn = psycopg.connect(dsn, autocommit=True, application_name=app)
    g = gevent.spawn(outcome, victim_conn.execute, "SELECT pg_sleep(3)")
    # The query is on its way (the client sent it) and running (the server has it): the
    # greenlet is waiting for the result when the socket goes.
    wait_for(
        lambda: (
            victim_conn.pgconn.transaction_status == pq.TransactionStatus.ACTIVE
            and len(admin.active_queries(app)) == 1
        ),
        5,
        interval=0.005,
        what="the victim's query to be running",
    )
    start = time.monotonic()
    victim_conn.pgconn.finish()
    result = g.get(timeout=2)
    assert isinstance(result, psycopg.OperationalError), result
    assert time.monotonic() - start < 1.0


def test_connect_timeout_against_a_silent_listener(conn: object) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        port = listener.getsockname()[1]
        start = time.monotonic()
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(f"host=127.0.0.1 port={port} user=x dbname=x connect_timeout=1")
        assert 0.8 < time.monotonic() - start < 3.0


def test_queries_stay_concurrent(dsn: str, admin: Server, conn: object) -> None:
    """Ten queries from ten greenlets run on the server at the same time (a blocking wait
    would let only one run at a time)."""
    app = "gp_gevent_wait_concurrent"
    conns = [psycopg.connect(dsn, autocommit=True, application_name=app) for _ in range(10)]
    try:
        jobs = [gevent.spawn(c.execute, "SELECT pg_sleep(1)") for c in conns]
        wait_for(lambda: len(admin.active_queries(app)) == 10, 5, what="10 queries at once")
        gevent.joinall(jobs, timeout=10, raise_error=True)
    finally:
        for c in conns:
            c.close()


def _kept(fileno: int) -> object:
    cache = gevent.get_hub().__dict__.get(gevent_wait._CACHE_ATTR, {})
    return cache.get(fileno)


def test_each_socket_keeps_its_watchers_between_queries(conn: psycopg.Connection) -> None:
    conn.execute("SELECT 1")
    fileno = conn.pgconn.socket
    kept = _kept(fileno)
    assert kept is not None
    io = kept.io  # type: ignore[attr-defined]
    for _ in range(5):
        conn.execute("SELECT 1")
    assert _kept(fileno) is kept and kept.io is io  # type: ignore[attr-defined]
    assert not io.active


def test_a_new_socket_on_a_reused_fd_number_works(dsn: str, conn: object) -> None:
    first = psycopg.connect(dsn, autocommit=True)
    first.execute("SELECT 1")
    fileno = first.pgconn.socket
    first.close()
    second = psycopg.connect(dsn, autocommit=True)  # the lowest free fd: usually the same
    try:
        assert second.pgconn.socket == fileno or _kept(second.pgconn.socket) is None
        assert second.execute("SELECT 2").fetchone() == (2,)
        big = "y" * (4 << 20)  # switches the kept watcher between write and read
        assert second.execute("SELECT length(%s)", (big,)).fetchone() == (len(big),)
    finally:
        second.close()


def test_kept_timer_ticks_at_psycopg_interval_and_two_waiters_on_one_fd_both_wake(
    conn: object,
) -> None:
    a, b = socket.socketpair()
    a.setblocking(False)
    ticks = [0, 0]
    fed = gevent.event.Event()

    def reader(i: int) -> Generator[int, int, int]:
        ready = yield waiting.Wait.R
        while not ready:
            ticks[i] += 1
            if ticks[0] >= 2:
                fed.set()
            ready = yield waiting.Wait.R
        return int(ready)

    try:
        jobs = [gevent.spawn(gevent_wait.wait, reader(i), a.fileno(), 0.05) for i in (0, 1)]
        assert fed.wait(timeout=5), "the interval timer never ticked"
        b.send(b"x")
        gevent.joinall(jobs, timeout=5, raise_error=True)
        assert [j.value for j in jobs] == [int(waiting.Ready.R)] * 2
        assert ticks[1] >= 1  # the second waiter (fresh watchers) ticks as well
    finally:
        a.close()
        b.close()


def test_a_socket_reusing_a_closed_ones_fd_without_a_hub_turn_is_still_watched(
    conn: object,
) -> None:
    # libev would keep believing the old file registered with epoll and never report the
    # new one: the wait then ticks at its interval forever.
    def reader(sock: socket.socket) -> Generator[int, int, int]:
        ready = yield waiting.Wait.R
        while not ready:
            ready = yield waiting.Wait.R
        return int(ready)

    a, b = socket.socketpair()
    a.setblocking(False)
    b.send(b"1")
    assert gevent_wait.wait(reader(a), a.fileno(), 0.05) == int(waiting.Ready.R)
    fileno = a.fileno()
    a.close()
    b.close()
    c, d = socket.socketpair()  # no hub turn since the close
    try:
        c.setblocking(False)
        assert c.fileno() == fileno
        d.send(b"2")
        with gevent.Timeout(2, AssertionError("the reused fd was never reported ready")):
            assert gevent_wait.wait(reader(c), c.fileno(), 0.05) == int(waiting.Ready.R)
    finally:
        c.close()
        d.close()
