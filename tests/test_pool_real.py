"""The pool against a real PostgreSQL server over loopback TCP."""

from __future__ import annotations

import contextlib
import gc
import os
import random
import time
from collections.abc import Callable
from typing import Any

import gevent
import pytest
from gevent.event import Event

from greenpool import ConnectError, GreenPool, PoolClosed, PoolError, PoolTimeout
from tests.support.hygiene import outcome
from tests.support.invariants import backend_pids, backend_starts, backends_within_max, settled
from tests.support.pgcluster import APP_PASSWORD, APP_USER, PW_PASSWORD, PW_USER, PgCluster
from tests.support.server import Server
from tests.support.waiting import wait_for

Factory = Callable[..., GreenPool[Any]]
DRIVERS = ["psycopg", "psycopg2"]


def backend_pid(conn: Any) -> int:
    return int(conn.info.backend_pid)


def run_query(conn: Any, sql: str) -> list[Any]:
    cur = conn.cursor()
    cur.execute(sql)
    return list(cur.fetchall()) if cur.description else []


# ---------------------------------------------------------------- cooperation


@pytest.mark.parametrize("driver", DRIVERS)
def test_queries_cooperate_and_the_hub_never_stalls(
    make_pool: Factory, admin: PgCluster, driver: str
) -> None:
    """Ten borrowers' queries run on the server at the same time, and a ticker greenlet
    keeps ticking meanwhile: a wait that blocked the hub would stall it for a whole
    query (1 s) and run the queries one after another."""
    pool = make_pool(min_size=10, max_size=10, driver=driver)
    pool.wait(10)
    pool.check_cooperation()
    gaps: list[float] = []
    stop = Event()

    def ticker() -> None:
        last = time.monotonic()
        while not stop.is_set():
            gevent.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    def sleeper() -> None:
        with pool.connection() as conn:
            run_query(conn, "SELECT pg_sleep(1)")

    tick = gevent.spawn(ticker)
    sleepers = [gevent.spawn(sleeper) for _ in range(10)]
    try:
        wait_for(lambda: len(admin.active_queries(pool.name)) == 10, 5, what="10 at once")
        gevent.joinall(sleepers, timeout=30, raise_error=True)
    finally:
        stop.set()
    tick.get(timeout=5)
    assert len(gaps) > 20, gaps
    assert max(gaps) < 0.5, f"the hub stalled for {max(gaps):.3f}s"


IMPORT_ORDER_SCRIPT = """
import warnings, sys
{before}
from gevent import monkey
{patch}
import greenpool
problems = greenpool.cooperation_problems("psycopg")
try:
    greenpool.check_cooperation()
except greenpool.CooperationError as ex:
    print("RAISED:", ex)
else:
    print("OK")
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    pool = greenpool.GreenPool({dsn!r}, min_size=0, name="import_order")
    pool.close()
print("WARNED" if any("cooperate" in str(w.message) for w in caught) else "QUIET")
print("AFTER:", "; ".join(greenpool.cooperation_problems("psycopg")) or "OK")
"""


@pytest.mark.parametrize(
    ("before", "patch", "wait_mode", "expect"),
    [
        ("", "monkey.patch_all()", "gevent", ["OK", "QUIET", "AFTER: OK"]),
        # The pool installs gevent-native waits, which cures the import-order trap, and the
        # check sets the driver up the same way first (gunicorn's post_worker_init runs it
        # before any pool opened: it must not fail the boot for what a pool would cure)...
        ("import psycopg", "monkey.patch_all()", "gevent", ["OK", "QUIET", "AFTER: OK"]),
        # ...unless told to keep psycopg's own: then it says so loudly.
        (
            "import psycopg",
            "monkey.patch_all()",
            "psycopg",
            ["RAISED:", "imported before", "WARNED", "AFTER: psycopg was imported before"],
        ),
        ("", "", "gevent", ["RAISED:", "not monkey-patched", "WARNED", "AFTER: gevent has"]),
    ],
    ids=["patched-first", "imported-first-cured", "imported-first-kept", "not-patched"],
)
def test_import_order_check(
    dsn: str, before: str, patch: str, wait_mode: str, expect: list[str]
) -> None:
    import subprocess
    import sys

    script = IMPORT_ORDER_SCRIPT.format(before=before, patch=patch, dsn=dsn)
    env = {**os.environ, "GREENPOOL_PSYCOPG_WAIT": wait_mode}
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env
    )
    assert out.returncode == 0, out.stderr
    for word in expect:
        assert word in out.stdout, out.stdout


