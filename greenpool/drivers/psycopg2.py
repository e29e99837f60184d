"""psycopg2 adapter, made cooperative by psycogreen's gevent wait callback.

With a wait callback installed libpq runs in asynchronous mode, where it ignores
``connect_timeout``; the adapter enforces the timeout with gevent instead.
"""

from __future__ import annotations

import contextlib
from typing import Any

import gevent

from greenpool.cooperation import gevent_patched
from greenpool.drivers.base import ConnState
from greenpool.drivers.common import LibpqDriver


class Psycopg2Driver(LibpqDriver):
    """Driver adapter for psycopg2 (``driver="psycopg2"``)."""

    name = "psycopg2"
    PING_SQL = "SELECT 1"
    CLIENT_ATTRS = ("autocommit", "readonly", "isolation_level", "deferrable", "cursor_factory")

    def __init__(self) -> None:
        super().__init__()
        try:
            import psycopg2
            import psycopg2.extensions as ext
        except ImportError as ex:
            raise ValueError(
                "driver='psycopg2' needs psycopg2 and psycogreen: pip install 'greenpool[psycopg2]'"
            ) from ex
        self._psycopg2 = psycopg2
        self._ext = ext
        self._status = {
            ext.TRANSACTION_STATUS_IDLE: ConnState.IDLE,
            ext.TRANSACTION_STATUS_INTRANS: ConnState.IN_TRANSACTION,
            ext.TRANSACTION_STATUS_INERROR: ConnState.IN_ERROR,
            ext.TRANSACTION_STATUS_ACTIVE: ConnState.ACTIVE,
            ext.TRANSACTION_STATUS_UNKNOWN: ConnState.BROKEN,
        }

    def prepare(self) -> None:
        """Install a gevent wait callback: psycogreen's, plus cancel-on-interrupt.

        A user's own callback is left alone. psycogreen's is replaced by a wrapper that,
        when the waiting greenlet is killed or times out mid-query, asks the server to
        cancel the query before psycopg2 closes the connection (after which the cancel
        key is gone and the query would run on).
        """
        try:
            from psycogreen.gevent import gevent_wait_callback
        except ImportError as ex:
            raise ValueError(
                "driver='psycopg2' needs psycogreen: pip install 'greenpool[psycopg2]'"
            ) from ex
        current = self._ext.get_wait_callback()
        if current is None or current is gevent_wait_callback:
            self._ext.set_wait_callback(_make_cancelling_callback(gevent_wait_callback))

    def cooperation_problems(self) -> list[str]:
        problems = []
        if not gevent_patched("socket"):
            problems.append(
                "gevent has not monkey-patched socket: call gevent.monkey.patch_all() first"
            )
        if self._ext.get_wait_callback() is None:
            problems.append(
                "psycopg2 has no wait callback: every query blocks the hub "
                "(install psycogreen; greenpool installs it when the pool is created)"
            )
        return problems

    def validate_conninfo(self, conninfo: str) -> None:
        try:
            self._ext.parse_dsn(conninfo)
        except self._psycopg2.Error:
            raise ValueError(
                "conninfo: libpq cannot parse the connection string; "
                "check its key=value pairs or URL syntax"
            ) from None

    def _open(self, conninfo: str, kwargs: dict[str, Any]) -> Any:
        return self._psycopg2.connect(conninfo, **kwargs)

    def _run(self, conn: Any, sql: str, params: Any = None) -> list[Any]:
        with conn.cursor() as cur:
            cur.execute(sql, params)
            return list(cur.fetchall()) if cur.description is not None else []

    def _drop_buffered(self, conn: Any) -> None:
        if conn.notifies:
            del conn.notifies[:]
        if conn.notices:
            del conn.notices[:]

    def _parameter(self, conn: Any, name: str) -> str | None:
        value = conn.get_parameter_status(name)
        return str(value) if value is not None else None

    def state(self, conn: Any) -> ConnState:
        if conn.closed:
            return ConnState.BROKEN
        return self._status.get(conn.info.transaction_status, ConnState.BROKEN)

    def cancel(self, conn: Any, timeout: float) -> None:
        _cancel_cooperatively(conn, timeout)

    def is_connection(self, obj: Any) -> bool:
        return isinstance(obj, self._psycopg2.extensions.connection)


