"""Fault scenarios against a real server: restarts, terminated backends, black holes,
refused connections, kills at random points, a slow server and a mixed soak.

Each scenario runs the bounded load generator of ``tests/support/loadgen.py`` (200 greenlets over
a pool of max 10 by default), asserts what greenpool guarantees, and reports its figures:
printed, and appended as a JSON line to ``$GREENPOOL_FAULT_RESULTS`` (see RELIABILITY.md,
whose table is rendered from that file by ``python -m tests.support.loadgen render``).

Network faults go through the in-process :class:`~tests.support.faultproxy.FaultProxy`;
server faults use the private cluster (these tests need it: they are skipped when
``GREENPOOL_TEST_DSN`` names an external server). All traffic stays on 127.0.0.1.

Environment: ``GREENPOOL_FAULT_WORKERS`` (200), ``GREENPOOL_SOAK_SECONDS`` (40),
``GREENPOOL_FAULT_SEED`` (20240601).
"""

from __future__ import annotations

import gc
import itertools
import logging
import os
import random
import time
from collections.abc import Callable, Iterator
from typing import Any

import gevent
import psycopg
import pytest
from gevent.event import Event

from greenpool import ConnectError, GreenPool, PoolTimeout
from tests.support.faultproxy import FaultProxy
from tests.support.invariants import backend_pids, settled
from tests.support.loadgen import (
    CUT,
    HUNG,
    KILLED,
    QUERY_TIMEOUT,
    LoadGen,
    record_result,
    rss_mb,
)
from tests.support.pgcluster import PgCluster
from tests.support.waiting import wait_for

WORKERS = int(os.environ.get("GREENPOOL_FAULT_WORKERS", "200"))
SOAK_SECONDS = float(os.environ.get("GREENPOOL_SOAK_SECONDS", "40"))
SEED = int(os.environ.get("GREENPOOL_FAULT_SEED", "20240601"))
MAX = 10
# How late a timeout may fire and still count as "on time" on a loaded 2-core CI box
# running 200 greenlets, the proxy and the server.
MARGIN = 0.25

Factory = Callable[..., GreenPool[Any]]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def proxy(cluster: PgCluster) -> Iterator[FaultProxy]:
    with FaultProxy(cluster.host, cluster.port) as fp:
        yield fp


def via(cluster: PgCluster, proxy: FaultProxy, **extra: Any) -> str:
    """A superuser DSN through the fault proxy."""
    return cluster.dsn(host=proxy.host, port=proxy.port, **extra)


def check_invariants(pool: GreenPool[Any], cluster: PgCluster) -> dict[str, Any]:
    """After the load stopped: nothing lost, nothing running, the server agrees.

    Settled: nothing acquired, constructing, closing or waiting, and the server's
    backends of the pool are exactly the pool's connections (at most max_size); every
    count >= 0; every lent connection came back."""
    s = settled(pool, cluster)
    assert s["acquire_count"] == s["returns_count"], f"a lent connection never came back: {s}"
    active = cluster.active_queries(pool.name)
    assert not active, f"queries left running on the server: {active}"
    # Nothing leaked: every slot can be borrowed at once, each a distinct live backend.
    conns = [pool.getconn(timeout=10) for _ in range(pool.max_size)]
    try:
        pids = set()
        for conn in conns:
            conn.execute("SELECT 1")
            pids.add(conn.info.backend_pid)
        assert len(pids) == pool.max_size
        assert cluster.backend_count(pool.name) <= pool.max_size
    finally:
        for conn in conns:
            pool.putconn(conn)
    return s


def sample_backends(cluster: PgCluster, name: str, stop: Event, out: list[int]) -> None:
    """Record the server-side backend count of ``name`` every 50 ms until ``stop``."""
    for _ in range(10_000):
        if stop.is_set():
            return
        out.append(cluster.backend_count(name))
        stop.wait(0.05)


def assert_no_hang(lg: LoadGen) -> None:
    outcomes = lg.outcomes()
    assert outcomes[HUNG] == 0, lg.summary()
    assert lg.duplicated == 0, "a connection was lent to two borrowers at once"
    assert lg.bad_state == 0, "a connection was lent in a bad state"


def rerun() -> str:
    """The command that reruns the current test."""
    nodeid = os.environ.get("PYTEST_CURRENT_TEST", "tests/test_faults.py").split(" ")[0]
    return f"python -m pytest -q {nodeid}"


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e3, 1)


# --------------------------------------------------------------------------- 1. restart


