"""psycopg2 through the scenarios that tests elsewhere run with psycopg 3: reset policies
(what the next borrower of the same backend sees), the Flask extension with
``GREENPOOL_DRIVER``, and a real ``os.fork()`` of a Flask app after its pool started
(both drivers), checked against every parent backend on the server.

Health checks, black-hole connects and the core pool's fork run both drivers in
``test_pool_real.py`` and ``test_faults.py``.
"""

from __future__ import annotations

import gc
import os
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import psycopg2
import psycopg2.extensions
import pytest
from flask import Flask

from greenpool import GreenPool
from greenpool.drivers import ConnState, get_driver
from greenpool.flask import GreenPool as FlaskGreenPool
from tests.support.invariants import backend_starts, settled
from tests.support.pgcluster import APP_USER
from tests.support.server import Server
from tests.support.sessionprobe import PROBE_FIELDS, probe_sql
from tests.support.waiting import wait_for

Factory = Callable[..., GreenPool[Any]]
DRIVERS = ["psycopg", "psycopg2"]

# --------------------------------------------------------------------------- reset policies

PROBE = probe_sql()
FIELDS = PROBE_FIELDS
LEAKED = (APP_USER, "tenant-1", True, 1, 1, 1, 1)
# What the next borrower of the same backend sees, per policy ("default": none given);
# the same table as RELIABILITY.md's, which test_security.py checks for psycopg 3.
EXPECTED: dict[str | None, tuple[str, str, bool, int, int, int, int]] = {
    None: LEAKED,
    "client": LEAKED,
    "light": ("postgres", "", True, 1, 0, 0, 0),
    "session": ("postgres", "", False, 1, 0, 0, 0),
    "discard": ("postgres", "", False, 0, 0, 0, 0),
    "default": ("postgres", "", False, 1, 0, 0, 0),
}


def run(conn: Any, sql: str) -> list[Any]:
    with conn.cursor() as cur:
        cur.execute(sql)
        return list(cur.fetchall()) if cur.description else []


def leave_session_state(conn: Any) -> int:
    """Everything a borrower can leave on its session; returns the backend pid."""
    for sql in (
        f"SET ROLE {APP_USER}",
        "CREATE TEMP TABLE gp_private (secret text)",
        "INSERT INTO gp_private VALUES ('tenant-1 data')",
        "PREPARE gp_stmt AS SELECT secret FROM gp_private",
        "SELECT pg_advisory_lock(4242)",
        "LISTEN gp_channel",
        "DECLARE gp_cursor CURSOR WITH HOLD FOR SELECT 1",
        "SET app.tenant = 'tenant-1'",
    ):
        run(conn, sql)
    return int(conn.info.backend_pid)


@pytest.mark.parametrize("policy", list(EXPECTED), ids=[str(p).lower() for p in EXPECTED])
def test_session_state_seen_by_the_next_borrower(make_pool: Factory, policy: str | None) -> None:
    kw: dict[str, Any] = {} if policy == "default" else {"reset": policy}
    pool = make_pool(min_size=1, max_size=1, driver="psycopg2", **kw)
    with pool.connection() as conn:  # committed: the SETs, LISTEN and cursor persist
        assert isinstance(conn, psycopg2.extensions.connection)
        pid = leave_session_state(conn)
    with pool.connection() as conn:
        row = run(conn, PROBE)[0]
    assert row[0] == pid, "not the same backend: the test proves nothing"
    seen = (row[1], row[2], bool(row[3]), row[4], row[5], row[6], row[7])
    assert seen == EXPECTED[policy], dict(zip(FIELDS, seen, strict=True))


