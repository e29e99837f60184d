"""Per-app state: the configured databases and the pools that serve them.

Pools come from the process registry (:func:`greenpool.get_pool`), keyed by conninfo and
settings: each process (gunicorn worker) opens its own on first use, never inheriting
one from a parent, so ``--preload`` is safe; apps configured alike share one. When the
extension object was itself created with a conninfo, it is the default database's pool.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

import gevent

from greenpool.cooperation import cooperation_problems, cooperation_required
from greenpool.errors import CooperationError, PoolError
from greenpool.flask_ext.config import (
    DatabaseConfig,
    ExtensionOptions,
    ParsedConfig,
    database_from,
)
from greenpool.registry import get_pool
from greenpool.settings import seconds

if TYPE_CHECKING:
    from greenpool.api import GreenPool

logger = logging.getLogger("greenpool.flask")


class AppState:
    """What ``app.extensions["greenpool"]`` holds."""

    def __init__(
        self, app_name: str, parsed: ParsedConfig, own_pool: GreenPool[Any] | None = None
    ) -> None:
        self.app_name = app_name
        self.databases: dict[str | None, DatabaseConfig] = parsed.databases
        self.options: ExtensionOptions = parsed.options
        self._top = parsed.top  # top-level settings new databases inherit
        self._base_name = parsed.base_name
        self._own_pool = own_pool  # the extension object, when it is a pool itself
        self._pools: dict[str | None, GreenPool[Any]] = {}  # checked and in use here
        self._prometheus = parsed.options.prometheus is True  # histograms wanted

    def enable_prometheus(self) -> None:
        """Record the acquire-wait and hold-time histograms of this app's pools, from now
        on (stats_blueprint and GreenPoolCollector call this), unless
        ``GREENPOOL_PROMETHEUS`` is False. Never switches."""
        if self.options.prometheus is False or self._prometheus:
            return
        self._prometheus = True
        for key, pool in list(self._pools.items()):
            if not pool.closed:
                self._instrument(pool, key)

    def _instrument(self, pool: GreenPool[Any], key: str | None) -> None:
        label = self.databases[key].label if key in self.databases else str(key)
        if self._prometheus:
            from greenpool import prometheus

            prometheus.instrument(pool, database=label)
        if self.options.otel:
            from greenpool import otel

            provider = None if self.options.otel is True else self.options.otel
            otel.instrument(pool, provider)

    def database(self, key: str | None) -> DatabaseConfig:
        """The configuration of ``key`` (None: the default database)."""
        try:
            return self.databases[key]
        except KeyError:
            names = ", ".join(repr(d.label) for d in self.databases.values())
            what = "no default database (GREENPOOL_CONNINFO)" if key is None else repr(key)
            raise KeyError(
                f"greenpool: {what} is not configured for app {self.app_name!r} "
                f"(configured: {names or 'none'})"
            ) from None

    def add_database(self, name: str, conninfo: str, **settings: Any) -> DatabaseConfig:
        """Configure a named database at run time (e.g. one database per tenant), with
        the app's top-level settings as defaults. Validated like a bind; no connection is
        opened until it is used."""
        if name in self.databases:
            raise PoolError(f"greenpool: database {name!r} is already configured")
        db = database_from(name, {"conninfo": conninfo, **settings}, self._top, self._base_name)
        self.databases[name] = db
        return db

    def pool(self, key: str | None) -> GreenPool[Any]:
        """The open pool of database ``key`` in this process, created on first use.

        Switches only when the pool opens."""
        pool = self._pools.get(key)
        if pool is not None and pool._state != "closed":
            if pool._hub is not gevent.get_hub() and pool._hub is not None:  # None: forked
                raise PoolError(
                    f"greenpool: the pools of app {self.app_name!r} belong to another "
                    "thread's gevent hub and are not thread-safe; serve with "
                    "`gunicorn -k gevent` or `flask run --without-threads`"
                )
            return pool
        if key is None and self._own_pool is not None:
            pool = self._own_pool
            if pool._state == "new":
                pool.open()
        else:
            db = self.database(key)
            pool = get_pool(db.conninfo, **db.pool_kwargs())
        self._check(pool, key)
        self._pools[key] = pool
        if self._prometheus or self.options.otel:
            self._instrument(pool, key)
        return pool

    def _check(self, pool: GreenPool[Any], key: str | None) -> None:
        if pool._hub is not None and pool._hub is not gevent.get_hub():
            raise PoolError(
                f"greenpool: the pools of app {self.app_name!r} belong to another thread's "
                "gevent hub and are not thread-safe; serve with `gunicorn -k gevent` or "
                "`flask run --without-threads`"
            )
        try:
            pool.check_cooperation()
        except CooperationError as ex:
            if cooperation_required(self.options.require_cooperation):
                raise CooperationError(
                    f"{ex}. greenpool refuses to serve requests with a driver that blocks the "
                    "whole worker; serve with `gunicorn -c python:greenpool.gunicorn` (it "
                    "patches and sets the drivers up in order) or set "
                    "GREENPOOL_REQUIRE_COOPERATION = False to run anyway"
                ) from None
            label = "default" if key is None else key
            logger.warning("greenpool: database %r will block while it waits: %s", label, ex)
        logger.info("greenpool: pool %r started in process %d", pool.name, os.getpid())

    def started_pool(self, key: str | None) -> GreenPool[Any] | None:
        """The pool of ``key`` if this app uses it in this process, without opening it."""
        pool = self._pools.get(key)
        return None if pool is None or pool.closed else pool

    def cooperation_problems(self) -> list[str]:
        """Why any configured database driver would block the hub; empty when all is well.

        Checks drivers without connecting (for gunicorn's ``post_worker_init``)."""
        problems: list[str] = []
        for db in self.databases.values():
            problems += [f"database {db.label!r}: {p}" for p in cooperation_problems(db.driver)]
        return problems

    def close(self, timeout: float = 5.0) -> None:
        """Close this process's pools of this app; later use opens new ones."""
        timeout = seconds("timeout", timeout)
        pools, self._pools = self._pools, {}
        for pool in pools.values():
            if pool is self._own_pool:
                continue  # the extension object's own pool: closed by db.close()
            try:
                pool.close(timeout=timeout)
            except Exception:
                logger.exception("greenpool: closing pool %r failed", pool.name)

    def snapshot(self, *, errors: bool = True) -> dict[str, Any]:
        """Stats of every configured database in this process, without starting a pool.

        ``errors=False`` leaves out ``last_error`` (server addresses, users, FATAL text)."""
        result: dict[str, Any] = {}
        for key, db in self.databases.items():
            pool = self.started_pool(key)
            entry: dict[str, Any] = {"pool": db.pool_name, "started": pool is not None}
            if pool is not None:
                entry.update(pool.stats())
                entry["pool"] = db.pool_name
                if not errors:
                    entry.pop("last_error", None)
            result[db.label] = entry
        return {"pid": os.getpid(), "app": self.app_name, "databases": result}
