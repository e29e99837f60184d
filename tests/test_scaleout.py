"""Scale-out against real components: a streaming standby (pg_basebackup, promoted for
real), a primary turned read-only while it keeps answering, read replicas with lag, and
Debian's PgBouncer in transaction mode. Figures go to the fault results file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import gevent
import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from greenpool import GreenPool, PoolTimeout
from tests.support.loadgen import record_result
from tests.support.pgcluster import PgCluster
from tests.support.waiting import wait_for

Factory = Callable[..., GreenPool[Any]]


def both_hosts(primary: PgCluster, other: PgCluster, **extra: Any) -> str:
    """A multi-host conninfo: the primary first, then the other server."""
    return make_conninfo(
        primary.dsn(),
        host=f"{primary.host},{other.host}",
        port=f"{primary.port},{other.port}",
        **extra,
    )


def make_table(cluster: PgCluster, name: str) -> None:
    with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
        conn.execute(f"CREATE TABLE IF NOT EXISTS {name} (id serial PRIMARY KEY, v text)")


# ---------------------------------------------------------------------------- failover


@pytest.mark.slow
def test_failover_under_write_load_recovers_quickly(
    standby_pair: tuple[PgCluster, Any], make_pool: Factory
) -> None:
    primary, standby = standby_pair
    make_table(primary, "gp_failover")
    standby.wait_caught_up()
    pool = make_pool(
        both_hosts(primary, standby, target_session_attrs="read-write", connect_timeout=1),
        min_size=4,
        max_size=4,
        timeout=2,
        check_idle_after=0.2,
    )
    pool.wait(10)
    errors: Counter[str] = Counter()
    ok_times: list[float] = []
    waits: list[float] = []
    stop = gevent.event.Event()

    def writer() -> None:
        for _ in range(100_000):
            if stop.is_set():
                return
            start = time.monotonic()
            try:
                with pool.connection(timeout=2) as conn:
                    waits.append(time.monotonic() - start)
                    conn.execute("INSERT INTO gp_failover (v) VALUES ('x')")
                ok_times.append(time.monotonic())
            except PoolTimeout:
                waits.append(time.monotonic() - start)
                errors["PoolTimeout"] += 1
                gevent.sleep(0.01)
            except psycopg.Error as ex:
                errors[type(ex).__name__] += 1
                gevent.sleep(0.01)

    writers = [gevent.spawn(writer) for _ in range(8)]
    try:
        wait_for(lambda: len(ok_times) >= 50, 10, what="writes before the failover")
        primary.stop()
        t_stopped = time.monotonic()
        opened_to_old_primary = pool.stats()["new_conns_count"]  # it refuses new ones now
        standby.promote()
        t_promoted = time.monotonic()
        first_ok_after = len(ok_times)
        wait_for(lambda: len(ok_times) > first_ok_after + 20, 20, what="writes after promotion")
        recovery = next(t for t in ok_times[first_ok_after:]) - t_promoted
    finally:
        stop.set()
        gevent.joinall(writers, timeout=10)
        if not primary.is_running():
            primary.start()  # the fixture's primary serves the next tests (as a new one)
    assert recovery <= 2.0, f"writes resumed {recovery:.2f} s after the promotion"
    assert max(waits) <= 2.0 + 1.0, "a borrower waited past its timeout"
    # Each broken connection costs at most one error to one borrower (4 or 5: one more
    # may have been opened while the load ran).
    failed = sum(v for k, v in errors.items() if k != "PoolTimeout")
    assert failed <= opened_to_old_primary, (errors, opened_to_old_primary)
    hosts = pool.stats()["hosts"]
    assert hosts[f"{standby.host}:{standby.port}"]["connections"] >= 1
    record_result(
        "8. failover under write load",
        {
            "writers": 8,
            "max_size": 4,
            "promote_s": round(t_promoted - t_stopped, 2),
            "recovery_after_promotion_s": round(recovery, 2),
            "errors": dict(errors),
            "max_wait_s": round(max(waits), 2),
        },
        guarantee="writes resume within 2 s of the promotion; one error per broken connection",
        headline=f"writes resumed {recovery * 1e3:.0f} ms after the promotion; errors "
        f"{dict(errors)}",
        rerun="python -m pytest -q tests/test_scaleout.py -k failover",
    )


@pytest.mark.slow
@pytest.mark.parametrize("pool_kind", ["greenpool", "psycopg_pool"])
def test_demoted_primary_that_keeps_answering(
    standby_pair: tuple[PgCluster, Any], make_pool: Factory, pool_kind: str
) -> None:
    """The primary turns read-only but answers (SELECT 1 passes); the standby is
    promoted. greenpool learns it from the first 25006 (or the role report) and moves to
    the new primary; psycopg_pool keeps lending connections to the read-only server."""
    from tests.support.standby import set_read_only

    primary, standby = standby_pair
    make_table(primary, "gp_demote")
    standby.wait_caught_up()
    conninfo = both_hosts(primary, standby, target_session_attrs="read-write")
    if pool_kind == "greenpool":
        gp = make_pool(conninfo, min_size=3, max_size=3, timeout=3)
        gp.wait(10)
        borrow = gp.connection
        close: Callable[[], None] = gp.close
    else:
        from psycopg_pool import ConnectionPool

        pp: ConnectionPool[Any] = ConnectionPool(
            conninfo,
            min_size=3,
            max_size=3,
            timeout=3,
            check=ConnectionPool.check_connection,
            open=True,
        )
        pp.wait(10)
        borrow = pp.connection  # type: ignore[assignment]
        close = pp.close
    try:
        set_read_only(primary, True)
        standby.promote()
        outcomes: Counter[str] = Counter()
        started = time.monotonic()
        first_ok: float | None = None
        for _ in range(60):
            try:
                with borrow() as conn:
                    conn.execute("INSERT INTO gp_demote (v) VALUES ('after')")
                outcomes["ok"] += 1
                first_ok = first_ok or time.monotonic() - started
            except psycopg.errors.ReadOnlySqlTransaction:
                outcomes["25006"] += 1
            except Exception as ex:
                outcomes[type(ex).__name__] += 1
            gevent.sleep(0.02)
        hosts = gp.stats()["hosts"] if pool_kind == "greenpool" else {}
    finally:
        close()
        set_read_only(primary, False)
    record_result(
        f"9. demoted primary that keeps answering ({pool_kind})",
        {"attempts": 60, "outcomes": dict(outcomes), "first_ok_s": first_ok},
        pool=pool_kind,
        guarantee="a read-write pool never keeps lending connections to a read-only host",
        headline=f"{pool_kind}: {dict(outcomes)}",
        rerun="python -m pytest -q tests/test_scaleout.py -k demoted",
    )
    if pool_kind == "greenpool":
        # The first 25006 evicts every connection (not one per error), and none of the
        # new ones goes to the read-only server.
        assert outcomes["25006"] <= 1, outcomes
        assert outcomes["ok"] >= 55, outcomes
        old_primary = hosts[f"{primary.host}:{primary.port}"]
        assert (old_primary["role"], old_primary["connections"]) == ("read-only", 0), hosts
        assert hosts[f"{standby.host}:{standby.port}"]["connections"] >= 1, hosts
    else:
        assert outcomes["25006"] >= 50, outcomes  # the difference this test records


# ---------------------------------------------------------------------------- replicas


def replica_pool(make_pool: Factory, primary: PgCluster, standby: Any, **kw: Any) -> Any:
    kw.setdefault("max_replica_lag", 1.0)
    kw.setdefault("replica_check_period", 0.1)
    pool = make_pool(primary.dsn(), min_size=1, max_size=3, replicas=[standby.dsn()], **kw)
    pool.wait(10)
    wait_for(lambda: pool.stats()["replicas"][0]["healthy"], 10, what="replica measured")
    return pool


def in_recovery(pool: Any) -> bool:
    with pool.connection(read_only=True) as conn:
        row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
    return bool(row[0])


def test_reads_go_to_the_standby_and_writes_to_the_primary(
    standby_pair: tuple[PgCluster, Any], make_pool: Factory
) -> None:
    primary, standby = standby_pair
    pool = replica_pool(make_pool, primary, standby)
    assert in_recovery(pool) is True
    with pool.connection() as conn:
        assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (False,)
    conn = pool.getconn(read_only=True)
    try:
        assert conn.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
    finally:
        pool.putconn(conn)
    stats = pool.stats()
    assert stats["replicas"][0]["served"] >= 2 and stats["replicas"][0]["acquired"] == 0


def test_budget_counts_what_a_worker_opens_on_each_server(
    standby_pair: tuple[PgCluster, Any], make_pool: Factory
) -> None:
    """`greenpool budget`'s per-worker arithmetic against ground truth: every connection
    of one worker's pools borrowed, the backends on the primary and on the standby
    (pg_stat_activity) are what the budget counts, the lag monitor's probes included."""
    from greenpool.budget import Budget, ReplicaServer, ServerLimits

    primary, standby = standby_pair
    app = "gp-budget-truth"
    pool = make_pool(
        primary.dsn(application_name=app),
        max_size=3,
        replicas=[{"conninfo": standby.dsn(application_name=app), "max_size": 2}],
        replica_check_period=0.1,
    )
    wait_for(lambda: pool.stats()["replicas"][0]["healthy"], 10, what="replica measured")
    held = [pool.getconn() for _ in range(3)] + [pool.getconn(read_only=True) for _ in range(2)]
    try:
        limits = ServerLimits(100)
        budget = Budget(1, 1, 3, 0, limits, replicas=[ReplicaServer(limits, 2)])
        assert primary.backend_count(app) == budget.app_connections == 4
        assert standby.backend_count(app) == budget.replica_connections(budget.replicas[0]) == 3
    finally:
        for conn in held:
            pool.putconn(conn)


