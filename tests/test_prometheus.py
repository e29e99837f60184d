"""Prometheus metrics in one process (greenpool.prometheus, the Flask endpoint) and the
Grafana dashboard's queries against what they export. Real server, real
prometheus_client; the multi-worker scrape is in test_metrics_gunicorn.py."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import gevent
import pytest
from flask import Flask
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from greenpool import GreenPool, prometheus
from greenpool.flask import GreenPool as FlaskGreenPool
from greenpool.flask import GreenPoolCollector, stats_blueprint
from greenpool.stats import COUNTERS, GAUGES, HISTOGRAMS
from tests.support import dashboard

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
    for stat in (*GAUGES, *COUNTERS, *HISTOGRAMS):
        assert stat.metric in families, stat


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
    for stat in (*GAUGES, *HISTOGRAMS):
        assert f"`{stat.metric}`" in text, stat
    for stat in COUNTERS:
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
