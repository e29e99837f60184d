"""The Flask extension as an attacker and a careless user would use it.

Each test here failed on the code before the security review's fixes: session state of
one request reaching the next (the default now resets it), a leaked client attribute
committing a failed request, connections held by streamed responses, an unprotected
stats endpoint, NaN timeouts, configuration values echoed in errors.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import gevent
import gevent.event
import psycopg
import pytest
from flask import Flask, Response, abort, stream_with_context

import greenpool
from greenpool import GreenPool
from greenpool.flask import ConfigError, close_all_pools, stats_blueprint
from tests.support.pgcluster import APP_PASSWORD, APP_USER, PgCluster

SECRET_ROW = "tenant-a-private"


@pytest.fixture(scope="module")
def tenant_schema(pg_cluster: PgCluster | None, dsn: str) -> str:
    """A row-level-security table readable by the app role, per app.tenant; a role whose
    table nobody else may read. Returns the app role's DSN (not a superuser: RLS binds)."""
    if pg_cluster is None:
        pytest.skip("needs the private cluster's roles (GREENPOOL_TEST_DSN is set)")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            """
            DROP TABLE IF EXISTS gp_tenant_rows, gp_role_private;
            DO $$BEGIN
              IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'gp_tenant_a') THEN
                CREATE ROLE gp_tenant_a;
              END IF;
            END$$;
            CREATE TABLE gp_tenant_rows (tenant text, secret text);
            INSERT INTO gp_tenant_rows VALUES ('A', 'tenant-a-private'), ('B', 'tenant-b');
            ALTER TABLE gp_tenant_rows ENABLE ROW LEVEL SECURITY;
            CREATE POLICY by_tenant ON gp_tenant_rows
              USING (tenant = current_setting('app.tenant', true));
            GRANT SELECT ON gp_tenant_rows TO PUBLIC;
            CREATE TABLE gp_role_private (secret text);
            INSERT INTO gp_role_private VALUES ('tenant-a-private');
            REVOKE ALL ON gp_role_private FROM PUBLIC;
            GRANT SELECT ON gp_role_private TO gp_tenant_a;
            CREATE TABLE IF NOT EXISTS gp_flask_writes (tag text);
            GRANT ALL ON gp_flask_writes TO PUBLIC;
            """
        )
        conn.execute(f"GRANT gp_tenant_a TO {APP_USER}")
    return pg_cluster.dsn(user=APP_USER, password=APP_PASSWORD)


def make(app_dsn: str, **config: Any) -> tuple[Flask, GreenPool[Any]]:
    app = Flask("flasksec")
    app.config.update(
        GREENPOOL_CONNINFO=app_dsn,
        GREENPOOL_NAME=f"gpsec-{uuid.uuid4().hex[:8]}",
        GREENPOOL_MIN_SIZE=1,
        GREENPOOL_MAX_SIZE=1,  # every request gets the same backend
        GREENPOOL_TIMEOUT=5,
    )
    app.config.update(config)
    db: GreenPool[Any] = GreenPool()
    db.init_app(app)

    @app.get("/tenant-a")
    def tenant_a() -> Any:
        db.conn.execute("SELECT set_config('app.tenant', 'A', false)")
        db.conn.execute("SET ROLE gp_tenant_a")
        rows = db.conn.execute("SELECT secret FROM gp_role_private").fetchall()
        return {"rows": [r[0] for r in rows], "pid": db.conn.info.backend_pid}

    @app.get("/anonymous")
    def anonymous() -> Any:
        rls = db.conn.execute("SELECT secret FROM gp_tenant_rows").fetchall()
        user = db.conn.execute("SELECT current_user").fetchone()
        pid = db.conn.info.backend_pid
        return {"rows": [r[0] for r in rls], "user": user and user[0], "pid": pid}

    @app.post("/autocommit")
    def set_autocommit() -> Any:
        db.conn.autocommit = True
        return {"ok": True}

    @app.post("/insert-then-fail/<tag>")
    def insert_then_fail(tag: str) -> Any:
        db.conn.execute("INSERT INTO gp_flask_writes VALUES (%s)", (tag,))
        abort(500)

    return app, db


@pytest.fixture
def apps() -> Iterator[Callable[..., tuple[Flask, GreenPool[Any]]]]:
    made: list[tuple[Flask, GreenPool[Any]]] = []

    def factory(app_dsn: str, **config: Any) -> tuple[Flask, GreenPool[Any]]:
        made.append(make(app_dsn, **config))
        return made[-1]

    yield factory
    for app, db in made:
        db.close(timeout=1, app=app)