@pytest.mark.slow
def test_a_lagging_replica_is_skipped_until_it_catches_up(
    standby_pair: tuple[PgCluster, Any], make_pool: Factory
) -> None:
    primary, standby = standby_pair
    make_table(primary, "gp_lag")
    pool = replica_pool(make_pool, primary, standby, max_replica_lag=0.5)
    standby.pause_replay()
    t_paused = time.monotonic()
    try:
        with pool.connection() as conn:  # a commit the replica will not replay
            conn.execute("INSERT INTO gp_lag (v) VALUES ('behind')")
        wait_for(lambda: not in_recovery(pool), 10, what="reads moved to the primary")
        moved = time.monotonic() - t_paused
    finally:
        standby.resume_replay()
    t_resumed = time.monotonic()
    wait_for(lambda: in_recovery(pool), 10, what="reads back on the replica")
    back = time.monotonic() - t_resumed
    assert 0.4 <= moved <= 3.0, f"reads moved after {moved:.2f} s (max_replica_lag 0.5 s)"
    record_result(
        "10. replica lag",
        {
            "max_replica_lag_s": 0.5,
            "moved_to_primary_s": round(moved, 2),
            "back_on_replica_s": round(back, 2),
        },
        guarantee="reads leave a replica lagging past max_replica_lag and come back",
        headline=f"reads left the paused replica after {moved:.2f} s, returned "
        f"{back:.2f} s after replay resumed",
        rerun="python -m pytest -q tests/test_scaleout.py -k lagging",
    )


