"""A first-come, first-served queue of greenlets waiting for a connection.

Built on gevent's low-level hub ``Waiter`` and a loop timer rather than ``Event`` or
``Timeout``: one allocation of each per wait, no exception used for the timeout. A
connection is handed over by storing it on the waiter *before* waking it, so the hand-off
happens atomically with respect to other greenlets; a waiter that dies after being served
gives the connection back (see ``GreenPool._wait``).
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Iterator
from typing import Any, Generic, TypeVar

from gevent import get_hub
from gevent.hub import Waiter as _HubWaiter

T = TypeVar("T")

_TIMED_OUT = object()


class Waiter(Generic[T]):
    """One greenlet waiting for an item (or an error) from the pool."""

    __slots__ = ("_hub_waiter", "error", "item")

    def __init__(self) -> None:
        self.item: T | None = None
        self.error: BaseException | None = None
        self._hub_waiter: Any = _HubWaiter()

    def wait(self, timeout: float) -> bool:
        """Block this greenlet until woken or ``timeout`` passes; False means timed out."""
        hub = get_hub()
        timer = hub.loop.timer(timeout)
        timer.start(self._hub_waiter.switch, _TIMED_OUT)
        try:
            return self._hub_waiter.get() is not _TIMED_OUT
        finally:
            timer.close()

    def wake(self) -> None:
        """Schedule the waiting greenlet to resume (the hub does the switch)."""
        get_hub().loop.run_callback(self._hub_waiter.switch, None)


class WaitQueue(Generic[T]):
    """FIFO of live waiters; a waiter that gives up is removed at once."""

    __slots__ = ("queue",)

    def __init__(self) -> None:
        self.queue: deque[Waiter[T]] = deque()

    def __len__(self) -> int:
        return len(self.queue)

    def __bool__(self) -> bool:
        return bool(self.queue)

    def __iter__(self) -> Iterator[Waiter[T]]:
        return iter(self.queue)

    def push(self) -> Waiter[T]:
        waiter: Waiter[T] = Waiter()
        self.queue.append(waiter)
        return waiter

    def serve(self, item: T) -> bool:
        """Hand ``item`` to the oldest waiter; False when nobody is waiting."""
        if not self.queue:
            return False
        waiter = self.queue.popleft()
        waiter.item = item
        waiter.wake()
        return True

    def discard(self, waiter: Waiter[T]) -> None:
        with contextlib.suppress(ValueError):
            self.queue.remove(waiter)

    def fail_all(self, error: BaseException) -> int:
        """Wake every waiter with ``error``; return how many there were."""
        count = len(self.queue)
        while self.queue:
            waiter = self.queue.popleft()
            waiter.error = error
            waiter.wake()
        return count
