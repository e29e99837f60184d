"""The Flask extension against a real PostgreSQL: per-request connections, commit and
rollback, release, 503 on exhaustion, named databases, stats endpoints."""

from __future__ import annotations

import contextvars
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import gevent
import psycopg
import pytest
from flask import Flask, abort, copy_current_request_context
from prometheus_client.parser import text_string_to_metric_families

from greenpool import CooperationError, PoolError
from greenpool.api import GreenPool as CorePool
from greenpool.flask import GreenPool, stats_blueprint
from tests.support.waiting import wait_for

TABLE = "flask_test_items"
MakeApp = Callable[..., tuple[Flask, GreenPool]]


@pytest.fixture(scope="module")
def table(dsn: str) -> str:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} (id serial PRIMARY KEY, tag text)")
        conn.execute(
            "CREATE TABLE IF NOT EXISTS flask_test_deferred "
            "(x int UNIQUE DEFERRABLE INITIALLY DEFERRED)"
        )
    return TABLE


def rows_tagged(dsn: str, tag: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(f"SELECT count(*) FROM {TABLE} WHERE tag = %s", (tag,)).fetchone()
        assert row is not None
        return int(row[0])


def build_app(db: GreenPool, dsn: str, **config: Any) -> Flask:
    app = Flask("flasktest")
    app.config.update(
        GREENPOOL_CONNINFO=dsn,
        GREENPOOL_NAME=f"gpf-{uuid.uuid4().hex[:8]}",
        GREENPOOL_MIN_SIZE=0,
        GREENPOOL_MAX_SIZE=2,
        GREENPOOL_TIMEOUT=5,
    )
    app.config.update(config)
    db.init_app(app)
    app.register_blueprint(stats_blueprint(public=True), url_prefix="/_greenpool")

    @app.get("/nodb")
    def nodb() -> Any:
        return {"ok": True}

    @app.get("/db")
    def use_db() -> Any:
        with db.conn.cursor() as cur:
            cur.execute("SELECT current_setting('application_name')")
            return {"app": cur.fetchone()[0]}

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

    @app.post("/insert-then-409/<tag>")
    def insert_then_409(tag: str) -> Any:
        with db.conn.cursor() as cur:
            cur.execute(f"INSERT INTO {TABLE} (tag) VALUES (%s)", (tag,))
        abort(409)

    return app


@pytest.fixture
def make_app(dsn: str, table: str) -> Iterator[MakeApp]:
    made: list[tuple[Flask, GreenPool]] = []

    def factory(**config: Any) -> tuple[Flask, GreenPool]:
        db = GreenPool()
        app = build_app(db, config.pop("conninfo", dsn), **config)
        made.append((app, db))
        return app, db

    yield factory
    for app, db in made:
        db.close(timeout=1, app=app)


def stats(app: Flask, name: str = "default") -> dict[str, Any]:
    result: dict[str, Any] = app.extensions["greenpool"].snapshot()["databases"][name]
    return result


# ---------------------------------------------------------------------------- lazy


def test_request_without_database_never_acquires(make_app: MakeApp) -> None:
    app, _db = make_app()
    client = app.test_client()
    assert client.get("/nodb").status_code == 200
    assert stats(app)["started"] is False  # not even a pool yet

    assert client.get("/db").status_code == 200
    before = stats(app)["acquire_count"]
    assert before == 1
    for _ in range(3):
        assert client.get("/nodb").status_code == 200
    assert stats(app)["acquire_count"] == before
    assert stats(app)["acquired"] == 0


def test_connection_is_reused_within_a_request(make_app: MakeApp) -> None:
    app, db = make_app()
    with app.test_request_context():
        assert db.conn is db.conn
        assert db.get_conn() is db.conn
        assert stats(app)["acquire_count"] == 1
        app.do_teardown_request()
    assert stats(app)["returns_count"] == 1


# ---------------------------------------------------------------------------- commit


def test_commit_on_success(make_app: MakeApp, dsn: str) -> None:
    app, _db = make_app()
    tag = uuid.uuid4().hex
    assert app.test_client().post(f"/insert/{tag}").status_code == 200
    assert rows_tagged(dsn, tag) == 1
    assert stats(app)["acquired"] == 0


def test_rollback_when_the_view_raises(make_app: MakeApp, dsn: str) -> None:
    app, _db = make_app()
    tag = uuid.uuid4().hex
    assert app.test_client().post(f"/insert-then-fail/{tag}").status_code == 500
    assert rows_tagged(dsn, tag) == 0
    assert stats(app)["acquired"] == 0


def test_rollback_on_error_status(make_app: MakeApp, dsn: str) -> None:
    app, _db = make_app()
    tag = uuid.uuid4().hex
    assert app.test_client().post(f"/insert-then-409/{tag}").status_code == 409
    assert rows_tagged(dsn, tag) == 0


def test_commit_on_success_disabled(make_app: MakeApp, dsn: str) -> None:
    app, db = make_app(GREENPOOL_COMMIT_ON_SUCCESS=False)

    @app.post("/explicit/<tag>")
    def explicit(tag: str) -> Any:
        with db.conn.cursor() as cur:
            cur.execute(f"INSERT INTO {TABLE} (tag) VALUES (%s)", (tag,))
        db.conn.commit()
        return {"ok": True}

    tag, tag2 = uuid.uuid4().hex, uuid.uuid4().hex
    assert app.test_client().post(f"/insert/{tag}").status_code == 200
    assert rows_tagged(dsn, tag) == 0
    assert app.test_client().post(f"/explicit/{tag2}").status_code == 200
    assert rows_tagged(dsn, tag2) == 1


def test_failing_commit_becomes_a_500(make_app: MakeApp) -> None:
    app, db = make_app()

    @app.post("/deferred")
    def deferred() -> Any:
        with db.conn.cursor() as cur:
            cur.execute("INSERT INTO flask_test_deferred VALUES (1), (1)")  # checked at COMMIT
        return {"ok": True}

    response = app.test_client().post("/deferred")
    assert response.status_code == 500
    assert stats(app)["acquired"] == 0


# ---------------------------------------------------------------------------- release


def test_released_exactly_once_when_teardown_runs_twice(make_app: MakeApp) -> None:
    app, db = make_app()
    with app.test_request_context():
        db.conn.execute("SELECT 1")
        app.do_teardown_request()
        app.do_teardown_request()
    # the context's own teardown ran a third time on leaving the block
    s = stats(app)
    assert (s["acquire_count"], s["returns_count"], s["acquired"]) == (1, 1, 0)


def test_teardown_never_raises(make_app: MakeApp, caplog: pytest.LogCaptureFixture) -> None:
    app, db = make_app()

    @app.get("/misuse")
    def misuse() -> Any:
        db.get_pool().putconn(db.conn)  # the app gives it back itself: teardown's fails
        return {"ok": True}

    with caplog.at_level(logging.ERROR, logger="greenpool.flask"):
        response = app.test_client().get("/misuse")
    assert response.status_code == 200
    assert "releasing the request's connection" in caplog.text
    assert stats(app)["acquired"] == 0
    assert app.test_client().get("/db").status_code == 200


def test_db_conn_needs_a_request(make_app: MakeApp, dsn: str) -> None:
    app, db = make_app()
    with app.app_context():
        with pytest.raises(RuntimeError, match=r"db\.connection\(\)"):
            _ = db.conn
        tag = uuid.uuid4().hex
        with db.connection() as conn:  # the way for CLI commands and jobs
            conn.execute(f"INSERT INTO {TABLE} (tag) VALUES (%s)", (tag,))
    assert rows_tagged(dsn, tag) == 1
    with db.connection(app=app) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_spawned_greenlets_use_their_own_connection(make_app: MakeApp) -> None:
    app, db = make_app()
    outcome: dict[str, Any] = {}

    @app.get("/spawn")
    def spawn() -> Any:
        mine = db.conn
        app_obj = app

        def job() -> None:
            with app_obj.test_request_context():
                pass
            try:
                with app_obj.app_context(), db.connection() as conn:
                    outcome["other"] = conn is not mine
            except Exception as ex:  # pragma: no cover - reported below
                outcome["error"] = ex

        gevent.spawn(job).join(5)
        return {"ok": True}

    assert app.test_client().get("/spawn").status_code == 200
    assert outcome == {"other": True}
    assert stats(app)["acquired"] == 0


def test_request_connection_refused_to_other_greenlets(make_app: MakeApp) -> None:
    app, db = make_app()
    seen: dict[str, Any] = {}

    @app.get("/leak")
    def leak() -> Any:
        _ = db.conn

        @copy_current_request_context
        def copied() -> Any:
            return db.conn  # its own g, no after_request: writes would be lost

        shared = contextvars.copy_context()  # the very same g

        for label, job in (("copied", copied), ("shared", lambda: shared.run(db.get_conn))):
            try:
                gevent.spawn(job).get(timeout=5)
            except RuntimeError as ex:
                seen[label] = str(ex)
        return {"ok": True}

    assert app.test_client().get("/leak").status_code == 200
    assert set(seen) == {"copied", "shared"}
    assert all("db.connection()" in message for message in seen.values())
    assert stats(app)["acquired"] == 0
    assert stats(app)["acquire_count"] == 1


# ---------------------------------------------------------------------------- 503


def test_pool_timeout_becomes_503(make_app: MakeApp, caplog: pytest.LogCaptureFixture) -> None:
    app, db = make_app(GREENPOOL_MAX_SIZE=1, GREENPOOL_TIMEOUT=0.2, GREENPOOL_RETRY_AFTER=7)
    pool = db.get_pool(app=app)
    held = pool.getconn()
    try:
        client = app.test_client()
        with caplog.at_level(logging.WARNING, logger="greenpool.flask"):
            start = time.monotonic()
            response = client.get("/db")
            elapsed = time.monotonic() - start
        assert response.status_code == 503
        assert response.headers["Retry-After"] == "7"
        assert elapsed < 3
        assert "acquired=1" in caplog.text and "503" in caplog.text
        as_json = client.get("/db", headers={"Accept": "application/json"})
        assert as_json.status_code == 503
        assert as_json.json == {
            "error": "service_unavailable",
            "message": "The database is busy; please retry shortly.",
        }
        assert client.get("/nodb").status_code == 200  # no database, no waiting
    finally:
        pool.putconn(held)
    assert app.test_client().get("/db").status_code == 200
    assert stats(app)["timeout_count"] == 2


def test_full_wait_queue_becomes_503(make_app: MakeApp) -> None:
    app, db = make_app(GREENPOOL_MAX_SIZE=1, GREENPOOL_TIMEOUT=5, GREENPOOL_MAX_WAITING=1)
    pool = db.get_pool(app=app)
    held = pool.getconn()
    waiter = gevent.spawn(app.test_client().get, "/db")
    try:
        wait_for(lambda: pool.stats()["waiting"] == 1)
        response = app.test_client().get("/db")
        assert response.status_code == 503
        assert "Retry-After" in response.headers
    finally:
        pool.putconn(held)
    assert waiter.get(timeout=5).status_code == 200
    assert stats(app)["too_many_requests_count"] == 1


def test_exhaustion_handler_can_be_disabled(make_app: MakeApp) -> None:
    app, db = make_app(
        GREENPOOL_MAX_SIZE=1, GREENPOOL_TIMEOUT=0.1, GREENPOOL_HANDLE_EXHAUSTION=False
    )
    pool = db.get_pool(app=app)
    held = pool.getconn()
    try:
        assert app.test_client().get("/db").status_code == 500
    finally:
        pool.putconn(held)


# ---------------------------------------------------------------------------- binds


def test_named_databases_have_their_own_pools(make_app: MakeApp, dsn: str) -> None:
    app, db = make_app(GREENPOOL_BINDS={"reporting": {"conninfo": dsn, "max_size": 1}})
    name = app.config["GREENPOOL_NAME"]

    @app.get("/both")
    def both() -> Any:
        main = db.conn.execute("SELECT current_setting('application_name')").fetchone()
        rep = db.get_conn("reporting").execute("SELECT current_setting('application_name')")
        return {"main": main[0], "reporting": rep.fetchone()[0]}

    assert app.test_client().get("/both").json == {
        "main": name,
        "reporting": f"{name}-reporting",
    }
    snapshot = app.extensions["greenpool"].snapshot()["databases"]
    assert snapshot["default"]["acquire_count"] == 1
    assert snapshot["reporting"]["acquire_count"] == 1
    assert snapshot["reporting"]["max_size"] == 1
    assert db.get_pool("reporting", app=app) is not db.get_pool(app=app)
    with app.app_context(), pytest.raises(KeyError, match="'nope' is not configured"):
        db.get_pool("nope")


# ---------------------------------------------------------------------------- process


def test_forked_child_serves_with_its_own_connections(make_app: MakeApp) -> None:
    """A real fork after the app's pool started: the child's requests use new backends,
    and the parent's sessions survive the child (nothing was closed or sent on them)."""
    import os

    app, db = make_app()

    @app.get("/pid")
    def pid() -> Any:
        return {"pid": db.conn.info.backend_pid}

    client = app.test_client()
    parent_backend = client.get("/pid").json["pid"]  # type: ignore[index]
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # the child: one request, report its backend, exit without cleanup
        try:
            os.close(read_end)
            response = app.test_client().get("/pid")
            body = response.json if response.status_code == 200 else None
            os.write(write_end, str(body["pid"] if body else -response.status_code).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    _, status = os.waitpid(child, 0)
    with os.fdopen(read_end) as pipe:
        child_backend = int(pipe.read() or -2)
    assert status == 0
    assert child_backend > 0 and child_backend != parent_backend
    # The parent's idle connection is the same session, still working.
    assert client.get("/pid").json["pid"] == parent_backend  # type: ignore[index]


def test_pools_belong_to_one_thread(make_app: MakeApp) -> None:
    app, db = make_app()
    db.get_pool(app=app)
    threadpool = gevent.get_hub().threadpool
    with pytest.raises(PoolError, match="not thread-safe"):
        threadpool.apply(db.get_pool, kwds={"app": app})


def test_uncooperative_driver_refused_or_warned(
    make_app: MakeApp,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def blocked(self: CorePool) -> None:
        raise CooperationError("psycopg was imported before gevent patched select")

    monkeypatch.setattr(CorePool, "check_cooperation", blocked)
    strict, strict_db = make_app(GREENPOOL_REQUIRE_COOPERATION=True)
    with pytest.raises(CooperationError, match="refuses to serve"):
        strict_db.get_pool(app=strict)
    assert strict.test_client().get("/db").status_code == 500
    assert strict.test_client().get("/nodb").status_code == 200

    lenient, _lenient_db = make_app(GREENPOOL_REQUIRE_COOPERATION=False)
    with caplog.at_level(logging.WARNING, logger="greenpool.flask"):
        assert lenient.test_client().get("/db").status_code == 200
    assert "will block while it waits" in caplog.text

    auto, auto_db = make_app()  # auto: gevent is patched here, so it is required
    with pytest.raises(CooperationError):
        auto_db.get_pool(app=auto)


def test_close_then_reuse(make_app: MakeApp) -> None:
    app, db = make_app()
    first = db.get_pool(app=app)
    db.close(app=app)
    assert first.closed
    assert stats(app)["started"] is False
    assert app.test_client().get("/db").status_code == 200
    assert db.get_pool(app=app) is not first


# ---------------------------------------------------------------------------- stats


def test_stats_json_and_prometheus(make_app: MakeApp) -> None:
    app, _db = make_app()
    client = app.test_client()
    before = client.get("/_greenpool/stats").json
    assert before is not None
    assert before["databases"]["default"]["started"] is False
    assert client.get("/_greenpool/metrics").status_code == 200
    for _ in range(3):
        client.get("/db")

    body = client.get("/_greenpool/stats").json
    assert body is not None
    default = body["databases"]["default"]
    assert body["pid"] > 0
    assert default["started"] is True
    assert default["acquire_count"] == 3
    assert default["peak_acquired"] == 1
    assert default["pool"] == app.config["GREENPOOL_NAME"]
    assert "password" not in str(body)

    response = client.get("/_greenpool/metrics")
    assert response.status_code == 200
    assert response.mimetype == "text/plain"
    samples = {
        (s.name, s.labels.get("reason")): s
        for family in text_string_to_metric_families(response.get_data(as_text=True))
        for s in family.samples
    }
    acquires = samples[("greenpool_acquires_total", None)]
    assert acquires.value == 3
    assert acquires.labels["database"] == "default"
    assert acquires.labels["pool"] == app.config["GREENPOOL_NAME"]
    assert samples[("greenpool_max_size", None)].value == 2
    assert samples[("greenpool_connections_closed_total", "broken")].value == 0
    assert ("greenpool_acquire_waited_seconds_total", None) in samples
