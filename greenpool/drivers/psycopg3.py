"""psycopg 3 adapter (the default driver).

psycopg 3 cooperates with gevent by itself once ``select`` is monkey-patched *before*
psycopg is imported: it then waits with ``select.poll``, which gevent makes cooperative.
Imported earlier, it keeps its C wait function, which blocks the whole hub; the pool then
installs gevent-native wait functions (:mod:`greenpool.drivers.gevent_wait`), which also
cost less CPU per round trip.
"""

from __future__ import annotations

import logging
import os
import re
import selectors
from typing import Any

import gevent

from greenpool.cooperation import gevent_patched
from greenpool.drivers.base import ConnState
from greenpool.drivers.common import LibpqDriver

logger = logging.getLogger("greenpool")

WAIT_ENV = "GREENPOOL_PSYCOPG_WAIT"

# What makes psycopg clear its prepared-statement cache (psycopg/_preparing.py).
_FORGETS_PREPARED = re.compile(r"\b(?:DROP|ALTER|ROLLBACK|DISCARD\s+ALL|DEALLOCATE)\b", re.I)


class Psycopg3Driver(LibpqDriver):
    """Driver adapter for psycopg 3 (``driver="psycopg"``)."""

    name = "psycopg"
    CLIENT_ATTRS = (
        "autocommit",
        "read_only",
        "isolation_level",
        "deferrable",
        "prepare_threshold",
        "row_factory",
        "cursor_factory",
        "server_cursor_factory",
    )
    CLIENT_LISTS = ("_notice_handlers", "_notify_handlers")

    def __init__(self) -> None:
        super().__init__()
        import psycopg
        from psycopg.pq import TransactionStatus

        version = tuple(int(p) for p in psycopg.__version__.split(".")[:2] if p.isdigit())
        if version < (3, 2):
            raise ValueError(
                f"driver: psycopg {psycopg.__version__} cannot cooperate with gevent "
                "reliably; greenpool needs psycopg >= 3.2"
            )

        self._psycopg = psycopg
        from psycopg import generators
        from psycopg.pq import ExecStatus

        self._generators = generators
        self._idle = TransactionStatus.IDLE
        self._fatal = ExecStatus.FATAL_ERROR
        self._forgets: dict[str, bool] = {}
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
        if mode == "psycopg" or not gevent_patched("select"):
            return
        if os.environ.get("PSYCOPG_WAIT_FUNC"):  # the user chose psycopg's wait explicitly
            return
        from greenpool.drivers import gevent_wait

        problems = gevent_wait.install()
        if problems:
            logger.info("keeping psycopg's own wait functions: %s", "; ".join(problems))

    def cooperation_problems(self) -> list[str]:
        problems = []
        if not gevent_patched("socket") or not gevent_patched("select"):
            problems.append(
                "gevent has not monkey-patched socket/select: call gevent.monkey.patch_all() "
                "first thing (gunicorn -k gevent does it for you)"
            )
            return problems
        from psycopg import waiting

        from greenpool.drivers import gevent_wait

        if gevent_wait.installed():
            return problems
        wait_c = getattr(waiting, "wait_c", None)
        if wait_c is not None and waiting.wait is wait_c:
            problems.append(
                "psycopg was imported before gevent patched select, so it waits in C and "
                "blocks the hub: import gevent and call monkey.patch_all() before psycopg"
            )
        sel = getattr(waiting, "DefaultSelector", None)
        if sel is not None and sel is not selectors.DefaultSelector:
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

    def _open(self, conninfo: str, kwargs: dict[str, Any]) -> Any:
        return self._psycopg.Connection.connect(conninfo, **kwargs)

    def execute(self, conn: Any, sql: str) -> None:
        """Run ``sql`` (one or more statements, no rows wanted) as one simple-query
        message straight through libpq: no cursor, no autocommit switch. The release
        reset runs this on every return: about 40% less client CPU than a cursor."""
        pgconn = conn.pgconn
        if pgconn.transaction_status != self._idle or pgconn.pipeline_status:
            super().execute(conn, sql)  # psycopg's own path: it refuses what it refuses
            return
        encoding = conn.info.encoding
        try:
            with conn.lock:
                pgconn.send_query(sql.encode(encoding))
                results = conn.wait(self._generators.execute(pgconn))
        finally:
            if self._forgets_prepared(sql):
                # The server dropped (or may have dropped) psycopg's prepared statements:
                # psycopg must prepare again rather than run "_pg3_0", which is gone.
                # It notices by itself only for statements it ran through a cursor.
                prepared = getattr(conn, "_prepared", None)
                if prepared is not None:
                    prepared.clear()
        for res in results:
            if res.status == self._fatal:
                raise self._psycopg.errors.error_from_result(res, encoding=encoding)

    def _forgets_prepared(self, sql: str) -> bool:
        forgets = self._forgets.get(sql)
        if forgets is None:
            forgets = _FORGETS_PREPARED.search(sql) is not None
            if len(self._forgets) < 64:  # the pool's few fixed statements
                self._forgets[sql] = forgets
        return forgets

    def _run(self, conn: Any, sql: str, params: Any = None) -> list[Any]:
        # prepare=False: psycopg would otherwise prepare a statement the pool repeats
        # (and a prepared DISCARD ALL deallocates itself: "_pg3_0 does not exist").
        cur = conn.execute(sql, params, prepare=False)
        return cur.fetchall() if cur.description is not None else []

    def _drop_buffered(self, conn: Any) -> None:
        backlog = getattr(conn, "_notifies_backlog", None)
        if backlog:
            backlog.clear()

    def _parameter(self, conn: Any, name: str) -> str | None:
        value = conn.pgconn.parameter_status(name.encode())
        return value.decode() if value is not None else None

    def state(self, conn: Any) -> ConnState:
        # libpq reports UNKNOWN for a closed or broken connection: no need to ask more.
        return self._status.get(conn.pgconn.transaction_status, ConnState.BROKEN)

    def cancel(self, conn: Any, timeout: float) -> None:
        if self._cancel_safe:
            conn.cancel_safe(timeout=timeout)
        else:  # libpq < 17: PQcancel blocks, so run it off the hub.
            gevent.get_hub().threadpool.apply(conn.cancel)

    def is_connection(self, obj: Any) -> bool:
        return isinstance(obj, self._psycopg.Connection)