@pytest.mark.slow
@pytest.mark.needs_restart
def test_server_restart_under_load(cluster: PgCluster, make_pool: Factory) -> None:
    timeout = 1.0
    pool = make_pool(min_size=2, max_size=MAX, timeout=timeout, connect_timeout=2)
    pool.wait(10)
    lg = LoadGen(pool, workers=WORKERS, timeout=timeout, duration=60).start()
    try:
        wait_for(lambda: lg.outcomes()["ok"] >= 2000, 20, what="steady load")
        lg.phase = "outage"
        t_down = time.monotonic()
        cluster.stop("fast")
        # Stay down until every worker has hit at least one acquire timeout.
        wait_for(
            lambda: lg.outcomes("outage")["PoolTimeout"] >= WORKERS, 20, what="outage timeouts"
        )
        lg.phase = "restart"
        lg.arm()
        t_start = time.monotonic()
        cluster.start()  # returns once the server accepts connections
        t_up = time.monotonic()
        lg.phase = "recovering"
        first_ok = lg.wait_ok(10)
        assert first_ok is not None, "the pool did not serve again within 10 s"
        wait_for(
            lambda: pool.stats()["total"] == MAX and pool.stats()["constructing"] == 0,
            10,
            what="pool back to max_size",
        )
        t_full = time.monotonic()
        lg.phase = "recovered"
        wait_for(lambda: lg.outcomes("recovered")["ok"] >= 2000, 20, what="load after recovery")
    finally:
        lg.stop()
    assert_no_hang(lg)
    # Operations are counted in the phase they started in: the ones queued when the
    # server went down fail in "run", with one query error per connection at most.
    allowed = {"ok", "PoolTimeout", "OperationalError", "AdminShutdown"}
    assert set(lg.outcomes()) <= allowed, lg.summary()
    query_errors = lg.outcomes()["OperationalError"] + lg.outcomes()["AdminShutdown"]
    assert query_errors <= MAX, lg.summary()
    waits = lg.wait_hist()
    assert waits.max <= timeout + MARGIN, waits.summary()
    assert lg.latency_hist().max <= timeout + MARGIN, lg.latency_hist().summary()
    msg = lg.errors_seen[("outage", "PoolTimeout")]
    assert "no connection available after" in msg and "last connection error" in msg, msg
    assert "refused" in msg or "connect" in msg, msg
    recovery = max(0.0, first_ok - t_up)
    assert first_ok - t_up <= 5.0
    assert set(lg.outcomes("recovered")) == {"ok"}, lg.outcomes("recovered")
    stats = check_invariants(pool, cluster)
    record_result(
        "1. server restart under load",
        {
            "workers": WORKERS,
            "outage_s": round(t_start - t_down, 2),
            "server_start_s": round(t_up - t_start, 2),
            "recovery_s": round(recovery, 2),
            "back_to_max_size_s": round(t_full - t_up, 2),
            "outcomes": dict(lg.outcomes()),
            "query_errors": query_errors,
            "outage_outcomes": dict(lg.outcomes("outage")),
            "wait": waits.summary(),
            "recovering_outcomes": dict(lg.outcomes("recovering")),
            "recovered_outcomes": dict(lg.outcomes("recovered")),
            "example_error": msg,
            "stats_after": {k: stats[k] for k in ("total", "idle", "connect_errors")},
        },
        guarantee="acquires fail within `timeout` with the last connection error; "
        "self-heals; backends ≤ max_size",
        headline=f"served {recovery:.2f} s after the server was up; max acquire "
        f"{waits.max:.2f} s (timeout {timeout:g} s); {query_errors} query errors "
        f"(≤ 1 per connection); leaks 0",
        rerun=rerun(),
    )


# --------------------------------------------------------------------------- 2. terminated


@pytest.mark.slow
def test_idle_backends_terminated_are_replaced_before_anyone_sees_an_error(
    cluster: PgCluster, make_pool: Factory
) -> None:
    # check_idle_after=0: every checkout pings first (the default pings connections idle
    # for more than 1 s, which an idle pool's connections are after a second).
    pool = make_pool(min_size=MAX, max_size=MAX, timeout=5, check_idle_after=0)
    pool.wait(10)
    before = backend_pids(cluster, pool.name)
    assert len(before) == MAX
    t0 = time.monotonic()
    assert cluster.terminate_backends(pool.name) == MAX
    lg = LoadGen(pool, workers=WORKERS, timeout=5, duration=30, max_ops=20).run()
    elapsed = time.monotonic() - t0
    assert_no_hang(lg)
    assert lg.outcomes() == {"ok": WORKERS * 20}, lg.summary()
    after = backend_pids(cluster, pool.name)
    assert not (after & before), "a terminated backend is still in use"
    stats = check_invariants(pool, cluster)
    assert stats["check_failed_count"] == MAX
    record_result(
        "2a. idle backends terminated",
        {
            "workers": WORKERS,
            "ops": lg.ops,
            "errors": lg.ops - lg.outcomes()["ok"],
            "replaced": stats["check_failed_count"],
            "wait": lg.wait_hist().summary(),
            "elapsed_s": round(elapsed, 2),
        },
        guarantee="dead idle connections are caught by the checkout ping and replaced",
        headline=f"0 errors in {lg.ops} ops; {stats['check_failed_count']} replaced; "
        f"p99 wait {lg.wait_hist().quantile(0.99) * 1e3:.0f} ms",
        rerun=rerun(),
    )


@pytest.mark.slow
def test_busy_backends_terminated_give_one_error_then_work(
    cluster: PgCluster, make_pool: Factory
) -> None:
    pool = make_pool(min_size=0, max_size=MAX, timeout=5)
    results: dict[int, list[str]] = {i: [] for i in range(MAX)}

    def borrower(i: int) -> None:
        for _ in range(2):
            try:
                with pool.connection() as conn:
                    if not results[i]:
                        conn.execute("SELECT pg_sleep(30)")
                    else:
                        conn.execute("SELECT 1")
                results[i].append("ok")
            except psycopg.Error as ex:
                results[i].append(type(ex).__name__)

    greenlets = [gevent.spawn(borrower, i) for i in range(MAX)]
    wait_for(lambda: len(cluster.active_queries(pool.name)) == MAX, 10, what="10 busy")
    t0 = time.monotonic()
    terminated = cluster.terminate_backends(pool.name)
    gevent.joinall(greenlets, timeout=10, raise_error=True)
    elapsed = time.monotonic() - t0
    assert terminated == MAX
    for i, outcomes in results.items():
        assert len(outcomes) == 2 and outcomes[0] != "ok" and outcomes[1] == "ok", (i, outcomes)

    # The same under load: each terminated connection costs at most one error, nobody
    # sees two, and the pool keeps serving.
    def query(conn: Any) -> None:
        conn.execute("SELECT pg_sleep(0.02)")

    lg = LoadGen(pool, workers=WORKERS, timeout=5, duration=60, query=query).start()
    try:
        wait_for(lambda: lg.outcomes()["ok"] >= 500, 20, what="steady load")
        lg.phase = "terminated"
        killed = cluster.terminate_backends(pool.name)
        lg.arm()
        assert lg.wait_ok(5) is not None
        wait_for(lambda: lg.outcomes("terminated")["ok"] >= 1000, 20, what="load after")
    finally:
        lg.stop()
    assert_no_hang(lg)
    errors = lg.ops - lg.outcomes()["ok"]
    assert errors <= killed, lg.summary()
    assert max(lg.per_worker_errors.values(), default=0) <= 1, lg.per_worker_errors
    check_invariants(pool, cluster)
    first_errors = sorted({o[0] for o in results.values()})
    record_result(
        "2b. busy backends terminated",
        {
            "busy_borrowers": MAX,
            "first_outcomes": first_errors,
            "second_outcome": "ok",
            "under_load_terminated": killed,
            "under_load_errors": errors,
            "elapsed_s": round(elapsed, 2),
        },
        guarantee="a busy borrower gets one error; its next acquire works",
        headline=f"{MAX}/{MAX} busy borrowers: 1 error ({', '.join(first_errors)}) then ok; "
        f"under load {errors} errors for {killed} terminated, ≤ 1 per borrower",
        rerun=rerun(),
    )