# ---------------------------------------------------------------- sizes and fairness


def test_never_more_than_max_size_backends_under_a_slow_connect(
    make_pool: Factory, admin: PgCluster
) -> None:
    def slow_configure(conn: Any) -> None:
        gevent.sleep(0.1)  # a slow connect: the slot is held while it runs

    pool = make_pool(min_size=0, max_size=4, configure=slow_configure, max_connecting=4)
    seen: list[int] = []
    stop = Event()

    def sampler() -> None:
        while not stop.is_set():
            seen.append(backends_within_max(pool, admin))
            stop.wait(0.005)

    def borrower() -> None:
        for _ in range(3):
            with pool.connection(timeout=10) as conn:
                run_query(conn, "SELECT pg_sleep(0.01)")

    sample = gevent.spawn(sampler)
    try:
        gevent.joinall([gevent.spawn(borrower) for _ in range(50)], raise_error=True)
    finally:
        stop.set()
    sample.get(timeout=10)  # its asserts count
    assert len(seen) > 10 and max(seen) == 4, seen
    assert pool.stats()["new_conns_count"] == 4
    settled(pool, admin)


def test_waiters_are_served_in_arrival_order(make_pool: Factory) -> None:
    pool = make_pool(min_size=2, max_size=2)
    pool.wait(10)
    held = [pool.getconn(), pool.getconn()]
    order: list[int] = []

    def borrower(i: int) -> None:
        with pool.connection(timeout=10) as conn:
            order.append(i)
            run_query(conn, "SELECT 1")

    greenlets = []
    for i in range(30):
        greenlets.append(gevent.spawn(borrower, i))
        gevent.sleep(0)
    for conn in held:
        pool.putconn(conn)
    gevent.joinall(greenlets, raise_error=True)
    assert order == list(range(30))


def test_timeouts_and_max_waiting_with_a_real_server(make_pool: Factory, admin: PgCluster) -> None:
    from greenpool import TooManyRequests

    pool = make_pool(min_size=1, max_size=1, max_waiting=1)
    conn = pool.getconn(timeout=10)
    start = time.monotonic()
    with pytest.raises(PoolTimeout):
        pool.getconn(timeout=0.2)
    assert 0.15 < time.monotonic() - start < 1.0
    waiter = gevent.spawn(pool.getconn, 10)
    gevent.sleep(0.01)
    with pytest.raises(TooManyRequests):
        pool.getconn(timeout=10)
    pool.putconn(conn)
    pool.putconn(waiter.get(timeout=5))
    settled(pool, admin)


def test_thousands_of_killed_or_timed_out_waiters_leak_nothing(
    make_pool: Factory, admin: PgCluster
) -> None:
    pool = make_pool(min_size=0, max_size=3, timeout=0.05)
    rng = random.Random(1234)
    kills = 0

    def borrower() -> None:
        try:
            with pool.connection() as conn:
                run_query(conn, "SELECT 1")
        except (PoolTimeout, gevent.Timeout):
            pass  # timed out by the pool, or killed with a Timeout by the test

    deadline = time.monotonic() + 20
    batch: list[gevent.Greenlet] = []
    for _ in range(2500):
        if time.monotonic() > deadline:
            break
        g = gevent.spawn(borrower)
        batch.append(g)
        if rng.random() < 0.5:
            gevent.sleep(rng.choice([0, 0, 0.0005, 0.001]))
            if rng.random() < 0.5:
                g.kill(block=False)
            else:
                g.kill(gevent.Timeout(), block=False)
            kills += 1
        if len(batch) >= 20:
            gevent.joinall(batch, raise_error=True)
            batch = []
    gevent.joinall(batch, raise_error=True)
    assert kills > 500
    s = settled(pool, admin)
    assert s["waiting"] == 0 and s["total"] <= 3, s
    held = [pool.getconn(timeout=10) for _ in range(3)]  # every slot still usable
    for conn in held:
        assert run_query(conn, "SELECT 1") == [(1,)]
        pool.putconn(conn)
    assert admin.backend_count(pool.name) <= 3


