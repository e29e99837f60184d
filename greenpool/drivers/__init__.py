"""Driver adapters behind :class:`greenpool.drivers.base.Driver`."""

from __future__ import annotations

from typing import Any

from greenpool.drivers.base import ConnState, Driver

__all__ = ["ConnState", "Driver", "get_driver"]


def get_driver(driver: str | Any) -> Driver:
    """Return the adapter for a driver name ("psycopg", "psycopg2") or a Driver object."""
    if not isinstance(driver, str):
        return driver  # type: ignore[no-any-return]
    if driver in ("psycopg", "psycopg3"):
        from greenpool.drivers.psycopg3 import Psycopg3Driver

        return Psycopg3Driver()
    if driver == "psycopg2":
        from greenpool.drivers.psycopg2 import Psycopg2Driver

        return Psycopg2Driver()
    raise ValueError(f"driver: unknown driver {driver!r} (use 'psycopg' or 'psycopg2')")