def test_a_stopped_replica_falls_back_to_the_primary_within_the_timeout(
    standby_pair: tuple[PgCluster, Any], make_pool: Factory
) -> None:
    primary, standby = standby_pair
    pool = replica_pool(make_pool, primary, standby, timeout=3)
    standby.stop()
    start = time.monotonic()
    for _ in range(5):
        assert in_recovery(pool) is False
    assert time.monotonic() - start < 3 * 5
    wait_for(lambda: not pool.stats()["replicas"][0]["healthy"], 10, what="replica marked down")


def test_replica_fallback_fail_refuses_instead_of_reading_the_primary(
    standby_pair: tuple[PgCluster, Any], make_pool: Factory
) -> None:
    primary, standby = standby_pair
    pool = replica_pool(make_pool, primary, standby, replica_fallback="fail")
    standby.stop()
    wait_for(lambda: not pool.stats()["replicas"][0]["healthy"], 10, what="replica marked down")
    with pytest.raises(PoolTimeout, match="no healthy replica"):
        pool.getconn(read_only=True, timeout=1)


def test_read_your_writes_with_a_commit_token(
    standby_pair: tuple[PgCluster, Any], make_pool: Factory
) -> None:
    """With the standby's replay paused, a plain read goes to the standby and misses the
    write (the control: without ``after=`` the test sees the stale replica); a read
    ``after=`` the write's token waits for a replica that replayed it, then falls back to
    the primary. Once replay resumes, the token's read is served by the standby."""
    primary, standby = standby_pair
    make_table(primary, "gp_ryw")
    standby.wait_caught_up()  # the table itself must reach the standby before the pause
    # A generous lag bound: the paused standby stays a candidate for plain reads.
    pool = replica_pool(make_pool, primary, standby, max_replica_lag=600)
    query = "SELECT count(*), pg_is_in_recovery() FROM gp_ryw WHERE v = %s"
    standby.pause_replay()
    try:
        with pool.connection() as conn:
            conn.execute("INSERT INTO gp_ryw (v) VALUES ('paused')")
        with pool.connection() as conn:
            token = pool.commit_token(conn)
        with pool.connection(read_only=True, timeout=5) as conn:
            assert conn.execute(query, ("paused",)).fetchone() == (0, True)  # stale replica
        started = time.monotonic()
        with pool.connection(read_only=True, after=token, timeout=0.5) as conn:
            assert conn.execute(query, ("paused",)).fetchone() == (1, False)  # the primary
        assert time.monotonic() - started < 5  # bounded by the borrower's timeout
    finally:
        standby.resume_replay()
    for i in range(10):
        with pool.connection() as conn:
            conn.execute("INSERT INTO gp_ryw (v) VALUES (%s)", (f"row{i}",))
        with pool.connection() as conn:
            token = pool.commit_token(conn)
        with pool.connection(read_only=True, after=token, timeout=5) as conn:
            seen = conn.execute(query, (f"row{i}",)).fetchone()
            assert seen is not None and seen[0] == 1, f"row{i} not visible after its token"
    wait_for(lambda: in_recovery(pool), 10, what="reads on the standby again")
    with pool.connection(read_only=True, after=token, timeout=5) as conn:
        assert conn.execute(query, ("row9",)).fetchone() == (1, True)  # the standby


