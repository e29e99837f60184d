"""A fast in-memory driver for model-based tests (real-server tests live elsewhere).

Connections are plain objects whose transaction state the test sets directly. Connect,
ping, rollback and cancel each yield to the hub (``gevent.sleep``) so greenlets can be
killed in the middle of them, as with a real socket. A connection remembers when it was
made (by the driver's ``clock``, which a test may replace with a fake one) and whether a
borrower left session state on it that a server-side reset (``RESET ALL``,
``DISCARD ALL``) clears.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from typing import Any

import gevent

from greenpool.drivers.base import ConnState


class FakeConn:
    """One fake server session."""

    _ids = itertools.count(1)

    def __init__(self, created: float = 0.0) -> None:
        self.id = next(self._ids)
        self.created = created
        self.session: str | None = None  # server-side session state a borrower left
        self.state = ConnState.IDLE
        self.closed = False
        self.cancelled = False
        self.dead = False  # the "server" dropped it: pings fail
        self.autocommit = False  # a client-side attribute borrowers may change
        self.resets = 0  # reset round trips run on it

    def __repr__(self) -> str:
        return f"<FakeConn {self.id} {self.state.value}{' closed' if self.closed else ''}>"


class FakeDriver:
    """Implements greenpool.drivers.base.Driver in memory."""

    name = "fake"

    def __init__(self, connect_delay: float = 0.0, op_delay: float = 0.0) -> None:
        self.connect_delay = connect_delay
        self.op_delay = op_delay
        self.fail_connect: BaseException | None = None
        self.conns: list[FakeConn] = []
        self.clock: Callable[[], float] = time.monotonic

    # -- Driver interface
    def prepare(self) -> None:
        pass

    def cooperation_problems(self) -> list[str]:
        return []

    def validate_conninfo(self, conninfo: str) -> None:
        pass

    def connect(self, conninfo: str, kwargs: dict[str, Any], timeout: float) -> FakeConn:
        gevent.sleep(self.connect_delay)
        if self.fail_connect is not None:
            raise self.fail_connect
        conn = FakeConn(self.clock())
        self.conns.append(conn)
        return conn

    def state(self, conn: FakeConn) -> ConnState:
        return ConnState.BROKEN if conn.closed else conn.state

    def ping(self, conn: FakeConn) -> None:
        gevent.sleep(self.op_delay)
        if conn.dead or conn.closed:
            raise OSError("fake connection is dead")

    def commit(self, conn: FakeConn) -> None:
        gevent.sleep(self.op_delay)
        conn.state = ConnState.IDLE

    def rollback(self, conn: FakeConn) -> None:
        conn.state = ConnState.ACTIVE  # a kill during the round trip leaves it active
        gevent.sleep(self.op_delay)
        conn.state = ConnState.IDLE

    def execute(self, conn: FakeConn, sql: str) -> None:
        gevent.sleep(self.op_delay)
        conn.resets += 1
        if "RESET ALL" in sql or "DISCARD ALL" in sql:
            conn.session = None

    def query(self, conn: FakeConn, sql: str, params: Any = None) -> list[Any]:
        self.execute(conn, sql)
        return []

    def client_state(self, conn: FakeConn) -> Any:
        return conn.autocommit

    def restore_client_state(self, conn: FakeConn, saved: Any) -> None:
        conn.autocommit = saved

    def cancel(self, conn: FakeConn, timeout: float) -> None:
        gevent.sleep(self.op_delay)
        conn.cancelled = True

    def close(self, conn: FakeConn) -> None:
        conn.closed = True

    def backend_pid(self, conn: FakeConn) -> int | None:
        return conn.id

    def host_of(self, conn: FakeConn) -> str:
        return "fake:5432"

    def server_read_only(self, conn: FakeConn) -> bool | None:
        return None

    def sent_marker(self, conn: FakeConn) -> int | None:
        return None

    def is_connection(self, obj: Any) -> bool:
        return isinstance(obj, FakeConn)

    # -- helpers for tests
    def open_conns(self) -> list[FakeConn]:
        return [c for c in self.conns if not c.closed]
