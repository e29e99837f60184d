"""A minimal Flask app for the HTTP end-to-end benchmark.

Served by ``gunicorn -k gevent benchmarks.httpapp:app`` (the gevent worker monkey-patches
before it imports this module). ``GET /q`` borrows a connection, runs ``SELECT 1`` and
returns the value; ``GET /health`` touches no database.

Environment:

- ``BENCH_DSN`` (required): where to connect;
- ``BENCH_HTTP_POOL``: ``greenpool`` (default), ``greenpool_pw`` (greenpool keeping
  psycopg's own wait function: ``GREENPOOL_PSYCOPG_WAIT=psycopg``), ``psycopg_pool``,
  ``nopool`` (connect per request) or ``nodb`` (``/q`` answers without a database: the
  floor of what the app costs, which no pool can go under);
- ``BENCH_HTTP_MAX_SIZE``: pool size (default 10; the pools are opened full).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import psycopg
from flask import Flask

MODE = os.environ.get("BENCH_HTTP_POOL", "greenpool")
DSN = os.environ["BENCH_DSN"]
MAX_SIZE = int(os.environ.get("BENCH_HTTP_MAX_SIZE", "10"))
APP_NAME = f"bench-http-{MODE}"


def _make_borrow() -> Callable[[], AbstractContextManager[Any]] | None:
    kwargs: dict[str, Any] = {"autocommit": True}
    if MODE in ("greenpool", "greenpool_pw"):
        from greenpool import GreenPool

        if MODE == "greenpool_pw":
            os.environ["GREENPOOL_PSYCOPG_WAIT"] = "psycopg"
        gpool = GreenPool(
            DSN,
            min_size=MAX_SIZE,
            max_size=MAX_SIZE,
            name=APP_NAME,
            kwargs=kwargs,
            reset=None,  # same work as psycopg_pool, which resets nothing
            open=False,
        )
        gpool.open(wait=True, timeout=30.0)
        return gpool.connection
    if MODE == "psycopg_pool":
        from psycopg_pool import ConnectionPool

        ppool: Any = ConnectionPool(
            DSN,
            min_size=MAX_SIZE,
            max_size=MAX_SIZE,
            kwargs={**kwargs, "application_name": APP_NAME},
            name=APP_NAME,
            open=True,
        )
        ppool.wait(timeout=30.0)
        return ppool.connection  # type: ignore[no-any-return]
    if MODE == "nopool":

        def connect() -> AbstractContextManager[Any]:
            return psycopg.connect(DSN, application_name=APP_NAME, **kwargs)

        return connect
    if MODE == "nodb":
        return None
    raise SystemExit(f"BENCH_HTTP_POOL: unknown mode {MODE!r}")


borrow = _make_borrow()
app = Flask(__name__)


@app.get("/health")
def health() -> str:
    return "ok"


@app.get("/q")
def query() -> str:
    if borrow is None:
        return "1"
    with borrow() as conn:
        row = conn.execute("SELECT 1").fetchone()
    return str(row[0])
