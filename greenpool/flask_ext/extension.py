"""``db = GreenPool(); db.init_app(app)``: the Flask extension.

``init_app`` validates ``app.config`` (see :mod:`greenpool.flask_ext.config`), stores the
app's state in ``app.extensions["greenpool"]`` (never the app on the extension object),
installs the request hooks and the ``flask greenpool`` commands, and makes the object a
Flask-aware pool:

- created without a conninfo (``GreenPool()``), it becomes a *handle*: each app's
  databases are served by pools from the process registry, created on first use in each
  process; pool methods (``connection()``, ``getconn()``, ``stats()`` ...) act on the
  current app's default database. One handle can serve several apps (tests, app
  factories).
- created with a conninfo (``GreenPool("postgresql://...")``), it stays that pool and is
  the app's default database; binds come from ``GREENPOOL_BINDS``.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

from flask import Flask, has_app_context

from greenpool.api import GreenPool
from greenpool.errors import PoolError, PoolTimeout, TooManyRequests
from greenpool.flask_ext import request as req
from greenpool.flask_ext.config import parse_config
from greenpool.flask_ext.state import AppState
from greenpool.pool import NEW, Connection
from greenpool.settings import seconds

if TYPE_CHECKING:
    from greenpool.flask_ext.config import DatabaseConfig

EXTENSION_KEY = req.EXTENSION_KEY


def init_app(db: GreenPool[Any], app: Flask) -> None:
    """See :meth:`greenpool.GreenPool.init_app`. No connection is opened here."""
    if EXTENSION_KEY in app.extensions:
        raise RuntimeError(
            f"greenpool is already registered on app {app.name!r}: create one GreenPool "
            "extension per app and call init_app() once"
        )
    is_handle = isinstance(db, FlaskHandle) or (
        db._state == NEW and not db.target.conninfo and not db._kwargs
    )
    own_pool = None if is_handle else db
    parsed = parse_config(app.config, app.name, own_pool.name if own_pool is not None else None)
    state = AppState(app.name, parsed, own_pool)
    app.extensions[EXTENSION_KEY] = state
    req.install(app, state)
    if parsed.options.handle_exhaustion:
        app.register_error_handler(PoolTimeout, req.exhausted)
        app.register_error_handler(TooManyRequests, req.exhausted)
    from greenpool.flask_ext.cli import greenpool_cli

    app.cli.add_command(greenpool_cli)
    if not isinstance(db, FlaskPool):
        db.__class__ = FlaskHandle if is_handle else FlaskPool
        db._app_states = weakref.WeakSet()  # type: ignore[attr-defined]
    db._app_states.add(app.extensions[EXTENSION_KEY])  # type: ignore[attr-defined]


def pool_of(db: GreenPool[Any], name: str | None, app: Flask | None) -> GreenPool[Any]:
    """The pool serving database ``name`` of ``app`` (default: the current app)."""
    if not isinstance(db, FlaskPool):
        raise PoolError("a database name or app needs db.init_app(app) first")
    return req.state_of(app).pool(name)


class FlaskPool(GreenPool[Any]):
    """A pool that also serves a Flask app's requests (``db.conn``). Internal: objects
    become one through ``init_app``; ``isinstance(db, greenpool.GreenPool)`` holds."""

    @property
    def conn(self) -> Any:
        """The current request's connection to the default database (see
        :meth:`greenpool.GreenPool.conn`)."""
        return req.request_conn(self, None)

    def get_conn(self, name: str | None = None) -> Any:
        return req.request_conn(self, name)

    @property
    def read_conn(self) -> Any:
        """The current request's connection for reads: a replica's
        (``GREENPOOL_REPLICAS``), or the primary one once the request used ``db.conn``."""
        return req.request_read_conn(self)

    def release(self) -> None:
        req.release_early(self)

    @staticmethod
    def app_state(app: Flask | None = None) -> AppState:
        """The extension state of ``app`` (default: the current app)."""
        return req.state_of(app)

    def get_pool(self, name: str | None = None, app: Flask | None = None) -> GreenPool[Any]:
        """The open pool of database ``name`` (None: the default) of ``app`` (default:
        the current app) in this process, opened on first use."""
        return req.state_of(app).pool(name)

    def add_database(
        self, name: str, conninfo: str, *, app: Flask | None = None, **settings: Any
    ) -> DatabaseConfig:
        """Configure a named database at run time (one database per tenant, say), with the
        app's top-level ``GREENPOOL_*`` settings as defaults; ``db.get_conn(name)`` and
        ``db.connection(name=name)`` then use it. Nothing connects until it is used."""
        return req.state_of(app).add_database(name, conninfo, **settings)

    def app_stats(self, app: Flask | None = None, *, errors: bool = True) -> dict[str, Any]:
        """Stats of every database of ``app`` in this process (unstarted ones included)."""
        return req.state_of(app).snapshot(errors=errors)

    def close_app(self, app: Flask | None = None, timeout: float = 5.0) -> None:
        """Close this process's pools of ``app`` (using them again opens new ones)."""
        req.state_of(app).close(timeout)


class FlaskHandle(FlaskPool):
    """``GreenPool()`` after ``init_app``: pool methods act on the current app's default
    database, whose pool comes from the registry (see the module docstring)."""

    def _default(self) -> GreenPool[Any]:
        if not has_app_context():
            raise RuntimeError(
                "this GreenPool serves Flask apps (init_app): use it inside an app context, "
                "or pass app= (db.connection(app=app)); or db.get_pool(app=app)"
            )
        return req.state_of(None).pool(None)

    def __repr__(self) -> str:
        return "<GreenPool (Flask extension; pools per app and process)>"

    @property
    def closed(self) -> bool:
        return False

    def getconn(self, timeout: float | None = None, read_only: bool = False) -> Any:
        return self._default().getconn(timeout, read_only)

    def putconn(self, conn: Any, discard: bool = False) -> None:
        self._default().putconn(conn, discard)

    def connection(
        self,
        timeout: float | None = None,
        *,
        read_only: bool = False,
        after: str | None = None,
        name: str | None = None,
        app: Flask | None = None,
    ) -> Connection[Any]:
        pool = req.state_of(app).pool(name)
        return pool.connection(timeout, read_only=read_only, after=after)

    def stats(self) -> dict[str, Any]:
        return self._default().stats()

    def check(self) -> int:
        return self._default().check()

    def resize(self, min_size: int, max_size: int | None = None) -> None:
        self._default().resize(min_size, max_size)

    def reconnect_all(self) -> None:
        self._default().reconnect_all()

    def drain(self, timeout: float = 30.0, *, conninfo: str | None = None) -> None:
        self._default().drain(timeout, conninfo=conninfo)

    def open(self, wait: bool = False, timeout: float = 30.0) -> None:
        pool = self._default()
        if wait:
            pool.wait(timeout)

    def wait(self, timeout: float = 30.0) -> None:
        self._default().wait(timeout)

    def close(self, timeout: float = 5.0, *, app: Flask | None = None) -> None:
        """Close this process's pools of ``app`` (default: the current app, or every app
        this object serves when there is no app context); using them again opens new
        ones."""
        timeout = seconds("timeout", timeout)
        if app is None and not has_app_context():
            for state in list(self._app_states):  # type: ignore[attr-defined]
                state.close(timeout)
            return
        req.state_of(app).close(timeout)
