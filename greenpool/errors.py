"""Exceptions raised by greenpool. Every one subclasses :class:`PoolError`."""

from __future__ import annotations


class PoolError(Exception):
    """Base class of every error greenpool raises on its own account."""


class PoolTimeout(PoolError):
    """No connection could be handed out within the acquire timeout."""


class PoolClosed(PoolError):
    """The pool is closed (or was never opened)."""


class TooManyRequests(PoolError):
    """The queue of waiting borrowers is full (``max_waiting``)."""


class ConnectError(PoolError):
    """The pool could not open a connection; ``__cause__`` is the driver's error."""


class CooperationError(PoolError):
    """Database I/O would block the whole gevent hub instead of one greenlet."""