# --------------------------------------------------------------------------- 3. black hole


@pytest.mark.slow
@pytest.mark.parametrize("driver", ["psycopg", "psycopg2"])
@pytest.mark.parametrize("given", ["keyword", "conninfo"])
def test_blackhole_connect_is_bounded_by_connect_timeout(
    cluster: PgCluster, proxy: FaultProxy, make_pool: Factory, driver: str, given: str
) -> None:
    """libpq ignores connect_timeout in the asynchronous mode both drivers use under
    gevent: the pool enforces it, whether it is a keyword or in the conninfo (the
    default, 10 s, would show). In the conninfo it is libpq's: whole seconds, at least 2."""
    proxy.blackhole()
    if given == "keyword":
        pool = make_pool(via(cluster, proxy), open=False, connect_timeout=2.0, driver=driver)
    else:
        pool = make_pool(via(cluster, proxy, connect_timeout=2), open=False, driver=driver)
    assert pool.settings.connect_timeout == 2.0
    t0 = time.monotonic()
    # The pool's bound, or psycopg 3's own (it reads the conninfo's connect_timeout as
    # libpq does): both fire at 2 s.
    with pytest.raises(ConnectError, match=r"timed out|timeout expired") as info:
        pool.open(wait=True, timeout=30)
    took = time.monotonic() - t0
    assert 2.0 <= took <= 2.0 + MARGIN, took
    assert pool.closed
    if (driver, given) != ("psycopg", "keyword"):
        return
    record_result(
        "3a. black hole: connect",
        {"connect_timeout_s": 2.0, "open_wait_s": round(took, 3), "error": str(info.value)},
        guarantee="connect bounded by `connect_timeout`",
        headline=f"open(wait=True) raised ConnectError after {took:.2f} s (connect_timeout 2 s)",
        rerun=rerun(),
    )


@pytest.mark.slow
def test_blackhole_checkout_is_bounded_by_the_acquire_timeout(
    cluster: PgCluster, proxy: FaultProxy, make_pool: Factory
) -> None:
    """The checkout ping must not stretch getconn() beyond its timeout.

    Every idle connection is pinged at checkout here (check_idle_after=0); on a black hole
    each ping waits ping_timeout. The acquire must still end after ``timeout``.
    """
    timeout, ping_timeout = 0.5, 1.0
    pool = make_pool(
        via(cluster, proxy),
        min_size=MAX,
        max_size=MAX,
        timeout=timeout,
        ping_timeout=ping_timeout,
        check_idle_after=0,
        connect_timeout=1,
    )
    pool.wait(10)
    proxy.blackhole()
    t0 = time.monotonic()
    with pytest.raises(PoolTimeout):
        pool.getconn()
    took = time.monotonic() - t0
    record_result(
        "3b. black hole: checkout ping",
        {"timeout_s": timeout, "ping_timeout_s": ping_timeout, "getconn_s": round(took, 3)},
        guarantee="getconn() ends within `timeout` even when pings hang",
        headline=f"getconn(timeout={timeout:g}) gave up after {took:.2f} s",
        rerun=rerun(),
    )
    assert took <= timeout + MARGIN, f"getconn(timeout={timeout}) took {took:.2f} s"


def test_short_acquire_timeout_never_discards_healthy_connections(
    cluster: PgCluster, proxy: FaultProxy, make_pool: Factory
) -> None:
    """A checkout ping cut short by the borrower's own deadline proves nothing about the
    connection: it must not be destroyed (nor the next one, and the next...)."""
    pool = make_pool(via(cluster, proxy), min_size=MAX, max_size=MAX, check_idle_after=0)
    pool.wait(10)
    wait_for(lambda: pool.stats()["idle"] == MAX, 10, what="10 idle")
    before = backend_pids(cluster, pool.name)
    proxy.set_latency(0.005)  # a 10 ms round trip, like a LAN under load
    timed_out = 0
    for timeout in (0, 0.004):
        # PoolTimeout is allowed (nothing could be verified in time), destruction is not.
        try:
            pool.putconn(pool.getconn(timeout=timeout))
        except PoolTimeout:
            timed_out += 1
    assert timed_out, "every acquire was served in time: the cut-short check never ran"
    # The checks the borrowers gave up on finish in the background: wait for them (every
    # connection idle again) before judging what they did.
    wait_for(
        lambda: pool.stats()["idle"] == MAX and pool.stats()["closing"] == 0,
        10,
        what="the background checks to finish",
    )
    proxy.heal()
    stats = pool.stats()
    assert stats["broken_destroy_count"] == 0 and stats["new_conns_count"] == MAX, (
        f"a short acquire timeout destroyed healthy connections: {stats}"
    )
    assert backend_pids(cluster, pool.name) == before


