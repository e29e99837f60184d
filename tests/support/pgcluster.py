"""A private, throwaway PostgreSQL cluster for the test-suite.

``PgCluster`` is :class:`greenpool.embedded.EmbeddedPostgres` (initdb into a temporary
directory, a postmaster on ``127.0.0.1`` on a free port, run as ``postgres``/``nobody``
when we are root, SCRAM authentication everywhere with the superuser's random password
in a ``0600`` passfile, cleanup on destroy, at exit and by a watchdog when this process
dies) plus what the tests need on top:

- two LOGIN roles with known passwords (:data:`PW_USER`, :data:`APP_USER`), re-created
  by every first start;
- :meth:`PgCluster.restart` keeping the port; TLS and other settings through
  ``extra_settings``;
- admin helpers (:meth:`PgCluster.execute`, :meth:`PgCluster.backend_count`,
  :meth:`PgCluster.terminate_backends`, :meth:`PgCluster.active_queries`), each opening
  one short-lived superuser connection with plain psycopg 3, which is gevent-cooperative
  when imported after ``gevent.monkey.patch_all()``.

Binary discovery (``GREENPOOL_PG_BINDIR``, ``pg_config``, ``/usr/lib/postgresql/*/bin``,
``PATH``, the ``pgserver`` wheel) lives in :func:`greenpool.embedded.find_pg_bindir`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import psycopg
from psycopg import sql as pgsql

from greenpool.embedded import (
    BINDIR_ENV,
    HOST,
    SUPERUSER,
    EmbeddedPostgres,
    PgBinariesNotFoundError,
    StopMode,
    find_pg_bindir,
    free_port,
)
from greenpool.embedded import EmbeddedPostgresError as PgClusterError

__all__ = [
    "APP_PASSWORD",
    "APP_USER",
    "BINDIR_ENV",
    "HOST",
    "PW_PASSWORD",
    "PW_USER",
    "SUPERUSER",
    "ActiveQuery",
    "PgBinariesNotFoundError",
    "PgCluster",
    "PgClusterError",
    "find_pg_bindir",
    "free_port",
]

#: A LOGIN role that must authenticate with scram-sha-256.
PW_USER = "greenpool_pw"
PW_PASSWORD = "s3cret-pw"
#: A second LOGIN role with a password, for "application" connections.
APP_USER = "greenpool_app"
APP_PASSWORD = "app-pw"

ADMIN_APPLICATION_NAME = "pgcluster-admin"

_free_port = free_port  # the old private name, still used by a few tests


class ActiveQuery(NamedTuple):
    """One row of :meth:`PgCluster.active_queries`."""

    pid: int
    application_name: str
    query: str
    wait_event_type: str | None
    wait_event: str | None
    running_for: float  # seconds since query_start


class PgCluster(EmbeddedPostgres):
    """A throwaway PostgreSQL cluster on 127.0.0.1 with test roles and admin helpers.

    Usable as a context manager (``with PgCluster() as pg: ...``): entering starts it,
    leaving destroys it.
    """

    def __enter__(self) -> PgCluster:
        self.start()
        return self

    def restart(self, mode: StopMode = "fast") -> None:
        """Stop then start again; the port stays the same."""
        self.stop(mode)
        self.start()

    # -- admin helpers ------------------------------------------------------

    def connect_admin(self, **extra: Any) -> psycopg.Connection[tuple[Any, ...]]:
        """A new autocommit superuser connection (caller closes it)."""
        params: dict[str, Any] = {
            "application_name": ADMIN_APPLICATION_NAME,
            "connect_timeout": 10,
        }
        params.update(extra)
        return psycopg.connect(self.dsn(SUPERUSER, **params), autocommit=True)

    def execute(
        self, sql: str, params: Sequence[Any] | dict[str, Any] | None = None
    ) -> list[tuple[Any, ...]]:
        """Run one statement as superuser (autocommit); return its rows, if any."""
        with self.connect_admin() as conn:
            cur = conn.execute(sql.encode(), params)  # bytes: any SQL is accepted
            if cur.description is None:
                return []
            return cur.fetchall()

    def backend_count(self, application_name: str | None = None) -> int:
        """Client backends (optionally with this application_name), not counting
        the admin connection used to ask."""
        rows = self.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE backend_type = 'client backend'"
            " AND pid <> pg_backend_pid()"
            " AND (%(app)s::text IS NULL OR application_name = %(app)s::text)",
            {"app": application_name},
        )
        return int(rows[0][0])

    def terminate_backends(self, application_name: str) -> int:
        """pg_terminate_backend() every client backend with this
        application_name, all at once; waits (up to 5 s) until they are gone.
        Returns how many were terminated.

        pg_terminate_backend(pid, timeout) would wait for each backend in turn, polling
        every 100 ms: ten backends then die one by one over a second, which is not the
        "all at once" fault the tests mean.
        """
        rows = self.execute(
            "SELECT coalesce(array_agg(pid) FILTER (WHERE pg_terminate_backend(pid)), '{}')"
            " FROM pg_stat_activity"
            " WHERE backend_type = 'client backend'"
            " AND pid <> pg_backend_pid()"
            " AND application_name = %(app)s::text",
            {"app": application_name},
        )
        pids: list[int] = list(rows[0][0])
        deadline = time.monotonic() + 5.0
        while True:
            left = self.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%(pids)s)",
                {"pids": pids},
            )[0][0]
            if not left or time.monotonic() >= deadline:
                return len(pids) - int(left)
            time.sleep(0.01)

    def active_queries(self, application_name: str | None = None) -> list[ActiveQuery]:
        """Client backends whose state is 'active' (excluding the asking one)."""
        rows = self.execute(
            "SELECT pid, application_name, query, wait_event_type, wait_event,"
            " extract(epoch FROM clock_timestamp() - query_start)::float8"
            " FROM pg_stat_activity"
            " WHERE backend_type = 'client backend'"
            " AND state = 'active'"
            " AND pid <> pg_backend_pid()"
            " AND (%(app)s::text IS NULL OR application_name = %(app)s::text)"
            " ORDER BY query_start",
            {"app": application_name},
        )
        return [ActiveQuery(int(r[0]), r[1], r[2], r[3], r[4], float(r[5] or 0.0)) for r in rows]

    # -- internals ----------------------------------------------------------

    def _first_ready(self) -> None:
        with self.connect_admin() as conn:
            for role, password in ((PW_USER, PW_PASSWORD), (APP_USER, APP_PASSWORD)):
                exists = conn.execute(
                    "SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)
                ).fetchone()
                verb = "ALTER" if exists else "CREATE"
                conn.execute(
                    pgsql.SQL("{} ROLE {} LOGIN PASSWORD {}").format(
                        pgsql.SQL(verb),
                        pgsql.Identifier(role),
                        pgsql.Literal(password),
                    )
                )
                conn.execute(
                    pgsql.SQL(
                        "GRANT CONNECT, TEMPORARY ON DATABASE postgres TO {0};"
                        " GRANT USAGE, CREATE ON SCHEMA public TO {0}"
                    ).format(pgsql.Identifier(role))
                )
