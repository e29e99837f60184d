"""The suite's one way to wait for a state: poll a condition with a deadline.

Tests synchronise on events where there is one; for everything else (server-side
effects, a background greenlet's outcome) they poll with :func:`wait_for`, which fails
the test with a message instead of returning a flag that a caller might forget to
assert. Never a bare sleep.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import gevent

__all__ = ["wait_for"]


def wait_for(
    predicate: Callable[[], object],
    timeout: float = 10.0,
    interval: float = 0.02,
    what: str = "",
) -> float:
    """Poll ``predicate`` until it is true; return the seconds that took.

    Raises AssertionError (naming ``what``, or the predicate) after ``timeout`` seconds.
    Switches greenlets while it waits, so background greenlets make progress.
    """
    start = time.monotonic()
    deadline = start + timeout
    while True:
        if predicate():
            return time.monotonic() - start
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what or predicate}")
        gevent.sleep(interval)