# ---------------------------------------------------------------- release semantics


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("how", ["kill", "timeout"])
def test_borrower_dying_mid_query_discards_and_cancels_on_server(
    make_pool: Factory, admin: PgCluster, driver: str, how: str
) -> None:
    pool = make_pool(min_size=1, max_size=1, driver=driver)
    pids: list[int] = []

    def borrower() -> None:
        with pool.connection() as conn:
            pids.append(backend_pid(conn))
            run_query(conn, "SELECT pg_sleep(30)")

    g = gevent.spawn(outcome, borrower)
    # The borrower's own query (the pool runs short ones of its own: reset, capture).
    wait_for(lambda: any("pg_sleep" in q.query for q in admin.active_queries(pool.name)))
    interrupt = gevent.Timeout() if how == "timeout" else gevent.GreenletExit()
    g.kill(interrupt, block=True)
    assert g.value is interrupt, g.value  # it reached the borrower, nothing swallowed it
    wait_for(
        lambda: not admin.active_queries(pool.name),
        timeout=10,
        what="the query to stop on the server after the borrower died",
    )
    with pool.connection(timeout=10) as conn:
        assert backend_pid(conn) != pids[0], "the dirty connection was reused"
        assert run_query(conn, "SELECT 1") == [(1,)]
    s = settled(pool, admin)
    assert s["broken_destroy_count"] == 1, s
    # psycopg 3 leaves the connection ACTIVE and the pool cancels; psycopg2 closes it
    # itself, so greenpool's wait callback cancels before that happens.
    assert s["cancel_count"] == (1 if driver == "psycopg" else 0), s


@pytest.fixture
def table(admin: PgCluster, request: pytest.FixtureRequest) -> str:
    name = "t_" + request.node.name.replace("[", "_").replace("]", "").replace("-", "_")[:40]
    admin.execute(f"DROP TABLE IF EXISTS {name}; CREATE TABLE {name} (v int)")
    return str(name)


@pytest.mark.parametrize("driver", DRIVERS)
def test_release_in_each_transaction_state(
    make_pool: Factory, admin: PgCluster, table: str, driver: str
) -> None:
    pool = make_pool(min_size=1, max_size=1, driver=driver)

    # In a transaction: rolled back on release.
    conn = pool.getconn()
    pid = backend_pid(conn)
    run_query(conn, f"INSERT INTO {table} VALUES (1)")
    pool.putconn(conn)
    assert admin.execute(f"SELECT count(*) FROM {table}") == [(0,)]

    # In a failed transaction: rolled back, reusable.
    conn = pool.getconn()
    with pytest.raises(Exception, match="division by zero"):
        run_query(conn, "SELECT 1/0")
    pool.putconn(conn)
    conn = pool.getconn()
    assert backend_pid(conn) == pid
    assert run_query(conn, "SELECT 2") == [(2,)]
    pool.putconn(conn)

    # Closed by the borrower: discarded and replaced.
    conn = pool.getconn()
    conn.close()
    pool.putconn(conn)
    conn = pool.getconn(timeout=10)
    assert backend_pid(conn) != pid
    pool.putconn(conn)
    assert pool.stats()["rollback_count"] == 3  # the SELECT 2 opened a transaction too
    settled(pool, admin)


