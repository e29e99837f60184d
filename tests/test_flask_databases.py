"""Named databases of a Flask app: binds from the configuration, and databases added at
run time (one database per tenant), all served by the process registry."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from flask import Flask
from psycopg.conninfo import make_conninfo

import greenpool
from greenpool import GreenPool
from greenpool.flask import ConfigError


@pytest.fixture(scope="module")
def tenant_db(dsn: str) -> Iterator[str]:
    name = f"gp_tenant_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield name
    greenpool.close_all(timeout=1)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def make_app(dsn: str) -> tuple[Flask, GreenPool[Any]]:
    app = Flask("flaskdbs")
    app.config.update(
        GREENPOOL_CONNINFO=dsn,
        GREENPOOL_NAME=f"gpdb-{uuid.uuid4().hex[:6]}",
        GREENPOOL_MIN_SIZE=0,
        GREENPOOL_MAX_SIZE=3,
        GREENPOOL_TIMEOUT=5,
    )
    db: GreenPool[Any] = GreenPool(app)

    @app.get("/tenant/<name>")
    def tenant(name: str) -> Any:
        row = db.get_conn(name).execute("SELECT current_database()").fetchone()
        return {"db": row[0] if row else None}

    return app, db


def test_a_database_added_at_run_time_serves_requests_with_inherited_settings(
    dsn: str, tenant_db: str
) -> None:
    app, db = make_app(dsn)
    with app.app_context():
        config = db.add_database("tenant_x", make_conninfo(dsn, dbname=tenant_db))
        assert config.pool_name.endswith("-tenant_x")
    client = app.test_client()
    assert client.get("/tenant/tenant_x").json == {"db": tenant_db}
    with app.app_context():
        pool = db.get_pool("tenant_x")
        assert pool.max_size == 3  # GREENPOOL_MAX_SIZE, inherited
        assert pool is greenpool.get_pool(config.conninfo, **config.pool_kwargs())
        with db.connection(name="tenant_x") as conn:
            assert conn.execute("SELECT current_database()").fetchone() == (tenant_db,)
        with pytest.raises(greenpool.PoolError, match="already configured"):
            db.add_database("tenant_x", dsn)
        with pytest.raises(ConfigError, match="bind name"):
            db.add_database("bad name\n", dsn)
        with pytest.raises(ConfigError, match="libpq cannot parse"):
            db.add_database("tenant_y", dsn + " no_such_option=1")
    assert client.get("/tenant/unknown").status_code == 500  # not configured: an error
    db.close(timeout=1, app=app)


def test_flask_entry_points_before_init_app_say_what_is_missing() -> None:
    """A GreenPool that no app was given to: the Flask entry points fail at once, naming
    init_app (they are declared on GreenPool so that type checkers see them)."""
    db: GreenPool[Any] = GreenPool()
    calls = {
        "conn": lambda: db.conn,
        "get_conn": lambda: db.get_conn("reports"),
        "get_pool": lambda: db.get_pool("reports"),
        "add_database": lambda: db.add_database("tenant", "dbname=tenant"),
        "release": db.release,
    }
    for name, call in calls.items():
        with pytest.raises(RuntimeError, match=r"call db\.init_app\(app\) first"):
            call()
        assert db.state == "new", name  # nothing opened or connected