def _make_cancelling_callback(wait: Any) -> Any:
    def greenpool_wait_callback(conn: Any, timeout: float | None = None) -> None:
        try:
            wait(conn, timeout)
        except BaseException:
            # A query in flight: cancel it on the server. Not while connecting: there is
            # nothing to cancel, and the cancel would only spend the connect's budget.
            if _query_in_flight(conn):
                with contextlib.suppress(BaseException):
                    _cancel_cooperatively(conn, 2.0)
            raise

    greenpool_wait_callback.greenpool = True  # type: ignore[attr-defined]
    return greenpool_wait_callback


def _query_in_flight(conn: Any) -> bool:
    try:
        import psycopg2.extensions as ext

        return bool(conn.info.transaction_status == ext.TRANSACTION_STATUS_ACTIVE)
    except Exception:
        return False


# psycopg2's conn.cancel() runs the blocking PQcancel() *holding the GIL*: in a thread it
# still stops every greenlet (and forever on a black-holed network). libpq >= 17 has a
# non-blocking cancel API; call it through ctypes on the libpq psycopg2 itself loaded
# (ctypes releases the GIL, and each step only polls) and wait with gevent.
_PGRES_POLLING_FAILED, _PGRES_POLLING_READING, _PGRES_POLLING_WRITING, _PGRES_POLLING_OK = (
    0,
    1,
    2,
    3,
)
_libpq: Any = None


def _psycopg2_libpq() -> Any:
    global _libpq
    if _libpq is None:
        import ctypes

        import psycopg2._psycopg  # noqa: F401  (loads libpq)

        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libpq" in line and "/" in line}
        for path in sorted(paths):
            lib = ctypes.CDLL(path)
            if hasattr(lib, "PQcancelCreate"):
                for name, res, args in (
                    ("PQcancelCreate", ctypes.c_void_p, [ctypes.c_void_p]),
                    ("PQcancelStart", ctypes.c_int, [ctypes.c_void_p]),
                    ("PQcancelPoll", ctypes.c_int, [ctypes.c_void_p]),
                    ("PQcancelSocket", ctypes.c_int, [ctypes.c_void_p]),
                    ("PQcancelErrorMessage", ctypes.c_char_p, [ctypes.c_void_p]),
                    ("PQcancelFinish", None, [ctypes.c_void_p]),
                ):
                    getattr(lib, name).restype = res
                    getattr(lib, name).argtypes = args
                _libpq = lib
                break
        else:
            _libpq = False
    return _libpq


def _cancel_cooperatively(conn: Any, timeout: float) -> None:
    """Ask the server to cancel conn's query without blocking the hub; bounded."""
    from gevent.socket import wait_read, wait_write

    lib = _psycopg2_libpq()
    if not lib:
        raise RuntimeError("cancel needs libpq >= 17 (psycopg2-binary >= 2.9.10)")
    cancel_conn = lib.PQcancelCreate(conn.pgconn_ptr)
    if not cancel_conn:
        raise MemoryError("PQcancelCreate failed")
    try:
        with gevent.Timeout(timeout, TimeoutError(f"cancel timed out after {timeout:g} s")):
            if not lib.PQcancelStart(cancel_conn):
                raise RuntimeError((lib.PQcancelErrorMessage(cancel_conn) or b"").decode())
            while True:
                status = lib.PQcancelPoll(cancel_conn)
                if status == _PGRES_POLLING_OK:
                    return
                if status == _PGRES_POLLING_FAILED:
                    message = lib.PQcancelErrorMessage(cancel_conn) or b""
                    raise RuntimeError(message.decode(errors="replace"))
                sock = lib.PQcancelSocket(cancel_conn)
                if status == _PGRES_POLLING_READING:
                    wait_read(sock)
                else:
                    wait_write(sock)
    finally:
        lib.PQcancelFinish(cancel_conn)