def test_flask_read_conn_reads_its_own_writes(standby_pair: tuple[PgCluster, Any]) -> None:
    from flask import Flask

    primary, standby = standby_pair
    make_table(primary, "gp_flask_ryw")
    app = Flask("ryw")
    app.config.update(
        GREENPOOL_CONNINFO=primary.dsn(),
        GREENPOOL_REPLICAS=[standby.dsn()],
        GREENPOOL_MAX_REPLICA_LAG=5,
        GREENPOOL_MIN_SIZE=0,
        GREENPOOL_NAME="gp-flask-ryw",
    )
    db: GreenPool[Any] = GreenPool(app)

    @app.post("/write/<tag>")
    def write(tag: str) -> Any:
        db.conn.execute("INSERT INTO gp_flask_ryw (v) VALUES (%s)", (tag,))
        row = db.read_conn.execute(
            "SELECT count(*), pg_is_in_recovery() FROM gp_flask_ryw WHERE v = %s", (tag,)
        ).fetchone()
        return {"seen": row[0], "replica": row[1]}

    @app.get("/read")
    def read() -> Any:
        row = db.read_conn.execute("SELECT pg_is_in_recovery()").fetchone()
        return {"replica": row[0]}

    client = app.test_client()
    try:
        with app.app_context():
            pool = db.get_pool()
            wait_for(lambda: pool.stats()["replicas"][0]["healthy"], 10, what="replica measured")
        for i in range(10):
            assert client.post(f"/write/t{i}").json == {"seen": 1, "replica": False}
        assert client.get("/read").json == {"replica": True}
    finally:
        db.close(timeout=1, app=app)


