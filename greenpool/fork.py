"""Fork safety: a forked child never touches its parent's connections.

After ``os.fork()`` (gunicorn's workers, multiprocessing) the child holds copies of the
parent's sockets. Closing them, or letting a finaliser send a Terminate, would end the
parent's server sessions. In the child every pool forgets its records and greenlets (the
sockets are pointed at /dev/null and the objects kept referenced forever, so nothing is
ever sent), and an open pool starts afresh on its next use.
"""

from __future__ import annotations

import os
import weakref
from typing import Any, Protocol


class ForkAware(Protocol):
    def _after_fork_in_child(self) -> None: ...


# Connections a forked child inherited, kept referenced so they are never finalised.
_ORPHANS: list[Any] = []
_TRACKED: weakref.WeakSet[Any] = weakref.WeakSet()


def track(obj: ForkAware) -> None:
    """Call ``obj._after_fork_in_child()`` in every forked child (weakly referenced)."""
    _TRACKED.add(obj)


def tracked() -> list[Any]:
    """The live objects being tracked (pools), in no particular order."""
    return list(_TRACKED)


def orphan(conn: Any) -> None:
    """In a forked child, make a parent's connection harmless (see the module doc)."""
    _ORPHANS.append(conn)
    try:
        fd = conn.fileno()
    except Exception:
        return
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def orphan_count() -> int:
    """How many inherited connections this process has made harmless."""
    return len(_ORPHANS)


def _after_fork_in_child() -> None:
    for obj in list(_TRACKED):
        obj._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
