"""Operating a pool: tracers, leak detection, credential rotation, dedicated connections,
health warnings. Against the real server."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import gevent
import psycopg
import pytest

from greenpool import GreenPool
from tests.support.pgcluster import APP_PASSWORD, APP_USER, PgCluster
from tests.support.waiting import wait_for

Factory = Callable[..., GreenPool[Any]]


# ---------------------------------------------------------------------------- tracers


@pytest.mark.allow_pool_errors(r"a tracer raised \(ignored\)")
def test_tracers_see_wait_and_hold_times_and_cost_nothing_when_unset(
    make_pool: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    pool = make_pool(min_size=1, max_size=1)
    assert "getconn" not in vars(pool) and "_release" not in vars(pool)  # no override
    seen: list[tuple[str, Any, float]] = []
    remove = pool.add_tracer(
        on_acquire=lambda p, c, s: seen.append(("acquire", c, s)),
        on_release=lambda p, c, s: seen.append(("release", c, s)),
    )
    with pool.connection() as conn:
        gevent.sleep(0.1)
    holder = pool.getconn()
    waiter = gevent.spawn(pool.getconn, 5)
    gevent.sleep(0.1)
    pool.putconn(holder)
    pool.putconn(waiter.get(timeout=5))
    kinds = [k for k, _, _ in seen]
    assert kinds == ["acquire", "release", "acquire", "release", "acquire", "release"]
    assert seen[0][1] is conn and seen[1][2] >= 0.09  # held for the sleep
    assert seen[3][2] >= 0.09  # the holder held it while the waiter waited...
    assert seen[4][2] >= 0.09  # ...and the waiter's wait is its acquire's time
    remove()

    def failing_tracer(pool: Any, conn: Any, seconds: float) -> None:
        raise ZeroDivisionError("a tracer that fails")

    pool.add_tracer(on_acquire=failing_tracer)
    with caplog.at_level(logging.ERROR, logger="greenpool"), pool.connection() as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert "a tracer raised" in caplog.text
    assert len(seen) == 6  # removed tracers are not called


# ---------------------------------------------------------------------------- leaks


def test_a_connection_held_too_long_is_logged_once_with_the_borrowers_stack(
    make_pool: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    pool = make_pool(min_size=1, max_size=2, leak_threshold=0.2)

    def borrower_that_forgets() -> Any:
        return pool.getconn()

    with caplog.at_level(logging.WARNING, logger="greenpool"):
        conn = borrower_that_forgets()
        wait_for(lambda: pool.stats()["leaked_count"] == 1, timeout=5)
        gevent.sleep(0.5)  # two more maintenance passes: still one report
    pool.putconn(conn)
    reports = [r for r in caplog.records if "has been held for" in r.getMessage()]
    assert len(reports) == 1
    assert "borrower_that_forgets" in reports[0].getMessage()
    assert pool.stats()["leaked_count"] == 1


@pytest.mark.parametrize("threshold", [None, 30.0], ids=["detection-off", "detection-on"])
def test_a_dead_borrowers_connection_is_reclaimed(
    make_pool: Factory, admin: Any, threshold: float | None
) -> None:
    pool = make_pool(min_size=0, max_size=1, leak_threshold=threshold)
    held: list[Any] = []

    def forgets() -> None:
        held.append(pool.getconn(timeout=5))  # and returns without putconn

    def killed_while_holding() -> None:
        held.append(pool.getconn(timeout=5))
        gevent.sleep(60)

    gevent.spawn(forgets).get(timeout=5)
    if threshold is None:
        # Without detection the connection is lost until restart: nobody can borrow.
        with pytest.raises(Exception, match="no connection available"):
            pool.getconn(timeout=0.3)
        assert pool.stats()["acquired"] == 1
        return
    wait_for(lambda: pool.stats()["reclaimed_count"] == 1, timeout=5)
    with pool.connection(timeout=5) as conn:  # a replacement serves the next borrower
        assert conn is not held[0]
    g = gevent.spawn(killed_while_holding)
    wait_for(lambda: len(held) == 2, timeout=5)
    g.kill()
    wait_for(lambda: pool.stats()["reclaimed_count"] == 2, timeout=5)
    assert held[1].closed  # closed, never lent again
    wait_for(lambda: admin.backend_count(pool.name) <= 1, timeout=5)
    with pool.connection(timeout=5) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


# ---------------------------------------------------------------------------- credentials


def test_rotated_credentials_take_effect_without_a_restart(
    pg_cluster: PgCluster | None, make_pool: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    if pg_cluster is None:
        pytest.skip("needs the private cluster's roles")
    source = {"password": APP_PASSWORD}

    def before_connect(kwargs: dict[str, Any]) -> None:
        kwargs["password"] = source["password"]  # e.g. a fresh IAM token or Vault secret

    pool = make_pool(
        pg_cluster.dsn(user=APP_USER), min_size=2, max_size=3, before_connect=before_connect
    )
    pool.wait(10)
    old_pids = set()
    with pool.connection() as a, pool.connection() as b:
        old_pids = {a.info.backend_pid, b.info.backend_pid}
    rotated = "r0tated-Zq7x-secret"
    caplog.set_level(logging.DEBUG)
    with psycopg.connect(pg_cluster.admin_dsn, autocommit=True) as admin_conn:
        admin_conn.execute(f"ALTER ROLE {APP_USER} PASSWORD '{rotated}'")
    try:
        source["password"] = rotated
        pool.drain(timeout=10)  # existing connections retire; new ones use the new secret
        with pool.connection() as conn:
            assert conn.info.backend_pid not in old_pids
            assert conn.execute("SELECT current_user").fetchone() == (APP_USER,)
        source["password"] = "wrong-Zq7x-secret"
        with pytest.raises(Exception) as info:
            pool.drain(timeout=5)
        assert "wrong-Zq7x-secret" not in str(info.value)
        texts = [caplog.text, repr(pool), str(pool.stats())]
        assert not any(s in t for t in texts for s in (rotated, "wrong-Zq7x-secret"))
    finally:
        with psycopg.connect(pg_cluster.admin_dsn, autocommit=True) as admin_conn:
            admin_conn.execute(f"ALTER ROLE {APP_USER} PASSWORD '{APP_PASSWORD}'")


# ---------------------------------------------------------------------------- dedicated


def test_dedicated_connections_use_the_pools_settings_outside_the_pool(
    pg_cluster: PgCluster | None, make_pool: Factory
) -> None:
    if pg_cluster is None:
        pytest.skip("needs the private cluster's roles")
    dsn = pg_cluster.dsn(user=APP_USER, password=APP_PASSWORD) + " pool_max_conns=2"

    def configure(conn: Any) -> None:
        conn.execute("SET work_mem = '7MB'")
        conn.commit()

    pool = make_pool(dsn, min_size=1, configure=configure)
    assert APP_PASSWORD not in repr(pool.conninfo)
    assert "pool_max_conns" not in str(pool.conninfo)
    pool.wait(10)
    listener = pool.connect_dedicated()
    try:
        assert pool.stats()["total"] == 1  # not counted by the pool...
        wait_for(lambda: pg_cluster.backend_count(pool.name) == 2, timeout=5)  # ...but real
        assert listener.execute("SHOW work_mem").fetchone() == ("7MB",)
        name = listener.execute("SELECT current_setting('application_name')").fetchone()
        assert name == (pool.name,)
        listener.rollback()
        listener.autocommit = True
        listener.execute("LISTEN gp_dedicated")
        with pool.connection() as conn:
            conn.execute("NOTIFY gp_dedicated, 'hello'")
        note = next(listener.notifies(timeout=5))
        assert note.payload == "hello"
    finally:
        listener.close()
    with pytest.raises(Exception, match="dedicated connection failed"):
        make_pool(dsn.replace(f"port={pg_cluster.port}", "port=1"), open=False).connect_dedicated(2)


# ---------------------------------------------------------------------------- alerts


def test_saturation_warns_and_exhaustion_errors_once_a_minute(
    make_pool: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    pool = make_pool(min_size=1, max_size=1, saturation_warning_after=0.2)
    with caplog.at_level(logging.WARNING, logger="greenpool"):
        held = pool.getconn()
        wait_for(lambda: "of max_size in use" in caplog.text, timeout=5)
        for _ in range(3):
            with pytest.raises(Exception, match="no connection available"):
                pool.getconn(timeout=0.05)
        wait_for(lambda: "is exhausted" in caplog.text, timeout=5)
        gevent.sleep(1.2)  # more passes: rate-limited
        pool.putconn(held)
    assert caplog.text.count("of max_size in use") == 1
    assert caplog.text.count("is exhausted") == 1