# ---------------------------------------------------------------------------- PgBouncer

_BOUNCER_WORKER = textwrap.dedent(
    """
    from gevent import monkey; monkey.patch_all()
    import sys, collections, gevent, psycopg
    from greenpool import GreenPool
    dsn, mode, greenlets, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    import time
    kw = {
        "transaction": {"pooler_mode": "transaction"}, "none": {"reset": "client"}, "direct": {}
    }[mode]
    pool = GreenPool(dsn, min_size=2, max_size=8, timeout=30, name="gp_bouncer", **kw)
    pool.wait(30)
    outcomes = collections.Counter()
    def one(i):
        for r in range(repeats):
            try:
                with pool.connection() as conn:
                    conn.execute("SELECT %s::int + %s::int", (i, r)).fetchone()
                outcomes["ok"] += 1
            except psycopg.Error as ex:
                outcomes[type(ex).__name__] += 1
    start = time.time()
    gevent.joinall([gevent.spawn(one, i) for i in range(greenlets)], timeout=120)
    end = time.time()
    pool.close()
    import json; print(json.dumps({"outcomes": dict(outcomes), "window": [start, end]}))
    """
)


def run_bouncer_load(dsn: str, mode: str, processes: int = 2) -> tuple[Counter[str], float]:
    """The outcomes of 2 processes x 250 greenlets x 8 queries, and their ops/s (over
    the window from the first process's start to the last one's end)."""
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _BOUNCER_WORKER, dsn, mode, "250", "8"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(processes)
    ]
    total: Counter[str] = Counter()
    starts, ends = [], []
    for proc in procs:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err[-2000:]
        result = json.loads(out.strip().splitlines()[-1])
        total.update(result["outcomes"])
        starts.append(result["window"][0])
        ends.append(result["window"][1])
    return total, sum(total.values()) / (max(ends) - min(starts))


@pytest.mark.slow
def test_transaction_pooling_needs_pooler_mode_for_prepared_statements(
    make_pgbouncer: Callable[..., Any],
) -> None:
    """0 errors through PgBouncer in transaction mode with pooler_mode, errors without it;
    and, as a figure, the same load straight to the server in the same run (what the
    detour through PgBouncer costs in throughput)."""
    bouncer = make_pgbouncer(pool_mode="transaction", default_pool_size=4)
    with_mode, through = run_bouncer_load(bouncer.dsn(), "transaction")
    direct_outcomes, direct = run_bouncer_load(bouncer.cluster.dsn(), "direct")
    without, _ = run_bouncer_load(bouncer.dsn(), "none")
    assert with_mode == Counter({"ok": 2 * 250 * 8}), with_mode
    assert direct_outcomes == Counter({"ok": 2 * 250 * 8}), direct_outcomes
    assert sum(v for k, v in without.items() if k != "ok") > 0, without  # what it prevents
    record_result(
        "11. PgBouncer transaction pooling",
        {
            "processes": 2,
            "greenlets": 500,
            "default_pool_size": 4,
            "with_pooler_mode": dict(with_mode),
            "without": dict(without),
            "ops_per_s_through_pgbouncer": round(through),
            "ops_per_s_direct": round(direct),
            "pgbouncer_vs_direct": round(through / direct, 2),
        },
        guarantee="0 errors through PgBouncer in transaction mode with pooler_mode",
        headline=f"500 greenlets x 8 prepared-eligible queries: {dict(with_mode)} with "
        f"pooler_mode='transaction', {dict(without)} without; {through:,.0f} ops/s through "
        f"PgBouncer vs {direct:,.0f} direct ({through / direct:.2f}x, same run)",
        rerun="python -m pytest -q tests/test_scaleout.py -k transaction_pooling",
    )


