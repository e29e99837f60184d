"""Checkout checks and release cleaning: what makes a connection fit to lend again.

At checkout a record of an old generation or past its lifetime is retired, and one idle
longer than ``check_idle_after`` is pinged first (bounded by the borrower's deadline). On
release a connection is rolled back if a transaction is open and cleaned by the reset
policy; every step is bounded by ``ping_timeout``, and a connection that cannot be brought
back to idle in time is discarded (its query cancelled on the server).

Reset policies (``reset=``), what a released connection gets before the next borrower:

- ``"session"`` (default): a fresh session in one round trip, keeping prepared
  statements: ``CLOSE ALL; SET SESSION AUTHORIZATION DEFAULT; RESET ALL; UNLISTEN *;
  SELECT pg_advisory_unlock_all(); DISCARD TEMP; DISCARD SEQUENCES``, then the settings
  the ``configure`` callback made are applied again. Client-side attributes (autocommit,
  read_only, isolation_level, row_factory ...) are restored and buffered notifications
  dropped, with no I/O. A borrower that sent nothing at all (the kernel's count of bytes
  written on the TCP socket has not moved since the last reset) cannot have changed the
  session: its release skips the round trip (not over a Unix socket, where the count is
  unknown, nor with a callable).
- ``"discard"``: the same with ``DISCARD ALL`` (also drops prepared statements).
- ``"light"``: like ``"session"`` but keeps temporary tables.
- ``"client"``: client-side attributes and buffers only, no round trip: for apps that
  never change session state on the server (and behind a transaction pooler).
- a callable ``reset(conn)``: client-side restore, then your own; it must leave the
  connection idle.
- ``None``: nothing at all (session state set by one borrower reaches the next).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from time import monotonic
from typing import TYPE_CHECKING, Any

import gevent
from gevent import Greenlet

from greenpool.drivers.base import ConnState, Driver
from greenpool.hosts import HostTable

if TYPE_CHECKING:
    from greenpool.pool import Pool, Record

logger = logging.getLogger("greenpool")

SESSION_SQL = (
    "CLOSE ALL; SET SESSION AUTHORIZATION DEFAULT; RESET ALL; UNLISTEN *; "
    "SELECT pg_advisory_unlock_all(); DISCARD TEMP; DISCARD SEQUENCES"
)
POLICIES: dict[str, str | None] = {
    "session": SESSION_SQL,
    "discard": "DISCARD ALL",
    "light": (
        "CLOSE ALL; SET SESSION AUTHORIZATION DEFAULT; RESET ALL; UNLISTEN *; "
        "SELECT pg_advisory_unlock_all(); DISCARD SEQUENCES"
    ),
    "client": None,
}
DEFAULT_RESET = "session"

#: What ``configure`` may have set that a reset undoes: session settings and the role.
CAPTURE_SQL = (
    "SELECT name, setting FROM pg_catalog.pg_settings WHERE source = 'session' "
    "UNION ALL SELECT 'role', current_setting('role') WHERE current_setting('role') <> 'none'"
)
REAPPLY_SQL = (
    "SELECT pg_catalog.set_config(n, v, false) FROM unnest(%s::text[], %s::text[]) t(n, v)"
)


class ResetPolicy:
    """What the pool does to a released, idle connection before reusing it."""

    def __init__(
        self,
        name: str | None,
        sql: str | None = None,
        func: Callable[[Any], None] | None = None,
    ) -> None:
        self.name = name
        self.sql = sql
        self.func = func
        self.client = name is not None  # restore client-side attributes
        self.needed = self.client
        #: Whether it needs a round trip, i.e. relies on the server keeping session state.
        self.server_side = sql is not None or func is not None

    def __repr__(self) -> str:
        return f"<ResetPolicy {self.name!r}>"


def get_reset_policy(reset: Callable[[Any], None] | str | None) -> ResetPolicy:
    """Turn the ``reset=`` argument into a policy; ValueError for an unknown name.

    ``"default"`` is ``DEFAULT_RESET``; ``"none"`` (for configuration files) is None."""
    if reset is None or reset == "none":
        return ResetPolicy(None)
    if reset == "default":
        reset = DEFAULT_RESET
    if isinstance(reset, str):
        if reset not in POLICIES:
            raise ValueError(
                f"reset: unknown policy {reset!r} (use {', '.join(map(repr, POLICIES))}, "
                "a callable, or None)"
            )
        return ResetPolicy(reset, sql=POLICIES[reset])
    if callable(reset):
        return ResetPolicy("callable", func=reset)
    raise ValueError(
        f"reset: expected a policy name, a callable or None, got {type(reset).__name__}"
    )


class CleanState:
    """What a connection looked like when last clean: the driver's snapshot of its
    client-side attributes, and its sent-bytes mark (``Driver.sent_marker``; None when
    unknown or when the policy runs a callable): while the mark has not moved, the
    borrower sent nothing, and a release skips the server-side reset."""

    __slots__ = ("client", "sent")

    def __init__(self, client: Any) -> None:
        self.client = client
        self.sent: int | None = None


class _CheckTimeout(Exception):
    def __str__(self) -> str:
        return "timed out"


class Vetting:
    """The checkout check and the release cleaning of one pool."""

    def __init__(
        self,
        pool: Pool[Any],
        driver: Driver,
        policy: ResetPolicy,
        check: Callable[[Any], None] | None,
        redact: Callable[[str], str],
        hosts: HostTable | None = None,
    ) -> None:
        self._pool = pool
        self.hosts = hosts if hosts is not None else HostTable(None)
        #: Called with a host that turned read-only (GreenPool reconnects everything).
        self.on_read_only: Callable[[str], None] = lambda host: None
        #: Behind a transaction pooler: warn (once) when a borrower used LISTEN.
        self.warn_session_features = False
        self._driver = driver
        self.policy = policy
        self._check = check
        self._redact = redact
        self._checkers: set[Greenlet] = set()  # pings a borrower stopped waiting for
        self.check_failed_count = 0
        self.checks_failed_in_row = 0  # the connector backs off while checks keep failing
        self.broken_destroy_count = 0
        self.lifetime_destroy_count = 0
        self.rollback_count = 0
        self.reset_count = 0

    # ------------------------------------------------------------------ checkout

    def checkout(self, rec: Record, deadline: float) -> bool | None:
        """Check a busy record before lending it: True to lend it, False if it was
        retired instead, None if the borrower's deadline came first (the record then
        goes back to the pool). Switches only while pinging."""
        pool = self._pool
        if rec.generation != pool._generation:
            pool._discard(rec)
            return False
        now = monotonic()
        if now >= rec.expires_at:
            self.lifetime_destroy_count += 1
            pool._discard(rec)
            return False
        settings = pool.settings
        if now - rec.idle_since > settings.check_idle_after:
            if deadline - now >= settings.ping_timeout:
                return self.ping(rec)
            return self._ping_within(rec, deadline - now)
        return True

    def _ping_within(self, rec: Record, budget: float) -> bool | None:
        """Ping with the full ping_timeout, but stop waiting after ``budget`` seconds.

        A ping cut short by the borrower's deadline says nothing about the connection: the
        check finishes in its own greenlet, which puts a live connection back (or discards
        a dead one), and the borrower gets None (its PoolTimeout). Switches.
        """
        borrower_waiting = True

        def check() -> bool:
            ok = self.ping(rec)  # discards a dead one
            if ok and not borrower_waiting:
                self._pool._recycle(rec, checked=True)
            return ok

        checker = gevent.spawn(check)
        try:
            checker.join(max(0.0, budget))
        except BaseException:
            # Killed or timed out by its caller: the check goes on without the borrower,
            # or, if it passed at this very moment, the connection goes back now.
            borrower_waiting = False
            if not checker.ready():
                self._track(checker)
            elif checker.value:
                self._pool._recycle(rec, checked=True)
            raise
        if not checker.ready():
            borrower_waiting = False
            self._track(checker)
            return None
        return bool(checker.value)

    def _track(self, checker: Greenlet) -> None:
        self._checkers.add(checker)
        checker.link(self._checkers.discard)

    def pending_checks(self) -> list[Greenlet]:
        """The pings still running for borrowers that gave up (close() kills them)."""
        return list(self._checkers)

    def ping(self, rec: Record) -> bool:
        """Check a busy record with one round trip bounded by ping_timeout; a dead one is
        discarded (False). Switches."""
        try:
            with gevent.Timeout(self._pool.settings.ping_timeout, _CheckTimeout):
                if self._check is not None:
                    self._check(rec.conn)
                else:
                    self._driver.ping(rec.conn)
        except BaseException as ex:
            self.check_failed_count += 1
            self.checks_failed_in_row += 1
            self.broken_destroy_count += 1
            self.hosts.connection_broken(rec.host)
            self._pool._discard(rec)
            if not isinstance(ex, (Exception, _CheckTimeout)):
                raise
            logger.info(
                "pool %r: connection failed its check and was replaced: %s",
                self._pool.name,
                self._redact(describe_error(ex)),
            )
            return False
        self.checks_failed_in_row = 0
        saved = rec.client_state
        if saved is not None and saved.sent is not None and self._check is None:
            saved.sent = self._driver.sent_marker(rec.conn)  # an idle record: clean
        if self.observe_role(rec):
            self._pool._discard(rec)
            return False
        return True

    def observe_role(self, rec: Record) -> bool:
        """Read the server's role from its ParameterStatus reports (no I/O). When its
        server turned read-only and that matters (the pool asked for a writable server, or
        the host was seen writable before), tell the pool (which reconnects everything)
        and return True: this connection must not be lent. Never switches."""
        read_only = self._driver.server_read_only(rec.conn)
        if read_only is None:
            return False
        hosts = self.hosts
        was = hosts.role(rec.host)
        hosts.saw_role(rec.host, read_only)
        if read_only and (hosts.wants_writable or was == "primary"):
            self.on_read_only(rec.host)
            return True
        return False

    # ------------------------------------------------------------------ release

    def clean(self, rec: Record, state: ConnState) -> ConnState:
        """Bring a returned connection back to IDLE; return the state that stopped it.

        Each round trip (rollback, reset) is bounded by ping_timeout: past it the
        connection counts as broken (the pool then cancels its query and closes it).
        Switches, except for an idle connection under a client-side-only policy or one
        whose borrower sent nothing."""
        if state is ConnState.IDLE:
            saved = rec.client_state
            if not self.policy.server_side:
                if self.warn_session_features:
                    self._warn_listen(rec.conn)
                if saved is not None:  # no I/O, so no timer either
                    self._driver.restore_client_state(rec.conn, saved.client)
                return state
            if (
                saved is not None
                and saved.sent is not None
                and self._driver.sent_marker(rec.conn) == saved.sent
            ):
                # Not one byte sent since it was last reset (or opened): its session on
                # the server is as clean as then; only the client side may differ.
                self._driver.restore_client_state(rec.conn, saved.client)
                return state
        try:
            with gevent.Timeout(self._pool.settings.ping_timeout, _CheckTimeout):
                state = self._clean(rec, state)
        except (Exception, _CheckTimeout) as ex:
            logger.info(
                "pool %r: cleaning a returned connection failed: %s",
                self._pool.name,
                self._redact(describe_error(ex)),
            )
            state = ConnState.BROKEN
        if state is not ConnState.IDLE:
            self.broken_destroy_count += 1
            self.hosts.connection_broken(rec.host)
        return state

    def _warn_listen(self, conn: Any) -> None:
        if getattr(conn, "_notify_handlers", None) or getattr(conn, "_notifies_backlog", None):
            self.warn_session_features = False  # once
            logger.warning(
                "pool %r: a borrower used LISTEN behind a transaction pooler "
                "(pooler_mode='transaction'): notifications need a session pooler or a "
                "dedicated connection (pool.connect_dedicated())",
                self._pool.name,
            )

    def _clean(self, rec: Record, state: ConnState) -> ConnState:
        driver = self._driver
        conn = rec.conn
        if state is ConnState.IN_TRANSACTION or state is ConnState.IN_ERROR:
            self.rollback_count += 1
            driver.rollback(conn)
            state = driver.state(conn)
        if state is not ConnState.IDLE:
            return state
        policy = self.policy
        saved = rec.client_state
        if policy.client and saved is not None:
            driver.restore_client_state(conn, saved.client)
        if policy.server_side:
            self.reset_count += 1
            if policy.sql is not None:
                driver.execute(conn, policy.sql)
                if rec.session_settings:
                    reapply(driver, conn, rec.session_settings)
            if policy.func is not None:
                policy.func(conn)
            state = driver.state(conn)
            if state is ConnState.IDLE and self.observe_role(rec):
                return ConnState.BROKEN  # its server turned read-only
            if saved is not None and saved.sent is not None:
                saved.sent = driver.sent_marker(conn)
        return state

    def after_connect(self, rec: Record, configured: bool) -> None:
        """Remember what a new connection looks like, to restore it on every release:
        its client-side attributes, and (when the policy resets the session) the session
        settings and role set since it connected (by ``configure``, or by whatever runs
        at connect: SQLAlchemy's connect events, Django's connection set-up). Switches
        (one round trip) in the latter case."""
        saved = None
        if self.policy.client:
            rec.client_state = saved = CleanState(self._driver.client_state(rec.conn))
        if self.policy.sql is not None:
            rec.session_settings = capture(self._driver, rec.conn)
            if saved is not None and self.policy.func is None:
                saved.sent = self._driver.sent_marker(rec.conn)


def capture(driver: Driver, conn: Any) -> list[tuple[str, str]]:
    """The session settings (and role) set on ``conn`` since it connected."""
    rows: list[tuple[str, str]] = driver.query(conn, CAPTURE_SQL)
    return rows


def reapply(driver: Driver, conn: Any, settings: list[tuple[str, str]]) -> None:
    """Set again what :func:`capture` saw. One round trip."""
    names = [n for n, _ in settings]
    values = [v for _, v in settings]
    driver.query(conn, REAPPLY_SQL, (names, values))


def redacted_copy(ex: BaseException | None, redact: Callable[[str], str]) -> BaseException | None:
    """An exception of the same type as ``ex`` whose message went through ``redact``
    (the driver's own error may quote connection details), to chain as a cause."""
    if ex is None:
        return None
    try:
        copy = type(ex)(redact(str(ex)))
    except Exception:
        copy = Exception(redact(describe_error(ex)))
    return copy


def describe_error(ex: BaseException) -> str:
    """``Type: message`` on one line (the caller redacts it)."""
    text = str(ex).strip().replace("\n", " ")
    return f"{type(ex).__name__}: {text}" if text else type(ex).__name__
