"""psycopg 3 wait functions built directly on gevent's hub I/O watchers.

Under gevent, psycopg 3 notices that ``select`` is monkey-patched and waits with
``psycopg.waiting.wait_poll``, which goes through gevent's *emulation* of ``select.poll``:
a poll object, a result set with an Event, a Timeout, a hub Waiter and a list per wait.
:func:`wait` and :func:`wait_conn` do only what is needed: one ``loop.io`` watcher (libev's
``EV_READ``/``EV_WRITE`` bits equal psycopg's ``Wait``/``Ready`` flags), one timer for
psycopg's ``interval``/``timeout``, and a switch to the hub. :func:`wait` keeps the watcher
and the timer of each socket for the next query, as gevent's own sockets keep theirs.
Measured (benchmarks/): the client CPU of a SELECT 1 drops by about a third.

They keep psycopg's semantics: the generator gets the ready flags, or 0 when ``interval``
passes; ``timeout`` raises ``psycopg.errors._WaitTimeout`` after resuming the generator; a
socket closed under a waiter raises ``OperationalError`` within one interval; an exception
thrown into the waiting greenlet stops both watchers before it propagates.

:func:`install` swaps them into ``psycopg.waiting`` (``Connection`` looks the functions up
at call time) only when :func:`compatible` finds nothing wrong, so a psycopg release that
changes these internals falls back to psycopg's own (cooperative, slower) wait. Installing
also cures the import-order trap: psycopg imported before ``monkey.patch_all()`` keeps its
blocking C wait, which this replaces. ``GREENPOOL_PSYCOPG_WAIT=psycopg`` opts out.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from time import monotonic
from typing import Any, TypeVar

from gevent import get_hub, getcurrent

RV = TypeVar("RV")

# libev's EV_READ / EV_WRITE, which are also psycopg's Wait.R / Wait.W and Ready.R / Ready.W.
EV_READ = 1
EV_WRITE = 2
_EV_RW = EV_READ | EV_WRITE

# What the timer callback switches in with; any int is an I/O event mask instead.
_TICK = object()

# Bound once: psycopg's symbols are looked up lazily so this module imports without it.
_errors: Any = None


def _psycopg_errors() -> Any:
    global _errors
    if _errors is None:
        from psycopg import errors

        _errors = errors
    return _errors


def _socket_closed(fileno: int) -> bool:
    try:
        os.fstat(fileno)
    except OSError:
        return True
    return False


def _wait_once(hub: Any, fileno: int, events: int, wake_after: float | None) -> int:
    """Park the current greenlet until ``fileno`` is ready for ``events`` or the timer fires.

    Returns the ready flags (a subset of ``events``), or 0 when the timer fired first.
    Raises OperationalError if the socket turned out to be closed.
    """
    loop = hub.loop
    current_switch = getcurrent().switch
    io = loop.io(fileno, events)
    timer = None
    try:
        io.start(current_switch, pass_events=True)
        if wake_after is not None:
            timer = loop.timer(wake_after if wake_after > 0 else 0.0)
            timer.start(current_switch, _TICK)
        result = hub.switch()
    finally:
        io.stop()
        io.close()
        if timer is not None:
            timer.stop()
            timer.close()
    return _ready_flags(result, fileno, events)


def _ready_flags(result: Any, fileno: int, events: int) -> int:
    """What a watcher switched in with, as the flags for psycopg's generator (0: timer)."""
    if result is _TICK:
        if _socket_closed(fileno):
            raise _psycopg_errors().OperationalError("connection socket closed")
        return 0
    if type(result) is not int:
        # Something switched into this greenlet that is not one of our watchers.
        from gevent.exceptions import InvalidSwitchError

        raise InvalidSwitchError(
            f"psycopg wait on fd {fileno}: unexpected switch into the waiting greenlet "
            f"with {result!r}"
        )
    if result < 0 or not result & _EV_RW:
        # libev flags an fd it cannot watch (closed, not a socket) as an error event.
        raise _psycopg_errors().OperationalError("connection socket closed")
    return result & events


def _wake_after(interval: float, deadline: float | None) -> float | None:
    """When the next wait should give up on the socket: psycopg's interval, the deadline."""
    if deadline is None:
        return interval if interval > 0 else None
    left = max(0.0, deadline - monotonic())
    return min(interval, left) if interval > 0 else left


class _SocketWatchers:
    """The I/O watcher and interval timer kept for one socket between waits.

    Creating and closing a libev watcher per wait costs about as much as the rest of the
    wait's own bookkeeping. libev tracks fds by number, and a later socket may get the
    number of a closed one without the hub running in between: libev then still believes
    the fd registered with epoll. Setting the watcher's events (as a fresh watcher's init
    does) makes libev re-register it; :func:`_wait_kept` does so when a wait ends on the
    interval timer, not before every start (that cost one epoll_ctl syscall per wait).
    """

    __slots__ = ("interval", "io", "timer")

    def __init__(self, loop: Any, fileno: int, events: int, interval: float) -> None:
        self.io = loop.io(fileno, events)
        self.interval = interval
        self.timer = loop.timer(interval, interval) if interval > 0 else None