def test_connection_context_commits_or_rolls_back(
    make_pool: Factory, admin: PgCluster, table: str
) -> None:
    pool = make_pool(min_size=1, max_size=1)
    with pool.connection() as conn:
        run_query(conn, f"INSERT INTO {table} VALUES (1)")
    with pytest.raises(RuntimeError), pool.connection() as conn:
        run_query(conn, f"INSERT INTO {table} VALUES (2)")
        raise RuntimeError("boom")
    with pytest.raises(PoolError, match="rolled back"), pool.connection() as conn:
        run_query(conn, f"INSERT INTO {table} VALUES (3)")
        with contextlib.suppress(Exception):  # swallowed: the block must not commit
            run_query(conn, "SELECT 1/0")
    assert admin.execute(f"SELECT v FROM {table} ORDER BY v") == [(1,)]
    settled(pool, admin)


# ---------------------------------------------------------------- server-side faults


@pytest.mark.parametrize("driver", DRIVERS)
def test_terminated_idle_backends_are_replaced_before_anyone_sees_an_error(
    make_pool: Factory, admin: PgCluster, driver: str
) -> None:
    pool = make_pool(min_size=3, max_size=3, check_idle_after=0.0, driver=driver)
    pool.wait(10)
    assert admin.terminate_backends(pool.name) == 3
    for _ in range(10):
        with pool.connection(timeout=10) as conn:
            assert run_query(conn, "SELECT 1") == [(1,)]
    assert pool.stats()["check_failed_count"] == 3


@pytest.mark.parametrize("driver", DRIVERS)
def test_health_check_replaces_dead_idle_connections_by_itself(
    make_pool: Factory, admin: PgCluster, driver: str
) -> None:
    pool = make_pool(min_size=2, max_size=2, health_check_period=0.2, driver=driver)
    pool.wait(10)
    admin.terminate_backends(pool.name)
    wait_for(lambda: pool.stats()["check_failed_count"] >= 2)
    wait_for(lambda: admin.backend_count(pool.name) == 2)
    assert pool.stats()["acquire_count"] == 0  # nobody had to ask
    assert pool.check() == 0  # check() on healthy connections replaces nothing
    settled(pool, admin)


@pytest.mark.needs_restart
def test_pool_recovers_by_itself_after_a_server_restart(
    make_pool: Factory, cluster: PgCluster
) -> None:
    pool = make_pool(min_size=2, max_size=4, timeout=0.5, health_check_period=0.5)
    pool.wait(10)
    cluster.stop("fast")
    # Connections idle for less than check_idle_after are not pinged, so a borrower may see
    # the server's shutdown error once; then the pool checks the rest and later acquires
    # time out (quickly, with the connection error), never hang.
    errors: list[BaseException] = []
    for _ in range(5):
        start = time.monotonic()
        try:
            with pool.connection() as conn:
                run_query(conn, "SELECT 1")
        except Exception as ex:
            errors.append(ex)
        assert time.monotonic() - start < 2.0
        if isinstance(errors[-1], PoolTimeout):
            break
    assert isinstance(errors[-1], PoolTimeout), errors
    assert "last connection error" in str(errors[-1])
    assert len(errors) <= 3, errors
    cluster.start()
    back = time.monotonic()
    wait_for(lambda: cluster.backend_count(pool.name) == 2, timeout=15)
    recovery = time.monotonic() - back
    with pool.connection(timeout=5) as conn:
        assert run_query(conn, "SELECT 1") == [(1,)]
    assert recovery < 10, recovery
    settled(pool, cluster)


