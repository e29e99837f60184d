"""``pooler_mode`` configured three ways (the keyword, ``pool_pooler_mode`` in the conninfo,
Flask's ``GREENPOOL_POOLER_MODE``) and what it changes: psycopg 3's server-side
preparation off unless the connect keywords choose a threshold, no reset policy that needs
session state, bad values refused by name; then the same against the test server (a
borrow works, nothing gets prepared server-side, LISTEN is warned about once)."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from flask import Flask

from greenpool import GreenPool
from greenpool.flask import ConfigError
from greenpool.flask import GreenPool as FlaskGreenPool

Factory = Callable[..., GreenPool[Any]]

#: Nothing listens there: these pools are never opened.
OFFLINE = "host=127.0.0.1 port=1 dbname=app user=web"
OFFLINE_URL = "postgresql://web@127.0.0.1:1/app"
MODE_ERROR = "pooler_mode: expected None, 'session' or 'transaction'"


def offline_pool(conninfo: str = OFFLINE, **kwargs: Any) -> GreenPool[Any]:
    pool: GreenPool[Any] = GreenPool(conninfo, open=False, **kwargs)
    return pool


def threshold_set(pool: GreenPool[Any]) -> tuple[bool, Any]:
    """Whether the pool passes ``prepare_threshold`` to connect(), and its value."""
    kwargs = pool.target.attempt_kwargs if pool.target.attempts else pool.target.kwargs
    assert kwargs is not None
    return "prepare_threshold" in kwargs, kwargs.get("prepare_threshold")


# ---------------------------------------------------------------------------- three ways


@pytest.mark.parametrize(
    ("conninfo", "kwargs"),
    [
        (OFFLINE, {"pooler_mode": "transaction"}),
        (OFFLINE + " pool_pooler_mode=transaction", {}),
        (OFFLINE_URL + "?pool_pooler_mode=transaction", {}),
        (OFFLINE_URL + "?pool_pooler_mode=session", {"pooler_mode": "transaction"}),
    ],
    ids=["keyword", "keyvalue", "url", "keyword-wins"],
)
def test_transaction_mode_turns_server_side_preparation_off(
    conninfo: str, kwargs: dict[str, Any]
) -> None:
    pool = offline_pool(conninfo, **kwargs)
    assert pool.pooler_mode == "transaction"
    assert threshold_set(pool) == (True, None)
    assert pool._vetting.policy.name == "client"  # "default" becomes a client-side reset
    assert not pool._vetting.policy.server_side
    assert pool._vetting.warn_session_features
    assert "pool_pooler_mode" not in pool.target.conninfo  # never reaches libpq


@pytest.mark.parametrize(
    ("conninfo", "kwargs", "mode"),
    [
        (OFFLINE, {}, None),
        (OFFLINE, {"pooler_mode": "session"}, "session"),
        (OFFLINE + " pool_pooler_mode=session", {}, "session"),
        (OFFLINE + " pool_pooler_mode=transaction", {"pooler_mode": "session"}, "session"),
        (OFFLINE + " pool_pooler_mode=none", {}, None),
    ],
)
def test_other_modes_leave_preparation_and_reset_alone(
    conninfo: str, kwargs: dict[str, Any], mode: str | None
) -> None:
    pool = offline_pool(conninfo, **kwargs)
    assert pool.pooler_mode == mode
    assert threshold_set(pool) == (False, None)
    assert pool._vetting.policy.name == "session"  # the default, a server round trip
    assert not pool._vetting.warn_session_features


@pytest.mark.parametrize("threshold", [5, 0])
def test_a_prepare_threshold_chosen_in_kwargs_is_kept(threshold: int) -> None:
    pool = offline_pool(pooler_mode="transaction", kwargs={"prepare_threshold": threshold})
    assert threshold_set(pool) == (True, threshold)


def test_several_hosts_get_preparation_off_on_every_attempt() -> None:
    pool = offline_pool("host=127.0.0.1,127.0.0.2 port=1 dbname=app", pooler_mode="transaction")
    assert pool.target.attempts is not None
    assert threshold_set(pool) == (True, None)


def test_psycopg2_gets_no_prepare_threshold() -> None:
    pytest.importorskip("psycopg2")
    pool = offline_pool(pooler_mode="transaction", driver="psycopg2")
    assert threshold_set(pool) == (False, None)
    assert pool._vetting.policy.name == "client"


def test_a_new_conninfo_keeps_preparation_off() -> None:
    pool: GreenPool[Any] = GreenPool(pooler_mode="transaction")  # no conninfo: stays new
    pool.configure_conninfo(OFFLINE)
    assert threshold_set(pool) == (True, None)


# ---------------------------------------------------------------------------- refusals


def _session_reset(conn: Any) -> None:
    conn.execute("RESET ALL")


@pytest.mark.parametrize(
    ("reset", "name"),
    [
        ("session", "session"),
        ("discard", "discard"),
        ("light", "light"),
        (_session_reset, "callable"),
    ],
)
@pytest.mark.parametrize("how", ["keyword", "conninfo"])
def test_a_reset_that_needs_session_state_is_refused_by_name(
    reset: Any, name: str, how: str
) -> None:
    if how == "keyword":
        args: tuple[str, dict[str, Any]] = (OFFLINE, {"pooler_mode": "transaction"})
    else:
        args = (OFFLINE + " pool_pooler_mode=transaction", {})
    with pytest.raises(ValueError) as info:
        offline_pool(args[0], reset=reset, **args[1])
    assert str(info.value) == (
        f"reset: {name!r} relies on session state, which a transaction pooler does not keep "
        "(pooler_mode='transaction'); use 'client' or None"
    )


@pytest.mark.parametrize("reset", ["client", None, "none", "default"])
def test_client_side_resets_are_accepted(reset: str | None) -> None:
    pool = offline_pool(pooler_mode="transaction", reset=reset)
    assert not pool._vetting.policy.server_side


@pytest.mark.parametrize("bad", ["statement", "Transaction", "transaction "])
def test_a_bad_mode_is_refused_by_name(bad: str) -> None:
    with pytest.raises(ValueError) as info:
        offline_pool(pooler_mode=bad)
    assert str(info.value) == MODE_ERROR


def test_a_bad_mode_in_the_conninfo_is_refused_without_echoing_it() -> None:
    for conninfo in (OFFLINE + " pool_pooler_mode=statement", OFFLINE_URL + "?pool_pooler_mode=x"):
        with pytest.raises(ValueError) as info:
            offline_pool(conninfo)
        assert str(info.value) == MODE_ERROR


# ---------------------------------------------------------------------------- Flask


def flask_app(**config: Any) -> tuple[Flask, FlaskGreenPool[Any]]:
    app = Flask("poolertest")
    app.config.update(config)
    db: FlaskGreenPool[Any] = FlaskGreenPool()
    db.init_app(app)
    return app, db


def databases(app: Flask) -> dict[str | None, Any]:
    result: dict[str | None, Any] = app.extensions["greenpool"].databases
    return result


def test_flask_pooler_mode_reaches_the_pool() -> None:
    app, _ = flask_app(
        GREENPOOL_CONNINFO=OFFLINE,
        GREENPOOL_POOLER_MODE="transaction",
        GREENPOOL_BINDS={"plain": {"conninfo": OFFLINE, "pooler_mode": None}, "inherits": OFFLINE},
    )
    dbs = databases(app)
    assert dbs[None].pooler_mode == "transaction"
    assert dbs["inherits"].pooler_mode == "transaction"  # binds inherit the top level
    kwargs = dbs[None].pool_kwargs()
    assert kwargs["pooler_mode"] == "transaction"
    pool = offline_pool(dbs[None].conninfo, **kwargs)
    assert threshold_set(pool) == (True, None)
    assert pool._vetting.policy.name == "client"


def test_flask_pooler_mode_from_the_conninfo_and_opt_in_kwargs() -> None:
    app, _ = flask_app(
        GREENPOOL_CONNINFO=OFFLINE_URL + "?pool_pooler_mode=transaction",
        GREENPOOL_KWARGS={"prepare_threshold": 5},
    )
    db = databases(app)[None]
    assert db.pooler_mode == "transaction"
    pool = offline_pool(db.conninfo, **db.pool_kwargs())
    assert threshold_set(pool) == (True, 5)


def test_flask_refuses_a_bad_mode_naming_the_key() -> None:
    with pytest.raises(ConfigError) as info:
        flask_app(GREENPOOL_CONNINFO=OFFLINE, GREENPOOL_POOLER_MODE="statement")
    assert str(info.value) == "GREENPOOL_POOLER_MODE: expected None, 'session' or 'transaction'"
    with pytest.raises(ConfigError) as info:
        flask_app(
            GREENPOOL_CONNINFO=OFFLINE,
            GREENPOOL_BINDS={"b": {"conninfo": OFFLINE, "pooler_mode": "statement"}},
        )
    assert str(info.value) == (
        "GREENPOOL_BINDS['b']['pooler_mode']: expected None, 'session' or 'transaction'"
    )


def test_flask_refuses_a_session_reset_naming_the_key_and_policy() -> None:
    with pytest.raises(ConfigError) as info:
        flask_app(
            GREENPOOL_CONNINFO=OFFLINE,
            GREENPOOL_POOLER_MODE="transaction",
            GREENPOOL_RESET="discard",
        )
    message = str(info.value)
    assert message.startswith("GREENPOOL_RESET: 'discard' relies on session state")
    assert "pooler_mode='transaction'" in message


# ---------------------------------------------------------------------------- the server


PREPARED = "SELECT count(*) FROM pg_catalog.pg_prepared_statements"


def prepared_after_repeats(conn: Any, times: int = 8) -> int:
    """How many statements the session has prepared after one query ran ``times`` times
    (psycopg prepares it past ``prepare_threshold``, 5 by default)."""
    for i in range(times):
        conn.execute("SELECT %s::int + 1", (i,)).fetchone()
    row = conn.execute(PREPARED, prepare=False).fetchone()
    return int(row[0])


def test_a_transaction_mode_pool_prepares_nothing(make_pool: Factory) -> None:
    pool = make_pool(pooler_mode="transaction", min_size=0, max_size=1)
    with pool.connection() as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        assert conn.prepare_threshold is None
        assert prepared_after_repeats(conn) == 0


def test_the_conninfo_way_works_on_a_live_connection(make_pool: Factory, dsn: str) -> None:
    pool = make_pool(dsn + " pool_pooler_mode=transaction", min_size=0, max_size=1)
    with pool.connection() as conn:
        assert conn.prepare_threshold is None
        assert prepared_after_repeats(conn) == 0


def test_without_the_mode_psycopg_prepares(make_pool: Factory) -> None:
    # The control: the query above does get prepared when nothing turns preparation off.
    pool = make_pool(min_size=0, max_size=1)
    with pool.connection() as conn:
        assert conn.prepare_threshold == 5
        assert prepared_after_repeats(conn) == 1


def test_an_opt_in_threshold_prepares_behind_the_mode(make_pool: Factory) -> None:
    pool = make_pool(
        pooler_mode="transaction", kwargs={"prepare_threshold": 2}, min_size=0, max_size=1
    )
    with pool.connection() as conn:
        assert conn.prepare_threshold == 2
        assert prepared_after_repeats(conn) == 1


@pytest.fixture
def flask_live(dsn: str) -> Iterator[tuple[Flask, FlaskGreenPool[Any]]]:
    app, db = flask_app(
        GREENPOOL_CONNINFO=dsn,
        GREENPOOL_NAME=f"gpp-{uuid.uuid4().hex[:8]}",
        GREENPOOL_POOLER_MODE="transaction",
        GREENPOOL_MIN_SIZE=0,
        GREENPOOL_MAX_SIZE=1,
        GREENPOOL_TIMEOUT=5,
    )

    @app.get("/threshold")
    def threshold() -> Any:
        return {"threshold": db.conn.prepare_threshold, "prepared": prepared_after_repeats(db.conn)}

    yield app, db
    handle: Any = db  # a Flask handle: close() takes the app
    handle.close(timeout=1, app=app)


def test_flask_pooler_mode_on_a_live_request(flask_live: tuple[Flask, Any]) -> None:
    app, _ = flask_live
    response = app.test_client().get("/threshold")
    assert response.status_code == 200
    assert response.get_json() == {"threshold": None, "prepared": 0}


LISTEN_WARNING = "used LISTEN behind a transaction pooler"


def listen_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if LISTEN_WARNING in r.getMessage()]


def borrow_and_listen(pool: GreenPool[Any]) -> None:
    with pool.connection() as conn:
        conn.add_notify_handler(lambda notify: None)
        conn.execute("LISTEN greenpool_pooler_test")


def test_listen_behind_a_transaction_pooler_is_warned_about_once(
    make_pool: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="greenpool")
    pool = make_pool(pooler_mode="transaction", min_size=0, max_size=1)
    with pool.connection() as conn:  # no LISTEN: nothing to say
        conn.execute("SELECT 1")
    assert listen_warnings(caplog) == []
    for _ in range(3):
        borrow_and_listen(pool)
    warnings = listen_warnings(caplog)
    assert len(warnings) == 1, warnings
    assert f"pool {pool.name!r}: a borrower {LISTEN_WARNING}" in warnings[0]
    assert "pool.connect_dedicated()" in warnings[0]
    record = next(r for r in caplog.records if LISTEN_WARNING in r.getMessage())
    assert record.levelno == logging.WARNING
    assert record.name == "greenpool"


def test_listen_without_a_pooler_is_not_warned_about(
    make_pool: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="greenpool")
    pool = make_pool(min_size=0, max_size=1)
    borrow_and_listen(pool)
    assert listen_warnings(caplog) == []
