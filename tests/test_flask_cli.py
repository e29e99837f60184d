"""``flask greenpool check`` and ``flask greenpool stats`` through Flask's CLI runner."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from flask import Flask

from greenpool.flask import GreenPool
from tests.support.pgcluster import APP_PASSWORD, APP_USER
from tests.support.server import Server


@pytest.fixture
def secret_dsn(cluster: Server) -> tuple[str, str]:
    """A DSN with a password in it (the app role), and that password."""
    return cluster.dsn(APP_USER, APP_PASSWORD), APP_PASSWORD


def make_app(conninfo: str, **config: Any) -> tuple[Flask, Any]:
    app = Flask("clitest")
    app.config.update(
        GREENPOOL_CONNINFO=conninfo,
        GREENPOOL_NAME=f"gpcli-{uuid.uuid4().hex[:8]}",
        GREENPOOL_MAX_SIZE=3,
        **config,
    )
    db: Any = GreenPool(app)  # init_app turns it into the app's Flask pool
    return app, db


def test_check_reports_server_settings_and_cooperation(
    secret_dsn: tuple[str, str], dsn: str
) -> None:
    conninfo, password = secret_dsn
    app, _db = make_app(conninfo, GREENPOOL_BINDS={"reporting": {"conninfo": dsn}})
    result = app.test_cli_runner().invoke(args=["greenpool", "check"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "database 'default'" in out and "database 'reporting'" in out
    assert "connected in" in out and "PostgreSQL" in out
    assert "max_size=3" in out
    assert "cooperation: ok" in out
    assert password not in out
    assert f"user {APP_USER}" in out

    as_json = app.test_cli_runner().invoke(args=["greenpool", "check", "--json", "-d", "default"])
    assert as_json.exit_code == 0, as_json.output
    report = json.loads(as_json.output)["databases"]
    assert [r["database"] for r in report] == ["default"]
    assert report[0]["ok"] is True
    assert report[0]["server_version"]
    assert report[0]["settings"]["max_size"] == 3
    assert report[0]["cooperation"]["ok"] is True
    assert password not in as_json.output


def test_check_fails_cleanly_without_leaking_the_password(cluster: Server) -> None:
    wrong = "not-the-pw-4242"
    app, _db = make_app(cluster.dsn(APP_USER, wrong), GREENPOOL_CONNECT_TIMEOUT=5)
    result = app.test_cli_runner().invoke(args=["greenpool", "check", "--timeout", "5"])
    assert result.exit_code == 1
    assert "FAILED" in result.output
    assert "password authentication failed" in result.output
    assert wrong not in result.output


def test_check_unknown_database() -> None:
    app, _db = make_app("dbname=x")
    result = app.test_cli_runner().invoke(args=["greenpool", "check", "-d", "nope"])
    assert result.exit_code == 2
    assert "'nope' is not configured" in result.output


def test_stats_counts_the_apps_server_connections(secret_dsn: tuple[str, str]) -> None:
    conninfo, password = secret_dsn
    app, db = make_app(conninfo, GREENPOOL_MIN_SIZE=2)
    pool = db.get_pool(app=app)
    try:
        pool.wait(10)
        held = pool.getconn()
        result = app.test_cli_runner().invoke(args=["greenpool", "stats", "--json"])
        pool.putconn(held)
    finally:
        db.close(app=app)
    assert result.exit_code == 0, result.output
    entry = json.loads(result.output)["databases"][0]
    assert entry["connections"] == 2  # the command's own connection is not counted
    assert entry["max_size_per_process"] == 3
    assert entry["max_connections"] > 0
    assert password not in result.output

    text = app.test_cli_runner().invoke(args=["greenpool", "stats"])
    assert text.exit_code == 0
    assert "server connections with application_name" in text.output