def test_wrong_password_fails_fast_at_open(cluster: Server) -> None:
    bad = cluster.dsn(PW_USER, password="wrong-" + PW_PASSWORD)
    pool: GreenPool[Any] = GreenPool(bad, min_size=2, name="gp_wrong_password", open=False)
    start = time.monotonic()
    with pytest.raises(ConnectError, match="password authentication failed") as info:
        pool.open(wait=True, timeout=20)
    assert time.monotonic() - start < 3
    assert PW_PASSWORD not in str(info.value) and PW_PASSWORD not in repr(pool)
    assert pool.closed
    with pytest.raises(PoolClosed):
        pool.getconn()


def test_no_server_fails_fast_at_open() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    pool: GreenPool[Any] = GreenPool(f"host=127.0.0.1 port={port} user=x dbname=x", open=False)
    start = time.monotonic()
    with pytest.raises(ConnectError, match="refused"):
        pool.open(wait=True)
    assert time.monotonic() - start < 3


# ---------------------------------------------------------------- ageing and sizing


def test_idle_connections_above_min_size_are_reaped(make_pool: Factory, admin: PgCluster) -> None:
    pool = make_pool(min_size=1, max_size=4, max_idle=0.3)
    pool.wait(10)
    held = [pool.getconn(timeout=10) for _ in range(4)]
    for conn in held:
        pool.putconn(conn)
    assert pool.stats()["total"] == 4
    wait_for(lambda: pool.stats()["total"] == 1, timeout=5)
    assert pool.stats()["idle_destroy_count"] == 3
    wait_for(lambda: admin.backend_count(pool.name) == 1)


def test_connections_are_retired_at_max_lifetime_with_jitter(
    make_pool: Factory, admin: PgCluster
) -> None:
    """Each backend's life, as the server saw it, ends within [max_lifetime - jitter,
    max_lifetime] (plus a maintenance tick), and the jitter spreads the ends out."""
    n, lifetime, jitter = 6, 1.0, 0.6
    # health_check_period=0.1: the maintenance greenlet wakes every 100 ms.
    pool = make_pool(
        min_size=n, max_size=n, max_lifetime=lifetime, max_lifetime_jitter=jitter,
        health_check_period=0.1,
    )  # fmt: skip
    pool.wait(10)
    ages: dict[tuple[int, Any], float] = {}  # (pid, backend_start) -> age when last seen

    def originals_gone() -> bool:
        rows = admin.execute(
            "SELECT pid, backend_start, extract(epoch FROM clock_timestamp() - backend_start)"
            " FROM pg_stat_activity WHERE application_name = %s",
            [pool.name],
        )
        alive = {(int(pid), start): float(age) for pid, start, age in rows}
        if not ages:
            ages.update(alive)
            assert len(ages) == n, ages
        for key in ages.keys() & alive.keys():
            ages[key] = alive[key]
        return not ages.keys() & alive.keys()

    wait_for(originals_gone, 10, interval=0.02, what="every first backend to retire")
    lived = sorted(ages.values())
    # Last seen alive at these ages: a backend ends at most one poll (plus the query)
    # after; the pool retires it at its first maintenance tick past its own lifetime.
    assert lived[0] >= lifetime - jitter - 0.15, lived
    assert lived[-1] <= 2 * lifetime, lived
    assert lived[-1] - lived[0] >= 0.05, f"no jitter: every backend retired together {lived}"
    assert pool.stats()["lifetime_destroy_count"] >= n
    settled(pool, admin)


def test_try_now_acquire_on_an_empty_pool_fails_at_once_and_grows_it(
    make_pool: Factory, admin: PgCluster
) -> None:
    pool = make_pool(min_size=0, max_size=2)
    start = time.monotonic()
    with pytest.raises(PoolTimeout):
        pool.getconn(timeout=0)
    assert time.monotonic() - start < 1.0
    wait_for(lambda: admin.backend_count(pool.name) == 1, what="the connection it asked for")
    wait_for(lambda: pool.stats()["idle"] == 1, what="the new connection to be ready")
    conn = pool.getconn(timeout=0)  # there now: served without waiting
    assert run_query(conn, "SELECT 1") == [(1,)]
    pool.putconn(conn)
    assert pool.stats()["new_conns_count"] == 1
    settled(pool, admin)


