"""The pool's invariants, checked against ground truth rather than against the pool's own
arithmetic.

``stats()["total"]`` is computed as ``idle + acquired + constructing``, so comparing those
proves nothing. What the pool cannot fake: the backends the *server* sees for the pool's
``application_name`` (never more than ``max_size``; exactly ``total`` once the pool is
quiet), the connections a fake driver holds open, and counters that never go negative.
"""

from __future__ import annotations

from typing import Any

from tests.support.server import Server
from tests.support.waiting import wait_for

#: stats() keys that are not counts.
NOT_COUNTS = frozenset({"name", "state", "failing", "last_error", "hosts", "replicas"})
HOST_COUNTS = ("connections", "connect_errors")


def backend_pids(server: Server, application_name: str) -> set[int]:
    """The pids of the server's client backends with this application_name."""
    rows = server.execute(
        "SELECT pid FROM pg_stat_activity WHERE backend_type = 'client backend' "
        "AND application_name = %s",
        [application_name],
    )
    return {int(r[0]) for r in rows}


def backend_starts(server: Server, application_name: str) -> dict[int, Any]:
    """``{pid: backend_start}`` of the server's client backends with this
    application_name: a pid may be reused, a (pid, backend_start) pair is one session."""
    rows = server.execute(
        "SELECT pid, backend_start FROM pg_stat_activity "
        "WHERE backend_type = 'client backend' AND application_name = %s",
        [application_name],
    )
    return {int(r[0]): r[1] for r in rows}


def counts_non_negative(stats: dict[str, Any]) -> None:
    """Every size and counter in ``stats`` is a number >= 0."""
    bad = {
        k: v
        for k, v in stats.items()
        if k not in NOT_COUNTS and (isinstance(v, bool) or not isinstance(v, int | float) or v < 0)
    }
    for host, figures in stats.get("hosts", {}).items():
        for key in HOST_COUNTS:
            value = figures[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                bad[f"hosts[{host}].{key}"] = value
    assert not bad, f"negative or non-numeric counts {bad} in {stats}"
    for replica in stats.get("replicas", []):
        for key in ("served", "acquired", "max_size"):
            assert replica[key] >= 0, f"replica {replica['name']}: {key} < 0 in {stats}"


def backends_within_max(pool: Any, server: Server, max_size: int | None = None) -> int:
    """The server never sees more than ``max_size`` backends of the pool (any moment).

    ``max_size``: the bound to check, when it is not the pool's current one (after a
    shrink, borrowed connections above the new size are closed only when returned)."""
    bound = pool.max_size if max_size is None else max_size
    backends = server.backend_count(pool.name)
    assert backends <= bound, f"the server sees {backends} backends of {pool.name} (max {bound})"
    counts_non_negative(pool.stats())
    return backends


def quiet(stats: dict[str, Any]) -> bool:
    in_flight = (stats["acquired"], stats["constructing"], stats["closing"], stats["waiting"])
    return in_flight == (0, 0, 0, 0)


def settled(pool: Any, server: Server, timeout: float = 15.0) -> dict[str, Any]:
    """Wait until nothing is in flight and the server's backends of the pool are exactly
    the pool's connections; return the stats (counts checked non-negative, total within
    max_size). Call once the test's borrowers are done."""
    try:
        wait_for(lambda: quiet(pool.stats()), timeout)
    except AssertionError:
        raise AssertionError(f"pool {pool.name} did not settle: {pool.stats()}") from None

    def server_agrees() -> bool:
        return quiet(pool.stats()) and server.backend_count(pool.name) == pool.stats()["total"]

    try:
        wait_for(server_agrees, timeout, interval=0.05)
    except AssertionError:
        raise AssertionError(
            f"the server sees {server.backend_count(pool.name)} backends of {pool.name}; "
            f"the pool counts {pool.stats()}"
        ) from None
    stats: dict[str, Any] = pool.stats()
    counts_non_negative(stats)
    assert stats["total"] <= stats["max_size"], stats
    return stats


def fake_driver_agrees(pool: Any, driver: Any) -> None:
    """On the fake driver: every slot that is not being opened holds exactly one connection
    open in the driver (closing ones included: a cancel in flight keeps its connection
    open), and no open connection is outside a slot. A slot being opened may already hold
    its connection (the connector is vetting it: configure, the settings snapshot), so the
    driver's count lies between the two."""
    open_conns = len(driver.open_conns())
    slots, constructing = pool._slots, pool._constructing
    assert slots - constructing <= open_conns <= slots, (
        f"the driver has {open_conns} open connections; the pool holds {slots - constructing}"
        f" and opens {constructing} (slots {slots}, closing {pool._closing})"
    )
    assert pool._constructing >= 0 and pool._closing >= 0 and pool._slots >= 0, pool.counts()
    counts_non_negative(pool.stats())
