"""One pool per connection target and settings, per process.

``get_pool(conninfo, **settings)`` returns the same open pool for the same arguments
(the TDBC proposal's lookup by connection arguments), so code that cannot pass a pool
around (a Flask bind, an ORM engine, a tenant's database chosen at run time) still
shares one. The pool is created and opened on first use and at most once, even when the
first users race (opening may switch greenlets); a closed pool is replaced by a new one
on the next call. After ``os.fork()`` the child's pools have forgotten the parent's
connections (see :mod:`greenpool.fork`) and open new ones on first use.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

from gevent.lock import Semaphore

from greenpool import fork
from greenpool.api import GreenPool
from greenpool.pool import CLOSED, NEW
from greenpool.settings import seconds


class _Entry:
    __slots__ = ("lock", "pool")

    def __init__(self, pool: GreenPool[Any]) -> None:
        self.pool = pool
        self.lock = Semaphore()


_ENTRIES: dict[Hashable, _Entry] = {}


def _freeze(name: str, value: Any) -> Hashable:
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _freeze(name, v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(name, v) for v in value)
    try:
        hash(value)
    except TypeError:
        raise ValueError(f"get_pool: setting {name!r} is not hashable") from None
    return value  # type: ignore[no-any-return]


def pool_key(conninfo: str, settings: Mapping[str, Any]) -> Hashable:
    """The registry key of a pool: its conninfo text and every setting (callables by
    identity)."""
    return (conninfo, tuple(sorted((k, _freeze(k, v)) for k, v in settings.items())))


def get_pool(conninfo: str = "", **settings: Any) -> GreenPool[Any]:
    """The process's open pool for ``conninfo`` and ``settings``, created on first use.

    ``settings`` are :class:`GreenPool`'s keyword arguments (``open`` excepted). Switches
    only while the pool opens (the driver's first-time set-up).
    """
    if "open" in settings:
        raise ValueError("get_pool: 'open' is not a setting; the pool opens on first use")
    key = pool_key(conninfo, settings)
    entry = _ENTRIES.get(key)
    if entry is None or entry.pool._state == CLOSED:
        entry = _Entry(GreenPool(conninfo, open=False, **settings))
        _ENTRIES[key] = entry
    if entry.pool._state == NEW:
        with entry.lock:
            if entry.pool._state == NEW:
                entry.pool.open()
    return entry.pool


def registered_pools() -> list[GreenPool[Any]]:
    """The pools :func:`get_pool` has handed out and that are not closed."""
    return [e.pool for e in _ENTRIES.values() if e.pool._state != CLOSED]


def close_all(timeout: float = 5.0) -> None:
    """Close every open pool of this process, those from :func:`get_pool` and those made
    directly (e.g. from gunicorn's ``worker_exit``). Each waits up to ``timeout`` seconds
    for its borrowed connections. A pool never opened is left as it is (it holds nothing;
    a ``db = GreenPool()`` waiting for ``init_app`` stays usable). Switches."""
    timeout = seconds("timeout", timeout)
    for pool in fork.tracked():
        if isinstance(pool, GreenPool) and pool._state not in (NEW, CLOSED):
            pool.close(timeout)
    for key in [k for k, e in _ENTRIES.items() if e.pool._state == CLOSED]:
        del _ENTRIES[key]
