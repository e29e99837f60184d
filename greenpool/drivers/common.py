"""What the psycopg 3 and psycopg2 adapters share: both drive libpq the same way.

Subclasses say how to open a connection, how to run one statement and which client-side
attributes a borrower may change; everything else (timeouts on connect, autocommit
around pings and resets, the guard for interrupted queries, closing) is written once.
"""

from __future__ import annotations

import _socket
import contextlib
import struct
from operator import attrgetter
from typing import Any, ClassVar

import gevent

from greenpool.drivers.base import ConnState


class LibpqDriver:
    """Base of the libpq-based adapters (see :class:`greenpool.drivers.base.Driver`)."""

    name: str
    #: The statement :meth:`ping` runs (psycopg2 refuses an empty query).
    PING_SQL: ClassVar[str] = ""
    #: Client-side attributes a borrower may change; restored on release.
    CLIENT_ATTRS: ClassVar[tuple[str, ...]] = ()
    #: Lists on the connection (callbacks) whose contents are restored on release.
    CLIENT_LISTS: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        self._get_client_attrs = attrgetter(*self.CLIENT_ATTRS)

    # -- subclasses provide these
    def _open(self, conninfo: str, kwargs: dict[str, Any]) -> Any:
        raise NotImplementedError

    def _run(self, conn: Any, sql: str, params: Any = None) -> list[Any]:
        """Execute one statement (never prepared server-side) and return its rows."""
        raise NotImplementedError

    def _drop_buffered(self, conn: Any) -> None:
        """Forget notifications and notices received for an earlier borrower."""

    def state(self, conn: Any) -> ConnState:
        raise NotImplementedError

    # -- shared
    def connect(self, conninfo: str, kwargs: dict[str, Any], timeout: float) -> Any:
        """Open a connection, cooperatively, within ``timeout`` seconds (libpq ignores
        connect_timeout in async mode, so gevent enforces it)."""
        with gevent.Timeout(timeout, TimeoutError(f"connect timed out after {timeout:g} s")):
            return self._open(conninfo, kwargs)

    def ping(self, conn: Any) -> None:
        """One cheap round trip outside any transaction, so the connection stays idle."""
        self.execute(conn, self.PING_SQL)

    def execute(self, conn: Any, sql: str) -> None:
        """Run ``sql`` in autocommit mode, then restore the connection's autocommit."""
        self.query(conn, sql)

    def query(self, conn: Any, sql: str, params: Any = None) -> list[Any]:
        """Run one statement in autocommit mode and return its rows (empty when it has
        none); the connection's autocommit is restored afterwards."""
        was = conn.autocommit
        if not was:
            conn.autocommit = True
        try:
            return self._run(conn, sql, params)
        finally:
            self._restore_autocommit(conn, was)

    def _restore_autocommit(self, conn: Any, value: bool) -> None:
        # Interrupted mid-query (killed, timed out) the connection is ACTIVE and the driver
        # refuses to change autocommit: raising here would replace the interruption
        # (swallowing GreenletExit or the caller's gevent.Timeout). The pool discards such
        # a connection anyway, so leave it be.
        if conn.autocommit != value and self.state(conn) is ConnState.IDLE:
            conn.autocommit = value

    def commit(self, conn: Any) -> None:
        conn.commit()

    def rollback(self, conn: Any) -> None:
        conn.rollback()

    def close(self, conn: Any) -> None:
        """Close without raising."""
        with contextlib.suppress(Exception):
            conn.close()

    def backend_pid(self, conn: Any) -> int | None:
        try:
            return int(conn.info.backend_pid)
        except Exception:
            return None

    def host_of(self, conn: Any) -> str:
        try:
            return f"{conn.info.host}:{conn.info.port}"
        except Exception:
            return "unknown"

    def _parameter(self, conn: Any, name: str) -> str | None:
        raise NotImplementedError

    def server_read_only(self, conn: Any) -> bool | None:
        standby = self._parameter(conn, "in_hot_standby")
        read_only = self._parameter(conn, "default_transaction_read_only")
        if standby is None and read_only is None:
            return None
        return standby == "on" or read_only == "on"

    def sent_marker(self, conn: Any) -> int | None:
        try:
            return tcp_sent_marker(conn.fileno())
        except Exception:
            return None

    def client_state(self, conn: Any) -> tuple[Any, ...]:
        """The client-side attributes and callback lists of ``conn`` (``CLIENT_ATTRS``,
        ``CLIENT_LISTS``). No I/O."""
        lists = tuple(tuple(getattr(conn, name, ())) for name in self.CLIENT_LISTS)
        return (self._get_client_attrs(conn), lists)

    def restore_client_state(self, conn: Any, saved: tuple[Any, ...]) -> None:
        """Set back every attribute that changed since :meth:`client_state`; drop what
        was buffered for the previous borrower. The connection must be idle. No I/O."""
        attrs, lists = saved
        current = self._get_client_attrs(conn)
        if current != attrs:
            for name, old, new in zip(self.CLIENT_ATTRS, attrs, current, strict=True):
                if old is not new and old != new:
                    setattr(conn, name, old)
        for name, old_items in zip(self.CLIENT_LISTS, lists, strict=True):
            items = getattr(conn, name, None)
            if items is None:
                continue
            if len(items) != len(old_items) or (items and tuple(items) != old_items):
                items[:] = old_items
        self._drop_buffered(conn)


_TCP_INFO = getattr(_socket, "TCP_INFO", None)
_TCP_INFO_LEN = 208
_unpack_sent = struct.Struct("=144xI52xQ").unpack_from  # tcpi_notsent_bytes, tcpi_bytes_sent


def tcp_sent_marker(fd: int) -> int | None:
    """Bytes the application wrote on TCP socket ``fd``: sent (retransmissions included)
    plus still queued, from Linux's ``TCP_INFO`` (4.19+). None on another kind of socket,
    an older kernel or another platform. The fd is borrowed, never closed."""
    if _TCP_INFO is None or fd < 0:
        return None
    sock = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM, 0, fd)
    try:
        info = sock.getsockopt(_socket.IPPROTO_TCP, _TCP_INFO, _TCP_INFO_LEN)
    except OSError:
        return None
    finally:
        sock.detach()
    if len(info) < _TCP_INFO_LEN:
        return None
    notsent, sent = _unpack_sent(info)
    return int(notsent + sent)