@pytest.mark.slow
def test_blackhole_health_check_is_bounded_by_ping_timeout(
    cluster: PgCluster, proxy: FaultProxy, make_pool: Factory
) -> None:
    """The maintenance greenlet's health check of 10 idle connections on a black hole
    must take about ping_timeout, not 10 x ping_timeout: it is never stuck."""
    ping_timeout = 0.5
    pool = make_pool(
        via(cluster, proxy),
        min_size=MAX,
        max_size=MAX,
        ping_timeout=ping_timeout,
        health_check_period=0.2,
        check_idle_after=0,  # every idle connection is due for a check at once
        connect_timeout=1,
    )
    pool.wait(10)
    wait_for(lambda: pool.stats()["idle"] == MAX, 10, what="10 idle")
    proxy.blackhole()
    t0 = time.monotonic()
    took = wait_for(
        lambda: pool.stats()["check_failed_count"] >= MAX,
        MAX * ping_timeout + 5,
        interval=0.01,
        what="every idle connection to fail its health check",
    )
    proxy.heal()
    # The maintenance greenlet is alive: it restores min_size with nobody calling the pool.
    healed = wait_for(
        lambda: pool.stats()["idle"] == MAX and pool.stats()["closing"] == 0, 10, what="healed"
    )
    record_result(
        "3c. black hole: health check",
        {
            "idle": MAX,
            "ping_timeout_s": ping_timeout,
            "all_checks_failed_after_s": round(took, 2),
            "refilled_after_heal_s": round(healed, 2),
            "since_blackhole_s": round(time.monotonic() - t0, 2),
        },
        guarantee="a health check round takes ≈ `ping_timeout`; maintenance never stuck",
        headline=f"{MAX} dead idle connections detected in {took:.2f} s "
        f"(ping_timeout {ping_timeout:g} s); refilled {healed:.2f} s after heal",
        rerun=rerun(),
    )
    assert took <= ping_timeout + 0.2 + MARGIN, (
        f"health check of {MAX} connections took {took:.2f} s: pings run one after another"
    )


@pytest.mark.slow
def test_blackhole_under_load_is_bounded_and_heals(
    cluster: PgCluster, proxy: FaultProxy, make_pool: Factory
) -> None:
    timeout, query_timeout, ping_timeout = 1.0, 1.0, 0.5
    pool = make_pool(
        via(cluster, proxy),
        min_size=2,
        max_size=MAX,
        timeout=timeout,
        ping_timeout=ping_timeout,
        connect_timeout=1.0,
        health_check_period=1.0,
    )
    pool.wait(10)
    lg = LoadGen(
        pool, workers=WORKERS, timeout=timeout, query_timeout=query_timeout, duration=60
    ).start()
    try:
        wait_for(lambda: lg.outcomes()["ok"] >= 2000, 20, what="steady load")
        lg.phase = "blackhole"
        t_bh = time.monotonic()
        proxy.blackhole()
        wait_for(
            lambda: (
                lg.outcomes("blackhole")["PoolTimeout"] >= WORKERS
                and pool.stats()["connect_errors"] >= 2
            ),
            20,
            what="black hole felt",
        )
        lg.phase = "healed"
        lg.arm()
        t_heal = time.monotonic()
        proxy.heal()
        first_ok = lg.wait_ok(10)
        assert first_ok is not None, "no success within 10 s of the network healing"
        wait_for(lambda: lg.outcomes("healed")["ok"] >= 2000, 20, what="load after heal")
    finally:
        lg.stop()
    assert_no_hang(lg)
    blackhole = lg.outcomes("blackhole")
    assert set(blackhole) <= {"ok", "PoolTimeout", QUERY_TIMEOUT}, blackhole
    waits = lg.wait_hist("blackhole")
    latency = lg.latency_hist("blackhole")
    assert waits.max <= timeout + MARGIN, waits.summary()
    assert latency.max <= timeout + query_timeout + MARGIN, latency.summary()
    stats = check_invariants(pool, cluster)
    # The maintenance greenlet survived the black hole: with nobody borrowing, its health
    # check still finds dead idle connections.
    failed_checks = stats["check_failed_count"]
    cluster.terminate_backends(pool.name)
    wait_for(
        lambda: pool.stats()["check_failed_count"] > failed_checks,
        10,
        what="the maintenance greenlet's health check to find the terminated backends",
    )
    recovery = first_ok - t_heal
    record_result(
        "3d. black hole under load",
        {
            "workers": WORKERS,
            "blackhole_s": round(t_heal - t_bh, 2),
            "blackhole_outcomes": dict(blackhole),
            "blackhole_wait": waits.summary(),
            "blackhole_latency": latency.summary(),
            "recovery_s": round(recovery, 3),
            "cancel_count": stats["cancel_count"],
            "connect_errors": stats["connect_errors"],
        },
        guarantee="acquire ≤ `timeout`, own query bounded by `gevent.Timeout`; heals",
        headline=f"max acquire {waits.max:.2f} s, max op {latency.max:.2f} s "
        f"(bounds {timeout:g} + {query_timeout:g} s); served {recovery:.2f} s after heal",
        rerun=rerun(),
    )


# --------------------------------------------------------------------------- 4. refused


@pytest.mark.slow
def test_refused_at_startup_open_wait_fails_fast(
    cluster: PgCluster, proxy: FaultProxy, make_pool: Factory
) -> None:
    proxy.refuse()
    pool = make_pool(via(cluster, proxy), open=False)
    t0 = time.monotonic()
    with pytest.raises(ConnectError, match="refused") as info:
        pool.open(wait=True, timeout=30)
    took = time.monotonic() - t0
    assert took < 1.0, took
    assert pool.closed
    assert "could not connect" in str(info.value)
    record_result(
        "4a. refused at startup: open(wait=True)",
        {"took_s": round(took, 3), "error": str(info.value)},
        guarantee="fails fast with ConnectError carrying the driver's message",
        headline=f"ConnectError after {took * 1e3:.0f} ms",
        rerun=rerun(),
    )


