"""A SQLAlchemy URL from a libpq conninfo, read by libpq itself."""

from __future__ import annotations

from typing import Any

#: libpq parameters with a place of their own in a SQLAlchemy URL.
_URL_PARTS = ("user", "password", "host", "port", "dbname")


def url_from_conninfo(conninfo: str, driver: str = "psycopg", **query: str) -> Any:
    """``postgresql+<driver>://...`` for a libpq URL or key=value string.

    libpq parses ``conninfo`` (``psycopg.conninfo.conninfo_to_dict``), so quoting, escapes
    and multi-host lists mean what they mean to libpq; parameters a URL has no part for
    (``passfile``, ``sslmode``, ``options`` ...) become query parameters, which the
    dialect passes to ``connect()``. ``query`` adds more (``application_name=...``).
    """
    from sqlalchemy import URL

    from greenpool.conninfo import libpq_parse

    params = libpq_parse(conninfo)
    port = params.pop("port", None)
    return URL.create(
        f"postgresql+{driver}",
        username=params.pop("user", None),
        password=params.pop("password", None),
        host=params.pop("host", None),
        port=int(port) if port and port.isdigit() else None,
        database=params.pop("dbname", None),
        query={**params, **query},
    )
