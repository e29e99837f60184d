"""Prototype (now adopted as ``greenpool.drivers.gevent_wait``): psycopg 3 wait functions
built directly on gevent's hub I/O watchers. The functions themselves are imported from
there; this module keeps the measured variants, a strict ``install`` and the self-test.

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

from collections.abc import Callable, Generator
from time import monotonic
from typing import Any, TypeVar

from gevent import get_hub

from greenpool.drivers.gevent_wait import (
    EV_READ,
    EV_WRITE,
    compatible,
    socketpair_selftest,
    wait,
    wait_conn,
)

__all__ = [
    "EV_READ",
    "EV_WRITE",
    "compatible",
    "install",
    "selftest",
    "socketpair_selftest",
    "wait",
    "wait_conn",
    "wait_no_timer",
]

RV = TypeVar("RV")


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