@pytest.mark.parametrize("reset", ["default", "none"])
def test_tenant_session_state_never_reaches_the_next_request(
    apps: Callable[..., tuple[Flask, GreenPool[Any]]], tenant_schema: str, reset: str
) -> None:
    config = {} if reset == "default" else {"GREENPOOL_RESET": "none"}
    app, _db = apps(tenant_schema, **config)
    client = app.test_client()
    first = client.get("/tenant-a").json
    assert first is not None and first["rows"] == [SECRET_ROW]
    second = client.get("/anonymous").json
    assert second is not None and second["pid"] == first["pid"], "not the same backend"
    if reset == "default":
        assert (second["rows"], second["user"]) == ([], APP_USER)
    else:  # the opt-out shows what the default prevents
        assert (second["rows"], second["user"]) == ([SECRET_ROW], "gp_tenant_a")


def test_a_leaked_autocommit_does_not_commit_a_failed_request(
    apps: Callable[..., tuple[Flask, GreenPool[Any]]], tenant_schema: str, dsn: str
) -> None:
    app, _db = apps(tenant_schema)
    client = app.test_client()
    tag = uuid.uuid4().hex
    assert client.post("/autocommit").status_code == 200
    assert client.post(f"/insert-then-fail/{tag}").status_code == 500
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM gp_flask_writes WHERE tag = %s", (tag,))
        assert row.fetchone() == (0,), "the failed request's INSERT was committed"


def test_streamed_responses_release_early_and_cannot_borrow_late(
    apps: Callable[..., tuple[Flask, GreenPool[Any]]], tenant_schema: str
) -> None:
    app, db = apps(tenant_schema)
    late: list[BaseException] = []

    @app.get("/stream-released")
    def stream_released() -> Response:
        rows = db.conn.execute("SELECT generate_series(1, 3)").fetchall()
        db.release()  # give the connection back before streaming

        def body() -> Iterator[str]:
            yield from (f"{r[0]}\n" for r in rows)

        return Response(stream_with_context(body()))

    @app.get("/stream-late")
    def stream_late() -> Response:
        def body() -> Iterator[str]:
            try:
                db.conn  # noqa: B018 - borrowing after the view returned
            except RuntimeError as ex:
                late.append(ex)
            yield "done\n"

        return Response(stream_with_context(body()))

    client = app.test_client()
    # Two clients that do not read their streams yet (each in its own greenlet, as under
    # gunicorn): with max_size=1 a third request still gets the connection, because the
    # view gave it back before streaming.
    started, read_now = gevent.event.Event(), gevent.event.Event()
    bodies: list[str] = []

    def slow_reader() -> None:
        response = client.get("/stream-released", buffered=False)
        started.set()
        read_now.wait(10)
        bodies.append(response.get_data(as_text=True))

    readers = [gevent.spawn(slow_reader) for _ in range(2)]
    assert started.wait(10)
    third = gevent.spawn(lambda: client.get("/anonymous").status_code).get(timeout=10)
    assert third == 200
    read_now.set()
    gevent.joinall(readers, timeout=10, raise_error=True)
    assert bodies == ["1\n2\n3\n"] * 2
    late_body = gevent.spawn(lambda: client.get("/stream-late").get_data(as_text=True))
    assert late_body.get(timeout=10) == "done\n"
    assert late and "not available after the view returned" in str(late[0])