@pytest.mark.parametrize("driver", ["psycopg", "psycopg2"])
def test_close_while_connecting_leaves_no_backend_until_a_garbage_collection(
    cluster: PgCluster, proxy: FaultProxy, make_pool: Factory, driver: str
) -> None:
    """close() kills the connectors; one killed mid-handshake must close its half-open
    connection at once (it used to stay referenced from a reference cycle, and its server
    backend with it, until Python's garbage collector ran)."""
    proxy.set_latency(0.1)  # a handshake of several round trips: a wide window
    was_enabled = gc.isenabled()
    gc.disable()  # what the collector would hide
    try:
        pool = make_pool(via(cluster, proxy), min_size=1, max_size=1, driver=driver)
        wait_for(
            lambda: cluster.backend_count(pool.name) == 1 and pool.stats()["constructing"] == 1,
            10,
            interval=0.005,
            what="a backend on the server while the pool is still connecting",
        )
        pool.close(timeout=0)
        wait_for(
            lambda: cluster.backend_count(pool.name) == 0,
            5,
            what="the half-open connection's backend to go",
        )
    finally:
        if was_enabled:
            gc.enable()
        proxy.heal()


def test_connect_error_carries_the_driver_error_as_cause(
    cluster: PgCluster, proxy: FaultProxy, make_pool: Factory
) -> None:
    proxy.refuse()
    pool = make_pool(via(cluster, proxy), open=False)
    with pytest.raises(ConnectError) as info:
        pool.open(wait=True, timeout=5)
    assert isinstance(info.value.__cause__, psycopg.OperationalError), info.value.__cause__


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.mark.slow
def test_refused_at_startup_backs_off_then_serves(
    cluster: PgCluster, proxy: FaultProxy, make_pool: Factory
) -> None:
    proxy.refuse()
    capture = _Capture()
    log = logging.getLogger("greenpool")
    old_level = log.level
    log.addHandler(capture)
    log.setLevel(logging.DEBUG)
    try:
        pool = make_pool(via(cluster, proxy), min_size=2, max_size=MAX, open=False)
        t_open = time.time()
        pool.open()  # no wait: the pool retries in the background
        wait_for(lambda: pool.stats()["connect_errors"] >= 6, 10, what="6 attempts")
        # Meanwhile borrowers get a clear, bounded error.
        t1 = time.monotonic()
        with pytest.raises(PoolTimeout, match=r"last connection error: .*refused") as info:
            pool.getconn(timeout=0.3)
        borrow_took = time.monotonic() - t1
        assert borrow_took <= 0.3 + MARGIN
        attempts = [r.created for r in capture.records if "connection failed" in r.getMessage()]
        t_heal = time.monotonic()
        proxy.refuse(False)
        with pool.connection(timeout=5) as conn:
            conn.execute("SELECT 1")
        served = time.monotonic() - t_heal
    finally:
        log.removeHandler(capture)
        log.setLevel(old_level)
    start = attempts[0]
    schedule = [round(b - a, 2) for a, b in itertools.pairwise(attempts)]
    assert len(schedule) >= 5, f"only {len(attempts)} logged attempts: {schedule}"
    # Exponential backoff 0.1, 0.2, 0.4, 0.8, 1.6 s (+/- 20% jitter), capped at 2 s. A
    # sleep never ends early; on a loaded machine it may end late (up to twice).
    for n, interval in enumerate(schedule[:5]):
        expected = min(2.0, 0.1 * 2**n)
        assert 0.75 * expected <= interval <= 2 * 1.2 * expected + 0.05, (n, schedule)
    assert schedule[4] > schedule[0] * 4, f"the intervals do not grow: {schedule}"
    assert served <= 2.0 * 1.2 + MARGIN, served
    record_result(
        "4b. refused at startup: backoff",
        {
            "first_attempt_after_open_s": round(start - t_open, 3),
            "retry_intervals_s": schedule,
            "served_after_server_appears_s": round(served, 3),
            "borrow_while_failing_s": round(borrow_took, 3),
            "borrow_error": str(info.value),
        },
        guarantee="exponential backoff (0.1 s doubling, cap 2 s, ±20%); serves at once",
        headline=f"retry intervals {schedule[:6]} s; served {served:.2f} s after the "
        "server appeared",
        rerun=rerun(),
    )


# --------------------------------------------------------------------------- 5. kills


def chaos_query(rng: random.Random) -> Callable[[Any], None]:
    def query(conn: Any) -> None:
        r = rng.random()
        if r < 0.5:
            conn.execute("SELECT 1").fetchone()
        elif r < 0.8:
            conn.execute("SELECT pg_sleep(%s)", [rng.uniform(0.001, 0.01)])
        elif r < 0.9:
            conn.execute("SELECT 1/0")  # fails: rolled back on release
        else:
            conn.execute("SELECT 1")
            conn.execute("SELECT pg_sleep(0.005)")  # several round trips

    return query


