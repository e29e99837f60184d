"""Prototype: psycopg 3 wait functions built directly on gevent's hub I/O watchers.

Under gevent, psycopg 3 (3.2+) notices that ``select`` is monkey-patched and picks
``psycopg.waiting.wait_poll``. Every time a query has to wait for the socket, that
function goes through gevent's *emulation* of ``select.poll``: a ``poll`` object (dict),
a ``PollResult`` (a set plus a ``gevent.event.Event``), one I/O watcher started with a
bound-method callback, an ``Event.wait(timeout)`` that allocates a ``Timeout`` (a timer
watcher) and a hub ``Waiter``, and finally a list built from the result set. That is a
dozen Python-level allocations and calls per wait for what is, underneath, "start one
libev watcher and switch to the hub".

:func:`wait` and :func:`wait_conn` below do only that: one ``loop.io(fd, events)`` watcher
(libev's ``EV_READ``/``EV_WRITE`` bits are the same numbers as psycopg's ``Wait``/``Ready``
flags, so no translation is needed), one ``loop.timer`` for psycopg's ``interval``/
``timeout``, the current greenlet's ``switch`` as the callback, and ``hub.switch()``.
They have the signatures of ``psycopg.waiting.wait`` and ``psycopg.waiting.wait_conn``
and the same semantics:

- the generator gets the ready flags, or ``Ready.NONE`` (0) when ``interval`` passes with
  the socket not ready (psycopg then simply yields the same wait again);
- ``timeout`` (``None``: none) raises ``psycopg.errors._WaitTimeout`` after the generator
  has been resumed, exactly as psycopg's functions do (a timeout of 0 polls once);
- a closed socket raises ``OperationalError("connection socket closed")``: libev reports
  an invalid fd as an error event, and the interval timer re-checks with ``os.fstat`` like
  ``wait_selector`` does, so a connection closed by another greenlet cannot hang a waiter;
- an exception thrown into the waiting greenlet (``gevent.Timeout``, ``GreenletExit``,
  ``KeyboardInterrupt``) stops and closes both watchers before propagating.

:func:`install` swaps them into ``psycopg.waiting`` (psycopg's ``Connection`` looks up
``waiting.wait``/``waiting.wait_conn`` at call time, so existing connections pick them up)
and returns a callable restoring the originals; :func:`compatible` says whether this
psycopg still looks like the one the prototype was written against. See the benchmark
README ("psycopg 3's wait path under gevent") for the measurements and for what a driver
adapter must do to use this safely.

``python -m benchmarks.prototypes.gevent_wait [DSN]`` runs :func:`selftest` (semantics,
with these functions and with psycopg's own, for comparison);
``python -m benchmarks.prototypes.wait_bench`` measures SELECT 1 on a held connection
with psycopg's default wait, with these functions, and with psycopg2 + psycogreen (each in
its own process, alternating, pinned to one CPU when possible).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Generator
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
        while True:
            wake_after: float | None
            if deadline is None:
                wake_after = interval if interval > 0 else None
            else:
                left = max(0.0, deadline - monotonic())
                wake_after = min(interval, left) if interval > 0 else left
            ready = _wait_once(hub, fileno, int(s), wake_after)
            s = gen.send(ready)
            if deadline is not None and monotonic() >= deadline:
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
            wake_after: float | None
            if deadline is None:
                wake_after = interval if interval > 0 else None
            else:
                left = max(0.0, deadline - monotonic())
                wake_after = min(interval, left) if interval > 0 else left
            ready = _wait_once(hub, fileno, int(s), wake_after)
            fileno, s = gen.send(ready)
            if deadline is not None and monotonic() >= deadline:
                raise _psycopg_errors()._WaitTimeout("wait timeout expired")
    except StopIteration as ex:
        rv: RV = ex.value
        return rv


# --------------------------------------------------------------------------- variants
# Measured variants, to show where the time goes (see the README).


def wait_no_timer(
    gen: Generator[int, int, RV],
    fileno: int,
    interval: float = 0.0,
    timeout: float | None = None,
) -> RV:
    """:func:`wait` without the interval timer when there is no timeout (NOT safe).

    Without the periodic wake-up a greenlet waiting on a socket that another greenlet
    closes would wait forever; only here to measure what the timer costs.
    """
    return wait(gen, fileno, 0.0 if timeout is None else interval, timeout)


# --------------------------------------------------------------------------- installing

#: Names (and parameters) of the psycopg.waiting functions this prototype replaces.
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


def install(*, strict: bool = True, variant: str = "wait") -> Callable[[], None]:
    """Make psycopg use these wait functions; return a callable that restores psycopg's.

    With ``strict`` (default) raise RuntimeError listing :func:`compatible`'s problems
    instead of installing.
    """
    from psycopg import waiting

    problems = compatible()
    if not problems:
        problems = socketpair_selftest()
    if problems and strict:
        raise RuntimeError("gevent_wait not installed: " + "; ".join(problems))
    funcs: dict[str, Callable[..., Any]] = {"wait": wait, "wait_no_timer": wait_no_timer}
    saved = (waiting.wait, waiting.wait_conn)
    waiting.wait = funcs[variant]
    waiting.wait_conn = wait_conn

    def restore() -> None:
        waiting.wait, waiting.wait_conn = saved

    return restore


# --------------------------------------------------------------------------- self-test


def selftest(dsn: str) -> list[str]:
    """Check the prototype's semantics against a live server; return failures (empty = ok).

    Must run in a process patched by gevent, with this module installed. Covers: results,
    a multi-read result set, a send that has to wait for the socket (8 MB parameter),
    concurrency, a server error, a gevent.Timeout in the middle of a query (no watcher
    leaked), a socket closed by another greenlet (raises within the interval instead of
    hanging), connect_timeout against a server that never answers, and that the hub keeps
    running other greenlets while a query waits.
    """
    import socket

    import gevent
    import psycopg
    from psycopg import errors

    failures: list[str] = []
    hub = get_hub()

    def check(name: str, ok: bool, detail: str = "") -> None:
        if not ok:
            failures.append(f"{name}: {detail}")

    baseline = hub.loop.activecnt
    with psycopg.connect(dsn, autocommit=True) as conn:
        check("select 1", conn.execute("SELECT 1").fetchone() == (1,))
        rows = conn.execute("SELECT generate_series(1, 200000)").fetchall()
        check("200k rows", len(rows) == 200000, str(len(rows)))
        big = "x" * (8 << 20)
        got = conn.execute("SELECT length(%s)", (big,)).fetchone()
        check("8 MB parameter (send waits for the socket)", got == (len(big),), str(got))
        try:
            conn.execute("SET statement_timeout = 50")
            conn.execute("SELECT pg_sleep(1)")
            check("statement_timeout", False, "no error")
        except errors.QueryCanceled:
            pass
        conn.execute("SET statement_timeout = 0")

    # Concurrency and cooperation: 10 x pg_sleep(0.2) in ~0.2 s while a ticker runs.
    conns = [psycopg.connect(dsn, autocommit=True) for _ in range(10)]
    ticks = [0]

    def ticker() -> None:
        while True:
            gevent.sleep(0.01)
            ticks[0] += 1

    tick = gevent.spawn(ticker)
    t0 = monotonic()
    gevent.joinall([gevent.spawn(c.execute, "SELECT pg_sleep(0.2)") for c in conns])
    wall = monotonic() - t0
    tick.kill()
    check("10 x pg_sleep(0.2) concurrently", wall < 0.6, f"{wall:.3f} s")
    check("hub keeps running other greenlets", ticks[0] >= 10, f"{ticks[0]} ticks")
    for c in conns:
        c.close()

    # gevent.Timeout in the middle of a query: the exception propagates, nothing leaks.
    conn = psycopg.connect(dsn, autocommit=True)
    try:
        with gevent.Timeout(0.1):
            conn.execute("SELECT pg_sleep(5)")
        check("gevent.Timeout", False, "no timeout")
    except gevent.Timeout:
        pass
    conn.cancel_safe(timeout=5)
    conn.close()

    # Socket closed by another greenlet while a query waits on it.
    conn = psycopg.connect(dsn, autocommit=True)
    outcome: list[str] = []

    def victim() -> None:
        try:
            conn.execute("SELECT pg_sleep(3)")
            outcome.append("returned")
        except psycopg.OperationalError as ex:
            outcome.append(f"OperationalError: {ex}")
        except Exception as ex:
            outcome.append(f"{type(ex).__name__}: {ex}")

    g = gevent.spawn(victim)
    gevent.sleep(0.05)
    t0 = monotonic()
    conn.pgconn.finish()  # what Connection.close() does underneath, without its lock
    g.join(timeout=2.0)
    took = monotonic() - t0
    check(
        "socket closed under a waiter",
        bool(outcome) and outcome[0].startswith("OperationalError") and took < 1.0,
        f"{outcome or 'still waiting'} after {took:.2f} s",
    )
    g.kill()

    # connect_timeout against a listener that accepts TCP but never speaks.
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(8)
    port = lsock.getsockname()[1]
    t0 = monotonic()
    try:
        psycopg.connect(f"host=127.0.0.1 port={port} connect_timeout=1 user=x dbname=x")
        check("connect_timeout", False, "connected?")
    except psycopg.OperationalError as ex:
        took = monotonic() - t0
        check("connect_timeout", 0.8 < took < 3.0, f"{type(ex).__name__} after {took:.2f} s")
    finally:
        lsock.close()

    gevent.sleep(0)
    check(
        "no watcher leaked", hub.loop.activecnt <= baseline, f"{baseline} -> {hub.loop.activecnt}"
    )
    return failures


def _main() -> int:
    """``python -m benchmarks.prototypes.gevent_wait [DSN]``: the self-test (own cluster if
    no DSN). Measurements: ``python -m benchmarks.prototypes.wait_bench``."""
    import sys

    from gevent import monkey

    monkey.patch_all()
    cluster: Any = None
    if len(sys.argv) > 1:
        dsn = sys.argv[1]
    else:
        from tests.support.pgcluster import PgCluster

        cluster = PgCluster()
        cluster.start()
        dsn = cluster.admin_dsn
    try:
        problems = compatible()
        print("compatible():", problems or "yes")
        restore = install()
        try:
            from psycopg import waiting

            print(
                "psycopg.waiting.wait is",
                getattr(waiting.wait, "__module__", "?"),
                getattr(waiting.wait, "__name__", "?"),
            )
            failures = selftest(dsn)
        finally:
            restore()
        # The same checks with psycopg's own wait, for comparison.
        default_failures = selftest(dsn)
    finally:
        if cluster is not None:
            cluster.destroy()
    print("gevent_wait:", failures if failures else "all checks passed")
    print("psycopg default wait:", default_failures if default_failures else "all checks passed")
    return 1 if failures else 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(_main())