@pytest.mark.parametrize("policy", [None, "client", "session"])
def test_client_side_attributes_are_restored_unless_reset_is_none(
    make_pool: Factory, policy: str | None
) -> None:
    pool = make_pool(min_size=1, max_size=1, driver="psycopg2", reset=policy)
    conn = pool.getconn()
    pid = conn.info.backend_pid
    conn.autocommit = True
    conn.readonly = True
    conn.isolation_level = psycopg2.extensions.ISOLATION_LEVEL_SERIALIZABLE
    pool.putconn(conn)
    conn = pool.getconn()
    assert conn.info.backend_pid == pid, "not the same connection: the test proves nothing"
    seen = (conn.autocommit, conn.readonly, conn.isolation_level)
    pool.putconn(conn)
    if policy is None:
        assert seen == (True, True, psycopg2.extensions.ISOLATION_LEVEL_SERIALIZABLE)
    else:
        assert seen == (False, None, None)


# --------------------------------------------------------------------------- Flask

TABLE = "psycopg2_flask_items"


@pytest.fixture(scope="module")
def table(dsn: str) -> str:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} (id serial PRIMARY KEY, tag text)")
    return TABLE


def tagged(dsn: str, tag: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(f"SELECT count(*) FROM {TABLE} WHERE tag = %s", (tag,)).fetchone()
        assert row is not None
        return int(row[0])


@pytest.fixture
def flask_app(dsn: str, table: str) -> Iterator[Callable[..., tuple[Flask, Any]]]:
    made: list[tuple[Flask, Any]] = []

    def factory(driver: str, **config: Any) -> tuple[Flask, Any]:
        app = Flask("psycopg2test")
        app.config.update(
            GREENPOOL_CONNINFO=dsn,
            GREENPOOL_DRIVER=driver,
            GREENPOOL_NAME=f"gpf2-{uuid.uuid4().hex[:8]}",
            GREENPOOL_MIN_SIZE=0,
            GREENPOOL_MAX_SIZE=2,
            GREENPOOL_TIMEOUT=5,
        )
        app.config.update(config)
        db: Any = FlaskGreenPool()  # init_app turns it into the app's Flask handle
        db.init_app(app)

        @app.get("/pid")
        def pid() -> Any:
            return {"pid": db.conn.info.backend_pid, "module": type(db.conn).__module__}

        @app.post("/insert/<tag>")
        def insert(tag: str) -> Any:
            with db.conn.cursor() as cur:
                cur.execute(f"INSERT INTO {TABLE} (tag) VALUES (%s)", (tag,))
            return {"ok": True}

        @app.post("/insert-then-fail/<tag>")
        def insert_then_fail(tag: str) -> Any:
            with db.conn.cursor() as cur:
                cur.execute(f"INSERT INTO {TABLE} (tag) VALUES (%s)", (tag,))
            raise RuntimeError("boom")

        made.append((app, db))
        return app, db

    yield factory
    for app, db in made:
        db.close(timeout=1, app=app)


def test_flask_with_the_psycopg2_driver(
    flask_app: Callable[..., tuple[Flask, Any]], dsn: str
) -> None:
    app, db = flask_app("psycopg2", GREENPOOL_MAX_SIZE=1, GREENPOOL_TIMEOUT=0.2)
    client = app.test_client()
    body = client.get("/pid").json
    assert body is not None and body["module"].startswith("psycopg2"), body
    committed, rolled_back = uuid.uuid4().hex, uuid.uuid4().hex
    assert client.post(f"/insert/{committed}").status_code == 200
    assert client.post(f"/insert-then-fail/{rolled_back}").status_code == 500
    assert (tagged(dsn, committed), tagged(dsn, rolled_back)) == (1, 0)
    pool = db.get_pool(app=app)
    held = pool.getconn()
    try:
        assert client.get("/pid").status_code == 503  # exhausted: 503, not a hang
    finally:
        pool.putconn(held)
    stats = pool.stats()
    assert stats["acquired"] == 0 and stats["rollback_count"] >= 1, stats
    assert stats["timeout_count"] == 1, stats


@pytest.mark.parametrize("driver", DRIVERS)
def test_forked_flask_app_never_touches_a_parent_backend(
    flask_app: Callable[..., tuple[Flask, Any]], admin: Server, driver: str
) -> None:
    """A real os.fork() of a Flask app whose pool has started (as gunicorn --preload
    would, had the app served before forking): the child serves with backends of its own
    and every parent session survives it, the same pid and backend_start, working."""
    app, db = flask_app(driver, GREENPOOL_MIN_SIZE=2, GREENPOOL_MAX_SIZE=3)
    client = app.test_client()
    body = client.get("/pid").json
    assert body is not None
    pool = db.get_pool(app=app)
    pool.wait(10)
    lent = pool.getconn()  # one lent, one idle: both must survive the child
    parent = backend_starts(admin, pool.name)
    assert len(parent) == 2 and lent.info.backend_pid in parent, parent
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        try:
            os.close(read_end)
            response = app.test_client().get("/pid")
            answer = response.json if response.status_code == 200 else None
            got = answer["pid"] if answer else -response.status_code
            lent.close()  # what a careless child, or a finaliser, does with it
            db.close(app=app)
            gc.collect()
            os.write(write_end, str(got).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    _, status = os.waitpid(child, 0)
    with os.fdopen(read_end) as pipe:
        child_backend = int(pipe.read() or -1)
    assert os.waitstatus_to_exitcode(status) == 0
    assert child_backend > 0 and child_backend not in parent, (child_backend, parent)
    wait_for(
        lambda: backend_starts(admin, pool.name) == parent,
        10,
        what="the server to show exactly the parent's sessions",
    )
    assert run(lent, "SELECT 1") == [(1,)], "the child broke the lent connection"
    pool.putconn(lent)
    conns = [pool.getconn(timeout=10) for _ in range(2)]
    assert {c.info.backend_pid for c in conns} == set(parent)
    for conn in conns:
        assert run(conn, "SELECT 1") == [(1,)], "the child broke an idle connection"
        pool.putconn(conn)
    served = client.get("/pid").json
    assert served is not None and served["pid"] in parent, served
    settled(pool, admin)


# --------------------------------------------------------------------------- driver.execute


@pytest.mark.parametrize("driver", DRIVERS)
def test_driver_execute_runs_every_statement_and_raises_the_servers_error(
    dsn: str, driver: str
) -> None:
    """execute() (the reset's path; psycopg 3 skips the cursor) runs a multi-statement
    string in one go, leaves the connection idle with its autocommit untouched, raises the
    server's error as the driver's own exception, and refuses a connection mid-transaction
    as the driver does, instead of running the statements inside that transaction."""
    drv = get_driver(driver)
    drv.prepare()
    conn = drv.connect(dsn, {}, 10.0)
    try:
        drv.execute(conn, "SET work_mem = '7MB'; SET statement_timeout = '7s'")
        assert drv.query(conn, "SHOW work_mem") == [("7MB",)]
        assert drv.query(conn, "SHOW statement_timeout") == [("7s",)]
        assert conn.autocommit is False and drv.state(conn) is ConnState.IDLE
        drv.execute(conn, "RESET ALL; SET work_mem = '8MB'")
        assert drv.query(conn, "SHOW work_mem") == [("8MB",)]
        with pytest.raises(Exception, match="division by zero") as info:
            drv.execute(conn, "SELECT 1; SELECT 1/0; SET work_mem = '9MB'")
        assert type(info.value).__module__.split(".")[0] == driver
        assert drv.state(conn) is ConnState.IDLE
        assert drv.query(conn, "SHOW work_mem") == [("8MB",)]  # the implicit block rolled back
        drv.ping(conn)
        cur = conn.cursor()
        cur.execute("SELECT 1")
        assert drv.state(conn) is ConnState.IN_TRANSACTION
        with pytest.raises(Exception, match=r"autocommit|inside a transaction"):
            drv.execute(conn, "SET work_mem = '9MB'")
        conn.rollback()
        assert drv.query(conn, "SHOW work_mem") == [("8MB",)]
    finally:
        drv.close(conn)