@pytest.mark.slow
def test_kills_and_timeouts_at_random_points(cluster: PgCluster, make_pool: Factory) -> None:
    # Runs until enough kills and timeouts happened (about 8 s on an idle 2-core machine),
    # not for a fixed time: a loaded machine takes longer but checks as much.
    wanted, limit = 1000, 90.0
    rng = random.Random(SEED)
    pool = make_pool(
        min_size=2,
        max_size=MAX,
        timeout=0.5,
        check_idle_after=0.005,  # pings at checkout: kill points while checking
        max_lifetime=1.0,  # constant reconnecting: kill points while connecting
        max_lifetime_jitter=0.5,
        reset="light",  # a round trip on release: kill points while releasing
    )
    pool.wait(10)
    lg = LoadGen(
        pool,
        workers=WORKERS,
        timeout=0.5,
        duration=limit + 30,
        query=chaos_query(rng),
        cut=lambda r: r.uniform(0.0, 0.03) if r.random() < 0.3 else None,
        seed=SEED,
    ).start()
    kills = swallowed = 0
    t0 = time.monotonic()
    try:
        for _ in range(1_000_000):
            if kills >= wanted and lg.outcomes()[CUT] >= wanted:
                break
            assert time.monotonic() - t0 < limit, (
                f"only {kills} kills and {lg.outcomes()[CUT]} timeouts in {limit:g} s"
            )
            gevent.sleep(rng.uniform(0, 0.004))
            i = rng.randrange(WORKERS)
            victim = lg.greenlet(i)
            if victim.dead:
                continue
            victim.kill(block=True, timeout=0.5)
            kills += 1
            if not victim.dead:
                swallowed += 1  # the kill did not end the greenlet: it runs on, kept
                continue
            lg.spawn_worker(i)
    finally:
        seconds = time.monotonic() - t0
        lg.stop()
    assert_no_hang(lg)
    outcomes = lg.outcomes()
    expected = {"ok", CUT, KILLED, "PoolTimeout", "DivisionByZero"}
    assert set(outcomes) <= expected, (outcomes, lg.errors_seen)
    stats = check_invariants(pool, cluster)
    cuts = outcomes[CUT]
    record_result(
        "5. kills and timeouts at random points",
        {
            "workers": WORKERS,
            "seconds": round(seconds, 1),
            "kills": kills,
            "kills_swallowed": swallowed,
            "timeouts_fired": cuts,
            "outcomes": dict(outcomes),
            "duplicated": lg.duplicated,
            "bad_state": lg.bad_state,
            "cancel_count": stats["cancel_count"],
            "broken_destroy_count": stats["broken_destroy_count"],
            "new_conns": stats["new_conns_count"],
        },
        guarantee="no leak, no double lend, no dirty lend, no query left running",
        headline=f"{kills} kills + {cuts} timeouts: leaked 0, duplicated {lg.duplicated}, "
        f"dirty {lg.bad_state}, swallowed kills {swallowed}",
        rerun=rerun(),
    )
    assert kills >= wanted and cuts >= wanted, (kills, cuts)
    assert swallowed == 0, f"{swallowed} kills were swallowed by the pool"


def _wait_active(conn: Any) -> None:
    from psycopg.pq import TransactionStatus

    wait_for(
        lambda: conn.pgconn.transaction_status == TransactionStatus.ACTIVE,
        5,
        interval=0.002,
        what="the pool's round trip to start",
    )


def test_kill_during_checkout_ping_is_not_swallowed(
    cluster: PgCluster, proxy: FaultProxy, make_pool: Factory
) -> None:
    pool = make_pool(via(cluster, proxy), min_size=1, max_size=1, check_idle_after=0)
    pool.wait(10)
    conn = pool.getconn()
    pool.putconn(conn)
    proxy.set_latency(0.3)

    def borrower() -> str:
        with pool.connection(timeout=10):
            return "borrowed"

    g = gevent.spawn(borrower)
    _wait_active(conn)  # the checkout ping is in flight
    g.kill(block=True, timeout=3)
    proxy.heal()
    assert g.dead, "the killed greenlet is still running: the pool swallowed GreenletExit"
    assert isinstance(g.value, gevent.GreenletExit), g.value
    check_invariants(pool, cluster)


def test_timeout_during_checkout_ping_is_not_swallowed(
    cluster: PgCluster, proxy: FaultProxy, make_pool: Factory
) -> None:
    pool = make_pool(via(cluster, proxy), min_size=1, max_size=1, check_idle_after=0)
    pool.wait(10)
    pool.putconn(pool.getconn())
    proxy.set_latency(0.3)
    t0 = time.monotonic()
    with pytest.raises(gevent.Timeout), gevent.Timeout(0.1):
        pool.putconn(pool.getconn(timeout=10))
    took = time.monotonic() - t0
    proxy.heal()
    assert took <= 0.1 + MARGIN, f"the caller's gevent.Timeout(0.1) ended after {took:.2f} s"
    check_invariants(pool, cluster)


def test_kill_during_reset_on_release_is_not_swallowed(
    cluster: PgCluster, proxy: FaultProxy, make_pool: Factory
) -> None:
    pool = make_pool(via(cluster, proxy), min_size=1, max_size=1, reset="discard")
    pool.wait(10)
    conn = pool.getconn()
    conn.execute("SELECT 1")
    conn.commit()
    proxy.set_latency(0.3)
    after_release = Event()

    def release() -> None:
        pool.putconn(conn)  # runs DISCARD ALL
        after_release.set()  # must not run: the greenlet was killed inside putconn

    g = gevent.spawn(release)
    _wait_active(conn)  # DISCARD ALL is in flight
    g.kill(block=True, timeout=3)
    proxy.heal()
    assert g.dead and isinstance(g.value, gevent.GreenletExit), g.value
    assert not after_release.is_set(), "putconn() returned normally: the kill was swallowed"
    check_invariants(pool, cluster)


_PSYCOPG2_CHILD = r"""
import sys, time
from gevent import monkey
monkey.patch_all()
import gevent
import gevent.select
import psycopg2.extensions as ext
from greenpool import GreenPool

def wait_until(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            print(f"timed out waiting for {what}", flush=True)
            sys.exit(1)
        gevent.sleep(0.005)

pool = GreenPool(sys.argv[1], driver="psycopg2", min_size=1, max_size=1, ping_timeout=1.0)
pool.wait(10)
gaps = []
held = []

def heartbeat():
    last = time.monotonic()
    for _ in range(100_000):
        gevent.sleep(0.01)
        now = time.monotonic()
        gaps.append(now - last)
        last = now

def borrower():
    with pool.connection() as conn:
        held.append(conn)
        conn.cursor().execute("SELECT pg_sleep(30)")

gevent.spawn(heartbeat)
g = gevent.spawn(borrower)
wait_until(
    lambda: held and held[0].info.transaction_status == ext.TRANSACTION_STATUS_ACTIVE,
    10, "the query to be sent",
)
print("querying", flush=True)
# Wait for the parent's go without blocking the hub (a plain readline would stop every
# greenlet, the one still sending the query included): it sees the query running on the
# server, then black-holes the network.
gevent.select.select([sys.stdin], [], [])
sys.stdin.readline()
gaps.clear()
t0 = time.monotonic()
g.kill(block=True, timeout=5)
kill_s = time.monotonic() - t0
ticks = len(gaps)
wait_until(lambda: len(gaps) >= ticks + 2, 5, "the heartbeat to tick after the kill")
wait_until(lambda: pool.stats()["acquired"] == pool.stats()["closing"] == 0, 5, "the release")
print(f"kill_s={kill_s:.3f} max_gap_s={max(gaps):.3f} ticks={len(gaps)}", flush=True)
pool.close(0)
"""


