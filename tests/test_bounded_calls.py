"""Every call that talks to the server is bounded, even on a black-holed network.

Release (the rollback and the session reset) is bounded by ``ping_timeout``: past it the
connection is discarded (its query cancelled) and ``putconn()`` returns; a ``configure``
callback that hangs gives its slot back after ``connect_timeout``. Both hung forever
before the security review's fixes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import gevent
import gevent.event
import pytest

from greenpool import GreenPool
from tests.support.faultproxy import FaultProxy
from tests.support.pgcluster import PgCluster
from tests.support.waiting import wait_for

Factory = Callable[..., GreenPool[Any]]


@pytest.fixture
def proxy(cluster: PgCluster) -> Iterator[FaultProxy]:
    with FaultProxy(cluster.host, cluster.port) as fp:
        yield fp


@pytest.mark.parametrize("used", ["idle", "in-transaction", "untouched"])
def test_release_on_a_black_hole_returns_within_ping_timeout(
    cluster: PgCluster, proxy: FaultProxy, make_pool: Factory, used: str
) -> None:
    ping_timeout = 0.5
    pool = make_pool(
        cluster.dsn(host=proxy.host, port=proxy.port),
        min_size=1,
        max_size=1,
        ping_timeout=ping_timeout,
    )
    conn = pool.getconn(timeout=10)
    if used == "in-transaction":
        conn.execute("SELECT 1")  # a transaction is open: the release must roll back
    elif used == "idle":
        conn.autocommit = True
        conn.execute("SELECT 1")  # idle, but the session was used: the release resets it
    proxy.blackhole()
    start = time.monotonic()
    done = gevent.spawn(pool.putconn, conn)
    done.get(timeout=ping_timeout * 4 + 5)  # a hang fails here, not in CI's timeout
    took = time.monotonic() - start
    assert took < ping_timeout * 4, f"putconn took {took:.2f} s on a black hole"
    stats = pool.stats()
    if used == "untouched":
        # Nothing sent, so nothing to reset: no round trip, and so no news of the black
        # hole either; the checkout ping of an idle connection is what finds it.
        assert stats["broken_destroy_count"] == 0 and stats["idle"] == 1
        assert took < ping_timeout
        proxy.heal()
        return
    assert stats["broken_destroy_count"] == 1 and stats["idle"] == 0
    proxy.heal()
    with pool.connection(timeout=10) as fresh:  # a new connection replaces it
        assert fresh is not conn and fresh.execute("SELECT 1").fetchone() == (1,)


def test_a_configure_callback_that_hangs_gives_its_slot_back(dsn: str, make_pool: Factory) -> None:
    release = gevent.event.Event()

    def configure(conn: Any) -> None:
        release.wait(30)  # hangs (until the test ends)

    pool = make_pool(dsn, min_size=1, max_size=1, connect_timeout=0.5, configure=configure)
    try:
        wait_for(lambda: pool.stats()["connect_errors"] >= 1, timeout=10)
        stats = pool.stats()
        assert stats["last_error"] and "timed out" in stats["last_error"]
        assert stats["constructing"] <= 1  # the next attempt may be under way
        assert stats["total"] - stats["constructing"] == 0  # nothing half-open kept
    finally:
        release.set()
