"""Prometheus metrics in one process (greenpool.prometheus, the Flask endpoint) and the
Grafana dashboard's queries against what they export. Real server, real
prometheus_client; the multi-worker scrape is in test_metrics_gunicorn.py."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import gevent
import psycopg
import pytest
from flask import Flask
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from greenpool import GreenPool, prometheus
from greenpool.flask import GreenPool as FlaskGreenPool
from greenpool.flask import GreenPoolCollector, stats_blueprint
from greenpool.stats import COUNTERS, GAUGES, HISTOGRAMS, HOST_STATS, REPLICA_STATS
from tests.support import dashboard
from tests.support.waiting import wait_for

Factory = Callable[..., GreenPool[Any]]
SLOW = 0.12


def samples(text: str) -> list[Any]:
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def pick(found: list[Any], name: str, **labels: str) -> list[Any]:
    return [
        s for s in found if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]


def one(found: list[Any], name: str, **labels: str) -> float:
    [sample] = pick(found, name, **labels)
    return float(sample.value)


def make_app(dsn: str, **config: Any) -> tuple[Flask, Any]:
    app = Flask("promtest")
    app.config.update(
        GREENPOOL_CONNINFO=dsn,
        GREENPOOL_NAME=f"gpp-{uuid.uuid4().hex[:8]}",
        GREENPOOL_MIN_SIZE=0,
        GREENPOOL_MAX_SIZE=2,
        GREENPOOL_TIMEOUT=5,
    )
    app.config.update(config)
    db: FlaskGreenPool[Any] = FlaskGreenPool(app)

    @app.get("/db")
    def use_db() -> Any:
        return {"one": db.conn.execute("SELECT 1").fetchone()[0]}

    @app.get("/slow")
    def slow() -> Any:
        db.conn.execute("SELECT 1")
        gevent.sleep(SLOW)  # holds the connection
        return {"ok": True}

    return app, db


@pytest.fixture
def apps(dsn: str) -> Iterator[Callable[..., tuple[Flask, Any]]]:
    made: list[tuple[Flask, Any]] = []

    def factory(**config: Any) -> tuple[Flask, Any]:
        app, db = make_app(dsn, **config)
        made.append((app, db))
        return app, db

    yield factory
    for app, db in made:
        db.close(app=app)


def test_flask_endpoint_has_wait_and_hold_histograms(apps: Any) -> None:
    app, db = apps()
    app.register_blueprint(stats_blueprint(public=True), url_prefix="/_greenpool")
    client = app.test_client()
    for _ in range(5):
        assert client.get("/db").status_code == 200
    jobs = [gevent.spawn(client.get, "/slow") for _ in range(3)]  # 3 requests, 2 connections
    gevent.joinall(jobs, timeout=10, raise_error=True)
    stats = db.get_pool(app=app).stats()
    name = app.config["GREENPOOL_NAME"]

    found = samples(client.get("/_greenpool/metrics").get_data(as_text=True))
    labels = {"database": "default", "pool": name}
    assert one(found, "greenpool_acquire_wait_seconds_count", **labels) == 8
    assert one(found, "greenpool_hold_seconds_count", **labels) == 8 == stats["returns_count"]
    assert one(found, "greenpool_acquires_total", **labels) == stats["acquire_count"] == 8
    # three requests held for SLOW seconds, five for less than 50 ms
    assert one(found, "greenpool_hold_seconds_bucket", le="0.1", **labels) == 5
    assert one(found, "greenpool_hold_seconds_bucket", le="+Inf", **labels) == 8
    assert one(found, "greenpool_hold_seconds_sum", **labels) >= 3 * SLOW
    # the third slow request waited for one of the first two: about SLOW
    assert one(found, "greenpool_acquire_wait_seconds_bucket", le="0.05", **labels) == 7
    assert one(found, "greenpool_acquire_wait_seconds_sum", **labels) >= SLOW * 0.8
    gauges = pick(found, "greenpool_connections_idle", **labels)
    assert [s.labels["pid"] for s in gauges] == [str(os.getpid())]


def test_histograms_stay_off_when_asked_and_without_the_blueprint(apps: Any) -> None:
    off, off_db = apps(GREENPOOL_PROMETHEUS=False)
    off.register_blueprint(stats_blueprint(public=True), url_prefix="/_greenpool")
    plain, plain_db = apps()  # no blueprint, no collector: nothing on the borrow path
    for app in (off, plain):
        assert app.test_client().get("/db").status_code == 200
    for app, db in ((off, off_db), (plain, plain_db)):
        pool = db.get_pool(app=app)
        assert "getconn" not in vars(pool), app.config["GREENPOOL_NAME"]
    found = samples(off.test_client().get("/_greenpool/metrics").get_data(as_text=True))
    assert one(found, "greenpool_acquires_total") == 1
    assert pick(found, "greenpool_acquire_wait_seconds_count") == []

    on, on_db = apps(GREENPOOL_PROMETHEUS=True)  # no blueprint needed
    on.test_client().get("/db")
    assert "getconn" in vars(on_db.get_pool(app=on))


def test_collector_registered_late_turns_histograms_on(apps: Any) -> None:
    app, _db = apps()
    client = app.test_client()
    client.get("/db")  # before: not recorded
    registry = CollectorRegistry()
    registry.register(GreenPoolCollector(app))
    client.get("/db")
    client.get("/db")
    found = samples(generate_latest(registry).decode())
    assert one(found, "greenpool_acquires_total") == 3
    assert one(found, "greenpool_acquire_wait_seconds_count") == 2


def test_core_instrument_without_flask(make_pool: Factory) -> None:
    pool = make_pool(min_size=1, max_size=2)
    other = make_pool(min_size=1, max_size=1)
    handle = prometheus.instrument(pool, database="orders")
    assert prometheus.instrument(pool) is handle
    assert len(handle._buffers) == 2  # observations batched, not one lock per bucket
    with pytest.raises(TypeError, match="wants a pool"):
        prometheus.instrument("not a pool")  # type: ignore[arg-type]
    pool.wait(10)
    for _ in range(4):
        with pool.connection() as conn:
            conn.execute("SELECT 1")
    with other.connection():
        pass
    registry = CollectorRegistry()
    registry.register(prometheus.PoolCollector())
    found = samples(generate_latest(registry).decode())
    assert one(found, "greenpool_acquire_wait_seconds_count", pool=pool.name) == 4
    assert one(found, "greenpool_acquires_total", pool=pool.name, database="orders") == 4
    assert pick(found, "greenpool_acquires_total", pool=other.name) == []  # not instrumented

    prometheus.instrument(other)
    with other.connection():
        pass
    only = CollectorRegistry()  # a collector of one pool shows that pool's series alone
    only.register(prometheus.PoolCollector(lambda: [("orders", pool)]))
    found = samples(generate_latest(only).decode())
    assert {s.labels["pool"] for s in found} == {pool.name}
    assert one(found, "greenpool_hold_seconds_count", pool=pool.name) == 4
    handle.remove()
    with pool.connection():
        pass
    found = samples(generate_latest(registry).decode())
    assert [s for s in found if s.labels.get("pool") == pool.name] == []
    assert "getconn" in vars(pool)  # the wrapper stays (with no tracer in it)
    assert pool.tracers.on_acquire == [] and pool.tracers.on_release == []


def test_every_stat_key_is_exported_once(apps: Any) -> None:
    app, _db = apps()
    app.register_blueprint(stats_blueprint(public=True), url_prefix="/_greenpool")
    client = app.test_client()
    client.get("/db")
    text = client.get("/_greenpool/metrics").get_data(as_text=True)
    families = [f.name for f in text_string_to_metric_families(text)]
    assert len(families) == len(set(families)), families
    for stat in (*GAUGES, *COUNTERS, *HISTOGRAMS, *HOST_STATS, *REPLICA_STATS):
        assert stat.metric in families, stat


# ---------------------------------------------------------------------------- hosts, replicas


def closed_port() -> int:
    """A loopback port nothing listens on (connections to it are refused at once)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def two_hosts(dsn: str) -> tuple[str, str, str]:
    """(conninfo listing a dead loopback port first, then the test server; the dead
    host's label; the server's label), labels as ``stats()["hosts"]`` keys them."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    params = conninfo_to_dict(dsn)
    host, port = str(params.get("host") or "127.0.0.1"), str(params.get("port") or 5432)
    dead = closed_port()
    conninfo = make_conninfo(dsn, host=f"127.0.0.1,{host}", port=f"{dead},{port}")
    return conninfo, f"127.0.0.1:{dead}", f"{host}:{port}"


def scrape(*rows: tuple[str, GreenPool[Any]]) -> list[Any]:
    registry = CollectorRegistry()
    registry.register(prometheus.PoolCollector((lambda: list(rows)) if rows else None))
    return samples(generate_latest(registry).decode())


def test_per_host_series_after_borrows_through_two_hosts(dsn: str, make_pool: Factory) -> None:
    conninfo, dead, live = two_hosts(dsn)
    # check_idle_after=0: pool.check() below pings every idle connection.
    pool = make_pool(conninfo, min_size=0, max_size=3, connect_timeout=2, check_idle_after=0)
    prometheus.instrument(pool, database="orders")
    held = [pool.getconn() for _ in range(2)]  # two connects, each refused by dead first
    for conn in held:
        pool.putconn(conn)
    for _ in range(5):  # served from the idle connections: no more connects
        with pool.connection() as conn:
            conn.execute("SELECT 1")
    before = time.time()
    hosts = pool.stats()["hosts"]
    assert hosts[live]["connections"] == 2 and hosts[dead]["connect_errors"] == 2, hosts

    found = scrape()
    mine = {"pool": pool.name, "database": "orders", "pid": str(os.getpid())}
    assert one(found, "greenpool_host_connections", host=live, role="primary", **mine) == 2
    assert one(found, "greenpool_host_connections", host=dead, role="unknown", **mine) == 0
    assert one(found, "greenpool_host_connect_errors_total", host=dead, **mine) == 2
    assert one(found, "greenpool_host_connect_errors_total", host=live, **mine) == 0
    changed = one(found, "greenpool_host_last_role_change_timestamp_seconds", host=live, **mine)
    assert changed == hosts[live]["last_role_change"] and before - 60 < changed <= before
    # the dead host's role was never seen: no sample (not a 0, which would read as 1970)
    assert pick(found, "greenpool_host_last_role_change_timestamp_seconds", host=dead) == []
    # every connect succeeded on the second host: no pool-level connect error
    assert one(found, "greenpool_connect_errors_total", **mine) == 0
    assert [s for s in found if s.name.startswith("greenpool_replica_")] == []
    extra = {"greenpool_host_connections": {"host", "role"}}
    for s in found:
        if s.name.startswith("greenpool_host_"):
            assert set(s.labels) == {*mine, *extra.get(s.name, {"host"})}, s
            assert s.labels["host"] in (dead, live)  # a host:port, never a conninfo

    held = [pool.getconn() for _ in range(3)]  # a third connect: dead refuses it again
    found = scrape()
    for conn in held:
        pool.putconn(conn)
    assert one(found, "greenpool_host_connections", host=live, role="primary", **mine) == 3
    assert one(found, "greenpool_host_connect_errors_total", host=dead, **mine) == 3

    # Two backends terminated on the server: each connection is found dead once (one by
    # its borrower's failed query, one by the health check) and counted on its host.
    assert pool.stats()["hosts"][live]["broken_connections"] == 0
    victim = pool.getconn()
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (victim.info.backend_pid,))
        with pytest.raises(psycopg.OperationalError):
            victim.execute("SELECT 1")
        pool.putconn(victim)
        idle = pool.getconn()
        pid = idle.info.backend_pid
        pool.putconn(idle)
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    pool.check()  # pings the idle connections now (the maintenance greenlet may too)
    wait_for(lambda: pool.stats()["broken_destroy_count"] == 2, 10, what="both found dead")
    stats = pool.stats()
    assert stats["hosts"][live]["broken_connections"] == 2, stats["hosts"]
    assert stats["hosts"][dead]["broken_connections"] == 0
    assert stats["broken_destroy_count"] == 2
    found = scrape()
    assert one(found, "greenpool_host_broken_connections_total", host=live, **mine) == 2
    assert one(found, "greenpool_host_broken_connections_total", host=dead, **mine) == 0


MULTIPROCESS_SCRIPT = textwrap.dedent("""
    from gevent import monkey; monkey.patch_all()
    import json, sys
    from greenpool import GreenPool, prometheus
    conninfo, live = sys.argv[1:3]
    pool = GreenPool(conninfo, name="gpp-mp", min_size=0, max_size=3, connect_timeout=2)
    prometheus.instrument(pool, database="orders")
    held = [pool.getconn() for _ in range(2)]
    for conn in held:
        pool.putconn(conn)
    scrapes = [prometheus.generate_latest()[0].decode()]
    pool.hosts.hosts[live].role = "read-only"  # as if it had been demoted
    scrapes.append(prometheus.generate_latest()[0].decode())
    pool.close()
    scrapes.append(prometheus.generate_latest()[0].decode())
    print(json.dumps(scrapes))
