"""The test server, whichever it is: the private cluster or ``GREENPOOL_TEST_DSN``'s.

:class:`Server` is what tests may ask of it (admin helpers, connection strings);
:class:`~tests.support.pgcluster.PgCluster` and :class:`ExternalServer` both provide it.
An external server cannot be stopped: tests that stop or restart the server are marked
``needs_restart`` and skipped then (``tests/conftest.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import psycopg
from psycopg import sql as pgsql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from tests.support.pgcluster import (
    ADMIN_APPLICATION_NAME,
    APP_PASSWORD,
    APP_USER,
    PW_PASSWORD,
    PW_USER,
    PgCluster,
)

__all__ = ["ExternalServer", "Server"]


class Server(Protocol):
    """What tests use of the server (PgCluster's admin helpers and ``dsn()``)."""

    @property
    def host(self) -> str: ...

    @property
    def port(self) -> int: ...

    def dsn(
        self, user: str = ..., password: str | None = None, dbname: str = ..., **extra: Any
    ) -> str: ...

    def execute(
        self, sql: str, params: Sequence[Any] | dict[str, Any] | None = None
    ) -> list[tuple[Any, ...]]: ...

    def backend_count(self, application_name: str | None = None) -> int: ...

    def active_queries(self, application_name: str | None = None) -> list[Any]: ...

    def terminate_backends(self, application_name: str) -> int: ...


class ExternalServer:
    """A running server named by a superuser DSN (``GREENPOOL_TEST_DSN``), with the admin
    helpers of :class:`PgCluster`. :meth:`provision` creates the password roles that the
    private cluster has (the server must authenticate them by password)."""

    execute = PgCluster.execute
    backend_count = PgCluster.backend_count
    terminate_backends = PgCluster.terminate_backends
    active_queries = PgCluster.active_queries

    def __init__(self, dsn: str) -> None:
        self.admin_dsn = dsn
        self._params = {k: v for k, v in conninfo_to_dict(dsn).items() if v is not None}

    @property
    def host(self) -> str:
        return str(self._params.get("host", "127.0.0.1"))

    @property
    def port(self) -> int:
        return int(self._params.get("port", 5432))

    def dsn(
        self,
        user: str | None = None,
        password: str | None = None,
        dbname: str | None = None,
        **extra: Any,
    ) -> str:
        """The admin DSN, for another user (its password dropped) or with extra keys."""
        params = dict(self._params)
        if user is not None and user != params.get("user"):
            params["user"] = user
            params.pop("password", None)
        if password is not None:
            params["password"] = password
        if dbname is not None:
            params["dbname"] = dbname
        params.update(extra)
        return make_conninfo("", **params)

    def connect_admin(self, **extra: Any) -> psycopg.Connection[Any]:
        extra.setdefault("application_name", ADMIN_APPLICATION_NAME)
        return psycopg.connect(self.admin_dsn, autocommit=True, **extra)

    def is_running(self) -> bool:
        return True

    def provision(self) -> None:
        """Create (or reset the passwords of) the private cluster's password roles."""
        with self.connect_admin() as conn:
            for role, password in ((PW_USER, PW_PASSWORD), (APP_USER, APP_PASSWORD)):
                exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,))
                verb = "ALTER" if exists.fetchone() else "CREATE"
                conn.execute(
                    pgsql.SQL("{} ROLE {} LOGIN PASSWORD {}").format(
                        pgsql.SQL(verb), pgsql.Identifier(role), pgsql.Literal(password)
                    )
                )
                database = conn.execute("SELECT current_database()").fetchone()
                assert database is not None
                conn.execute(
                    pgsql.SQL(
                        "GRANT CONNECT, TEMPORARY ON DATABASE {0} TO {1};"
                        " GRANT USAGE, CREATE ON SCHEMA public TO {1}"
                    ).format(pgsql.Identifier(database[0]), pgsql.Identifier(role))
                )
