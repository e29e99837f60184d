"""psycopg 3 adapter (the default driver).

psycopg 3 cooperates with gevent by itself once ``select`` is monkey-patched *before*
psycopg is imported: it then waits with ``select.poll``, which gevent makes cooperative.
Imported earlier, it keeps its C wait function, which blocks the whole hub.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import sys
from typing import Any

import gevent

from greenpool.drivers.base import ConnState

logger = logging.getLogger("greenpool")

WAIT_ENV = "GREENPOOL_PSYCOPG_WAIT"


def _gevent_patched(module: str) -> bool:
    monkey = sys.modules.get("gevent.monkey")
    return bool(monkey and monkey.is_module_patched(module))


class Psycopg3Driver:
    """Driver adapter for psycopg 3 (``driver="psycopg"``)."""

    name = "psycopg"

    def __init__(self) -> None:
        import psycopg
        from psycopg.pq import TransactionStatus

        version = tuple(int(p) for p in psycopg.__version__.split(".")[:2] if p.isdigit())
        if version < (3, 2):
            raise ValueError(
                f"driver: psycopg {psycopg.__version__} cannot cooperate with gevent "
                "reliably; greenpool needs psycopg >= 3.2"
            )

        self._psycopg = psycopg
        self._status = {
            TransactionStatus.IDLE: ConnState.IDLE,
            TransactionStatus.INTRANS: ConnState.IN_TRANSACTION,
            TransactionStatus.INERROR: ConnState.IN_ERROR,
            TransactionStatus.ACTIVE: ConnState.ACTIVE,
            TransactionStatus.UNKNOWN: ConnState.BROKEN,
        }
        try:
            from psycopg.pq import version as libpq_version

            self._cancel_safe = libpq_version() >= 170000
        except Exception:  # pragma: no cover - very old psycopg
            self._cancel_safe = False

    def prepare(self) -> None:
        """Under gevent, make psycopg wait with gevent's own I/O watchers.

        psycopg's own choice (``wait_poll`` through gevent's select emulation) is
        cooperative but costs about a third more CPU per round trip, and psycopg imported
        before patching keeps a C wait that blocks the hub. See ``gevent_wait``; set
        ``GREENPOOL_PSYCOPG_WAIT=psycopg`` to keep psycopg's own.
        """
        mode = os.environ.get(WAIT_ENV, "gevent")
        if mode not in ("gevent", "psycopg"):
            raise ValueError(f"{WAIT_ENV}: expected 'gevent' or 'psycopg', got {mode!r}")
        if mode == "psycopg" or not _gevent_patched("select"):
            return
        if os.environ.get("PSYCOPG_WAIT_FUNC"):  # the user chose psycopg's wait explicitly
            return
        from greenpool.drivers import gevent_wait

        problems = gevent_wait.install()
        if problems:
            logger.info("keeping psycopg's own wait functions: %s", "; ".join(problems))

    def cooperation_problems(self) -> list[str]:
        problems = []
        if not _gevent_patched("socket") or not _gevent_patched("select"):
            problems.append(
                "gevent has not monkey-patched socket/select: call gevent.monkey.patch_all() "
                "first thing (gunicorn -k gevent does it for you)"
            )
            return problems
        from psycopg import waiting

        wait_c = getattr(waiting, "wait_c", None)
        if wait_c is not None and waiting.wait is wait_c:
            problems.append(
                "psycopg was imported before gevent patched select, so it waits in C and "
                "blocks the hub: import gevent and call monkey.patch_all() before psycopg"
            )
        from greenpool.drivers import gevent_wait

        sel = getattr(waiting, "DefaultSelector", None)
        if (
            sel is not None
            and sel is not selectors.DefaultSelector
            and waiting.wait_conn is not gevent_wait.wait_conn
        ):
            problems.append(
                "psycopg.waiting captured an unpatched selectors.DefaultSelector "
                "(imported before monkey.patch_all()): connecting would block the hub"
            )
        return problems

    def validate_conninfo(self, conninfo: str) -> None:
        from psycopg.conninfo import conninfo_to_dict

        try:
            conninfo_to_dict(conninfo)
        except self._psycopg.Error as ex:
            # libpq quotes the offending fragment, which may be a password: say less.
            raise ValueError(
                "conninfo: libpq cannot parse the connection string "
                f"({type(ex).__name__}); check its key=value pairs or URL syntax"
            ) from None

    def connect(self, conninfo: str, kwargs: dict[str, Any], timeout: float) -> Any:
        with gevent.Timeout(timeout, TimeoutError(f"connect timed out after {timeout:g} s")):
            return self._psycopg.Connection.connect(conninfo, **kwargs)

    def state(self, conn: Any) -> ConnState:
        # libpq reports UNKNOWN for a closed or broken connection: no need to ask more.
        return self._status.get(conn.pgconn.transaction_status, ConnState.BROKEN)

    def ping(self, conn: Any) -> None:
        # An empty query is the cheapest round trip; autocommit keeps it outside a
        # transaction so the connection stays IDLE (as psycopg_pool's check does).
        if conn.autocommit:
            conn.execute("")
            return
        conn.autocommit = True
        try:
            conn.execute("")
        finally:
            self._restore_autocommit(conn, False)

    def commit(self, conn: Any) -> None:
        conn.commit()

    def rollback(self, conn: Any) -> None:
        conn.rollback()

    def execute(self, conn: Any, sql: str) -> None:
        was = conn.autocommit
        if not was:
            conn.autocommit = True
        try:
            conn.execute(sql)
        finally:
            self._restore_autocommit(conn, was)

    def _restore_autocommit(self, conn: Any, value: bool) -> None:
        # Interrupted mid-query (killed, timed out) the connection is ACTIVE and psycopg
        # refuses to change autocommit: raising here would replace the interruption
        # (swallowing GreenletExit or the caller's gevent.Timeout). The pool discards such
        # a connection anyway, so leave it be.
        if conn.autocommit != value and self.state(conn) is ConnState.IDLE:
            conn.autocommit = value

    def cancel(self, conn: Any, timeout: float) -> None:
        if self._cancel_safe:
            conn.cancel_safe(timeout=timeout)
        else:  # libpq < 17: PQcancel blocks, so run it off the hub.
            gevent.get_hub().threadpool.apply(conn.cancel)

    def close(self, conn: Any) -> None:
        with contextlib.suppress(Exception):
            conn.close()

    def backend_pid(self, conn: Any) -> int | None:
        try:
            return int(conn.info.backend_pid)
        except Exception:
            return None

    def is_connection(self, obj: Any) -> bool:
        return isinstance(obj, self._psycopg.Connection)
