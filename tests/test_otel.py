"""OpenTelemetry metrics (greenpool.otel) against the real server, read with the SDK's
in-memory reader."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gevent
import pytest
from flask import Flask
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from greenpool import GreenPool, PoolTimeout
from greenpool import otel as gp_otel
from tests.support.waiting import wait_for

Factory = Callable[..., GreenPool[Any]]
REPO = Path(__file__).resolve().parent.parent
POOL = "db.client.connection.pool.name"


class Reader:
    """An SDK meter provider with an in-memory reader; ``points()`` collects now."""

    def __init__(self) -> None:
        self.reader = InMemoryMetricReader()
        self.provider = MeterProvider(metric_readers=[self.reader])

    def metrics(self) -> dict[str, Any]:
        data = self.reader.get_metrics_data()
        found: dict[str, Any] = {}
        if data is None:
            return found
        for resource in data.resource_metrics:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    found[metric.name] = metric
        return found

    def points(self, pool_name: str) -> dict[str, list[Any]]:
        """Instrument name -> data points of ``pool_name``."""
        return {
            name: [p for p in metric.data.data_points if p.attributes.get(POOL) == pool_name]
            for name, metric in self.metrics().items()
        }


@pytest.fixture
def otel() -> Any:
    reader = Reader()
    yield reader
    reader.provider.shutdown()


def value(points: list[Any], **attributes: str) -> float:
    [point] = [p for p in points if all(p.attributes.get(k) == v for k, v in attributes.items())]
    return float(point.value)


def test_semconv_instruments_follow_the_pool(make_pool: Factory, otel: Reader) -> None:
    pool = make_pool(min_size=1, max_size=2, timeout=5)
    handle = gp_otel.instrument(pool, otel.provider)
    assert gp_otel.instrument(pool, otel.provider) is handle  # once per provider
    pool.wait(10)
    a = pool.getconn()
    b = pool.getconn()
    waiter = gevent.spawn(pool.getconn, 5)
    wait_for(lambda: pool.stats()["waiting"] == 1)

    busy = otel.points(pool.name)
    count = busy["db.client.connection.count"]
    assert value(count, **{"db.client.connection.state": "used"}) == 2
    assert value(count, **{"db.client.connection.state": "idle"}) == 0
    assert value(busy["db.client.connection.pending_requests"]) == 1
    assert value(busy["db.client.connection.max"]) == 2
    assert value(busy["db.client.connection.idle.max"]) == 2
    assert value(busy["db.client.connection.idle.min"]) == 0
    assert value(busy["db.client.connection.timeouts"]) == 0

    gevent.sleep(0.15)  # the waiter waits, a and b are held
    pool.putconn(a)
    pool.putconn(waiter.get(timeout=5))
    pool.putconn(b)

    stats = pool.stats()
    points = otel.points(pool.name)
    count = points["db.client.connection.count"]
    assert value(count, **{"db.client.connection.state": "idle"}) == stats["idle"] == 2
    assert value(count, **{"db.client.connection.state": "used"}) == 0
    assert value(points["db.client.connection.pending_requests"]) == 0
    [wait] = points["db.client.connection.wait_time"]
    [use] = points["db.client.connection.use_time"]
    [create] = points["db.client.connection.create_time"]
    assert wait.count == stats["acquire_count"] == 3  # a, b and the waiter
    assert wait.max >= 0.14  # the waiter waited through the sleep
    assert use.count == stats["returns_count"] == 3
    assert use.max >= 0.14  # a was held through it
    assert create.count == stats["new_conns_count"] == 2
    assert 0 < create.min <= create.max < 10
    assert list(wait.explicit_bounds) == list(gp_otel.BUCKETS)  # seconds, not the SDK's ms
    metrics = otel.metrics()
    assert metrics["db.client.connection.wait_time"].unit == "s"
    assert metrics["db.client.connection.count"].unit == "{connection}"
    assert metrics["db.client.connection.pending_requests"].unit == "{request}"
    assert metrics["db.client.connection.timeouts"].unit == "{timeout}"

    held = [pool.getconn(), pool.getconn()]
    with pytest.raises(PoolTimeout):
        pool.getconn(timeout=0.05)
    # Read and close without yielding to the hub: the maintenance greenlet never sees the
    # timeout, so no "exhausted" error record is logged.
    timeouts = value(otel.points(pool.name)["db.client.connection.timeouts"])
    assert timeouts == pool.stats()["timeout_count"] == 1
    pool.close(timeout=0)
    for conn in held:
        pool.putconn(conn)
    assert otel.points(pool.name).get("db.client.connection.count", []) == []  # closed

    handle.remove()
    after = otel.points(pool.name)
    assert [p.count for p in after["db.client.connection.wait_time"]] == [5]
    assert handle not in gp_otel._meters[id(otel.provider)].pools.values()
    assert pool.tracers.on_acquire == pool.tracers.on_release == pool.tracers.on_connect == []


def test_pools_are_told_apart_and_closed_ones_drop_out(make_pool: Factory, otel: Reader) -> None:
    first = make_pool(min_size=1, max_size=3)
    second = make_pool(min_size=2, max_size=4, min_idle=1)
    for pool in (first, second):
        gp_otel.instrument(pool, otel.provider, attributes={"service.instance.id": "w1"})
        pool.wait(10)
    with first.connection():
        one = otel.points(first.name)
        two = otel.points(second.name)
    assert value(one["db.client.connection.count"], **{"db.client.connection.state": "used"}) == 1
    assert value(two["db.client.connection.count"], **{"db.client.connection.state": "used"}) == 0
    assert value(one["db.client.connection.max"]) == 3
    assert value(two["db.client.connection.max"]) == 4
    assert value(two["db.client.connection.idle.min"]) == 1
    assert one["db.client.connection.max"][0].attributes["service.instance.id"] == "w1"
    second.close()
    assert otel.points(second.name).get("db.client.connection.count", []) == []
    assert otel.points(first.name)["db.client.connection.count"]


def test_a_pool_nobody_instruments_pays_nothing_and_imports_nothing(make_pool: Factory) -> None:
    pool = make_pool(min_size=1, max_size=1)
    with pool.connection():
        pass
    assert "getconn" not in vars(pool) and "_release" not in vars(pool)
    assert pool._connector.tracers is None
    code = (
        "import sys, greenpool\n"
        "p = greenpool.GreenPool('host=127.0.0.1 port=1', open=False)\n"
        "print(sorted(m for m in ('opentelemetry', 'prometheus_client') if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_without_histograms_the_borrow_path_stays_untraced(
    make_pool: Factory, otel: Reader
) -> None:
    pool = make_pool(min_size=1, max_size=2)
    gp_otel.instrument(pool, otel.provider, histograms=False)
    pool.wait(10)
    with pool.connection():
        points = otel.points(pool.name)
    assert "getconn" not in vars(pool) and "_release" not in vars(pool)
    used = {"db.client.connection.state": "used"}
    assert value(points["db.client.connection.count"], **used) == 1
    assert "db.client.connection.wait_time" not in points
    assert [p.count for p in points["db.client.connection.create_time"]] == [1]


def test_a_connect_tracer_alone_leaves_the_borrow_path_alone(make_pool: Factory) -> None:
    pool = make_pool(min_size=2, max_size=2, open=False)
    seen: list[float] = []
    remove = pool.tracers.add(on_connect=lambda p, c, s: seen.append(s))
    assert "getconn" not in vars(pool)
    pool.open()
    pool.wait(10)
    wait_for(lambda: len(seen) == 2)
    assert all(0 < s < 10 for s in seen)
    remove()
    pool.reconnect_all()
    wait_for(lambda: pool.stats()["new_conns_count"] == 4)
    assert len(seen) == 2


def test_flask_key_instruments_the_apps_pools(dsn: str, otel: Reader) -> None:
    from greenpool.flask import GreenPool as FlaskGreenPool

    app = Flask("oteltest")
    name = f"gpo-{uuid.uuid4().hex[:8]}"
    app.config.update(GREENPOOL_CONNINFO=dsn, GREENPOOL_NAME=name, GREENPOOL_MAX_SIZE=2)
    app.config["GREENPOOL_OTEL"] = otel.provider
    db: FlaskGreenPool[Any] = FlaskGreenPool(app)

    @app.get("/db")
    def use_db() -> Any:
        return {"one": db.conn.execute("SELECT 1").fetchone()[0]}

    try:
        client = app.test_client()
        for _ in range(3):
            assert client.get("/db").status_code == 200
        points = otel.points(name)
        assert [p.count for p in points["db.client.connection.wait_time"]] == [3]
        assert [p.count for p in points["db.client.connection.use_time"]] == [3]
        assert value(points["db.client.connection.max"]) == 2
    finally:
        db.close(app=app)
    with pytest.raises(Exception, match="GREENPOOL_OTEL"):
        other = Flask("bad")
        other.config.update(GREENPOOL_CONNINFO=dsn, GREENPOOL_OTEL="maybe")
        FlaskGreenPool(other)