_CACHE_ATTR = "_greenpool_psycopg_watchers"


def _kept_watchers(hub: Any, fileno: int, events: int, interval: float) -> _SocketWatchers:
    """The watchers kept for ``fileno`` on this hub (one hub per thread), made on first use."""
    cache: dict[int, _SocketWatchers] | None = hub.__dict__.get(_CACHE_ATTR)
    if cache is None:
        cache = {}
        setattr(hub, _CACHE_ATTR, cache)
    kept = cache.get(fileno)
    if kept is None or kept.interval != interval:
        kept = cache[fileno] = _SocketWatchers(hub.loop, fileno, events, interval)
    return kept


def _wait_kept(hub: Any, kept: _SocketWatchers, fileno: int, events: int) -> int:
    """:func:`_wait_once` with the socket's kept watchers (timer: psycopg's interval)."""
    io = kept.io
    if io.events != events:
        io.events = events  # a changed mask re-registers the fd anyway
    timer = kept.timer
    current_switch = getcurrent().switch
    try:
        io.start(current_switch, pass_events=True)
        if timer is not None:
            timer.again(current_switch, _TICK)
        result = hub.switch()
    finally:
        io.stop()
        if timer is not None:
            timer.stop()
    if result is _TICK:
        # Not ready within psycopg's interval. If this fd number now belongs to a new
        # socket that libev still believes registered (see _SocketWatchers), setting the
        # events makes the next start re-register it: that case heals at the first tick
        # instead of costing an epoll_ctl syscall on every wait.
        io.events = events
    return _ready_flags(result, fileno, events)


def wait(
    gen: Generator[int, int, RV],
    fileno: int,
    interval: float = 0.0,
    timeout: float | None = None,
) -> RV:
    """Consume a psycopg generator waiting on ``fileno`` with gevent's I/O watchers.

    Same signature and semantics as ``psycopg.waiting.wait`` (see the module docstring).
    """
    if interval is None:  # psycopg raises the same way
        raise ValueError("indefinite wait not supported anymore")
    hub = get_hub()
    deadline = monotonic() + timeout if timeout is not None else None
    try:
        s = next(gen)
        if deadline is None:
            kept = _kept_watchers(hub, fileno, int(s), interval)
            while True:
                if kept.io.active:  # another greenlet waits on this socket: misuse, but safe
                    ready = _wait_once(hub, fileno, int(s), _wake_after(interval, None))
                else:
                    ready = _wait_kept(hub, kept, fileno, int(s))
                s = gen.send(ready)
        while True:
            ready = _wait_once(hub, fileno, int(s), _wake_after(interval, deadline))
            s = gen.send(ready)
            if monotonic() >= deadline:
                raise _psycopg_errors()._WaitTimeout("wait timeout expired")
    except StopIteration as ex:
        rv: RV = ex.value
        return rv


def wait_conn(
    gen: Generator[tuple[int, int], int, RV],
    interval: float = 0.0,
    timeout: float | None = None,
) -> RV:
    """Like :func:`wait` for connection generators, which yield ``(fileno, wait)`` pairs.

    Same signature and semantics as ``psycopg.waiting.wait_conn``; the fd may change
    between yields (multiple hosts, SSL retry), so every wait uses a fresh watcher.
    """
    if interval is None:
        raise ValueError("indefinite wait not supported anymore")
    hub = get_hub()
    deadline = monotonic() + timeout if timeout is not None else None
    try:
        fileno, s = next(gen)
        while True:
            ready = _wait_once(hub, fileno, int(s), _wake_after(interval, deadline))
            fileno, s = gen.send(ready)
            if deadline is not None and monotonic() >= deadline:
                raise _psycopg_errors()._WaitTimeout("wait timeout expired")
    except StopIteration as ex:
        rv: RV = ex.value
        return rv


# --------------------------------------------------------------------------- installing

#: Names (and parameters) of the psycopg.waiting functions this module replaces.
_EXPECTED_PARAMS = {
    "wait": ("gen", "fileno", "interval", "timeout"),
    "wait_conn": ("gen", "interval", "timeout"),
}


