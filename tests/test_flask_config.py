"""Flask extension configuration: validation at init_app, without a database."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
from flask import Flask

import greenpool
from greenpool.flask import ConfigError, GreenPool

DSN = "host=127.0.0.1 port=1 dbname=app user=web password=hunter2"


def make_app(**config: Any) -> Flask:
    app = Flask("cfgtest")
    app.config.update(config)
    return app


def init(**config: Any) -> Flask:
    app = make_app(**config)
    GreenPool(app)
    return app


def test_alias_and_state_location() -> None:
    assert GreenPool is greenpool.GreenPool
    app = init(GREENPOOL_CONNINFO=DSN)
    state = app.extensions["greenpool"]
    assert list(state.databases) == [None]
    assert state.databases[None].pool_name == "cfgtest"


def test_extension_does_not_store_the_app() -> None:
    db: Any = GreenPool()  # init_app turns it into a Flask handle
    first, second = make_app(GREENPOOL_CONNINFO=DSN), make_app(DATABASE_URL=DSN)
    db.init_app(first)
    db.init_app(second)
    assert not any(v is first or v is second for v in vars(db).values())
    assert db.app_state(first) is not db.app_state(second)


def test_registering_twice_is_an_error() -> None:
    app = init(GREENPOOL_CONNINFO=DSN)
    with pytest.raises(RuntimeError, match="already registered"):
        GreenPool().init_app(app)


def test_database_url_fallback_and_precedence() -> None:
    app = init(DATABASE_URL="postgresql://u@h/fallback")
    assert app.extensions["greenpool"].databases[None].conninfo.endswith("/fallback")
    app = init(DATABASE_URL="postgresql://u@h/fallback", GREENPOOL_CONNINFO="dbname=main")
    assert app.extensions["greenpool"].databases[None].conninfo == "dbname=main"


def test_settings_are_coerced_from_strings() -> None:
    app = init(
        GREENPOOL_CONNINFO=DSN,
        GREENPOOL_MAX_SIZE="4",
        GREENPOOL_TIMEOUT="250ms",
        GREENPOOL_MAX_LIFETIME="1h",
        GREENPOOL_COMMIT_ON_SUCCESS="false",
        GREENPOOL_RETRY_AFTER="3",
        GREENPOOL_REQUIRE_COOPERATION="auto",
    )
    state = app.extensions["greenpool"]
    settings = state.databases[None].effective_settings()
    assert (settings.max_size, settings.timeout, settings.max_lifetime) == (4, 0.25, 3600.0)
    assert state.options.commit_on_success is False
    assert state.options.retry_after == 3
    assert state.options.require_cooperation is None


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"GREENPOOL_MAX_SIZE": "ten"}, r"GREENPOOL_MAX_SIZE: expected a whole number"),
        # Unicode digits int() would take (or choke on) and a 5000-digit number are refused
        # as ASCII-only, at most 9 digits, naming the key
        ({"GREENPOOL_MAX_SIZE": "\u00b2"}, r"GREENPOOL_MAX_SIZE: .*at most 9 ASCII digits$"),
        ({"GREENPOOL_MAX_SIZE": "\u0663"}, r"GREENPOOL_MAX_SIZE: .*at most 9 ASCII digits$"),
        ({"GREENPOOL_MAX_SIZE": "9" * 5000}, r"GREENPOOL_MAX_SIZE: .*at most 9 ASCII digits$"),
        ({"GREENPOOL_NAME": "a\x00b"}, r"GREENPOOL_NAME: a pool name must be 1-63 ASCII"),
        ({"GREENPOOL_NAME": "web\n"}, r"GREENPOOL_NAME: a pool name must be 1-63 ASCII"),
        ({"GREENPOOL_NAME": "x" * 100_000}, r"GREENPOOL_NAME: a pool name must be 1-63 ASCII"),
        ({"GREENPOOL_MAX_SIZE": 0}, r"GREENPOOL_MAX_SIZE: must be at least 1"),
        ({"GREENPOOL_MAX_SIZE": True}, r"GREENPOOL_MAX_SIZE: expected a whole number"),
        ({"GREENPOOL_MIN_SIZE": 5, "GREENPOOL_MAX_SIZE": 2}, r"GREENPOOL_MIN_SIZE: 5 is greater"),
        ({"GREENPOOL_TIMEOUT": "soon"}, r"GREENPOOL_TIMEOUT: not a duration"),
        ({"GREENPOOL_TIMEOUT": -1}, r"GREENPOOL_TIMEOUT: must be a non-negative"),
        ({"GREENPOOL_MAX_SIZ": 3}, r"GREENPOOL_MAX_SIZ: unknown .*did you mean GREENPOOL_MAX_SIZE"),
        ({"GREENPOOL_FROBNICATE": 1}, r"GREENPOOL_FROBNICATE: unknown greenpool setting"),
        ({"GREENPOOL_RESET": "everything"}, r"GREENPOOL_RESET: unknown policy 'everything'"),
        ({"GREENPOOL_DRIVER": "mysql"}, r"GREENPOOL_DRIVER: unknown driver"),
        ({"GREENPOOL_CONFIGURE": "not callable"}, r"GREENPOOL_CONFIGURE: expected a callable"),
        ({"GREENPOOL_KWARGS": ["x"]}, r"GREENPOOL_KWARGS: expected a dict"),
        ({"GREENPOOL_COMMIT_ON_SUCCESS": "maybe"}, r"GREENPOOL_COMMIT_ON_SUCCESS: expected"),
        ({"GREENPOOL_RETRY_AFTER": -1}, r"GREENPOOL_RETRY_AFTER: must not be negative"),
        ({"GREENPOOL_CONNINFO": 42}, r"GREENPOOL_CONNINFO: expected a connection string"),
        ({"GREENPOOL_CONNINFO": "mysql://x"}, r"GREENPOOL_CONNINFO: conninfo: unsupported URL"),
        ({"GREENPOOL_CONNINFO": "host=x pool_max_conns=0"}, r"GREENPOOL_CONNINFO \(max_size\)"),
    ],
)
def test_config_errors_name_the_key(config: dict[str, Any], message: str) -> None:
    config.setdefault("GREENPOOL_CONNINFO", DSN)
    with pytest.raises(ConfigError, match=message) as info:
        init(**config)
    assert "hunter2" not in str(info.value)


def test_no_database_configured() -> None:
    with pytest.raises(ConfigError, match="set GREENPOOL_CONNINFO or DATABASE_URL"):
        init()


def test_binds_inherit_pool_settings_but_not_identity() -> None:
    app = init(
        GREENPOOL_CONNINFO=DSN,
        GREENPOOL_NAME="web",
        GREENPOOL_TIMEOUT=3,
        GREENPOOL_MAX_SIZE=8,
        GREENPOOL_KWARGS={"options": "-c work_mem=64MB"},
        GREENPOOL_BINDS={
            "reporting": {"conninfo": "dbname=replica", "max_size": 2},
            "archive": "dbname=archive",
        },
    )
    dbs = app.extensions["greenpool"].databases
    reporting, archive = dbs["reporting"], dbs["archive"]
    assert reporting.pool_name == "web-reporting"
    assert reporting.settings == {"timeout": 3.0, "max_size": 2}
    assert reporting.kwargs == {}
    assert archive.conninfo == "dbname=archive"
    assert archive.settings["max_size"] == 8


def test_binds_only_without_default_database() -> None:
    app = init(GREENPOOL_BINDS={"reporting": {"conninfo": DSN}})
    state = app.extensions["greenpool"]
    assert list(state.databases) == ["reporting"]
    with pytest.raises(KeyError, match="no default database"):
        state.database(None)


@pytest.mark.parametrize(
    ("binds", "message"),
    [
        ({"reporting": {"max_size": 2}}, r"GREENPOOL_BINDS\['reporting'\]\['conninfo'\]: every"),
        (
            {"reporting": {"conninfo": DSN, "max_sise": 2}},
            r"GREENPOOL_BINDS\['reporting'\]\['max_sise'\]: unknown .*max_size",
        ),
        (
            {"reporting": {"conninfo": DSN, "max_size": "lots"}},
            r"GREENPOOL_BINDS\['reporting'\]\['max_size'\]: expected a whole number",
        ),
        ({"default": DSN}, r"GREENPOOL_BINDS: a bind name must be"),
        ({"a\x00b": DSN}, r"GREENPOOL_BINDS: a bind name must be"),  # NUL reached Prometheus
        ({"new\nline": DSN}, r"GREENPOOL_BINDS: a bind name must be"),
        ({"x" * 100_000: DSN}, r"GREENPOOL_BINDS: a bind name must be"),
        (["reporting"], r"GREENPOOL_BINDS: expected a dict"),
        ({"reporting": 3}, r"GREENPOOL_BINDS\['reporting'\]: expected a dict"),
    ],
)
def test_bind_errors_name_the_key(binds: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        init(GREENPOOL_CONNINFO=DSN, GREENPOOL_BINDS=binds)


def test_init_app_opens_nothing_and_validates_with_libpq() -> None:
    """init_app must be safe in a gunicorn master before the fork (--preload): no pool
    started; the conninfo is read by libpq's own parser (psycopg's conninfo_to_dict), so a
    keyword libpq does not know fails here, not at the first request. Importing psycopg
    before gevent patches is harmless: the pool installs gevent's waits when it opens."""
    app = init(GREENPOOL_CONNINFO=DSN)
    state = app.extensions["greenpool"]
    assert state.started_pool(None) is None
    assert state.snapshot()["databases"]["default"]["started"] is False
    with pytest.raises(ConfigError, match="GREENPOOL_CONNINFO: conninfo: libpq cannot parse"):
        init(GREENPOOL_CONNINFO=DSN + " no_such_keyword=1")
    code = (
        "from flask import Flask; from greenpool import GreenPool; "
        "app = Flask('x'); app.config['DATABASE_URL'] = 'dbname=x'; GreenPool(app); "
        "from gevent import monkey; monkey.patch_all(); import greenpool; "
        "print(greenpool.cooperation_problems())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "[]"


def test_hooks_and_cli_are_installed() -> None:
    app = init(GREENPOOL_CONNINFO=DSN)
    assert "greenpool" in app.cli.commands
    assert app.teardown_request_funcs[None]
    assert app.after_request_funcs[None]
    assert app.error_handler_spec[None][None]
    bare = init(GREENPOOL_CONNINFO=DSN, GREENPOOL_HANDLE_EXHAUSTION=False)
    assert not bare.error_handler_spec[None][None]
