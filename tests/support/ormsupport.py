"""Helpers shared by the ORM integration tests (SQLAlchemy, Flask-SQLAlchemy, Django)."""

from __future__ import annotations

import os
import socket
import uuid
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict


def unique_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def dsn_params(dsn: str) -> dict[str, Any]:
    return {k: v for k, v in conninfo_to_dict(dsn).items() if v is not None}


def sa_url(dsn: str, driver: str = "psycopg", **query: str) -> Any:
    """A SQLAlchemy URL for the test server's key=value DSN (passfile included)."""
    from greenpool.sqlalchemy.url import url_from_conninfo

    return url_from_conninfo(dsn, driver, **query)


def backend_pids(dsn: str, application_name: str) -> set[int]:
    """Ground truth: the server's client backends with this application_name."""
    with psycopg.connect(dsn, autocommit=True, application_name="orm-test-admin") as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE backend_type = 'client backend' "
            "AND application_name = %s AND pid <> pg_backend_pid()",
            (application_name,),
        ).fetchall()
    return {int(r[0]) for r in rows}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