def test_stats_endpoint_needs_an_explicit_authorisation_choice(
    apps: Callable[..., tuple[Flask, GreenPool[Any]]], tenant_schema: str
) -> None:
    with pytest.raises(ValueError, match="authorize="):
        stats_blueprint()
    app, _db = apps(tenant_schema)
    allowed = {"yes": False}
    app.register_blueprint(
        stats_blueprint(authorize=lambda: allowed["yes"]), url_prefix="/_greenpool"
    )
    client = app.test_client()
    assert client.get("/anonymous").status_code == 200
    assert client.get("/_greenpool/stats").status_code == 403
    assert client.get("/_greenpool/metrics").status_code == 403
    allowed["yes"] = True
    body = client.get("/_greenpool/stats").json
    assert body is not None
    assert "last_error" not in body["databases"]["default"]
    assert client.get("/_greenpool/metrics").status_code == 200


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, -1.0, 1e12])
def test_nan_and_infinite_timeouts_are_refused_everywhere(
    apps: Callable[..., tuple[Flask, GreenPool[Any]]],
    tenant_schema: str,
    bad: float,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    app, db = apps(tenant_schema)
    with app.app_context():
        pool = db.get_pool()
        with pytest.raises(ValueError, match="timeout"):
            pool.close(timeout=bad)
        with pytest.raises(ValueError, match="timeout"):
            pool.wait(bad)
        with pytest.raises(ValueError, match="timeout"):
            pool.drain(timeout=bad)
        with pytest.raises(ValueError, match="timeout"):
            pool.connect_dedicated(bad)
        assert not pool.closed, "a refused timeout closed the pool"
        with pytest.raises(ValueError, match="timeout"):
            db.close(timeout=bad)
        with pytest.raises(ValueError, match="timeout"):
            db.getconn(timeout=bad)
        with pytest.raises(ValueError, match="timeout"), db.connection(timeout=bad):
            pass
    fresh: GreenPool[Any] = GreenPool(
        tenant_schema, name=f"gpsec-new-{uuid.uuid4().hex[:8]}", open=False
    )
    try:
        with pytest.raises(ValueError, match="timeout"):
            fresh.open(wait=True, timeout=bad)
        assert fresh.stats()["state"] == "new", "open() started before refusing its timeout"
    finally:
        fresh.close()
    with pytest.raises(ValueError, match="timeout"):
        greenpool.close_all(bad)
    with pytest.raises(ValueError, match="timeout"):
        close_all_pools(bad)
    with app.app_context():
        assert not db.get_pool().closed, "a refused close_all timeout closed a pool"
    # close_all checks its timeout itself, not only through the first open pool's close()
    with monkeypatch.context() as patched:
        patched.setattr(greenpool.fork, "tracked", list)  # no pool open in this process
        with pytest.raises(ValueError, match="timeout"):
            greenpool.close_all(bad)
    result = app.test_cli_runner().invoke(args=["greenpool", "check", "--timeout", str(bad)])
    assert result.exit_code == 2 and "--timeout" in result.output, result.output


def test_config_errors_never_echo_values() -> None:
    secret = "Zq7xSecret"
    app = Flask("flaskcfg")
    app.config.update(GREENPOOL_BINDS=f"postgresql://u:{secret}@h/db")
    with pytest.raises(ConfigError) as info:
        GreenPool().init_app(app)
    assert secret not in str(info.value)
    app = Flask("flaskcfg2")
    app.config.update(
        GREENPOOL_CONNINFO=f"host=h password={secret}",
        GREENPOOL_KWARGS={"password": secret},
    )
    GreenPool().init_app(app)
    db_config = app.extensions["greenpool"].database(None)
    assert secret not in repr(db_config) and secret not in str(db_config)
    app = Flask("flaskcfg3")
    app.config.update(GREENPOOL_CONNINFO=f"host=h password=abc {secret}")
    with pytest.raises(ConfigError) as info:
        GreenPool().init_app(app)
    assert secret not in str(info.value)


def test_a_copied_request_context_never_gives_back_the_requests_connection(
    apps: Callable[..., tuple[Flask, GreenPool[Any]]], tenant_schema: str
) -> None:
    """A greenlet spawned with ``copy_current_request_context`` shares the request's
    environ; when its copy of the context ends, the request's connection must stay lent
    (giving it back would hand it to another borrower while the view still uses it)."""
    from flask import copy_current_request_context

    app, db = apps(tenant_schema)
    seen: dict[str, Any] = {}

    @app.get("/spawns")
    def spawns() -> Any:
        mine = db.conn

        @copy_current_request_context
        def side_job() -> None:
            pass  # its context's teardown runs when this returns

        gevent.spawn(side_job).get(timeout=5)
        seen["acquired"] = db.get_pool().stats()["acquired"]
        seen["same"] = db.conn is mine
        return {"n": mine.execute("SELECT 1").fetchone()[0]}

    assert app.test_client().get("/spawns").status_code == 200
    assert seen == {"acquired": 1, "same": True}


@pytest.mark.parametrize("configured_token", ["set", "empty"])
def test_the_example_apps_stats_answer_loopback_or_the_token_only(
    dsn: str, configured_token: str
) -> None:
    """The example app (served on 0.0.0.0 by its Dockerfile) protects /_greenpool/stats and
    /metrics: a client elsewhere needs ``X-Stats-Token`` equal to STATS_TOKEN; an empty
    STATS_TOKEN lets nobody in by an empty header."""
    from examples.flask_app import create_app
    from examples.flask_app import db as example_db

    token = uuid.uuid4().hex if configured_token == "set" else ""
    app = create_app(
        {
            "GREENPOOL_CONNINFO": dsn,
            "GREENPOOL_NAME": f"gpsec-example-{uuid.uuid4().hex[:8]}",
            "GREENPOOL_MIN_SIZE": 0,
            "STATS_TOKEN": token,
        }
    )
    try:
        remote = app.test_client()
        remote.environ_base["REMOTE_ADDR"] = "10.0.0.5"  # not loopback
        local = app.test_client()  # REMOTE_ADDR 127.0.0.1
        for path in ("/_greenpool/stats", "/_greenpool/metrics"):
            assert remote.get(path).status_code == 403, path
            assert remote.get(path, headers={"X-Stats-Token": ""}).status_code == 403, path
            wrong = remote.get(path, headers={"X-Stats-Token": token + "x"})
            assert wrong.status_code == 403, path
            with_token = remote.get(path, headers={"X-Stats-Token": token})
            assert with_token.status_code == (200 if token else 403), path
            assert local.get(path).status_code == 200, path
    finally:
        example_db.close(timeout=1, app=app)
