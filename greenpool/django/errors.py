"""Pool exhaustion as Django sees it: greenpool's errors that are also database errors."""

from __future__ import annotations

from django.db.utils import OperationalError

import greenpool


class PoolTimeout(greenpool.PoolTimeout, OperationalError):  # type: ignore[misc]
    """No connection within the pool's ``timeout``; caught by ``except PoolTimeout`` and
    ``except django.db.OperationalError`` alike."""


class TooManyRequests(greenpool.TooManyRequests, OperationalError):  # type: ignore[misc]
    """The pool's queue of waiting greenlets is full (``max_waiting``)."""
