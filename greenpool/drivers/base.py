"""The small interface every database driver adapter implements.

The pool never calls a driver module directly: it asks its :class:`Driver` to connect,
classify a connection's state, ping, roll back, cancel and close. Keeping this surface
small is what lets psycopg 3 and psycopg2 (and the fake driver of the model tests) share
one pool implementation.
"""

from __future__ import annotations

import enum
from typing import Any, Protocol


class ConnState(enum.Enum):
    """What a returned connection needs before it can be reused."""

    IDLE = "idle"  # clean: no transaction open
    IN_TRANSACTION = "in transaction"  # needs a rollback
    IN_ERROR = "in failed transaction"  # needs a rollback
    ACTIVE = "query in flight"  # a borrower died mid-query: cancel, then discard
    BROKEN = "broken"  # closed or unusable: discard


class Driver(Protocol):
    """Adapter between the pool and one PostgreSQL driver."""

    name: str

    def prepare(self) -> None:
        """Once per pool: make the driver cooperate with gevent where it can."""

    def cooperation_problems(self) -> list[str]:
        """Reasons why this driver's waits would block the hub; empty when cooperative."""

    def validate_conninfo(self, conninfo: str) -> None:
        """Raise ValueError (without secrets) if the conninfo cannot be parsed."""

    def connect(self, conninfo: str, kwargs: dict[str, Any], timeout: float) -> Any:
        """Open a connection, cooperatively, within ``timeout`` seconds."""

    def state(self, conn: Any) -> ConnState:
        """Classify the connection without any I/O."""

    def ping(self, conn: Any) -> None:
        """One cheap round trip; raise if the connection does not answer."""

    def commit(self, conn: Any) -> None: ...

    def rollback(self, conn: Any) -> None: ...

    def execute(self, conn: Any, sql: str) -> None:
        """Run a statement outside any transaction (used by reset policies)."""

    def query(self, conn: Any, sql: str, params: Any = None) -> list[Any]:
        """Run one statement outside any transaction and return its rows."""

    def client_state(self, conn: Any) -> Any:
        """A snapshot of the client-side attributes a borrower may change (autocommit,
        read_only, isolation level, row factory ...), taken when the connection is new."""

    def restore_client_state(self, conn: Any, saved: Any) -> None:
        """Put back what :meth:`client_state` saw, and drop buffered notifications and
        notices, so nothing client-side crosses from one borrower to the next. No I/O."""

    def sent_marker(self, conn: Any) -> int | None:
        """A count that grows whenever bytes are sent to the server on ``conn`` (the
        kernel's TCP counters): two equal readings prove nothing was sent in between.
        None when unknown (Unix socket, no TCP_INFO). One syscall, no round trip."""

    def cancel(self, conn: Any, timeout: float) -> None:
        """Ask the server to cancel the query in flight, cooperatively; best effort."""

    def close(self, conn: Any) -> None:
        """Close without raising."""

    def backend_pid(self, conn: Any) -> int | None: ...

    def host_of(self, conn: Any) -> str:
        """``host:port`` of the server ``conn`` is connected to. No I/O."""

    def server_read_only(self, conn: Any) -> bool | None:
        """Whether the server said it is read-only (``in_hot_standby`` or
        ``default_transaction_read_only`` in its ParameterStatus reports, PostgreSQL 14+);
        None when it did not say. No I/O."""

    def is_connection(self, obj: Any) -> bool:
        """Whether ``obj`` is a connection of this driver (for clear errors on misuse)."""
