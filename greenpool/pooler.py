"""Behind a connection pooler (PgBouncer): what ``pooler_mode`` changes.

``pooler_mode="transaction"`` (``pool_pooler_mode=transaction`` in the conninfo,
``GREENPOOL_POOLER_MODE`` in Flask) says that each transaction may run on a different
server connection and that no session state survives it:

- psycopg 3's automatic server-side prepared statements are switched off
  (``prepare_threshold=None``), which otherwise fail with "prepared statement _pg3_x does
  not exist", unless ``kwargs`` sets ``prepare_threshold`` itself (PgBouncer >= 1.22 with
  ``max_prepared_statements`` and libpq >= 17 can carry them);
- the release does no server round trip: the default reset becomes ``"client"``, and a
  policy that relies on session state (``"session"``, ``"discard"``, ``"light"``, a
  callable) is a ValueError naming it, since it would run on whichever server connection
  the pooler picks;
- checks use the empty query;
- a borrower that used LISTEN (notification handlers, buffered notifications) gets a
  warning at release: notifications need a session pooler or a dedicated connection.

``"session"`` behaves as with no pooler (the pooler's reset query runs when a client
disconnects, not between greenpool's borrowers, so greenpool's own reset still matters).
What cannot be detected: session-level ``SET``, ``SET ROLE``, session advisory locks,
``WITH HOLD`` cursors, temporary tables and ``PREPARE`` used by the application; use
``SET LOCAL``, ``set_config(..., true)`` and transaction-level locks instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from greenpool.conninfo import Target
from greenpool.drivers.base import Driver
from greenpool.vetting import ResetPolicy, get_reset_policy

MODES = (None, "session", "transaction")


def mode(explicit: str | None, from_conninfo: str | None) -> str | None:
    """The pooler mode (the keyword wins over ``pool_pooler_mode``); ValueError otherwise."""
    value = explicit if explicit is not None else from_conninfo
    if value in ("", "none"):
        value = None
    if value not in MODES:
        raise ValueError("pooler_mode: expected None, 'session' or 'transaction'")
    return value


def reset_policy(pooler_mode: str | None, reset: Callable[[Any], None] | str | None) -> ResetPolicy:
    """The reset policy for ``reset`` under ``pooler_mode``."""
    if pooler_mode != "transaction":
        return get_reset_policy(reset)
    policy = get_reset_policy("client" if reset == "default" else reset)
    if policy.server_side:
        raise ValueError(
            f"reset: {policy.name!r} relies on session state, which a transaction pooler "
            "does not keep (pooler_mode='transaction'); use 'client' or None"
        )
    return policy


def adjust_target(pooler_mode: str | None, target: Target, driver: Driver) -> None:
    """Switch off psycopg 3's server-side preparation behind a transaction pooler, unless
    the connect keywords choose a ``prepare_threshold`` themselves."""
    if pooler_mode != "transaction" or getattr(driver, "name", "") != "psycopg":
        return
    for kwargs in (target.kwargs, target.attempt_kwargs):
        if kwargs is not None and "prepare_threshold" not in kwargs:
            kwargs["prepare_threshold"] = None
