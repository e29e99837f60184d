"""Per-app state: one core pool per configured database, created lazily in each process.

A pool is never inherited across ``fork``: the first use in a process (a gunicorn worker)
creates and opens it there, so ``--preload`` is safe. That first use is also where the
extension refuses to run uncooperatively (see :func:`cooperation_required`).
"""

from __future__ import annotations

import logging
import os
import sys
import weakref
from typing import Any

import gevent
from gevent.lock import Semaphore

from greenpool.errors import CooperationError, PoolError
from greenpool.flask_ext.config import DatabaseConfig, ExtensionOptions
from greenpool.pool import GreenPool as CorePool

logger = logging.getLogger("greenpool.flask")

_STATES: weakref.WeakSet[AppState] = weakref.WeakSet()


def _gevent_patched() -> bool:
    monkey = sys.modules.get("gevent.monkey")
    return bool(monkey and monkey.is_module_patched("socket"))


def under_gunicorn() -> bool:
    """True in a gunicorn master or worker (gunicorn sets SERVER_SOFTWARE)."""
    return os.environ.get("SERVER_SOFTWARE", "").startswith("gunicorn")


def cooperation_required(setting: bool | None) -> bool:
    """Whether an uncooperative driver is an error (True) or a warning (False).

    ``None`` ("auto") requires cooperation when serving: under gunicorn, or once gevent
    has patched the socket module (a half-patched process is the dangerous case). Plain
    scripts, ``flask`` CLI commands and unpatched tests only get a warning.
    """
    if setting is not None:
        return setting
    return under_gunicorn() or _gevent_patched()


class AppState:
    """What ``app.extensions["greenpool"]`` holds."""

    def __init__(
        self, app_name: str, databases: dict[str | None, DatabaseConfig], options: ExtensionOptions
    ) -> None:
        self.app_name = app_name
        self.databases = databases
        self.options = options
        self._pools: dict[str | None, CorePool] = {}
        self._pid = os.getpid()
        self._hub: Any = None
        self._start_lock: Semaphore | None = None
        self._in_use: dict[str | None, int] = {}
        self._peak: dict[str | None, int] = {}
        _STATES.add(self)

    # ------------------------------------------------------------------ pools

    def database(self, key: str | None) -> DatabaseConfig:
        """The configuration of ``key`` (None: the default database)."""
        try:
            return self.databases[key]
        except KeyError:
            names = ", ".join(repr(d.key) for d in self.databases.values())
            what = "no default database (GREENPOOL_CONNINFO)" if key is None else repr(key)
            raise KeyError(
                f"greenpool: {what} is not configured for app {self.app_name!r} "
                f"(configured: {names})"
            ) from None

    def get_pool(self, key: str | None) -> CorePool:
        """The open core pool of ``key`` in this process, created on first use."""
        if self._pid != os.getpid():
            self._forget_after_fork()
        pool = self._pools.get(key)
        if pool is None:
            return self._start(key)
        if self._hub is not gevent.get_hub():
            raise PoolError(
                f"greenpool: the pools of app {self.app_name!r} belong to another thread's "
                "gevent hub and are not thread-safe; serve with `gunicorn -k gevent` or "
                "`flask run --without-threads`"
            )
        return pool

    def started_pool(self, key: str | None) -> CorePool | None:
        """The pool of ``key`` if this process started it, without starting it."""
        if self._pid != os.getpid():
            return None
        return self._pools.get(key)

    def _start(self, key: str | None) -> CorePool:
        db = self.database(key)
        hub = gevent.get_hub()
        if self._pools and self._hub is not hub:
            raise PoolError(
                f"greenpool: app {self.app_name!r} is used from a second thread; its pools "
                "belong to one gevent hub (serve with `gunicorn -k gevent`)"
            )
        if self._start_lock is None:
            self._start_lock = Semaphore()
        # Opening a pool may yield (the driver's first-time set-up), so concurrent first
        # requests must not each create one: one starts it, the others wait and share it.
        with self._start_lock:
            if key in self._pools:
                return self._pools[key]
            pool = CorePool(db.conninfo, **{**db.pool_kwargs(), "open": False})
            pool.open()
            try:
                self._check_cooperation(pool, db)
            except BaseException:
                pool.close(timeout=0)
                raise
            self._pools[key] = pool
            self._hub = hub
        logger.info("greenpool: pool %r started in process %d", db.pool_name, os.getpid())
        return pool

    def _check_cooperation(self, pool: CorePool, db: DatabaseConfig) -> None:
        try:
            pool.check_cooperation()
        except CooperationError as ex:
            if cooperation_required(self.options.require_cooperation):
                raise CooperationError(
                    f"{ex}. greenpool refuses to serve requests with a driver that blocks the "
                    "whole worker; fix the import order (see deploy/gunicorn.conf.py) or set "
                    "GREENPOOL_REQUIRE_COOPERATION = False to run anyway"
                ) from None
            logger.warning("greenpool: database %r will block while it waits: %s", db.label, ex)

    def cooperation_problems(self) -> list[str]:
        """Why any configured database driver would block the hub; empty when all is well.

        Checks drivers without connecting (for gunicorn's ``post_worker_init``).
        """
        from greenpool.cooperation import cooperation_problems

        problems: list[str] = []
        for db in self.databases.values():
            problems += [f"database {db.label!r}: {p}" for p in cooperation_problems(db.driver)]
        return problems

    def _forget_after_fork(self) -> None:
        """In a forked child: drop (never close) the parent's pools; the core pool's own
        fork handling keeps their sockets untouched."""
        if self._pools:
            logger.debug("greenpool: process %d forgets its parent's pools", os.getpid())
        self._pools = {}
        self._hub = None
        self._start_lock = None
        self._in_use = {}
        self._peak = {}
        self._pid = os.getpid()

    def close(self, timeout: float = 5.0) -> None:
        """Close this process's pools; later use creates new ones."""
        if self._pid != os.getpid():
            self._forget_after_fork()
            return
        pools, self._pools = self._pools, {}
        for pool in pools.values():
            try:
                pool.close(timeout=timeout)
            except Exception:
                logger.exception("greenpool: closing pool %r failed", pool.name)

    # ------------------------------------------------------------------ accounting

    def note_acquired(self, key: str | None) -> None:
        """Count a connection lent through the extension (for the peak statistic)."""
        n = self._in_use.get(key, 0) + 1
        self._in_use[key] = n
        if n > self._peak.get(key, 0):
            self._peak[key] = n

    def note_released(self, key: str | None) -> None:
        """The matching release of :meth:`note_acquired`."""
        self._in_use[key] = max(0, self._in_use.get(key, 0) - 1)

    def snapshot(self) -> dict[str, Any]:
        """Stats of every configured database in this process, without starting a pool."""
        result: dict[str, Any] = {}
        for key, db in self.databases.items():
            pool = self.started_pool(key)
            entry: dict[str, Any] = {
                "pool": db.pool_name,
                "started": pool is not None,
                "in_use": self._in_use.get(key, 0) if pool is not None else 0,
                "peak_acquired": self._peak.get(key, 0) if pool is not None else 0,
            }
            if pool is not None:
                entry.update(pool.stats())
                entry["pool"] = db.pool_name
            result[db.label] = entry
        return {"pid": os.getpid(), "app": self.app_name, "databases": result}


def close_all_pools(timeout: float = 5.0) -> None:
    """Close every pool the Flask extension started in this process.

    Meant for gunicorn's ``worker_exit`` hook: backends are released with a clean
    Terminate instead of being cut off when the process exits.
    """
    for state in list(_STATES):
        state.close(timeout=timeout)
