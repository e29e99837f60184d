"""The Flask extension class: ``db = GreenPool(); db.init_app(app)``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from flask import Flask, current_app, has_request_context
from gevent import getcurrent

from greenpool.errors import CooperationError, PoolTimeout, TooManyRequests
from greenpool.flask_ext import hooks
from greenpool.flask_ext.config import parse_config
from greenpool.flask_ext.state import AppState
from greenpool.pool import GreenPool as CorePool

EXTENSION_KEY = "greenpool"


class FlaskGreenPool:
    """Flask extension giving each request a pooled PostgreSQL connection.

    Use ``GreenPool(app)`` or, with an app factory, ``db = GreenPool()`` then
    ``db.init_app(app)``. Configuration comes from ``app.config`` (``GREENPOOL_CONNINFO``
    or ``DATABASE_URL``, ``GREENPOOL_MAX_SIZE``, ``GREENPOOL_BINDS`` ...; see
    docs/flask.md). The extension object stores no app: its state lives in
    ``app.extensions["greenpool"]``, so one object can serve several apps.

    Inside a request use :attr:`conn` (or :meth:`get_conn` for a named database): the
    connection is borrowed on first use and given back when the request ends, committed
    if the response is a success and rolled back otherwise. In spawned greenlets, CLI
    commands and background jobs use ``with db.connection() as conn:`` instead.
    """

    def __init__(self, app: Flask | None = None) -> None:
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Validate the app's configuration and install the request hooks.

        No connection is opened here: each process opens its pools on first use.
        """
        if EXTENSION_KEY in app.extensions:
            raise RuntimeError(
                f"greenpool is already registered on app {app.name!r}: create one GreenPool "
                "extension per app and call init_app() once"
            )
        parsed = parse_config(app.config, app.name)
        app.extensions[EXTENSION_KEY] = AppState(app.name, parsed.databases, parsed.options)
        app.before_request(hooks.mark_owner)
        app.after_request(hooks.commit_on_success)
        app.teardown_request(hooks.release_connections)
        if parsed.options.handle_exhaustion:
            app.register_error_handler(PoolTimeout, hooks.exhausted)
            app.register_error_handler(TooManyRequests, hooks.exhausted)
        from greenpool.flask_ext.cli import greenpool_cli

        app.cli.add_command(greenpool_cli)

    # ------------------------------------------------------------------ state

    @staticmethod
    def state(app: Flask | None = None) -> AppState:
        """The extension state of ``app`` (default: the current app)."""
        target = app if app is not None else current_app
        try:
            state: AppState = target.extensions[EXTENSION_KEY]
        except KeyError:
            raise RuntimeError(
                f"greenpool is not registered on app {target.name!r}: call db.init_app(app)"
            ) from None
        return state

    def get_pool(self, name: str | None = None, app: Flask | None = None) -> CorePool:
        """The core pool of database ``name`` (None: the default) in this process.

        It is created and opened on first use in each process, never inherited from a
        parent process.
        """
        return self.state(app).get_pool(name)

    # ------------------------------------------------------------------ borrowing

    @property
    def conn(self) -> Any:
        """The current request's connection to the default database."""
        return self.get_conn(None)

    def get_conn(self, name: str | None = None) -> Any:
        """The current request's connection to database ``name`` (borrowed on first use).

        Only the request's own greenlet may use it; other greenlets and code outside a
        request use :meth:`connection`.
        """
        if not has_request_context():
            raise RuntimeError(
                "db.conn is a per-request connection and there is no request here; "
                "use `with db.connection() as conn:` in CLI commands and background jobs"
            )
        hooks.check_owner()
        table = hooks.borrowed_table()
        borrowed = table.get(name)
        if borrowed is not None:
            if borrowed.greenlet is not getcurrent():  # g shared with another greenlet
                raise RuntimeError(
                    "db.conn belongs to the greenlet serving the request; another greenlet "
                    "must use `with db.connection() as conn:`"
                )
            return borrowed.conn
        state = self.state()
        pool = state.get_pool(name)
        conn = pool.getconn()
        table[name] = hooks.Borrowed(name, pool, conn, getcurrent(), state)
        state.note_acquired(name)
        return conn

    @contextmanager
    def connection(
        self, name: str | None = None, timeout: float | None = None, app: Flask | None = None
    ) -> Iterator[Any]:
        """Borrow a connection for a block: committed on success, rolled back on error.

        Works anywhere the app is known (an app context, or ``app=``): in greenlets
        spawned by a request, CLI commands, background jobs.
        """
        state = self.state(app)
        pool = state.get_pool(name)
        with pool.connection(timeout) as conn:
            state.note_acquired(name)
            try:
                yield conn
            finally:
                state.note_released(name)

    # ------------------------------------------------------------------ operations

    def stats(self, app: Flask | None = None) -> dict[str, Any]:
        """Stats of this process's pools (configured but unstarted ones included)."""
        return self.state(app).snapshot()

    def check_cooperation(self, app: Flask | None = None) -> None:
        """Raise CooperationError if any configured driver would block the hub.

        Meant for gunicorn's ``post_worker_init`` hook (after the worker patched).
        """
        problems = self.state(app).cooperation_problems()
        if problems:
            raise CooperationError("; ".join(problems))

    def close(self, app: Flask | None = None, timeout: float = 5.0) -> None:
        """Close this process's pools of ``app``; using them again opens new ones."""
        self.state(app).close(timeout)
