"""Django ``DATABASES`` entries from a libpq conninfo, read by libpq itself."""

from __future__ import annotations

from typing import Any

_SETTINGS = {
    "dbname": "NAME",
    "user": "USER",
    "password": "PASSWORD",
    "host": "HOST",
    "port": "PORT",
}


def database_from_conninfo(conninfo: str, **options: Any) -> dict[str, Any]:
    """``{"NAME": ..., "USER": ..., "HOST": ..., "OPTIONS": {...}}`` for a libpq URL or
    key=value string (``DATABASE_URL``). libpq parses it; parameters Django has no setting
    for (``passfile``, ``sslmode``, ``target_session_attrs`` ...) go to ``OPTIONS``, which
    Django passes to ``connect()``, with ``options`` added. No ``ENGINE`` is set."""
    from greenpool.conninfo import libpq_parse

    params = libpq_parse(conninfo)
    result: dict[str, Any] = {setting: params.pop(key, "") for key, setting in _SETTINGS.items()}
    result["NAME"] = result["NAME"] or "postgres"
    result["OPTIONS"] = {**params, **options}
    return result