def test_min_idle_is_refilled_after_a_checkout(make_pool: Factory, admin: PgCluster) -> None:
    pool = make_pool(min_size=0, max_size=5, min_idle=2)
    wait_for(lambda: admin.backend_count(pool.name) == 2, what="min_idle connections")
    held = [pool.getconn(timeout=10) for _ in range(2)]
    wait_for(lambda: admin.backend_count(pool.name) == 4, what="two more on the server")
    # (The server lists a backend before its connector has finished vetting it.)
    wait_for(lambda: pool.stats()["idle"] == 2, what="two more kept ready")
    for conn in held:
        pool.putconn(conn)
    settled(pool, admin)


def test_acquire_counters(make_pool: Factory, admin: PgCluster) -> None:
    """empty_acquire_count (served after waiting), canceled_acquire_count (a waiter
    killed or timed out by its caller), acquire_wait_seconds_total (what those waited)."""
    pool = make_pool(min_size=1, max_size=1)
    pool.wait(10)
    with pool.connection(timeout=10):
        pass  # served at once: no wait counted
    s = pool.stats()
    assert (s["acquire_count"], s["empty_acquire_count"], s["acquire_wait_seconds_total"]) == (
        1, 0, 0.0,
    )  # fmt: skip
    held = pool.getconn()
    started = time.monotonic()
    waiter = gevent.spawn(pool.getconn, 10)
    wait_for(lambda: pool.stats()["waiting"] == 1, what="the waiter to queue")
    queued = time.monotonic()
    gevent.sleep(0.2)  # the wait being measured
    released = time.monotonic()
    pool.putconn(held)
    conn = waiter.get(timeout=5)
    served = time.monotonic()
    s = pool.stats()
    assert s["empty_acquire_count"] == 1, s
    assert released - queued <= s["acquire_wait_seconds_total"] <= served - started, s
    # Waiters that their caller killed, or timed out with its own gevent.Timeout, are
    # canceled; one that hit the pool's timeout is a timeout.
    killed = gevent.spawn(outcome, pool.getconn, 10)
    wait_for(lambda: pool.stats()["waiting"] == 1)
    killed.kill()

    def bounded_by_the_caller() -> Any:
        with gevent.Timeout(0.05):
            return pool.getconn(10)

    timed_out = gevent.spawn(outcome, bounded_by_the_caller)
    assert isinstance(timed_out.get(timeout=5), gevent.Timeout)
    with pytest.raises(PoolTimeout):
        pool.getconn(timeout=0.05)
    pool.putconn(conn)
    s = pool.stats()
    assert (s["canceled_acquire_count"], s["timeout_count"], s["empty_acquire_count"]) == (
        2, 1, 1,
    ), s  # fmt: skip
    settled(pool, admin)


def test_drain_to_a_new_conninfo_rotates_credentials(make_pool: Factory, cluster: Server) -> None:
    """drain(conninfo=...) after a credential change: every connection is replaced by one
    of the new user (a borrowed one when it comes back)."""
    pool = make_pool(cluster.dsn(APP_USER, APP_PASSWORD), min_size=2, max_size=3)
    pool.wait(10)
    lent = pool.getconn()
    assert run_query(lent, "SELECT current_user") == [(APP_USER,)]
    old = backend_pids(cluster, pool.name)
    pool.drain(timeout=10, conninfo=cluster.dsn(PW_USER, PW_PASSWORD))
    assert run_query(lent, "SELECT current_user") == [(APP_USER,)]  # untouched while lent
    pool.putconn(lent)

    def users() -> list[str]:
        rows = cluster.execute(
            "SELECT usename FROM pg_stat_activity WHERE application_name = %s", [pool.name]
        )
        return sorted(str(r[0]) for r in rows)

    wait_for(
        lambda: not backend_pids(cluster, pool.name) & old and users() == [PW_USER] * 2,
        10,
        what="every backend to be the new user's",
    )
    conns = [pool.getconn(timeout=10) for _ in range(2)]
    for conn in conns:
        assert run_query(conn, "SELECT current_user") == [(PW_USER,)]
        pool.putconn(conn)
    assert APP_PASSWORD not in repr(pool) and PW_PASSWORD not in repr(pool)
    settled(pool, cluster)


