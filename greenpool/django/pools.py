"""One GreenPool per database alias per process, built from Django's connection settings.

Nothing here imports Django's database layer at module level, so ``greenpool.django`` can
be imported from settings modules and gunicorn hooks.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from gevent.lock import RLock

from greenpool import GreenPool

logger = logging.getLogger("greenpool")

#: Keys accepted in ``OPTIONS["pool"]`` (GreenPool's keyword arguments).
POOL_KEYS = frozenset(
    {
        "min_size",
        "max_size",
        "min_idle",
        "timeout",
        "max_waiting",
        "max_idle",
        "max_lifetime",
        "max_lifetime_jitter",
        "health_check_period",
        "check_idle_after",
        "ping_timeout",
        "connect_timeout",
        "max_connecting",
        "reconnect_timeout",
        "reset",
        "name",
    }
)

_pools: dict[str, GreenPool[Any]] = {}
_validated: set[tuple[str, str]] = set()
_creating = RLock()


def pool_options(alias: str, options: Any, driver: str = "psycopg") -> dict[str, Any]:
    """Validate ``OPTIONS["pool"]`` (True or a dict); ImproperlyConfigured names the key."""
    from django.core.exceptions import ImproperlyConfigured

    where = f"DATABASES[{alias!r}]['OPTIONS']['pool']"
    if options is True:
        return {}
    if not isinstance(options, dict):
        raise ImproperlyConfigured(f"{where}: expected True or a dict, got {options!r}")
    unknown = sorted(set(options) - POOL_KEYS)
    if unknown:
        raise ImproperlyConfigured(
            f"{where}: unknown setting(s) {', '.join(unknown)} "
            f"(known: {', '.join(sorted(POOL_KEYS))})"
        )
    key = (alias, repr(sorted(options.items())))
    if key not in _validated:  # a wrapper is made per greenlet: check each setting once
        try:
            GreenPool("", driver=driver, open=False, **options)  # validates, opens nothing
        except ValueError as ex:
            raise ImproperlyConfigured(f"{where}: {ex}") from None
        _validated.add(key)
    return dict(options)


def create_pool(
    alias: str, options: dict[str, Any], conn_params: dict[str, Any], driver: str, configure: Any
) -> GreenPool[Any]:
    """The alias's pool, created (and opened) on first use in this process.

    Many greenlets ask at once when a worker takes its first requests, and opening may
    switch greenlets (logging, the driver's set-up): the lock makes the first one create
    and open the pool while the others wait for it, so there is one pool per alias.
    """
    pool = _pools.get(alias)
    if pool is not None:
        return pool
    with _creating:
        pool = _pools.get(alias)
        if pool is not None:
            return pool
        from django.core.exceptions import ImproperlyConfigured

        kwargs = {"name": f"django-{alias}", **options}
        try:
            pool = GreenPool(
                "", kwargs=conn_params, driver=driver, configure=configure, open=False, **kwargs
            )
        except ValueError as ex:
            raise ImproperlyConfigured(f"DATABASES[{alias!r}]['OPTIONS']['pool']: {ex}") from None
        pool.open()
        _pools[alias] = pool
    logger.info("greenpool: Django database %r pooled by %r", alias, pool.name)
    return pool


def get_pool(alias: str = "default") -> GreenPool[Any] | None:
    """The alias's GreenPool in this process (None before its first query), for stats()."""
    return _pools.get(alias)


def drop_pool(alias: str, timeout: float = 0.0) -> None:
    pool = _pools.pop(alias, None)
    if pool is not None:
        pool.close(timeout)


def close_pools(timeout: float = 5.0) -> None:
    """Close every Django pool of this process (e.g. from gunicorn's ``worker_exit``)."""
    for alias in list(_pools):
        drop_pool(alias, timeout)


def gevent_patched() -> bool:
    """Whether gevent patched threads, so Django's per-thread connections are per greenlet."""
    monkey = sys.modules.get("gevent.monkey")
    return bool(monkey and monkey.is_module_patched("threading"))