@pytest.mark.slow
def test_pgbouncer_restart_and_pause_under_load(
    make_pgbouncer: Callable[..., Any], make_pool: Factory
) -> None:
    bouncer = make_pgbouncer(pool_mode="transaction", default_pool_size=4)
    pool = make_pool(
        bouncer.dsn(),
        pooler_mode="transaction",
        min_size=2,
        max_size=6,
        timeout=3,
        check_idle_after=0.1,
    )
    pool.wait(10)
    outcomes: Counter[str] = Counter()
    stop = gevent.event.Event()

    def worker() -> None:
        for _ in range(100_000):
            if stop.is_set():
                return
            try:
                with pool.connection(timeout=3) as conn:
                    conn.execute("SELECT 1").fetchone()
                outcomes["ok"] += 1
            except Exception as ex:
                outcomes[type(ex).__name__] += 1
                gevent.sleep(0.05)

    workers = [gevent.spawn(worker) for _ in range(20)]
    try:
        wait_for(lambda: outcomes["ok"] >= 200, 20, what="load through PgBouncer")
        bouncer.pause()
        gevent.sleep(0.5)
        bouncer.resume()
        resumed_at = outcomes["ok"]
        wait_for(lambda: outcomes["ok"] >= resumed_at + 200, 20, what="service after RESUME")
        errors_before_restart = sum(v for k, v in outcomes.items() if k != "ok")
        bouncer.restart()
        restarted_at = outcomes["ok"]
        wait_for(lambda: outcomes["ok"] >= restarted_at + 200, 20, what="service after restart")
    finally:
        stop.set()
        gevent.joinall(workers, timeout=10)
    errors = {k: v for k, v in outcomes.items() if k != "ok"}
    assert errors_before_restart == 0, outcomes  # PAUSE only delays
    assert sum(errors.values()) <= 6 + 20, outcomes  # bounded: a few per broken connection
    record_result(
        "12. PgBouncer PAUSE/RESUME and restart under load",
        {"workers": 20, "outcomes": dict(outcomes)},
        guarantee="bounded errors, then full service",
        headline=f"{outcomes['ok']} ok; errors {errors}",
        rerun="python -m pytest -q tests/test_scaleout.py -k restart_and_pause",
    )


def test_session_state_behind_a_transaction_pooler(
    make_pgbouncer: Callable[..., Any], make_pool: Factory
) -> None:
    bouncer = make_pgbouncer(pool_mode="transaction", default_pool_size=1)
    with pytest.raises(ValueError, match="relies on session state"):
        make_pool(bouncer.dsn(), pooler_mode="transaction", reset="session")
    pool = make_pool(bouncer.dsn(), pooler_mode="transaction", min_size=1, max_size=2)
    with pool.connection() as conn:
        conn.execute("SET LOCAL statement_timeout = '1234ms'")
        assert conn.execute("SHOW statement_timeout").fetchone() == ("1234ms",)
    with pool.connection() as conn:  # SET LOCAL ended with the transaction
        assert conn.execute("SHOW statement_timeout").fetchone() != ("1234ms",)
        assert conn.prepare_threshold is None  # psycopg will not prepare server-side