def test_resize_grows_and_shrinks(make_pool: Factory, admin: PgCluster) -> None:
    pool = make_pool(min_size=1, max_size=2)
    pool.wait(10)
    pool.resize(4, 6)
    wait_for(lambda: admin.backend_count(pool.name) == 4)
    held = [pool.getconn(timeout=10) for _ in range(6)]
    pool.resize(1, 2)
    for conn in held:
        pool.putconn(conn)  # surplus ones are closed as they come back
    assert pool.stats()["total"] <= 2
    wait_for(lambda: admin.backend_count(pool.name) <= 2)
    with pytest.raises(ValueError, match="min_size"):
        pool.resize(3, 2)
    assert pool.max_size == 2


def test_drain_replaces_every_connection(make_pool: Factory, admin: PgCluster) -> None:
    pool = make_pool(min_size=3, max_size=3)
    pool.wait(10)
    lent = pool.getconn()
    lent_pid = backend_pid(lent)
    old = backend_pids(admin, pool.name)
    assert len(old) == 3 and lent_pid in old, old
    pool.drain(timeout=10)
    # The idle ones were replaced (the server sees them go); the borrowed one stays...
    wait_for(
        lambda: (
            backend_pids(admin, pool.name) & old == {lent_pid}
            and len(backend_pids(admin, pool.name)) == 3
        ),
        what="the idle backends to be replaced",
    )
    assert run_query(lent, "SELECT 1") == [(1,)]  # ...and keeps working...
    pool.putconn(lent)  # ...until it comes back: then it is retired too
    wait_for(
        lambda: (
            not backend_pids(admin, pool.name) & old and len(backend_pids(admin, pool.name)) == 3
        ),
        what="the returned old backend to be replaced",
    )
    conns = [pool.getconn(timeout=10) for _ in range(3)]
    assert not {backend_pid(c) for c in conns} & old
    for conn in conns:
        pool.putconn(conn)
    settled(pool, admin)


def test_reconnect_all_closes_everything_and_reconnects(
    make_pool: Factory, admin: PgCluster
) -> None:
    pool = make_pool(min_size=2, max_size=2)
    pool.wait(10)
    lent = pool.getconn()
    old = backend_pids(admin, pool.name)
    assert len(old) == 2, old
    pool.reconnect_all()
    wait_for(  # the idle one is closed at once, the borrowed one stays
        lambda: backend_pids(admin, pool.name) & old == {backend_pid(lent)},
        what="the idle backend to be closed",
    )
    pool.putconn(lent)
    wait_for(
        lambda: (
            not backend_pids(admin, pool.name) & old and len(backend_pids(admin, pool.name)) == 2
        ),
        what="every old backend to be replaced",
    )
    settled(pool, admin)


def test_close_with_borrowed_connections(make_pool: Factory, admin: PgCluster) -> None:
    pool = make_pool(min_size=2, max_size=2)
    pool.wait(10)
    lent = pool.getconn()
    other = pool.getconn()
    waiter = gevent.spawn(outcome, pool.getconn, 10)
    wait_for(lambda: pool.stats()["waiting"] == 1, what="the waiter to queue")
    start = time.monotonic()
    pool.close(timeout=0.2)
    assert time.monotonic() - start < 1
    assert isinstance(waiter.get(timeout=1), PoolClosed)
    assert admin.backend_count(pool.name) == 2  # borrowed ones are not yanked away
    pool.putconn(lent)
    pool.putconn(other)
    assert lent.closed and other.closed
    wait_for(lambda: admin.backend_count(pool.name) == 0)
    with pytest.raises(PoolClosed):
        pool.getconn()


