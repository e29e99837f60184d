"""Replica routing policy on the real server: least-loaded by each replica's own max_size,
one timeout per borrow when replicas are saturated, bad tokens named, and a failing
replica probed again with backoff. The "replicas" are the session server reached under
other pool names (or through a fault proxy): the monitor sees a server not in recovery,
lag 0, which is all routing needs (tests/test_scaleout.py uses a real standby)."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from psycopg.conninfo import make_conninfo

from greenpool import GreenPool, PoolTimeout
from tests.support.faultproxy import FaultProxy
from tests.support.server import Server
from tests.support.waiting import wait_for

Factory = Callable[..., GreenPool[Any]]


def app_of(conn: Any) -> str:
    """Ground truth: the server's application_name of this connection's backend."""
    row = conn.execute(
        "SELECT application_name FROM pg_stat_activity WHERE pid = pg_backend_pid()"
    ).fetchone()
    return str(row[0])


@pytest.fixture
def two_replicas(make_pool: Factory, dsn: str) -> Iterator[GreenPool[Any]]:
    pool = make_pool(
        dsn,
        name="gp-rr-primary",
        max_size=2,
        timeout=5,
        replicas=[
            {"conninfo": dsn, "name": "gp-rr-small", "max_size": 1},
            {"conninfo": dsn, "name": "gp-rr-large", "max_size": 3},
        ],
        replica_check_period=0.05,
    )
    wait_for(
        lambda: all(r["healthy"] for r in pool.stats()["replicas"]), 10, what="replicas measured"
    )
    yield pool


def test_least_loaded_counts_each_replicas_own_max_size(two_replicas: GreenPool[Any]) -> None:
    """Reads fill both replicas to their own max_size before any falls back, and nobody
    waits on a saturated replica while another has room."""
    pool = two_replicas
    held = []
    start = time.monotonic()
    try:
        for _ in range(4):
            held.append(pool.getconn(read_only=True, timeout=2))
        took = time.monotonic() - start
        assert Counter(app_of(c) for c in held) == {"gp-rr-small": 1, "gp-rr-large": 3}
        assert took < 1.5, f"a borrow waited on a full replica ({took:.2f} s)"
        extra = pool.getconn(read_only=True, timeout=0.3)  # both full: the primary serves
        held.append(extra)
        assert app_of(extra) == "gp-rr-primary"
        assert pool._router is not None and pool._router.fallback_count == 1
    finally:
        for conn in held:
            pool.putconn(conn)
    stats = pool.stats()["replicas"]
    assert [(r["max_size"], r["acquired"]) for r in stats] == [(1, 0), (3, 0)]


def test_saturated_replicas_and_primary_wait_one_timeout_not_two(
    two_replicas: GreenPool[Any],
) -> None:
    pool = two_replicas
    held = [pool.getconn(read_only=True, timeout=2) for _ in range(4)]
    held += [pool.getconn(timeout=2) for _ in range(2)]
    try:
        start = time.monotonic()
        with pytest.raises(PoolTimeout):
            pool.getconn(read_only=True, timeout=0.5)
        took = time.monotonic() - start
        # One timeout on the replica, then the primary is only tried, not waited on.
        assert 0.45 <= took < 0.9, f"took {took:.2f} s for a 0.5 s timeout"
    finally:
        for conn in held:
            pool.putconn(conn)


@pytest.mark.parametrize(
    ("after", "error", "message"),
    [
        ("16-B3", ValueError, "after: not a WAL position"),
        ("zz/1", ValueError, "after: not a WAL position"),
        ("", TypeError, "after: expected a commit token"),
        (1234, TypeError, "after: expected a commit token"),
    ],
)
def test_bad_commit_token_is_named(
    two_replicas: GreenPool[Any], after: Any, error: type[Exception], message: str
) -> None:
    with (
        pytest.raises(error, match=message),
        two_replicas.connection(read_only=True, after=after, timeout=1),
    ):
        pass


def test_bad_timeout_with_a_token_is_refused(two_replicas: GreenPool[Any]) -> None:
    token = "0/0"
    for bad in (float("nan"), float("inf"), -1.0):
        with (
            pytest.raises(ValueError, match="timeout"),
            two_replicas.connection(read_only=True, after=token, timeout=bad),
        ):
            pass


def test_failing_replica_is_probed_again_with_backoff(
    make_pool: Factory, dsn: str, cluster: Server
) -> None:
    """A replica whose probe fails is marked down for 1 s, doubling to 30 s; it is not
    probed while down (the proxy sees no connection attempt); once healed, the next
    probe brings it back. Time is advanced by moving ``down_until``, not by sleeping."""
    with FaultProxy(cluster.host, cluster.port) as proxy:
        via_proxy = make_conninfo(dsn, host=proxy.host, port=proxy.port, connect_timeout=2)
        pool = make_pool(
            dsn,
            max_size=1,
            replicas=[{"conninfo": via_proxy, "name": "gp-rr-flaky", "max_size": 1}],
            replica_check_period=3600,  # the monitor measures once; the test drives it
        )
        router = pool._router
        assert router is not None
        replica = router.replicas[0]
        wait_for(lambda: replica.healthy, 10, what="replica measured")
        attempts: list[float] = []
        connect = replica.pool.connect_dedicated

        def counted(timeout: float | None = None) -> Any:
            attempts.append(time.monotonic())
            return connect(timeout)

        replica.pool.connect_dedicated = counted  # type: ignore[method-assign]
        proxy.refuse()
        proxy.reset_all()  # the probe's connection breaks
        router.measure()  # finds it broken: down for 1 s
        downs = [replica.down_for]
        assert not replica.healthy and not attempts
        for i in range(6):
            replica.down_until = 0.0  # as if the back-off had run out
            router.measure()
            assert not replica.healthy and replica.last_error
            assert len(attempts) == i + 1
            downs.append(replica.down_for)
            router.measure()  # still down: not probed
            assert len(attempts) == i + 1
        assert downs == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
        assert pool.stats()["replicas"][0]["healthy"] is False
        conn = pool.getconn(read_only=True, timeout=2)  # falls back to the primary
        assert app_of(conn) == pool.name
        pool.putconn(conn)
        proxy.refuse(False)
        replica.down_until = 0.0
        router.measure()
        assert replica.healthy and replica.down_for == 0.0 and replica.last_error is None
        conn = pool.getconn(read_only=True, timeout=2)
        try:
            assert app_of(conn) == "gp-rr-flaky"
        finally:
            pool.putconn(conn)
