"""A minimal Flask app for the HTTP end-to-end benchmark.

Served by ``gunicorn -k gevent 'benchmarks.httpapp:create_app()'`` (the gevent worker
monkey-patches before it imports this module); ``benchmarks.instructions`` also builds it
in-process and calls it as a WSGI app. Endpoints (each answers ``1``):

- ``GET /q``: ``SELECT 1``;
- ``GET /sleep``: ``SELECT pg_sleep(0.005)`` (I/O bound: the pool's connections are the
  limit);
- ``GET /tx``: a short transaction: ``SELECT ... FOR UPDATE`` and ``UPDATE`` of one random
  row of ``bench_http_accounts`` inside ``with conn.transaction()`` (BEGIN ... COMMIT: four
  round trips); the table is created by the orchestrator (:data:`SCHEMA`);
- ``GET /borrow``: borrows the request's connection and answers without a query (what
  ``benchmarks.flask_instructions`` counts: the borrowing path without the round trip,
  whose hub wake-ups make instruction counts move by a few percent between runs);
- ``GET /health``: no database.

Every variant lends autocommit connections, and the views are the same code: only how
the connection is borrowed and given back differs.

Environment (read by :func:`create_app` when called without arguments):

- ``BENCH_DSN`` (required): where to connect;
- ``BENCH_HTTP_POOL``, the variant:

  - ``ext``: the Flask extension, ``db.conn`` in the view (``GreenPool(); init_app``,
    ``GREENPOOL_CONNINFO``, ``GREENPOOL_KWARGS={"autocommit": True}``), with its default
    session reset (one round trip per request that used the database);
  - ``ext_noreset``: the same with ``GREENPOOL_RESET="none"`` (the work psycopg_pool does);
  - ``raw`` (alias ``greenpool``): the core pool, ``with pool.connection()`` in the view;
  - ``raw_hand``: the core pool wired by hand, ``getconn`` on first use and ``putconn``
    in a ``teardown_request`` hook (what the extension does, without the extension);
  - ``psycopg_pool_hand``: psycopg_pool wired by hand the same way;
  - ``psycopg_pool_with`` (alias ``psycopg_pool``): ``with pool.connection()`` in the view;
  - ``greenpool_pw``: ``raw`` keeping psycopg's own wait (``GREENPOOL_PSYCOPG_WAIT=psycopg``);
  - ``nopool``: connect per request;
  - ``nodb``: the same app, every endpoint answers without a database: the floor of what
    the app costs, which no pool can go under;

- ``BENCH_HTTP_MAX_SIZE``: pool size (default 10; the pools are opened full, the
  extension's on the first request);
- ``BENCH_HTTP_POOL_TIMEOUT``: seconds a request waits for a connection (default 30, every
  pool's default; ``benchmarks.http_instructions`` raises it for a worker under valgrind).
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from flask import Flask, g

#: Variants and what they are (report labels live in benchmarks.report).
VARIANTS = (
    "ext",
    "ext_noreset",
    "raw",
    "raw_hand",
    "psycopg_pool_hand",
    "psycopg_pool_with",
    "nodb",
    "greenpool",
    "greenpool_pw",
    "psycopg_pool",
    "nopool",
)
ALIASES = {"greenpool": "raw", "psycopg_pool": "psycopg_pool_with"}

#: Endpoint key -> path.
ENDPOINTS = {"select1": "/q", "sleep": "/sleep", "tx": "/tx"}
ACCOUNTS = 10_000
SCHEMA = (
    "CREATE TABLE IF NOT EXISTS bench_http_accounts (id int PRIMARY KEY, balance bigint)",
    f"INSERT INTO bench_http_accounts SELECT i, 0 FROM generate_series(1, {ACCOUNTS}) i "
    "ON CONFLICT DO NOTHING",
)
SLEEP_SQL = "SELECT pg_sleep(0.005)"
TX_LOCK_SQL = "SELECT balance FROM bench_http_accounts WHERE id = %s FOR UPDATE"
TX_UPDATE_SQL = "UPDATE bench_http_accounts SET balance = balance + 1 WHERE id = %s"

_G_KEY = "_bench_conn"


def _hand_wired(app: Flask, getconn: Callable[[], Any], putconn: Callable[[Any], None]) -> Any:
    """getconn on first use (kept on ``g``), putconn in teardown_request: returns get_conn."""

    def get_conn() -> Any:
        conn = g.get(_G_KEY)
        if conn is None:
            conn = getconn()
            setattr(g, _G_KEY, conn)
        return conn

    @app.teardown_request
    def _give_back(exc: BaseException | None = None) -> None:
        conn = g.pop(_G_KEY, None)
        if conn is not None:
            putconn(conn)

    return get_conn


def create_app(
    mode: str | None = None, dsn: str | None = None, max_size: int | None = None
) -> Flask:
    """The benchmark app for variant ``mode`` (default: from the environment)."""
    mode = mode or os.environ.get("BENCH_HTTP_POOL", "raw")
    mode = ALIASES.get(mode, mode)
    if mode not in VARIANTS:
        raise SystemExit(f"BENCH_HTTP_POOL: unknown mode {mode!r}")
    dsn = dsn if dsn is not None else os.environ["BENCH_DSN"]
    size = max_size or int(os.environ.get("BENCH_HTTP_MAX_SIZE", "10"))
    timeout = float(os.environ.get("BENCH_HTTP_POOL_TIMEOUT", "30"))
    app_name = f"bench-http-{mode}"
    kwargs: dict[str, Any] = {"autocommit": True}
    app = Flask(__name__)

    # Each variant defines either `borrow` (a context manager around one use) or
    # `get_conn` (the request's connection, given back when the request ends).
    borrow: Callable[[], AbstractContextManager[Any]] | None = None
    get_conn: Callable[[], Any] | None = None
    if mode in ("ext", "ext_noreset"):
        from greenpool import GreenPool as FlaskGreenPool

        if mode == "ext_noreset":  # same work as psycopg_pool: no session reset
            app.config["GREENPOOL_RESET"] = "none"
        app.config.update(
            GREENPOOL_CONNINFO=dsn,
            GREENPOOL_MIN_SIZE=size,
            GREENPOOL_MAX_SIZE=size,
            GREENPOOL_KWARGS=kwargs,
            GREENPOOL_NAME=app_name,
            GREENPOOL_TIMEOUT=timeout,
        )
        db = FlaskGreenPool()
        db.init_app(app)

        def ext_conn() -> Any:
            return db.conn

        get_conn = ext_conn
    elif mode in ("raw", "raw_hand", "greenpool_pw"):
        from greenpool import GreenPool

        if mode == "greenpool_pw":
            os.environ["GREENPOOL_PSYCOPG_WAIT"] = "psycopg"
        gpool = GreenPool(
            dsn,
            min_size=size,
            max_size=size,
            timeout=timeout,
            name=app_name,
            kwargs=kwargs,
            reset=None,  # same work as psycopg_pool, which resets nothing
            open=False,
        )
        gpool.open(wait=True, timeout=30.0)
        if mode == "raw_hand":
            get_conn = _hand_wired(app, gpool.getconn, gpool.putconn)
        else:
            borrow = gpool.connection
    elif mode in ("psycopg_pool_hand", "psycopg_pool_with"):
        from psycopg_pool import ConnectionPool

        ppool: Any = ConnectionPool(
            dsn,
            min_size=size,
            max_size=size,
            kwargs={**kwargs, "application_name": app_name},
            name=app_name,
            timeout=timeout,
            open=True,
        )
        ppool.wait(timeout=30.0)
        if mode == "psycopg_pool_hand":
            get_conn = _hand_wired(app, ppool.getconn, ppool.putconn)
        else:
            borrow = ppool.connection
    elif mode == "nopool":
        import psycopg

        def connect() -> AbstractContextManager[Any]:
            return psycopg.connect(dsn, application_name=app_name, **kwargs)

        borrow = connect

    @app.get("/health")
    def health() -> str:
        return "ok"

    if get_conn is not None:
        request_conn = get_conn

        @app.get("/borrow")
        def borrow_r() -> str:
            request_conn()
            return "1"

        @app.get("/q")
        def query_r() -> str:
            row = request_conn().execute("SELECT 1").fetchone()
            return str(row[0])

        @app.get("/sleep")
        def sleep_r() -> str:
            request_conn().execute(SLEEP_SQL).fetchone()
            return "1"

        @app.get("/tx")
        def tx_r() -> str:
            i = random.randint(1, ACCOUNTS)
            conn = request_conn()
            with conn.transaction():
                conn.execute(TX_LOCK_SQL, (i,)).fetchone()
                conn.execute(TX_UPDATE_SQL, (i,))
            return "1"

        return app

    if borrow is None:  # nodb

        @app.get("/q")
        @app.get("/sleep")
        @app.get("/tx")
        @app.get("/borrow")
        def floor() -> str:
            return "1"

        return app

    use = borrow

    @app.get("/borrow")
    def borrow_only() -> str:
        with use():
            pass
        return "1"

    @app.get("/q")
    def query() -> str:
        with use() as conn:
            row = conn.execute("SELECT 1").fetchone()
        return str(row[0])

    @app.get("/sleep")
    def sleep() -> str:
        with use() as conn:
            conn.execute(SLEEP_SQL).fetchone()
        return "1"

    @app.get("/tx")
    def tx() -> str:
        i = random.randint(1, ACCOUNTS)
        with use() as conn, conn.transaction():
            conn.execute(TX_LOCK_SQL, (i,)).fetchone()
            conn.execute(TX_UPDATE_SQL, (i,))
        return "1"

    return app
