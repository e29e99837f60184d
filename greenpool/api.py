"""``GreenPool``: the pool's mechanism with its policies plugged in, and its operations.

:class:`greenpool.pool.Pool` lends and takes back connections; this class builds one from
a conninfo and settings, plugs in the policies (:class:`~greenpool.connector.Connector`,
:class:`~greenpool.vetting.Vetting`, :class:`~greenpool.maintenance.Maintenance`), and adds
the lifecycle (open, wait, close), the operations (resize, check, drain, reconnect_all),
``stats()``, and the Flask entry points (``init_app``, ``conn``), which load the Flask
integration only when called.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Callable
from dataclasses import fields
from time import monotonic
from typing import TYPE_CHECKING, Any

import gevent
from gevent import getcurrent
from gevent.event import Event

from greenpool import conninfo as _ci
from greenpool import fork, pooler
from greenpool.alerts import Alerts
from greenpool.connector import Connector
from greenpool.cooperation import cooperation_problems
from greenpool.drivers import Driver, get_driver
from greenpool.errors import ConnectError, CooperationError, PoolClosed, PoolError, PoolTimeout
from greenpool.hosts import WRITABLE, HostTable
from greenpool.leaks import LeakDetector
from greenpool.maintenance import Maintenance
from greenpool.pool import CLOSED, FORKED, NEW, OPEN, Connection, ConnT, Pool, ReadOnlyConnection
from greenpool.routing import TOKEN_SQL, Router, replica_specs
from greenpool.settings import PoolSettings, build_settings, seconds
from greenpool.stats import snapshot
from greenpool.tracing import Tracer, Tracers
from greenpool.vetting import Vetting, redacted_copy

if TYPE_CHECKING:
    from flask import Flask

    from greenpool.flask_ext.config import DatabaseConfig

logger = logging.getLogger("greenpool")

ConnCallback = Callable[[Any], None]
_SETTING_NAMES = frozenset(f.name for f in fields(PoolSettings))
_NAME = re.compile(r"[ -~]{1,63}")


class GreenPool(Pool[ConnT]):
    """A gevent-cooperative PostgreSQL connection pool.

    Borrow with ``with pool.connection() as conn:`` (commits on success, rolls back on an
    exception) or ``getconn()`` / ``putconn()``. Connections are opened, checked, aged and
    replaced by the pool's own maintenance greenlet and connector greenlets; a borrower
    only ever waits, first come first served, for at most ``timeout`` seconds. Every
    released connection is rolled back and cleaned by the ``reset`` policy (by default a
    fresh session: no role, setting or client attribute crosses from one borrower to the
    next).

    Settings may also come from the conninfo, pgxpool-style (``pool_max_conns=10``);
    explicit keyword arguments win. With no conninfo and no ``kwargs`` the pool stays
    closed until :meth:`open` (pass ``open=True`` to use libpq's environment defaults).

    In a Flask app, ``db = GreenPool()`` then ``db.init_app(app)`` configures it from
    ``app.config`` (see docs/flask.md); views use ``db.conn``.
    """

    def __init__(
        self,
        conninfo: str | Flask = "",
        *,
        min_size: int | None = None,
        max_size: int | None = None,
        timeout: float | None = None,
        max_waiting: int | None = None,
        max_idle: float | None = None,
        max_lifetime: float | None = None,
        health_check_period: float | None = None,
        reconnect_timeout: float | None = None,
        driver: str | Driver = "psycopg",
        configure: ConnCallback | None = None,
        check: ConnCallback | None = None,
        reset: ConnCallback | str | None = "default",
        name: str | None = None,
        kwargs: dict[str, Any] | None = None,
        open: bool | None = None,
        min_idle: int | None = None,
        max_lifetime_jitter: float | None = None,
        check_idle_after: float | None = None,
        ping_timeout: float | None = None,
        connect_timeout: float | None = None,
        max_connecting: int | None = None,
        reconnect_failed: Callable[[GreenPool[Any]], None] | None = None,
        before_connect: Callable[[dict[str, Any]], None] | None = None,
        on_acquire: Tracer | None = None,
        on_release: Tracer | None = None,
        leak_threshold: float | None = None,
        saturation_warning_after: float | None = None,
        pooler_mode: str | None = None,
        replicas: list[str | dict[str, Any]] | None = None,
        max_replica_lag: float = 5.0,
        replica_fallback: str = "primary",
        replica_check_period: float = 1.0,
    ) -> None:
        app = None
        if not isinstance(conninfo, str) and hasattr(conninfo, "extensions"):
            app, conninfo = conninfo, ""  # GreenPool(app): the Flask extension habit
        given = locals()
        self._explicit = {k: given[k] for k in _SETTING_NAMES if given[k] is not None}
        self._kwargs: dict[str, Any] = dict(kwargs or {})
        pool_name = name or "greenpool"
        if not isinstance(pool_name, str) or not _NAME.fullmatch(pool_name):
            raise ValueError(
                "name: expected 1-63 printable ASCII characters (it becomes the "
                "application_name and a metric label)"
            )
        adapter = get_driver(driver)
        target, settings = self._parse(conninfo, adapter, pool_name)
        self.pooler_mode = pooler.mode(pooler_mode, self._conninfo_pooler_mode)
        policy = pooler.reset_policy(self.pooler_mode, reset)
        pooler.adjust_target(self.pooler_mode, target, adapter)
        super().__init__(pool_name, adapter, settings)
        self.target = target
        self.hosts = HostTable(target.target_session_attrs)
        self._vetting = Vetting(self, adapter, policy, check, target.redact, self.hosts)
        self._connector = Connector(
            self,
            adapter,
            target,
            self._vetting,
            configure,
            reconnect_failed,
            before_connect,
            self.hosts,
        )
        self._maintenance = Maintenance(self, self._connector, self._vetting)
        self.tracers = Tracers(self)
        if on_acquire is not None or on_release is not None:
            self.tracers.add(on_acquire, on_release)
        self._leaks: LeakDetector | None = None
        if settings.leak_threshold is not None:
            self._leaks = LeakDetector(self, self.tracers, settings.leak_threshold)
            self._maintenance.tasks.append(self._leaks.scan)
        self._maintenance.tasks.append(Alerts(self))
        self._router: Router | None = None
        specs = replica_specs(replicas)
        if specs:
            inherited = {k: v for k, v in self._explicit.items() if k not in ("min_size",)}
            pools: list[GreenPool[Any]] = [
                GreenPool(
                    spec_conninfo,
                    **{
                        **inherited,
                        "min_size": 0,
                        **spec,
                        "name": spec.get("name") or f"{pool_name[:54]}-replica{i}",
                        "driver": driver,
                        "reset": reset,
                        "configure": configure,
                        "check": check,
                        "kwargs": kwargs,
                        "before_connect": before_connect,
                        "open": False,
                    },
                )
                for i, (spec_conninfo, spec) in enumerate(specs)
            ]
            self._router = Router(
                self,
                pools,
                seconds("max_replica_lag", max_replica_lag),
                replica_fallback,
                max(0.05, seconds("replica_check_period", replica_check_period)),
            )
            router = self._router
            self._getconn_read_only = router.getconn
        self._grow = self._connector.grow
        self._vet = self._vetting.checkout
        self._clean = self._vetting.clean
        self._cleaning_needed = policy.needed
        self._on_broken = lambda: self._maintenance.wake(check=True)
        self._vetting.on_read_only = self._host_turned_read_only
        self._vetting.warn_session_features = self.pooler_mode == "transaction"
        self._on_read_only_error = self._read_only_error
        self._restart = self._restart_after_fork
        self._hub: Any = None
        self._opening: Event | None = None  # set while open() sets the driver up
        fork.track(self)
        if app is not None:
            self.init_app(app)
            return
        should_open = open if open is not None else bool(conninfo or kwargs)
        if should_open:
            self.open()

    # ------------------------------------------------------------------ configuration

    def _parse(
        self, conninfo: Any, driver: Driver, name: str
    ) -> tuple[_ci.Target, PoolSettings]:
        """Validate the conninfo (any object: a non-string is refused by name) and merge
        the settings it carries with the explicit ones."""
        target, from_conninfo = _ci.make_target(conninfo, self._kwargs, name)
        self._conninfo_pooler_mode = target.pooler_mode
        settings = build_settings(self._explicit, from_conninfo)
        if target.conninfo.strip():
            driver.validate_conninfo(target.conninfo)
        return target, settings

    def configure_conninfo(self, conninfo: str, kwargs: dict[str, Any] | None = None) -> None:
        """Set the connection string (and connect kwargs) of a pool that is not open yet.

        Never switches."""
        if self._state != NEW:
            raise PoolError(f"pool {self.name!r} is open: use drain(conninfo=...) to change it")
        if kwargs is not None:
            self._kwargs = dict(kwargs)
        self._set_target(conninfo)

    def _set_target(self, conninfo: str) -> None:
        target, settings = self._parse(conninfo, self._driver, self.name)
        pooler.adjust_target(self.pooler_mode, target, self._driver)
        self.settings = settings  # only once everything was accepted
        self.target = self._connector.target = target
        self.hosts.wants_writable = target.target_session_attrs in WRITABLE
        self._vetting._redact = target.redact

    @property
    def state(self) -> str:
        """``"new"`` (never opened), ``"open"`` or ``"closed"``. Never switches."""
        return OPEN if self._state == FORKED else self._state

    @property
    def min_size(self) -> int:
        return self.settings.min_size

    @property
    def max_size(self) -> int:
        return self.settings.max_size

    @property
    def timeout(self) -> float:
        return self.settings.timeout

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {self.name!r} {self.target.description} {self._state} "
            f"size={self._slots - self._closing}/{self.settings.max_size} "
            f"idle={len(self._idle)}>"
        )

    # ------------------------------------------------------------------ lifecycle

    def open(self, wait: bool = False, timeout: float = 30.0) -> None:
        """Start the pool: the maintenance greenlet begins opening min_size connections.

        With ``wait=True`` block until they are ready, failing fast with the real connection
        error (wrong password, no server) and closing the pool again in that case.
        Switches only with ``wait=True`` (and while the driver sets itself up).
        """
        timeout = seconds("timeout", timeout)
        opening = self._opening
        if opening is not None:  # another greenlet is opening it: wait for that
            opening.wait(timeout)
        if self._state in (OPEN, FORKED):
            if wait:
                self.wait(timeout)
            return
        if self._state == CLOSED:
            raise PoolClosed(f"pool {self.name!r} was closed; create a new pool")
        self._opening = Event()
        try:
            # Setting the driver up may switch greenlets (gevent_wait's self-test).
            problems = cooperation_problems(self._driver)
            if problems:
                msg = f"pool {self.name!r} will not cooperate with gevent: " + "; ".join(
                    problems
                )
                logger.warning(msg)
                warnings.warn(msg, RuntimeWarning, stacklevel=2)
            if self._state != NEW:
                raise PoolClosed(f"pool {self.name!r} was closed while it opened")
            self._state = OPEN
            self._hub = gevent.get_hub()
            self._maintenance.start()
            if self._router is not None:
                self._router.start()
        finally:
            opening, self._opening = self._opening, None
            opening.set()
        logger.info("pool %r opened (%s)", self.name, self.target.description)
        if wait:
            try:
                self.wait(timeout)
            except BaseException:
                self.close(timeout=0)
                raise

    def wait(self, timeout: float = 30.0) -> None:
        """Block until min_size (at least one) connections are open.

        Raises ConnectError with the driver's error as soon as a connection attempt fails,
        or PoolTimeout after ``timeout`` seconds. Switches.
        """
        timeout = seconds("timeout", timeout)
        self._check_open()
        connector = self._connector
        target = max(self.settings.min_size, 1)
        deadline = monotonic() + timeout
        errors_before = connector.connect_errors
        connector.wait_target = target
        try:
            connector.grow()
            while self.open_count() < target:
                if connector.connect_errors > errors_before:
                    raise ConnectError(
                        f"pool {self.name!r} could not connect ({self.target.description}): "
                        f"{connector.last_error}"
                    ) from redacted_copy(connector.last_exception, self.target.redact)
                remaining = deadline - monotonic()
                if remaining <= 0:
                    raise PoolTimeout(
                        f"pool {self.name!r}: {self.open_count()} of {target} connections "
                        f"ready after {timeout:g} s{connector.error_suffix()}"
                    )
                self._check_open()
                connector.wait_outcome(remaining)
        finally:
            connector.wait_target = 0

    def close(self, timeout: float = 5.0) -> None:
        """Close the pool: waiters get PoolClosed, idle connections are closed now.

        Borrowed connections are closed when they come back; this waits up to ``timeout``
        seconds for them, then returns anyway (logging how many are still out). Switches
        while waiting."""
        timeout = seconds("timeout", timeout)
        if self._state == CLOSED:
            return
        was_new = self._state == NEW
        current = getcurrent()
        to_kill = [
            g
            for g in (
                *self._connector.greenlets(),
                *self._vetting.pending_checks(),
                *self._maintenance.greenlets(),
            )
            if g is not current
        ]
        self._state = CLOSED
        gevent.killall(to_kill, block=False)
        self._connector.notify_outcome()
        if self._router is not None:
            self._router.close(timeout)
        self._close_mechanism(timeout)
        if not was_new:
            logger.info("pool %r closed", self.name)

    def __enter__(self) -> GreenPool[ConnT]:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _timeout_message(self, waited: float) -> str:
        return super()._timeout_message(waited) + self._connector.error_suffix()

    def _host_turned_read_only(self, host: str) -> None:
        """A server this pool wrote to now reports read-only (demoted, or
        default_transaction_read_only switched on): every connection goes, new ones
        follow target_session_attrs. Never switches."""
        logger.warning(
            "pool %r: server %s turned read-only; reconnecting every connection%s",
            self.name,
            host,
            "" if self.hosts.wants_writable else " (set target_session_attrs=read-write to "
            "skip read-only hosts when reconnecting)",
        )
        if self._state == OPEN:
            self._maintenance.reconnect_all()

    def _read_only_error(self, conn: Any) -> None:
        """A borrower got SQLSTATE 25006 (read-only transaction): look at the server's role
        now. Never switches."""
        rec = self._lent.get(id(conn))
        if rec is not None:
            self._vetting.observe_role(rec)

    def _restart_after_fork(self) -> None:
        self._hub = gevent.get_hub()
        self._maintenance.start()

    def _after_fork_in_child(self) -> None:
        """Forget the parent's connections and greenlets; restart lazily. Never switches."""
        for conn in self._forget_records():
            fork.orphan(conn)
        self._connector.forget_after_fork()
        self._maintenance.forget_after_fork()
        self._vetting._checkers = set()
        self._hub = None

    # ------------------------------------------------------------------ operations

    def check(self) -> int:
        """Ping idle connections unused for ``check_idle_after`` now; dead ones are
        replaced. Returns how many were. Switches."""
        self._check_open()
        return self._maintenance.health_check()

    def resize(self, min_size: int, max_size: int | None = None) -> None:
        """Change the pool's size limits; surplus idle connections are closed now.

        Never switches."""
        if self._state == CLOSED:
            raise PoolClosed(f"pool {self.name!r} is closed")
        self._maintenance.resize(min_size, max_size)

    def reconnect_all(self) -> None:
        """Close every connection (borrowed ones when they come back) and reconnect.

        For use after a failover or network change, when existing connections are
        suspect. Never switches."""
        self._check_open()
        self._maintenance.reconnect_all()

    def drain(self, timeout: float = 30.0, *, conninfo: str | None = None) -> None:
        """Replace every connection gracefully, e.g. after credentials rotate.

        Idle connections are replaced one at a time (the new one opened before the old one
        is closed when there is room, so capacity does not dip); borrowed ones are retired
        when they come back. With ``conninfo``, new connections use it. Raises
        ConnectError if a replacement cannot be opened within ``timeout``. Switches.
        """
        timeout = seconds("timeout", timeout)
        self._check_open()
        if conninfo is not None:
            self._set_target(conninfo)
        self._maintenance.drain(timeout)

    def add_tracer(
        self, on_acquire: Tracer | None = None, on_release: Tracer | None = None
    ) -> Callable[[], None]:
        """Call ``on_acquire(pool, conn, wait_seconds)`` after every borrow and
        ``on_release(pool, conn, hold_seconds)`` after every give-back (pgxpool's
        tracers); returns a function that removes them. Free while none is set."""
        return self.tracers.add(on_acquire, on_release)

    @property
    def conninfo(self) -> _ci.ConninfoText:
        """The conninfo libpq gets (pool settings removed), for connections opened outside
        the pool; its repr masks secrets (``str()`` is the real text)."""
        return _ci.ConninfoText(self.target.conninfo, self.target.redact)

    def connect_dedicated(self, timeout: float | None = None) -> ConnT:
        """Open a connection *outside* the pool with the pool's settings: its conninfo and
        kwargs, ``before_connect``, ``configure``, the cooperative connect bounded by
        ``connect_timeout`` (or ``timeout``). For LISTEN/NOTIFY listeners, migrations and
        session advisory locks; the caller closes it. Switches."""
        limit = self.settings.connect_timeout if timeout is None else seconds("timeout", timeout)
        return self._connector.open_dedicated(limit)  # type: ignore[no-any-return]

    def check_cooperation(self) -> None:
        """Raise CooperationError if this pool's database waits would block the hub."""
        problems = cooperation_problems(self._driver)
        if problems:
            raise CooperationError(f"pool {self.name!r}: " + "; ".join(problems))

    def stats(self) -> dict[str, Any]:
        """A snapshot of sizes and counters, free of secrets (see greenpool.stats).

        Never switches."""
        return snapshot(self)

    # ------------------------------------------------------------------ Flask

    def init_app(self, app: Flask) -> None:
        """Serve ``app``'s requests from this pool (configured from ``app.config`` when it
        was created without a conninfo). Loads greenpool's Flask integration."""
        from greenpool.flask_ext.extension import init_app

        init_app(self, app)

    @property
    def conn(self) -> ConnT:
        """The current Flask request's connection to the default database, borrowed on
        first use and given back when the request ends (needs :meth:`init_app`)."""
        raise RuntimeError("db.conn serves Flask requests: call db.init_app(app) first")

    @property
    def read_conn(self) -> ConnT:
        """The current Flask request's connection for reads (a replica's, see
        ``GREENPOOL_REPLICAS``; needs :meth:`init_app`)."""
        raise RuntimeError("db.read_conn serves Flask requests: call db.init_app(app) first")

    def get_conn(self, name: str | None = None) -> Any:
        """The current Flask request's connection to database ``name`` (a bind)."""
        raise RuntimeError("db.get_conn() serves Flask requests: call db.init_app(app) first")

    def release(self) -> None:
        """Give back the current Flask request's connections now (committing first), e.g.
        before streaming a response (needs :meth:`init_app`)."""
        raise RuntimeError("db.release() serves Flask requests: call db.init_app(app) first")

    def get_pool(self, name: str | None = None, app: Flask | None = None) -> GreenPool[Any]:
        """The pool of the app's database ``name`` in this process (needs :meth:`init_app`)."""
        raise RuntimeError("db.get_pool() serves Flask apps: call db.init_app(app) first")

    def add_database(
        self, name: str, conninfo: str, *, app: Flask | None = None, **settings: Any
    ) -> DatabaseConfig:
        """Configure a named database of the app at run time (needs :meth:`init_app`)."""
        raise RuntimeError("db.add_database() serves Flask apps: call db.init_app(app) first")

    def connection(
        self,
        timeout: float | None = None,
        *,
        read_only: bool = False,
        after: str | None = None,
        name: str | None = None,
        app: Flask | None = None,
    ) -> Connection[ConnT]:
        """Context manager lending a connection; commits on success, rolls back on error.

        ``read_only=True`` borrows from a replica (``after``: a :meth:`commit_token` the
        replica must have replayed); ``name``/``app`` pick a database of a Flask app
        (binds). Switches while waiting."""
        if name is None and app is None and not read_only:
            return Connection(self, timeout)
        if name is None and app is None:
            return ReadOnlyConnection(self, timeout, after)
        from greenpool.flask_ext.extension import pool_of

        return pool_of(self, name, app).connection(timeout, read_only=read_only, after=after)

    def commit_token(self, conn: Any) -> str:
        """After a commit on ``conn`` (a primary connection): the WAL position a replica
        must have replayed to show it; pass it as ``connection(read_only=True,
        after=token)``. One round trip. Switches."""
        return self._driver.query(conn, TOKEN_SQL)[0][0]  # type: ignore[no-any-return]
