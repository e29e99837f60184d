"""SQLAlchemy's engine on greenpool (``poolclass=GreenQueuePool``), against the real server.

Counts are checked against ground truth: the server's backends for the pool's
application_name (pg_stat_activity), not the pool's own bookkeeping.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import gevent
import pytest
import sqlalchemy as sa
from gevent.event import Event
from sqlalchemy import event, exc, text
from sqlalchemy.orm import Session

from greenpool.sqlalchemy import GreenQueuePool
from tests.support.ormsupport import backend_pids, sa_url, unique_name
from tests.support.waiting import wait_for

Engine = sa.engine.Engine


@pytest.fixture
def make_engine(dsn: str) -> Iterator[Callable[..., tuple[Engine, str]]]:
    """Engines on GreenQueuePool with a unique application_name; disposed at teardown."""
    engines: list[Engine] = []

    def factory(driver: str = "psycopg", **kwargs: Any) -> tuple[Engine, str]:
        app = unique_name("sa")
        kwargs.setdefault("pool_size", 2)
        kwargs.setdefault("max_overflow", 1)
        kwargs.setdefault("pool_timeout", 5)
        engine = sa.create_engine(
            sa_url(dsn, driver, application_name=app), poolclass=GreenQueuePool, **kwargs
        )
        engines.append(engine)
        return engine, app

    yield factory
    for engine in engines:
        engine.dispose()


@pytest.mark.parametrize("driver", ["psycopg", "psycopg2"])
def test_queries_status_and_cap(make_engine: Any, dsn: str, driver: str) -> None:
    engine, app = make_engine(driver, pool_size=2, max_overflow=1, pool_timeout=0.5)
    assert isinstance(engine.pool, GreenQueuePool)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT 41 + 1")).scalar() == 42
    held = [engine.connect() for _ in range(3)]
    for c in held:
        c.execute(text("SELECT 1"))
    pids = {c.connection.dbapi_connection.info.backend_pid for c in held}
    assert len(pids) == 3 and pids == backend_pids(dsn, app)  # three distinct live backends
    status = engine.pool.status()
    assert "Pool size: 2" in status and "Current Checked out connections: 3" in status, status
    assert engine.pool.checkedout() == 3 and engine.pool.overflow() == 1

    start = time.monotonic()
    with pytest.raises(exc.TimeoutError) as info:
        engine.connect()
    waited = time.monotonic() - start
    assert 0.4 < waited < 3, waited
    assert "limit of size 2 overflow 1 reached" in str(info.value)
    assert backend_pids(dsn, app) == pids  # the cap held on the server
    for c in held:
        c.close()
    assert engine.pool.checkedout() == 0 and engine.pool.checkedin() == 3


def test_pool_events_fire_as_for_queuepool(make_engine: Any, dsn: str) -> None:
    engine, app = make_engine(pool_size=1, max_overflow=0)
    seen: list[str] = []
    for name in ("connect", "first_connect", "checkout", "checkin", "reset", "close"):
        event.listen(engine, name, lambda *a, _n=name: seen.append(_n))
    event.listen(engine, "invalidate", lambda *a: seen.append("invalidate"))
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    assert seen == ["first_connect", "connect", "checkout", "reset", "checkin"], seen
    seen.clear()
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
        conn.invalidate()
    assert seen[:2] == ["checkout", "invalidate"] and "checkin" in seen, seen
    seen.clear()
    # The replacement is opened by greenpool (connect event), then lent.
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    assert seen[0] == "connect" and "checkout" in seen, seen
    assert len(backend_pids(dsn, app)) == 1
    seen.clear()
    engine.dispose()
    assert "close" in seen
    wait_for(lambda: not backend_pids(dsn, app))


def test_reset_on_return(make_engine: Any, dsn: str) -> None:
    engine, _ = make_engine(pool_size=1, max_overflow=0)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE IF NOT EXISTS sa_reset (v int)"))
        conn.execute(text("TRUNCATE sa_reset"))
    conn = engine.connect()
    conn.execute(text("INSERT INTO sa_reset VALUES (1)"))
    dbapi = conn.connection.dbapi_connection
    conn.close()  # never committed: reset on return rolls it back
    with engine.connect() as conn2:
        assert conn2.connection.dbapi_connection is dbapi
        assert conn2.execute(text("SELECT count(*) FROM sa_reset")).scalar() == 0

    commit_engine, _ = make_engine(pool_size=1, max_overflow=0, pool_reset_on_return="commit")
    raw = commit_engine.raw_connection()
    raw.cursor().execute("INSERT INTO sa_reset VALUES (2)")
    raw.close()  # "commit" on return
    with engine.connect() as conn3:
        assert conn3.execute(text("SELECT count(*) FROM sa_reset")).scalar() == 1

    # reset_on_return=None: SQLAlchemy does nothing, greenpool still never lends a
    # connection inside a transaction (it rolls back).
    none_engine, _ = make_engine(pool_size=1, max_overflow=0, pool_reset_on_return=None)
    raw = none_engine.raw_connection()
    raw.cursor().execute("INSERT INTO sa_reset VALUES (3)")
    raw.close()
    raw = none_engine.raw_connection()
    assert raw.dbapi_connection.info.transaction_status == 0
    raw.close()
    with engine.connect() as conn4:
        assert conn4.execute(text("SELECT count(*) FROM sa_reset")).scalar() == 1


@pytest.mark.parametrize("driver", ["psycopg", "psycopg2"])
def test_session_state_never_crosses_and_idle_checkouts_skip_the_reset(
    make_engine: Any, driver: str
) -> None:
    """A SET through the engine never reaches the next connection (greenpool resets the
    session after SQLAlchemy's rollback); a checkout that sent nothing costs no round
    trip on return."""
    engine, _ = make_engine(driver, pool_size=1, max_overflow=0, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        default = conn.exec_driver_sql("SHOW work_mem").scalar()
        conn.exec_driver_sql("SET work_mem = '77MB'")
    gp = engine.pool.greenpool
    resets = gp.stats()["reset_count"]
    for _ in range(3):
        engine.connect().close()
    assert gp.stats()["reset_count"] == resets
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SHOW work_mem").scalar() == default != "77MB"
    assert gp.stats()["reset_count"] == resets + 1


def test_dispose_and_recreate(make_engine: Any, dsn: str) -> None:
    engine, app = make_engine(pool_size=2, max_overflow=0)
    checkins: list[int] = []
    event.listen(engine, "checkin", lambda *a: checkins.append(1))
    out = engine.connect()
    out.execute(text("SELECT 1"))
    with engine.connect() as c:
        c.execute(text("SELECT 1"))
    assert len(backend_pids(dsn, app)) == 2
    old_pool = engine.pool
    engine.dispose()  # idle one closed now; the checked-out one when it comes back
    assert engine.pool is not old_pool and isinstance(engine.pool, GreenQueuePool)
    wait_for(lambda: len(backend_pids(dsn, app)) == 1)
    assert out.execute(text("SELECT 2")).scalar() == 2  # still usable
    out.close()
    wait_for(lambda: not backend_pids(dsn, app))
    with engine.connect() as c:  # the new pool works, with the old pool's listeners
        assert c.execute(text("SELECT 3")).scalar() == 3
    assert len(checkins) == 3
    assert len(backend_pids(dsn, app)) >= 1
    # A disposed pool stays usable, as SQLAlchemy's pools do.
    with old_pool.connect() as raw:
        raw.cursor().execute("SELECT 1")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_dispose_close_false_in_a_forked_child(make_engine: Any, dsn: str) -> None:
    engine, app = make_engine(pool_size=1, max_overflow=0)
    with engine.connect() as c:
        parent_pid = c.execute(text("SELECT pg_backend_pid()")).scalar()
    r, w = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            engine.dispose(close=False)
            with engine.connect() as c:
                pid = c.execute(text("SELECT pg_backend_pid()")).scalar()
            os.write(w, str(pid).encode())
            engine.dispose()
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    _, status = os.waitpid(child, 0)
    child_backend = int(os.read(r, 100) or b"0")
    os.close(r)
    assert status == 0 and child_backend not in (0, parent_pid)
    # The parent's connection survived the child, untouched.
    with engine.connect() as c:
        assert c.execute(text("SELECT pg_backend_pid()")).scalar() == parent_pid
    wait_for(lambda: backend_pids(dsn, app) == {parent_pid})


def test_disconnect_invalidates_and_recovers(make_engine: Any, admin: Any, dsn: str) -> None:
    engine, app = make_engine(pool_size=3, max_overflow=0)
    conns = [engine.connect() for _ in range(3)]
    for c in conns:
        c.execute(text("SELECT 1"))
        c.close()
    assert admin.terminate_backends(app) == 3
    with pytest.raises(exc.OperationalError) as info, engine.connect() as c:
        # psycopg notices only on use; greenpool's checkout ping skips connections used
        # within check_idle_after, so this one is handed out and fails once.
        c.execute(text("SELECT 1"))
    assert info.value.connection_invalidated
    for _ in range(5):  # the pool was invalidated: no further errors
        with engine.connect() as c:
            assert c.execute(text("SELECT 1")).scalar() == 1
    assert 1 <= len(backend_pids(dsn, app)) <= 3


def test_pre_ping_hides_dead_connections(make_engine: Any, admin: Any, dsn: str) -> None:
    engine, app = make_engine(pool_size=2, max_overflow=0, pool_pre_ping=True)
    for _ in range(2):
        with engine.connect() as c:
            c.execute(text("SELECT 1"))
    admin.terminate_backends(app)
    for _ in range(4):
        with engine.connect() as c:
            assert c.execute(text("SELECT 1")).scalar() == 1
    assert 1 <= len(backend_pids(dsn, app)) <= 2


def test_recycle_retires_old_connections(make_engine: Any, dsn: str) -> None:
    engine, app = make_engine(pool_size=1, max_overflow=0, pool_recycle=1)
    assert engine.pool.greenpool.settings.max_lifetime == 1.0
    with engine.connect() as c:
        first = c.execute(text("SELECT pg_backend_pid()")).scalar()
    wait_for(lambda: first not in backend_pids(dsn, app), timeout=10)
    with engine.connect() as c:
        assert c.execute(text("SELECT pg_backend_pid()")).scalar() != first


def test_greenpool_settings_pass_through(make_engine: Any) -> None:
    engine, _ = make_engine(
        pool_size=3, max_overflow=2, max_idle=30, health_check_period=7, min_size=0
    )
    s = engine.pool.greenpool.settings
    assert (s.min_size, s.max_size, s.max_idle, s.health_check_period) == (0, 5, 30, 7)
    assert engine.pool.recreate().greenpool.settings.health_check_period == 7


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_overflow": -1}, "max_overflow: must not be negative"),
        ({"pool_size": 0, "max_overflow": 0}, "pool_size + max_overflow"),
        ({"pool_size": "10"}, "pool_size: expected a whole number"),
        ({"pool_timeout": -1}, "timeout: must be a non-negative number"),
        ({"max_idle": "soon"}, "max_idle: expected a number of seconds"),
    ],
)
def test_bad_input_names_the_setting(dsn: str, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("+", r"\+")):
        sa.create_engine(sa_url(dsn), poolclass=GreenQueuePool, **kwargs)


def test_unsupported_dialect_is_refused() -> None:
    with pytest.raises(ValueError, match=r"sqlite\+pysqlite dialect is not supported"):
        sa.create_engine("sqlite://", poolclass=GreenQueuePool)


def test_killed_mid_query_cancels_on_the_server(make_engine: Any, admin: Any, dsn: str) -> None:
    engine, app = make_engine(pool_size=2, max_overflow=0)
    started = Event()

    def sleeper() -> None:
        with Session(engine) as session:
            started.set()
            session.execute(text("SELECT pg_sleep(30)"))

    g = gevent.spawn(sleeper)
    assert started.wait(5)
    wait_for(lambda: any("pg_sleep" in q.query for q in admin.active_queries(app)))
    g.kill(timeout=5)
    # SQLAlchemy invalidated the connection; greenpool cancelled the query first, so the
    # backend goes away at once (closing alone leaves it running pg_sleep for 30 s).
    wait_for(lambda: not admin.active_queries(app), timeout=5)
    wait_for(lambda: len(backend_pids(dsn, app)) <= 2, timeout=5)
    with engine.connect() as c:
        assert c.execute(text("SELECT 1")).scalar() == 1
    stats = engine.pool.greenpool.stats()
    assert stats["cancel_count"] == 1 and stats["acquired"] == 0, stats


def test_session_dropped_without_close_is_returned(
    make_engine: Any, dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A Session kept alive only by a reference cycle is returned when the collector runs,
    wherever it runs: here inside the hub, where no I/O is possible. QueuePool's
    finalizer rolls back right there and fails ("Exception during reset or similar"),
    then throws the connection away; GreenQueuePool returns it from a fresh greenlet."""
    engine, app = make_engine(pool_size=2, max_overflow=0, pool_timeout=5)
    invalidated: list[Any] = []
    event.listen(engine, "invalidate", lambda *a: invalidated.append(a))
    pids: list[int] = []

    def leak() -> None:
        session = Session(engine)
        session.info["self"] = session  # a cycle: only the collector frees it
        pids.append(session.execute(text("SELECT pg_backend_pid()")).scalar_one())

    errors: list[str] = []
    gc.disable()
    try:
        for _ in range(2):
            leak()  # each leaves a transaction open on a checked-out connection
        assert engine.pool.checkedout() == 2
        done = Event()

        def collect_in_hub() -> None:
            try:
                gc.collect()
            except BaseException as ex:  # pragma: no cover - the failure being tested
                errors.append(repr(ex))
            done.set()

        with caplog.at_level("ERROR", logger="sqlalchemy.pool"):
            gevent.get_hub().loop.run_callback(collect_in_hub)
            assert done.wait(5)
            wait_for(lambda: engine.pool.checkedout() == 0, timeout=5)
    finally:
        gc.enable()
    assert errors == [] and invalidated == []
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == []
    with engine.connect() as c1, engine.connect() as c2:  # both back, rolled back, reused
        got = {c.execute(text("SELECT pg_backend_pid()")).scalar() for c in (c1, c2)}
        for c in (c1, c2):
            assert c.connection.dbapi_connection.info.transaction_status == 2  # INTRANS now
    assert got == set(pids) == backend_pids(dsn, app)