""")


def test_per_host_series_in_multiprocess_mode(dsn: str, tmp_path: Any) -> None:
    """In the shared files (one worker here): gauges per pid, counters advanced by what
    happened since the last copy, a former role's series at 0, unknown figures NaN."""
    conninfo, dead, live = two_hosts(dsn)
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    run = subprocess.run(
        [sys.executable, "-c", MULTIPROCESS_SCRIPT, conninfo, live],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    first, demoted, closed = (samples(text) for text in json.loads(run.stdout))
    mine = {"pool": "gpp-mp", "database": "orders"}
    [pid] = {s.labels["pid"] for s in pick(first, "greenpool_host_connections")}

    def host_gauges(found: list[Any], host: str) -> dict[str, float]:
        return {
            s.labels["role"]: s.value
            for s in pick(found, "greenpool_host_connections", host=host, pid=pid, **mine)
        }

    assert host_gauges(first, live) == {"primary": 2}
    assert host_gauges(first, dead) == {"unknown": 0}
    assert host_gauges(demoted, live) == {"primary": 0, "read-only": 2}
    assert host_gauges(closed, live) == {"primary": 0, "read-only": 0}
    for found in (first, demoted, closed):  # summed over the workers: no pid label
        assert one(found, "greenpool_host_connect_errors_total", host=dead, **mine) == 2
        assert one(found, "greenpool_host_connect_errors_total", host=live, **mine) == 0
    stamp = "greenpool_host_last_role_change_timestamp_seconds"
    assert one(first, stamp, host=live, pid=pid, **mine) > 0
    assert pick(first, stamp, host=dead) == []
    assert math.isnan(one(closed, stamp, host=live, pid=pid, **mine))


@pytest.mark.slow
def test_replica_series(standby_pair: tuple[Any, Any], make_pool: Factory) -> None:
    from tests.support.waiting import wait_for

    primary, standby = standby_pair
    pool = make_pool(
        primary.dsn(), min_size=1, max_size=3, replicas=[standby.dsn()],
        max_replica_lag=5.0, replica_check_period=0.1,
    )  # fmt: skip
    prometheus.instrument(pool)
    pool.wait(10)
    wait_for(lambda: pool.stats()["replicas"][0]["healthy"], 10, what="replica measured")
    for _ in range(3):
        with pool.connection(read_only=True) as conn:
            conn.execute("SELECT 1")
    held = pool.getconn(read_only=True)
    try:
        found = scrape()
        [replica] = pool.stats()["replicas"]
    finally:
        pool.putconn(held)
    mine = {"pool": pool.name, "replica": replica["name"], "database": "default"}
    assert replica["name"] == f"{pool.name}-replica0"
    assert one(found, "greenpool_replica_healthy", **mine) == 1
    lag = one(found, "greenpool_replica_lag_seconds", **mine)
    assert replica["lag_seconds"] is not None and 0 <= lag <= 5.0
    assert one(found, "greenpool_replica_served_total", **mine) == replica["served"] == 4
    assert one(found, "greenpool_replica_acquired", **mine) == replica["acquired"] == 1
    replica_samples = [s for s in found if s.name.startswith("greenpool_replica_")]
    assert len(replica_samples) == 4
    for s in replica_samples:
        assert set(s.labels) == {*mine, "pid"}, s  # no conninfo, no error text
    standby.stop()
    wait_for(lambda: not pool.stats()["replicas"][0]["healthy"], 10, what="replica marked down")
    assert one(scrape(), "greenpool_replica_healthy", **mine) == 0


# ---------------------------------------------------------------------------- dashboard


def test_dashboard_queries_name_only_exported_metrics(apps: Any) -> None:
    board = dashboard.load()
    assert board["panels"] and board["templating"]["list"]
    found = dashboard.queries(board)
    assert len(found) >= 20
    exprs = " ".join(expr for _, expr in found)
    needed = (
        "greenpool_connections_idle", "greenpool_waiting", "pid",
        "greenpool_acquire_wait_seconds_bucket", "greenpool_hold_seconds_bucket",
        "greenpool_acquire_timeouts_total", "greenpool_connect_errors_total",
    )  # fmt: skip
    for name in needed:
        assert name in exprs, name

    app, _db = apps()
    app.register_blueprint(stats_blueprint(public=True), url_prefix="/_greenpool")
    client = app.test_client()
    for _ in range(3):
        client.get("/db")
    exported = dashboard.exported(client.get("/_greenpool/metrics").get_data(as_text=True))
    assert dashboard.problems(board, exported) == []


def test_the_dashboard_check_catches_a_wrong_name() -> None:
    exprs = [
        'sum by (pool) (rate(greenpool_acquire_total{pool=~"$pool"}[$__rate_interval]))',
        "sum by (pool, pid) (greenpool_hold_seconds_count)",
        "histogram_quantile(0.99, sum by (pool, le) (rate(greenpool_hold_seconds_bucket[5m])))",
    ]
    targets = [{"refId": ref, "expr": expr} for ref, expr in zip("ABC", exprs, strict=True)]
    board = {"panels": [{"title": "t", "targets": targets}]}
    exported = {
        "greenpool_acquires_total": {"pool", "pid", "database"},
        "greenpool_hold_seconds_count": {"pool", "database"},
        "greenpool_hold_seconds_bucket": {"pool", "database", "le"},
    }
    assert dashboard.problems(board, exported) == [
        "panel 't' A: greenpool_acquire_total is not exported",
        "panel 't' B: greenpool_hold_seconds_count has no label ['pid']",
    ]
    assert dashboard.names("label_values(greenpool_max_size, pool)") == (
        {"greenpool_max_size"},
        {"pool"},
    )


def test_operations_doc_lists_every_exported_metric() -> None:
    text = (dashboard.DASHBOARD.parents[1] / "docs" / "operations.md").read_text()
    for stat in (*GAUGES, *HISTOGRAMS, *HOST_STATS, *REPLICA_STATS):
        if stat.kind != "counter":
            assert f"`{stat.metric}`" in text, stat
    for stat in (*COUNTERS, *HOST_STATS, *REPLICA_STATS):
        if stat.kind == "counter":
            assert f"`{stat.metric}_total`" in text, stat
    assert "`greenpool_connections_closed_total`" in text


def test_batched_observations_land_in_the_buckets_prometheus_client_would_pick() -> None:
    from prometheus_client import Histogram

    from greenpool.prometheus import BUCKETS, _buffered

    values = [0.0, 0.00005, *BUCKETS, *(b * 1.01 for b in BUCKETS), 31.0, 1e6]
    direct = Histogram("direct", "d", buckets=BUCKETS, registry=None)
    batched = Histogram("batched", "b", buckets=BUCKETS, registry=None)
    buffer = _buffered(batched)
    assert buffer is not None
    for value in values:
        direct.observe(value)
        buffer.observe(value)
    buffer.flush()
    buffer.flush()  # nothing twice

    def figures(histogram: Any) -> list[tuple[str, str | None, float]]:
        return [
            (s.name.split("_")[-1], s.labels.get("le"), s.value)
            for family in histogram.collect()
            for s in family.samples
            if not s.name.endswith("_created")
        ]

    assert figures(batched) == figures(direct)