@pytest.mark.slow
def test_psycopg2_kill_mid_query_does_not_freeze_the_process(
    cluster: PgCluster, proxy: FaultProxy
) -> None:
    """Killing a greenlet mid-query makes the pool cancel the query on the server. With
    psycopg2 that cancel must not stop every other greenlet of the process (psycopg2's
    conn.cancel() runs PQcancel holding the GIL, even in gevent's thread pool)."""
    import subprocess
    import sys

    child = subprocess.Popen(
        [sys.executable, "-c", _PSYCOPG2_CHILD, via(cluster, proxy, application_name="gp_pg2")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stdin is not None and child.stdout is not None
    err = ""
    try:
        with gevent.Timeout(20):
            line = child.stdout.readline().strip()
        assert line == "querying", line
        seen: list[Any] = []

        def running() -> bool:
            seen[:] = cluster.execute(
                "SELECT state, query FROM pg_stat_activity WHERE application_name = 'gp_pg2'"
            )
            return seen == [("active", "SELECT pg_sleep(30)")]

        try:
            wait_for(running, 10)
        except AssertionError:
            raise AssertionError(f"the child's query is not running: {seen}") from None
        proxy.blackhole()  # the network fails while the query runs
        try:
            out, err = child.communicate("go\n", timeout=20)
        except subprocess.TimeoutExpired:
            out = "froze: no output within 20 s"
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(5)
        proxy.heal()
    record_result(
        "5b. psycopg2: kill mid-query on a failed network",
        {"child": out.strip()},
        guarantee="cancelling a discarded query never blocks other greenlets",
        headline=out.strip(),
        rerun=rerun(),
    )
    assert out.startswith("kill_s="), f"the psycopg2 process {out}\n{err}"
    assert "Traceback" not in err, err
    figures = dict(item.split("=") for item in out.split())
    assert float(figures["max_gap_s"]) < 0.5, out


# --------------------------------------------------------------------------- 6. slow server


@pytest.mark.slow
def test_slow_server_bounds_hold(cluster: PgCluster, proxy: FaultProxy, make_pool: Factory) -> None:
    timeout = 0.5
    latency = 0.02  # each way: >= 40 ms per round trip
    pool = make_pool(via(cluster, proxy), min_size=2, max_size=MAX, timeout=timeout)
    pool.wait(10)
    proxy.set_latency(latency)

    def query(conn: Any) -> None:
        conn.execute("SELECT pg_sleep(0.01)")

    stop = Event()
    counts: list[int] = []
    sampler = gevent.spawn(sample_backends, cluster, pool.name, stop, counts)
    try:
        lg = LoadGen(pool, workers=WORKERS, timeout=timeout, duration=6, query=query).run()
    finally:
        stop.set()
        sampler.join(5)
    proxy.heal()
    assert_no_hang(lg)
    assert set(lg.outcomes()) <= {"ok", "PoolTimeout"}, lg.outcomes()
    assert max(counts) <= MAX, f"server saw {max(counts)} backends (max_size {MAX})"
    late = lg.timeout_waits
    lateness_p99 = late.quantile(0.99) - timeout
    assert late.n > 0
    assert late.quantile(0.99) <= timeout + 0.2, late.summary()  # twice a 100 ms target
    assert late.max <= timeout + MARGIN, late.summary()
    waits = lg.wait_hist()
    check_invariants(pool, cluster)
    record_result(
        "6a. slow server: sizes and timeouts",
        {
            "latency_each_way_s": latency,
            "workers": WORKERS,
            "outcomes": dict(lg.outcomes()),
            "max_server_backends": max(counts),
            "samples": len(counts),
            "wait": waits.summary(),
            "timed_out_wait": late.summary(),
            "timeout_lateness_p99_ms": ms(lateness_p99),
        },
        guarantee="backends ≤ max_size; PoolTimeout fires on time",
        headline=f"server backends ≤ {max(counts)}; p99 wait {waits.quantile(0.99):.2f} s; "
        f"timeouts fire {lateness_p99 * 1e3:.0f} ms late at p99",
        rerun=rerun(),
    )


@pytest.mark.slow
def test_slow_server_waiters_are_served_in_order(
    cluster: PgCluster, proxy: FaultProxy, make_pool: Factory
) -> None:
    pool = make_pool(via(cluster, proxy), min_size=2, max_size=2, timeout=10)
    pool.wait(10)
    proxy.set_latency(0.01)
    held = [pool.getconn(), pool.getconn()]
    order: list[int] = []

    def borrower(i: int) -> None:
        with pool.connection() as conn:
            order.append(i)
            conn.execute("SELECT 1")

    n = 40
    greenlets = []
    for i in range(n):
        greenlets.append(gevent.spawn(borrower, i))
        wait_for(lambda: pool.stats()["waiting"] == len(greenlets), 5, interval=0.001)
    for conn in held:
        pool.putconn(conn)
    gevent.joinall(greenlets, timeout=30, raise_error=True)
    proxy.heal()
    assert order == list(range(n))
    record_result(
        "6b. slow server: FIFO",
        {"waiters": n, "in_order": order == list(range(n))},
        guarantee="waiters served first come, first served",
        headline=f"{n} queued waiters served in arrival order",
        rerun=rerun(),
    )


# --------------------------------------------------------------------------- 7. soak


def _soak_faults(
    cluster: PgCluster,
    proxy: FaultProxy,
    pool: GreenPool[Any],
    lg: LoadGen,
    rng: random.Random,
    until: float,
    injected: dict[str, int],
) -> None:
    def restart() -> None:
        cluster.restart(rng.choice(["fast", "immediate"]))

    def terminate() -> None:
        cluster.terminate_backends(pool.name)

    def blackhole() -> None:
        proxy.blackhole()
        gevent.sleep(rng.uniform(0.5, 2.0))
        proxy.heal()

    def slow() -> None:
        proxy.set_latency(rng.uniform(0.02, 0.2))
        gevent.sleep(rng.uniform(0.5, 2.0))
        proxy.heal()

    def refuse() -> None:
        proxy.refuse()
        proxy.reset_all()
        gevent.sleep(rng.uniform(0.3, 1.5))
        proxy.heal()

    def reset_all() -> None:
        proxy.reset_all()

    def kill_storm() -> None:
        for _ in range(50):
            i = rng.randrange(lg.workers)
            victim = lg.greenlet(i)
            if not victim.dead:
                victim.kill(block=True, timeout=1)
                if not victim.dead:  # swallowed: it runs on, kept
                    injected["kills_swallowed"] = injected.get("kills_swallowed", 0) + 1
                    continue
            lg.spawn_worker(i)

    faults: dict[str, Callable[[], None]] = {
        "restart": restart,
        "terminate": terminate,
        "blackhole": blackhole,
        "slow": slow,
        "refuse": refuse,
        "reset_all": reset_all,
        "kill_storm": kill_storm,
    }
    names = sorted(faults)
    for _ in range(10_000):
        gevent.sleep(rng.uniform(0.5, 2.0))
        if time.monotonic() >= until:
            return
        name = rng.choice(names)
        lg.phase = name
        faults[name]()
        injected[name] = injected.get(name, 0) + 1
        lg.phase = "calm"


@pytest.mark.slow
@pytest.mark.needs_restart
@pytest.mark.timeout(SOAK_SECONDS + 180)
def test_soak_mixed_faults(cluster: PgCluster, proxy: FaultProxy, make_pool: Factory) -> None:
    timeout, query_timeout = 1.0, 1.0
    rng = random.Random(SEED)
    pool = make_pool(
        via(cluster, proxy),
        min_size=2,
        max_size=MAX,
        timeout=timeout,
        ping_timeout=0.5,
        connect_timeout=1.0,
        check_idle_after=0.2,
        max_lifetime=10.0,
        health_check_period=2.0,
        reset="light",
    )
    pool.wait(10)
    lg = LoadGen(
        pool,
        workers=WORKERS,
        timeout=timeout,
        query_timeout=query_timeout,
        duration=SOAK_SECONDS + 60,
        query=chaos_query(random.Random(SEED + 1)),
        cut=lambda r: r.uniform(0.0, 0.05) if r.random() < 0.05 else None,
        seed=SEED,
    ).start()
    injected: dict[str, int] = {}
    try:
        wait_for(lambda: lg.outcomes()["ok"] >= 2000, 20, what="steady load")
        rss_start = rss_mb()
        t0 = time.monotonic()
        _soak_faults(cluster, proxy, pool, lg, rng, t0 + SOAK_SECONDS, injected)
        proxy.heal()
        if not cluster.is_running():
            cluster.start()
        lg.phase = "final"
        lg.arm()
        assert lg.wait_ok(10) is not None, "the pool did not serve after the last fault"
        wait_for(lambda: lg.outcomes("final")["ok"] >= 1000, 20, what="load after faults")
    finally:
        lg.stop()
    rss_end = rss_mb()
    assert_no_hang(lg)
    outcomes = lg.outcomes()
    waits = lg.wait_hist()
    latency = lg.latency_hist()
    over_wait = waits.max > timeout + MARGIN
    allowed = {
        "ok",
        CUT,
        KILLED,
        QUERY_TIMEOUT,
        "PoolTimeout",
        "DivisionByZero",
        "OperationalError",
        "AdminShutdown",
        "CrashShutdown",
    }
    unexpected = {k: v for k, v in outcomes.items() if k not in allowed}
    stats = check_invariants(pool, cluster)
    record_result(
        "7. soak: mixed faults",
        {
            "seconds": SOAK_SECONDS,
            "seed": SEED,
            "workers": WORKERS,
            "faults": injected,
            "ops": lg.ops,
            "outcomes": dict(outcomes),
            "wait": waits.summary(),
            "latency": latency.summary(),
            "rss_start_mb": round(rss_start, 1),
            "rss_end_mb": round(rss_end, 1),
            "duplicated": lg.duplicated,
            "bad_state": lg.bad_state,
            "new_conns": stats["new_conns_count"],
        },
        guarantee="0 lost/duplicated connections; no acquire beyond timeout; flat memory",
        headline=f"{lg.ops} ops, {sum(injected.values())} faults: lost 0, duplicated "
        f"{lg.duplicated}, max acquire {waits.max:.2f} s (timeout {timeout:g}), RSS "
        f"{rss_start:.0f}→{rss_end:.0f} MiB",
        rerun="GREENPOOL_SOAK_SECONDS=600 " + rerun(),
    )
    assert not unexpected, (unexpected, lg.errors_seen)
    assert not over_wait, f"an acquire took {waits.max:.2f} s (timeout {timeout:g} s)"
    assert latency.max <= timeout + query_timeout + MARGIN, latency.summary()
    assert injected.get("kills_swallowed", 0) == 0, injected
    assert rss_end - rss_start <= 25, (rss_start, rss_end)