def compatible() -> list[str]:
    """Reasons why this prototype should NOT be installed; empty if it is safe to.

    Checks what the driver adapter must check before swapping the functions: gevent has
    patched ``select`` (otherwise psycopg's C wait is right and ours would be wrong), psycopg
    still exposes ``waiting.wait``/``waiting.wait_conn`` with the signatures we mimic,
    ``Connection.wait`` still calls ``waiting.wait`` at call time, and the ``Wait``/``Ready``
    flags still equal libev's bits.
    """
    import inspect
    import sys

    problems: list[str] = []
    monkey = sys.modules.get("gevent.monkey")
    if not (monkey and monkey.is_module_patched("select")):
        problems.append("gevent has not patched select: psycopg's own wait is correct")
    try:
        import psycopg
        from psycopg import waiting
    except ImportError as ex:  # pragma: no cover
        return [*problems, f"psycopg not importable: {ex}"]
    for name, params in _EXPECTED_PARAMS.items():
        func = getattr(waiting, name, None)
        if func is None:
            problems.append(f"psycopg.waiting.{name} is gone")
            continue
        try:
            got = tuple(inspect.signature(func).parameters)
        except (TypeError, ValueError):
            got = ()
        if got[: len(params)] != params:
            problems.append(f"psycopg.waiting.{name}{got} no longer matches {params}")
    wait_enum = getattr(waiting, "Wait", None)
    ready_enum = getattr(waiting, "Ready", None)
    if wait_enum is None or ready_enum is None:
        problems.append("psycopg.waiting.Wait/Ready are gone")
    elif (int(wait_enum.R), int(wait_enum.W), int(ready_enum.R), int(ready_enum.W)) != (
        EV_READ,
        EV_WRITE,
        EV_READ,
        EV_WRITE,
    ):
        problems.append("psycopg's Wait/Ready flags no longer equal libev's EV_READ/EV_WRITE")
    try:
        src = inspect.getsource(psycopg.Connection.wait)
    except (OSError, TypeError):
        src = ""
    if "waiting.wait(" not in src:
        problems.append("psycopg.Connection.wait no longer calls waiting.wait at call time")
    for name in ("_WaitTimeout", "OperationalError"):
        if not hasattr(_psycopg_errors(), name):
            problems.append(f"psycopg.errors.{name} is gone")
    return problems


def socketpair_selftest() -> list[str]:
    """A functional check needing no database (about 0.1 ms): run :func:`wait` and
    :func:`wait_conn` over a socketpair with tiny generators shaped like psycopg's.

    What a driver adapter should run once before installing, on top of :func:`compatible`:
    it proves the Wait/Ready <-> libev mapping, the hand-back of the generator's value and
    the timeout path on this exact gevent + psycopg combination.
    """
    import socket

    from psycopg import errors
    from psycopg.waiting import Ready, Wait

    problems: list[str] = []
    a, b = socket.socketpair()
    try:
        a.setblocking(False)

        def reader() -> Generator[int, int, bytes]:
            ready = yield Wait.R
            while not ready:
                ready = yield Wait.R
            return a.recv(16) if ready & Ready.R else b""

        def writer() -> Generator[int, int, int]:
            ready = yield Wait.W
            return int(ready)

        def conn_gen() -> Generator[tuple[int, int], int, int]:
            ready = yield (a.fileno(), Wait.W)
            return int(ready)

        b.send(b"x")
        if wait(reader(), a.fileno(), 0.1) != b"x":
            problems.append("read readiness not reported")
        if wait(writer(), a.fileno(), 0.1) != Ready.W:
            problems.append("write readiness not reported")
        if wait_conn(conn_gen(), 0.1) != Ready.W:
            problems.append("wait_conn did not report write readiness")
        try:
            wait(reader(), a.fileno(), 0.1, timeout=0.0)  # nothing to read: must time out
            problems.append("timeout=0 did not raise _WaitTimeout")
        except errors._WaitTimeout:
            pass
    except Exception as ex:
        problems.append(f"{type(ex).__name__}: {ex}")
    finally:
        a.close()
        b.close()
    return problems


_saved: tuple[Any, Any] | None = None


def installed() -> bool:
    """Whether psycopg currently waits with these functions."""
    from psycopg import waiting

    return waiting.wait is wait and waiting.wait_conn is wait_conn


def install() -> list[str]:
    """Make psycopg wait with these functions, process-wide, if it is safe to.

    Returns the reasons it did not install (empty when installed or already installed).
    """
    global _saved
    from psycopg import waiting

    if installed():
        return []
    problems = compatible() or socketpair_selftest()
    if problems:
        return problems
    _saved = (waiting.wait, waiting.wait_conn)
    waiting.wait = wait
    waiting.wait_conn = wait_conn
    return []


def uninstall() -> None:
    """Give psycopg its own wait functions back (used by tests)."""
    global _saved
    from psycopg import waiting

    if _saved is not None and installed():
        waiting.wait, waiting.wait_conn = _saved
    _saved = None
