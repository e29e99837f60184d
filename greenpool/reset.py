"""Reset policies: what the pool does to a clean (IDLE) connection before reusing it.

- ``None`` (default): nothing beyond the rollback every release gets. Session state a
  borrower set outside a transaction (``SET``, ``SET ROLE``, temp tables, prepared
  statements, advisory locks, ``LISTEN``) stays on the connection. Costs nothing.
- ``"discard"``: ``DISCARD ALL`` — a fresh session: resets settings and role, drops temp
  tables, prepared statements and cursors, unlistens, releases advisory locks. One round
  trip per release.
- ``"light"``: ``RESET ALL; RESET ROLE; SET SESSION AUTHORIZATION DEFAULT; UNLISTEN *;
  SELECT pg_advisory_unlock_all(); CLOSE ALL`` in one round trip; keeps prepared
  statements and temp tables (cheaper when the app relies on prepared statements).
- a callable ``reset(conn)``: your own; it must leave the connection idle.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from greenpool.drivers.base import Driver

POLICIES: dict[str, str] = {
    "discard": "DISCARD ALL",
    "light": (
        "RESET ALL; RESET ROLE; SET SESSION AUTHORIZATION DEFAULT; UNLISTEN *; "
        "SELECT pg_advisory_unlock_all(); CLOSE ALL"
    ),
}


class ResetPolicy:
    """Callable applied to each clean connection on release."""

    def __init__(self, sql: str | None = None, func: Callable[[Any], None] | None = None) -> None:
        self.sql = sql
        self.func = func
        self.needed = sql is not None or func is not None

    def __call__(self, driver: Driver, conn: Any) -> None:
        if self.sql is not None:
            driver.execute(conn, self.sql)
        if self.func is not None:
            self.func(conn)


def get_reset_policy(reset: Callable[[Any], None] | str | None) -> ResetPolicy:
    """Turn the ``reset=`` argument into a policy; ValueError for an unknown name."""
    if reset is None:
        return ResetPolicy()
    if isinstance(reset, str):
        if reset not in POLICIES:
            raise ValueError(
                f"reset: unknown policy {reset!r} (use {', '.join(map(repr, POLICIES))}, "
                "a callable, or None)"
            )
        return ResetPolicy(sql=POLICIES[reset])
    if callable(reset):
        return ResetPolicy(func=reset)
    raise ValueError(f"reset: expected a policy name, a callable or None, got {reset!r}")
