"""greenpool: a gevent-cooperative PostgreSQL connection pool for WSGI servers.

``GreenPool`` is the pool (and, with ``init_app``, the Flask extension); ``get_pool``
returns the process's shared pool for a conninfo and settings; ``close_all`` closes every
pool of the process. Errors subclass ``PoolError``.
"""

from __future__ import annotations

from greenpool.api import GreenPool
from greenpool.cooperation import check_cooperation, cooperation_problems
from greenpool.errors import (
    ConnectError,
    CooperationError,
    PoolClosed,
    PoolError,
    PoolTimeout,
    TooManyRequests,
)
from greenpool.pool import Connection
from greenpool.registry import close_all, get_pool

__version__ = "0.1.0"

__all__ = [
    "ConnectError",
    "Connection",
    "CooperationError",
    "GreenPool",
    "PoolClosed",
    "PoolError",
    "PoolTimeout",
    "TooManyRequests",
    "check_cooperation",
    "close_all",
    "cooperation_problems",
    "get_pool",
]
