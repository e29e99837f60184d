"""The ``greenpool.django`` database backend: Django's PostgreSQL backend on a GreenPool.

Django keeps one ``DatabaseWrapper`` per alias per thread; once gevent has patched
``threading`` that means per greenlet. Each wrapper borrows a connection from the alias's
GreenPool (one per process) when it first needs one and gives it back in ``close()``,
which Django calls at the end of every request (``close_old_connections`` on
``request_finished``). A greenlet that ends while still holding a connection (a spawned
greenlet that never closed it, or one that was killed) gives it back as it ends. The
pool rolls back anything left open, so the next borrower always gets a clean one.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any

import gevent
from django.core.exceptions import ImproperlyConfigured
from django.db import DEFAULT_DB_ALIAS
from django.db.backends.base.base import NO_DB_ALIAS
from django.db.backends.postgresql.base import DatabaseWrapper as PostgresDatabaseWrapper
from django.db.backends.postgresql.psycopg_any import IsolationLevel, is_psycopg3
from django.utils.asyncio import async_unsafe

from greenpool import GreenPool, PoolTimeout, TooManyRequests
from greenpool.django import errors
from greenpool.django.pools import create_pool, drop_pool, gevent_patched, pool_options

_SIGNATURE_KEYS = ("dbname", "host", "port", "user", "service")


class DatabaseWrapper(PostgresDatabaseWrapper):  # type: ignore[misc]
    """Django's PostgreSQL ``DatabaseWrapper`` whose connections come from a GreenPool.

    ``OPTIONS["pool"]`` holds the pool's settings (GreenPool's keyword arguments:
    ``min_size``, ``max_size``, ``timeout``, ``max_waiting``, ``max_idle``,
    ``max_lifetime``, ...); ``True`` or absent means greenpool's defaults, ``False``
    turns pooling off. ``CONN_MAX_AGE`` must stay 0: the pool keeps the connections.
    """

    def __init__(self, settings_dict: dict[str, Any], alias: str = DEFAULT_DB_ALIAS) -> None:
        super().__init__(settings_dict, alias)
        self.settings_dict: dict[str, Any] = settings_dict
        self.connection: Any = None
        raw = settings_dict.get("OPTIONS", {}).get("pool", True)
        self._pool_options: dict[str, Any] | None = None
        if raw is not False and alias != NO_DB_ALIAS:
            self._pool_options = pool_options(alias, raw, _driver_name())
        if self._pool_options is not None and settings_dict.get("CONN_MAX_AGE", 0) != 0:
            raise ImproperlyConfigured(
                f"DATABASES[{alias!r}]['CONN_MAX_AGE']: must be 0 with greenpool.django "
                f"(got {settings_dict['CONN_MAX_AGE']!r}); the pool keeps connections open "
                "and each request gives its connection back"
            )
        self._lender: GreenPool[Any] | None = None
        self._linked: Any = None

    # ------------------------------------------------------------------ pool

    @property
    def pool(self) -> None:
        """Django's own pool (psycopg_pool, Django >= 5.1) is never used here."""
        return None

    @property
    def greenpool(self) -> GreenPool[Any] | None:
        """This alias's GreenPool in this process (None until its first connection)."""
        from greenpool.django.pools import get_pool

        return get_pool(self.alias)

    def _pooling(self) -> bool:
        # Without gevent's patching Django's connections are per OS thread (manage.py,
        # runserver's threads): a pool belongs to one hub, so connect as Django does.
        return self._pool_options is not None and gevent_patched()

    def close_pool(self) -> None:
        """Close this alias's pool; the next connection starts a new one."""
        drop_pool(self.alias)

    # ------------------------------------------------------------------ connections

    def get_connection_params(self) -> dict[str, Any]:
        options = self.settings_dict["OPTIONS"]
        if "pool" not in options:
            return dict(super().get_connection_params())
        saved = self.settings_dict
        self.settings_dict = {**saved, "OPTIONS": {k: v for k, v in options.items() if k != "pool"}}
        try:
            return dict(super().get_connection_params())
        finally:
            self.settings_dict = saved

    @async_unsafe  # type: ignore[untyped-decorator]
    def get_new_connection(self, conn_params: dict[str, Any]) -> Any:
        if not self._pooling():
            return super().get_new_connection(conn_params)
        assert self._pool_options is not None
        options = self.settings_dict["OPTIONS"]
        set_isolation_level = "isolation_level" in options
        try:
            self.isolation_level = IsolationLevel(
                options.get("isolation_level", IsolationLevel.READ_COMMITTED)
            )
        except ValueError:
            raise ImproperlyConfigured(
                f"Invalid transaction isolation level {options['isolation_level']} "
                "specified. Use one of the psycopg.IsolationLevel values."
            ) from None
        pool = self._pool_for(conn_params)
        try:
            connection = pool.getconn()
        except PoolTimeout as ex:
            raise errors.PoolTimeout(str(ex)) from ex
        except TooManyRequests as ex:
            raise errors.TooManyRequests(str(ex)) from ex
        self._lender = pool
        self._link_to_current_greenlet()
        if set_isolation_level:
            connection.isolation_level = self.isolation_level
        return connection

    def _pool_for(self, conn_params: dict[str, Any]) -> GreenPool[Any]:
        assert self._pool_options is not None
        params = dict(conn_params)
        if is_psycopg3:
            params["autocommit"] = True  # as Django's own pool: Django sets it per borrow
        pool = create_pool(
            self.alias, self._pool_options, params, _driver_name(), _configure_new_connection
        )
        signature = {k: params.get(k) for k in _SIGNATURE_KEYS}
        known = getattr(pool, "_greenpool_django_signature", None)
        if known is None:
            pool._greenpool_django_signature = signature  # type: ignore[attr-defined]
        elif known != signature:
            # NAME/HOST/... changed (the test runner switches to the test database):
            # connections of the old settings must not be lent any more.
            drop_pool(self.alias)
            return self._pool_for(conn_params)
        return pool

    def _close(self) -> None:
        lender, conn = self._lender, self.connection
        if lender is None or conn is None:
            super()._close()
            return
        self._lender = None
        self.connection = None  # given back: unusable even inside an atomic block
        with self.wrap_database_errors:
            lender.putconn(conn)

    def close_if_unusable_or_obsolete(self) -> None:
        """At every request boundary a pooled connection goes back to the pool (which
        rolls back and checks it); a plain one follows Django's CONN_MAX_AGE rules."""
        if self.connection is not None and self._lender is not None:
            self.close()
            return
        super().close_if_unusable_or_obsolete()

    # ------------------------------------------------------------------ greenlets

    def _link_to_current_greenlet(self) -> None:
        current = gevent.getcurrent()
        if not hasattr(current, "rawlink"):
            return  # the main greenlet (or a raw greenlet): nothing to link to
        linked = self._linked() if self._linked is not None else None
        if linked is current:
            return
        self._linked = weakref.ref(current)
        # A strong reference to the wrapper: the greenlet's local storage (and this
        # wrapper with it) may be gone by the time the link runs.
        current.rawlink(functools.partial(_greenlet_ended, self))


def _driver_name() -> str:
    return "psycopg" if is_psycopg3 else "psycopg2"


def _configure_new_connection(connection: Any) -> None:
    """Once per new connection (in the pool's connector greenlet)."""
    if not is_psycopg3:
        import psycopg2.extras

        connection.autocommit = True
        # As Django does per connection: JSONField decodes in Python, not in psycopg2.
        psycopg2.extras.register_default_jsonb(conn_or_curs=connection, loads=lambda x: x)


def _greenlet_ended(wrapper: DatabaseWrapper, greenlet: Any) -> None:
    """Runs in the hub when a greenlet that borrowed a connection ends."""
    if wrapper._lender is not None and wrapper.connection is not None:
        gevent.spawn(_give_back, wrapper)


def _give_back(wrapper: DatabaseWrapper) -> None:
    lender, conn = wrapper._lender, wrapper.connection
    if lender is None or conn is None:
        return
    wrapper._lender = None
    wrapper.connection = None
    wrapper.closed_in_transaction = wrapper.in_atomic_block
    lender.putconn(conn)  # rolled back if a transaction was left open