# ---------------------------------------------------------------- naming, config, fork


def test_application_name_defaults_to_pool_name_and_user_value_wins(
    make_pool: Factory, dsn: str
) -> None:
    pool = make_pool(min_size=1, name="gp_appname_default")
    with pool.connection() as conn:
        assert run_query(conn, "SHOW application_name") == [("gp_appname_default",)]
    mine = make_pool(dsn + " application_name=mine", min_size=1, name="gp_named")
    with mine.connection() as conn:
        assert run_query(conn, "SHOW application_name") == [("mine",)]
    kw = make_pool(min_size=1, name="gp_kw", kwargs={"application_name": "from_kwargs"})
    with kw.connection() as conn:
        assert run_query(conn, "SHOW application_name") == [("from_kwargs",)]


def test_pool_settings_in_the_conninfo(make_pool: Factory, dsn: str) -> None:
    pool = make_pool(dsn + " pool_max_conns=3 pool_min_conns=2 pool_max_conn_idle_time=1m30s")
    assert (pool.min_size, pool.max_size, pool.settings.max_idle) == (2, 3, 90.0)
    pool.wait(10)
    assert pool.stats()["total"] == 2
    explicit = make_pool(dsn + " pool_max_conns=3", max_size=5)
    assert explicit.max_size == 5


def test_pool_without_conninfo_stays_closed_until_opened(dsn: str) -> None:
    pool: GreenPool[Any] = GreenPool()
    assert pool.closed
    with pytest.raises(PoolClosed, match="not open"):
        pool.getconn()
    pool.configure_conninfo(dsn)
    pool.open(wait=True, timeout=10)
    with pool.connection() as conn:
        assert run_query(conn, "SELECT 1") == [(1,)]
    pool.close()


@pytest.mark.parametrize("driver", DRIVERS)
def test_forked_child_never_touches_a_parent_backend(
    make_pool: Factory, admin: PgCluster, driver: str
) -> None:
    """A real os.fork() after the pool started: the child's pool opens its own backends,
    and every one of the parent's sessions (idle or lent) is still there afterwards, the
    same session (pid and backend_start), and works, even though the child closed its
    inherited connection and its pool and collected garbage."""
    pool = make_pool(min_size=3, max_size=4, driver=driver)
    pool.wait(10)
    lent = pool.getconn()
    parent = backend_starts(admin, pool.name)
    assert len(parent) == 3 and backend_pid(lent) in parent, parent
    read_fd, write_fd = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            os.close(read_fd)
            if pool.stats()["total"] != 0:
                code = 3  # the child kept the parent's records
            else:
                with pool.connection(timeout=10) as conn:
                    code = 0 if backend_pid(conn) not in parent else 2
            lent.close()  # what a careless child, or a finaliser, does with it
            pool.close()
            gc.collect()
        finally:
            os.write(write_fd, bytes([code]))
            os._exit(code)
    os.close(write_fd)
    _, status = os.waitpid(child, 0)
    with os.fdopen(read_fd, "rb") as pipe:
        assert pipe.read() == b"\x00", (
            "the child failed (3: kept the parent's records; 2: borrowed a parent backend)"
        )
    assert os.waitstatus_to_exitcode(status) == 0
    wait_for(  # the child's own backend ends with it; the parent's are all still there
        lambda: backend_starts(admin, pool.name) == parent,
        10,
        what="the server to show exactly the parent's sessions",
    )
    assert run_query(lent, "SELECT 1") == [(1,)], "the child broke the lent connection"
    pool.putconn(lent)
    conns = [pool.getconn(timeout=10) for _ in range(3)]
    assert {backend_pid(c) for c in conns} == set(parent)
    for conn in conns:
        assert run_query(conn, "SELECT 1") == [(1,)], "the child broke an idle connection"
        pool.putconn(conn)
    settled(pool, admin)
