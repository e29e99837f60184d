"""greenpool: a gevent-cooperative PostgreSQL connection pool for WSGI servers."""

from __future__ import annotations

from greenpool.cooperation import check_cooperation, cooperation_problems
from greenpool.errors import (
    ConnectError,
    CooperationError,
    PoolClosed,
    PoolError,
    PoolTimeout,
    TooManyRequests,
)
from greenpool.pool import GreenPool, close_all

__version__ = "0.1.0"

__all__ = [
    "ConnectError",
    "CooperationError",
    "GreenPool",
    "PoolClosed",
    "PoolError",
    "PoolTimeout",
    "TooManyRequests",
    "check_cooperation",
    "close_all",
    "cooperation_problems",
]
